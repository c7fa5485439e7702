"""fit warns when the weights are not at a minimum of the objective it assumes."""

import copy
import warnings

import pytest
import torch
from _models import tiny_problem

from skmsif import MultiStageInfluenceEstimator, StationarityWarning

torch.set_num_threads(1)
DAMPING, ALPHA = 1e-2, 0.1


def _train(params, objective):
    optimiser = torch.optim.LBFGS(params, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=0, history_size=50,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        value = objective()
        value.backward()
        return value

    for _ in range(3):
        optimiser.step(closure)
    for p in params:
        p.grad = None


def trained_problem(case, weight_decay):
    """Both stages trained to convergence with L2 ``weight_decay`` (alpha in Case 2)."""
    pretrain, finetune, Z, X, x_test = tiny_problem(case)
    ce = torch.nn.functional.cross_entropy

    def l2(params):
        return weight_decay / 2 * sum((p * p).sum() for p in params)

    pre_params = list(pretrain.parameters())
    _train(pre_params, lambda: ce(pretrain(Z[0]), Z[1]) + l2(pre_params))
    if case == "fixed":
        shared = {id(p) for p in pretrain.parameters()}
        head = [p for p in finetune.parameters() if id(p) not in shared]
        _train(head, lambda: ce(finetune(X[0]), X[1]) + l2(head))
    else:
        with torch.no_grad():
            for target, source in zip(finetune[0].parameters(), pretrain[0].parameters()):
                target.copy_(source)
        anchors = [p.detach().clone() for p in pretrain[0].parameters()]
        fin_params = list(finetune.parameters())

        def objective():
            proximity = sum(((w - a) ** 2).sum()
                            for w, a in zip(finetune[0].parameters(), anchors))
            return ce(finetune(X[0]), X[1]) + l2(fin_params) + ALPHA * proximity

        _train(fin_params, objective)
    for parameter in [*pretrain.parameters(), *finetune.parameters()]:
        parameter.grad = None  # the finetune backward reached the shared embedding too
    return pretrain, finetune, Z, X


def _fit(case, problem):
    estimator = MultiStageInfluenceEstimator(
        embedding=case, alpha=ALPHA, pretrain_damping=DAMPING, finetune_damping=DAMPING,
        shared=None if case == "fixed" else "0")
    return estimator.fit(*problem)


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_no_warning_at_a_minimum_of_the_assumed_objective(case):
    problem = trained_problem(case, weight_decay=DAMPING)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StationarityWarning)
        estimator = _fit(case, problem)
    for stage in ("pretrain", "finetune"):
        assert estimator.stationarity_[stage]["relative"] < 1e-4


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_a_weight_decay_other_than_the_damping_is_reported(case):
    problem = trained_problem(case, weight_decay=10 * DAMPING)
    with pytest.warns(StationarityWarning, match="pretrain weights.*damping") as record:
        estimator = _fit(case, problem)
    assert any("finetune weights" in str(w.message) for w in record)
    assert estimator.stationarity_["pretrain"]["relative"] > 0.5


def test_the_users_models_are_untouched_by_the_check():
    pretrain, finetune, Z, X = trained_problem("fixed", DAMPING)
    before = copy.deepcopy([p.detach() for p in pretrain.parameters()])
    _fit("fixed", (pretrain, finetune, Z, X))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, pretrain.parameters()))
    assert all(p.grad is None for p in pretrain.parameters())

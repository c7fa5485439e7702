"""Leave-one-out ground truth (``skmsif.validation``) against independent references.

Notation: ``shared/design/MATH.md``. ``W`` is the shared embedding (prefix ``"0"`` of both
``nn.Sequential`` models), ``U`` the pretrain head, ``Theta`` the finetune head.

The independent reference is the multi-stage influence built here from dense Hessians
(``torch.autograd.functional.hessian`` of flat-vector objectives, ``torch.linalg.solve``)
at weights trained here to ``|grad| < 1e-12``; it does not use the package. The harness
must reproduce it as a derivative (central differences of its ``epsilon`` upweighting),
and its removals must follow ``-I / m`` to first order.
"""

import copy
import threading

import joblib
import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from sklearn.exceptions import ConvergenceWarning
from torch import nn
from torch.func import functional_call

from skmsif import validation
from skmsif.validation import audit_indices, faithfulness, leave_one_out

torch.set_num_threads(1)

DTYPE = torch.float64
N_INPUT, N_HIDDEN, N_PRETRAIN_CLASSES, N_FINETUNE_CLASSES = 3, 4, 3, 2
SETTINGS = {"pretrain_damping": 0.1, "finetune_damping": 0.1, "alpha": 0.1}
CASES = {"fixed": {"embedding": "fixed", "shared": None},
         "updated": {"embedding": "updated", "shared": "0"}}


# --------------------------------------------------------------------------- problems


def _linear(n_in, n_out, rng):
    layer = nn.Linear(n_in, n_out, dtype=DTYPE)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.normal(size=(n_out, n_in)) / np.sqrt(n_in)))
        layer.bias.copy_(torch.from_numpy(0.1 * rng.normal(size=n_out)))
    return layer


def make_problem(embedding, m=60, n=30, n_test=5, seed=0):
    """Untrained tiny models and teacher-labelled data with label noise."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=(N_INPUT, N_HIDDEN))

    def data(count, n_classes, head):
        inputs = rng.normal(size=(count, N_INPUT))
        logits = np.tanh(inputs @ teacher) @ head + rng.normal(size=(count, n_classes))
        return torch.from_numpy(inputs), torch.from_numpy(logits.argmax(1))

    Z = data(m, N_PRETRAIN_CLASSES, rng.normal(size=(N_HIDDEN, N_PRETRAIN_CLASSES)))
    finetune_head = rng.normal(size=(N_HIDDEN, N_FINETUNE_CLASSES))
    X = data(n, N_FINETUNE_CLASSES, finetune_head)
    x_test = data(n_test, N_FINETUNE_CLASSES, finetune_head)
    emb = nn.Sequential(_linear(N_INPUT, N_HIDDEN, rng), nn.Tanh())
    pretrain_model = nn.Sequential(emb, _linear(N_HIDDEN, N_PRETRAIN_CLASSES, rng))
    finetune_emb = emb if embedding == "fixed" else copy.deepcopy(emb)
    finetune_model = nn.Sequential(finetune_emb, _linear(N_HIDDEN, N_FINETUNE_CLASSES, rng))
    return {"embedding": embedding, "pretrain": pretrain_model, "finetune": finetune_model,
            "Z": Z, "X": X, "x_test": x_test}


class FlatLoss:
    """Per-example cross-entropy of ``model`` as a function of one flat vector holding
    all its parameters (in ``named_parameters`` order)."""

    def __init__(self, model, inputs, targets):
        self.model = model
        self.names = [name for name, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.inputs, self.targets = inputs, targets

    def current(self):
        return torch.cat([p.detach().reshape(-1) for p in self.model.parameters()])

    def index(self, prefix):
        """Coordinates of the parameters whose name starts with ``prefix + "."``."""
        start, picked = 0, []
        for name, shape in zip(self.names, self.shapes):
            size = int(torch.Size(shape).numel())
            if name.startswith(prefix + "."):
                picked.append(torch.arange(start, start + size))
            start += size
        return torch.cat(picked)

    def per_example(self, vector):
        pieces = torch.split(vector, [int(torch.Size(s).numel()) for s in self.shapes])
        params = {n: p.reshape(s) for n, p, s in zip(self.names, pieces, self.shapes)}
        outputs = functional_call(self.model, params, (self.inputs,))
        return nnf.cross_entropy(outputs, self.targets, reduction="none")

    def mean(self, vector):
        return self.per_example(vector).mean()

    def load(self, vector):
        with torch.no_grad():
            pieces = torch.split(vector, [int(torch.Size(s).numel()) for s in self.shapes])
            for p, piece in zip(self.model.parameters(), pieces):
                p.copy_(piece.reshape(p.shape))


def _minimise(objective, start):
    """L-BFGS, then Newton steps with the dense Hessian, to |grad| < 1e-12."""
    x = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-12,
                                  tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = objective(x)
        value.backward()
        return value

    optimizer.step(closure)
    x = x.detach()
    for _ in range(10):
        gradient = torch.func.grad(objective)(x)
        if gradient.abs().max() < 1e-13:
            break
        x = x - torch.linalg.solve(torch.autograd.functional.hessian(objective, x), gradient)
    assert torch.func.grad(objective)(x).abs().max() < 1e-12
    return x


def _stages(problem, pretrain_damping, finetune_damping, alpha):
    pre = FlatLoss(problem["pretrain"], *problem["Z"])
    fin = FlatLoss(problem["finetune"], *problem["X"])
    test = FlatLoss(problem["finetune"], *problem["x_test"])
    shared_pre, shared_fin = pre.index("0"), fin.index("0")
    theta = torch.tensor([i for i in range(len(fin.current())) if i not in set(
        shared_fin.tolist())])
    return pre, fin, test, shared_pre, shared_fin, theta


def train(problem, pretrain_damping, finetune_damping, alpha):
    """Train both stages of ``problem`` in place to tight optima of the objectives of
    ``leave_one_out``'s Notes (the weights the influence function assumes)."""
    pre, fin, _, shared_pre, shared_fin, theta = _stages(
        problem, pretrain_damping, finetune_damping, alpha)
    theta_p = _minimise(lambda v: pre.mean(v) + 0.5 * pretrain_damping * v.dot(v),
                        pre.current())
    pre.load(theta_p)
    phi = fin.current()
    w_bar = theta_p[shared_pre]
    if problem["embedding"] == "fixed":
        def finetune_objective(head):
            full = phi.clone()
            full[theta] = head
            full[shared_fin] = w_bar
            return fin.mean(full) + 0.5 * finetune_damping * head.dot(head)

        phi = phi.clone()
        phi[theta] = _minimise(finetune_objective, phi[theta])
    else:
        def finetune_objective(v):
            shift = v[shared_fin] - w_bar
            return (fin.mean(v) + alpha * shift.dot(shift)
                    + 0.5 * finetune_damping * v.dot(v))

        phi = _minimise(finetune_objective, phi)
    fin.load(phi)


def dense_influence(problem, pretrain_damping, finetune_damping, alpha):
    """Summed multi-stage influence ``I(z_i)`` (shape ``(m,)``) from dense Hessians,
    straight from MATH.md; asserts that both damped Hessians are positive definite."""
    pre, fin, test, shared_pre, shared_fin, theta = _stages(
        problem, pretrain_damping, finetune_damping, alpha)
    theta_p, phi = pre.current(), fin.current()
    a_g = torch.autograd.functional.hessian(pre.mean, theta_p)
    a_g += pretrain_damping * torch.eye(len(theta_p), dtype=DTYPE)
    h_f = torch.autograd.functional.hessian(fin.mean, phi)
    test_grad = torch.func.grad(lambda v: test.per_example(v).sum())(phi)
    if problem["embedding"] == "fixed":
        h_tt = h_f[theta][:, theta] + finetune_damping * torch.eye(len(theta), dtype=DTYPE)
        finetune_matrix = h_tt
        v1 = torch.linalg.solve(h_tt, test_grad[theta])
        w = test_grad[shared_fin] - h_f[shared_fin][:, theta] @ v1
    else:
        finetune_matrix = h_f + finetune_damping * torch.eye(len(phi), dtype=DTYPE)
        finetune_matrix[shared_fin, shared_fin] += 2 * alpha
        v1 = torch.linalg.solve(finetune_matrix, test_grad)
        w = 2 * alpha * v1[shared_fin]
    assert torch.linalg.eigvalsh(a_g)[0] > 0 and torch.linalg.eigvalsh(finetune_matrix)[0] > 0
    rhs = torch.zeros(len(theta_p), dtype=DTYPE)
    rhs[shared_pre] = w
    v2 = torch.linalg.solve(a_g, rhs)
    pretrain_grads = torch.autograd.functional.jacobian(pre.per_example, theta_p)
    return -(pretrain_grads @ v2).numpy()


def _args(problem):
    return (problem["pretrain"], problem["finetune"], problem["Z"], problem["X"],
            problem["x_test"])


def _kwargs(problem, **extra):
    return {**CASES[problem["embedding"]], **SETTINGS, **extra}


@pytest.fixture(scope="module", params=["fixed", "updated"])
def trained(request):
    problem = make_problem(request.param)
    train(problem, **SETTINGS)
    problem["influence"] = dense_influence(problem, **SETTINGS)
    return problem


@pytest.fixture(scope="module")
def removals(trained):
    """Leave-one-out of every pretrain example (converged recipe), with diagnostics."""
    m = len(trained["Z"][0])
    return leave_one_out(*_args(trained), np.arange(m), return_info=True, **_kwargs(trained))


# --------------------------------------------------------------------------- ground truth


def test_upweighting_derivative_matches_dense_influence(trained):
    """Central differences of the harness's epsilon-upweighting are the influence."""
    influence = trained["influence"]
    m = len(influence)
    indices = audit_indices(influence, n_top=3, n_random=2, random_state=0).indices
    step = 1e-4
    kwargs = _kwargs(trained, tol=1e-12)
    plus = leave_one_out(*_args(trained), indices, epsilon=step, **kwargs)
    minus = leave_one_out(*_args(trained), indices, epsilon=-step, **kwargs)
    derivative = (plus - minus) / (2 * step)
    error = np.abs(derivative - influence[indices]).max() / np.abs(influence[indices]).max()
    print(f"{trained['embedding']}: finite-difference derivative vs dense influence, "
          f"max relative error {error:.2e}")
    assert error < 1e-5

    # A fractional removal (5% of the example's weight) is first order in epsilon.
    epsilon = -0.05 / m
    fractional = leave_one_out(*_args(trained), indices, epsilon=epsilon, **kwargs)
    error = np.abs(fractional / epsilon - derivative).max() / np.abs(derivative).max()
    print(f"{trained['embedding']}: fractional removal / epsilon vs derivative, "
          f"max relative error {error:.2e}")
    assert error < 0.02


def test_removal_is_first_order_in_influence(trained, removals):
    change, info = removals
    m = len(change)
    assert info.converged.all() and info.reference.converged
    assert not info.from_cache.any()
    assert info.epsilon == -1 / m
    predicted = -trained["influence"] / m
    metrics = faithfulness(predicted, change)["all"]
    error = np.linalg.norm(change - predicted) / np.linalg.norm(predicted)
    print(f"{trained['embedding']}: removal vs -I/m over all {m}: pearson "
          f"{metrics['pearson']:.4f}, slope {metrics['slope']:.3f}, relative error {error:.3f}")
    assert metrics["pearson"] > 0.99
    assert 0.8 < metrics["slope"] < 1.25
    assert error < 0.25


def test_estimator_correlates_with_leave_one_out(trained, removals):
    """The package's estimator (exact Hessians, same dampings and alpha) predicts the
    retrained changes as ``-score / m``, on the top-|I| and on random examples."""
    from skmsif import MultiStageInfluenceEstimator

    change, _ = removals
    m = len(change)
    est = MultiStageInfluenceEstimator(hessian="exact", dtype="float64", **_kwargs(trained))
    scores = est.fit(*_args(trained)[:4]).score(trained["x_test"])
    audit = audit_indices(scores, n_top=10, n_random=10, random_state=0)
    metrics = faithfulness(-scores[audit.indices] / m, change[audit.indices],
                           groups=audit.groups)
    print(f"{trained['embedding']}: estimator vs leave-one-out " + ", ".join(
        f"{group}: pearson {v['pearson']:.4f} spearman {v['spearman']:.4f} "
        f"slope {v['slope']:.3f}" for group, v in metrics.items()))
    assert metrics["all"]["pearson"] > 0.95
    assert metrics["top"]["pearson"] > 0.95


def test_paper_recipe_with_full_batch_gradient_descent_approaches_converged(trained,
                                                                             removals):
    """Enough full-batch SGD steps from the optimum reach the perturbed optimum, so the
    "paper" recipe's removal (weight zero, same normalisation) is the converged one."""
    indices = np.array([1, 8, 30])
    change = leave_one_out(*_args(trained), indices, recipe="paper",
                           optimizer=torch.optim.SGD, lr=0.5, n_steps=400, batch_size=None,
                           **_kwargs(trained))
    np.testing.assert_allclose(change, removals[0][indices], rtol=1e-8)


# --------------------------------------------------------------------------- mechanics


def test_paper_recipe_reference_cancels_exactly(trained):
    kwargs = _kwargs(trained, recipe="paper", n_steps=(40, 20), batch_size=(16, 8), lr=1e-2,
                     random_state=0)
    unchanged, info = leave_one_out(*_args(trained), [2, 9], epsilon=0.0, return_info=True,
                                    **kwargs)
    assert np.array_equal(unchanged, np.zeros(2))
    assert info.pretrain_n_iter.tolist() == [40, 40]
    assert info.finetune_n_iter.tolist() == [20, 20]
    removal = leave_one_out(*_args(trained), [2, 9], **kwargs)
    assert np.all(removal != 0) and np.isfinite(removal).all()
    assert np.array_equal(removal, leave_one_out(*_args(trained), [2, 9], **kwargs))


def test_models_are_not_changed(trained):
    from _models import assert_unchanged, snapshot

    pretrain_model, finetune_model = copy.deepcopy((trained["pretrain"], trained["finetune"]))
    for model in (pretrain_model, finetune_model):
        for parameter in model.parameters():
            parameter.grad = torch.ones_like(parameter)
    pretrain_model.train()
    finetune_model.eval()
    finetune_model[0][0].weight.requires_grad_(False)  # for case 1, frozen in both models
    before = [snapshot(pretrain_model), snapshot(finetune_model)]
    problem = {**trained, "pretrain": pretrain_model, "finetune": finetune_model}
    for recipe in ("converged", "paper"):
        change = leave_one_out(*_args(problem), [0, 3], recipe=recipe, n_steps=5,
                               **_kwargs(trained))
        assert change.shape == (2,) and np.all(change != 0)
    assert_unchanged(pretrain_model, before[0])
    assert_unchanged(finetune_model, before[1])
    shared = finetune_model[0][0].weight is pretrain_model[0][0].weight
    assert shared == (trained["embedding"] == "fixed")


def test_parallel_and_repeated_indices_give_the_same_numbers(trained, removals):
    indices = [13, 0, 7, 13]
    change = leave_one_out(*_args(trained), indices, n_jobs=2, verbose=1, **_kwargs(trained))
    assert np.array_equal(change, removals[0][indices])


@pytest.mark.parametrize("trained", ["fixed"], indirect=True)
def test_fixed_embedding_matched_by_name_equals_shared_objects(trained, removals):
    """Case 1 with the finetune model holding an equal copy of W (shared="0"): the
    retrained pretrain W is copied into it, as if the objects were shared."""
    copied = copy.deepcopy(trained)
    copied["finetune"][0] = copy.deepcopy(copied["pretrain"][0])
    assert copied["finetune"][0][0].weight is not copied["pretrain"][0][0].weight
    change = leave_one_out(*_args(copied), [5, 21], **_kwargs(trained, shared="0"))
    np.testing.assert_allclose(change, removals[0][[5, 21]], rtol=1e-10)


def test_cache_serves_repeated_calls_without_retraining(trained, tmp_path, monkeypatch):
    first, info = leave_one_out(*_args(trained), [3, 5], return_info=True,
                                **_kwargs(trained, cache=tmp_path))
    assert not info.from_cache.any() and not info.reference.from_cache

    def no_retraining(*args, **kwargs):
        raise AssertionError("retrained although the result is cached")

    monkeypatch.setattr(validation._Problem, "retrain", no_retraining)
    memory = joblib.Memory(str(tmp_path), verbose=0)  # what cache=tmp_path uses
    second, info = leave_one_out(*_args(trained), [5, 3], return_info=True,
                                 **_kwargs(trained, cache=memory))
    assert info.from_cache.all() and info.reference.from_cache
    assert np.array_equal(second, first[::-1])
    # Other settings or other weights are other cache entries.
    with pytest.raises(AssertionError, match="retrained although"):
        leave_one_out(*_args(trained), [3], **_kwargs(trained, cache=memory, tol=1e-11))
    changed = copy.deepcopy(trained)
    with torch.no_grad():
        changed["finetune"][1].bias.add_(1e-3)
    with pytest.raises(AssertionError, match="retrained although"):
        leave_one_out(*_args(changed), [3], **_kwargs(trained, cache=memory))


@pytest.mark.parametrize("trained", ["fixed"], indirect=True)
def test_cache_identifies_callables_by_code_not_name(trained, tmp_path, monkeypatch):
    """The cache key uses the estimator's identity rules: two lambdas (one name,
    ``<lambda>``) that train differently are two entries; a callable holding an object
    with no identity by value disables the cache, with a warning, instead of serving
    another computation's retrain."""
    calls = []

    def retrain(self, index, epsilon):
        calls.append(index)
        return original(self, index, epsilon)

    original = validation._Problem.retrain
    monkeypatch.setattr(validation._Problem, "retrain", retrain)
    kwargs = _kwargs(trained, cache=tmp_path)
    leave_one_out(*_args(trained), [3], finetune_fn=lambda model, X, pre: None, **kwargs)
    assert calls == [None, 3]
    leave_one_out(*_args(trained), [3], finetune_fn=lambda model, X, pre: None, **kwargs)
    assert calls == [None, 3]  # the same code: served from the cache
    leave_one_out(*_args(trained), [3], finetune_fn=lambda model, X, pre: calls and None,
                  **kwargs)
    assert calls == [None, 3, None, 3]  # other code, same name: retrained
    lock = threading.Lock()  # no identity by value
    with pytest.warns(UserWarning, match="cache is not used.*cannot be identified"):
        leave_one_out(*_args(trained), [3], finetune_fn=lambda model, X, pre: lock and None,
                      **kwargs)
    assert calls[4:] == [None, 3]


def test_custom_stages_follow_the_documented_contract(trained):
    m = len(trained["Z"][0])
    calls = []

    def pretrain_fn(model, Z):
        assert not model.training and all(p.requires_grad for p in model.parameters())
        assert all(p.dtype == DTYPE for p in model.parameters())
        calls.append(("pretrain", len(Z[0]), len(Z[1])))

    def finetune_fn(model, X, pretrain_model):
        assert isinstance(pretrain_model, nn.Module) and len(X[0]) == len(trained["X"][0])
        calls.append(("finetune", {n: p.requires_grad for n, p in model.named_parameters()}))

    change, info = leave_one_out(*_args(trained), [4], pretrain_fn=pretrain_fn,
                                 finetune_fn=finetune_fn, return_info=True,
                                 **_kwargs(trained))
    assert [c[:2] for c in calls[::2]] == [("pretrain", m), ("pretrain", m - 1)]
    trainable = {n: trained["embedding"] == "updated" or not n.startswith("0.")
                 for n, _ in trained["finetune"].named_parameters()}
    assert calls[1] == ("finetune", trainable) and calls[3] == ("finetune", trainable)
    assert np.array_equal(change, [0.0])  # nothing was trained
    assert np.isnan(info.pretrain_grad_norm).all() and info.converged.all()


def test_non_converged_retrains_are_reported(trained):
    with pytest.warns(ConvergenceWarning,
                      match="2 of 2 leave-one-out retrains and the full-data reference"
                      ) as record:
        _, info = leave_one_out(*_args(trained), [0, 1], max_iter=1, tol=1e-15,
                                return_info=True, **_kwargs(trained))
    assert record[0].filename == __file__  # points at the caller
    assert not info.converged.any() and not info.reference.converged
    assert (info.pretrain_grad_norm > 1e-15).all()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "change, error, message",
    [
        ({"indices": [10]}, ValueError, r"out of range: Z has 10 examples.*\[0, 9\]"),
        ({"indices": [-1]}, ValueError, "out of range"),
        ({"indices": [0.5]}, TypeError, "indices must hold integers"),
        ({"indices": [[0, 1]]}, ValueError, "1-D"),
        ({"indices": []}, ValueError, "non-empty"),
        ({"recipe": "exact"}, ValueError, "'recipe' parameter"),
        ({"embedding": "frozen"}, ValueError, "'embedding' parameter"),
        ({"embedding": "updated", "shared": "0", "alpha": 0.0}, ValueError, "alpha > 0"),
        ({"epsilon": 0.1, "pretrain_fn": lambda model, Z: None}, ValueError, "epsilon=0.1"),
        ({"Z": np.zeros(3)}, TypeError, r"Z must be an \(inputs, targets\) pair"),
        ({"lr": (1e-3,)}, ValueError, r"lr=\(0.001,\) is not valid"),
        ({"n_steps": (5, -1)}, ValueError, "n_steps="),
        ({"cache": 3}, ValueError, "'cache' parameter"),
        ({"tol": 0}, ValueError, "'tol' parameter"),
        ({"x_test": (np.zeros((2, 4)), np.zeros(2, dtype=int))}, ValueError,
         "could not be evaluated on x_test"),
        ({"X": (np.zeros((3, 3)), np.array([0, 1, 5]))}, ValueError, r"labels .* \[0, 1\]"),
        ({"shared": "nope"}, ValueError, "'nope' matches no parameter"),
        ({"pretrain_model": "model"}, TypeError, "pretrain_model must be a torch.nn.Module"),
    ],
)
def test_bad_input_raises_naming_the_argument(change, error, message):
    problem = make_problem("fixed", m=10, n=6, n_test=2)
    args = dict(zip(["pretrain_model", "finetune_model", "Z", "X", "x_test"], _args(problem)))
    args["indices"] = [0]
    args.update(change)
    with pytest.raises(error, match=message):
        leave_one_out(**args)


# --------------------------------------------------------------------------- metrics


def test_faithfulness_metrics():
    actual = np.array([0.05, 0.1, -0.15, 0.2, 0.0])
    predicted = 2 * actual + np.array([0, 0, 0, 0, 0.01])
    metrics = faithfulness(predicted, actual, groups={"head": [0, 1, 2],
                                                      "mask": actual > 0, "one": [3]})
    assert set(metrics) == {"all", "head", "mask", "one"}
    assert metrics["all"]["n"] == 5 and metrics["mask"]["n"] == 3
    assert metrics["all"]["pearson"] > 0.99
    np.testing.assert_allclose(metrics["all"]["spearman"], 1.0)
    np.testing.assert_allclose(metrics["head"]["pearson"], 1.0)
    np.testing.assert_allclose(metrics["all"]["slope"], 2.0)
    np.testing.assert_allclose(metrics["all"]["median_ratio"], 2.0)  # a == 0 left out
    assert np.isnan(metrics["one"]["pearson"]) and metrics["one"]["slope"] == 2.0
    with pytest.raises(ValueError, match="same length"):
        faithfulness([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        faithfulness([1.0, np.nan], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"groups\['bad'\]"):
        faithfulness([1.0, 2.0], [1.0, 2.0], groups={"bad": [2]})


def test_audit_indices():
    scores = np.array([0.1, -3.0, 2.0, 0.0, 0.5, -0.7, 1.5, 0.2])
    audit = audit_indices(scores, n_top=3, n_random=3, random_state=0)
    assert audit.indices[:3].tolist() == [1, 2, 6]
    rest = audit.indices[audit.groups["random"]]
    assert len(set(rest)) == 3 and not set(rest) & {1, 2, 6}
    assert audit.groups["top"].tolist() == [0, 1, 2]
    again = audit_indices(scores, n_top=3, n_random=3, random_state=0)
    assert np.array_equal(audit.indices, again.indices)
    with pytest.raises(ValueError, match="1-D"):
        audit_indices(np.ones((2, 4)))
    with pytest.raises(ValueError, match="exceeds the 8 pretrain examples"):
        audit_indices(scores, n_top=5, n_random=4)

"""scikit-learn conventions, no mutation of the user's models, and clear errors."""

import copy
import re

import numpy as np
import pytest
import torch
from _models import assert_unchanged, snapshot, tiny_problem
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

from skmsif import MultiStageInfluenceEstimator


def _fit(case="fixed", **params):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem(case)
    if case == "updated":
        params.setdefault("shared", "0")
        params.setdefault("embedding", "updated")
    params.setdefault("finetune_damping", 1e-2)
    estimator = MultiStageInfluenceEstimator(**params)
    return estimator.fit(pretrain_model, finetune_model, Z, X), x_test


# ------------------------------------------------------------ conventions


def test_init_stores_parameters_and_clone_get_set_repr_work():
    estimator = MultiStageInfluenceEstimator(alpha=0.5, hessian="cg", shared=["0"])
    assert estimator.get_params()["alpha"] == 0.5
    assert estimator.get_params()["shared"] == ["0"]
    cloned = clone(estimator)
    assert cloned.get_params() == estimator.get_params()
    cloned.set_params(pretrain_damping=0.3)
    assert cloned.pretrain_damping == 0.3 and estimator.pretrain_damping == 1e-2
    assert re.search(r"MultiStageInfluenceEstimator\(.*alpha=0\.5", repr(estimator))


def test_not_fitted_error_before_fit():
    _, _, _, _, x_test = tiny_problem()
    with pytest.raises(NotFittedError):
        MultiStageInfluenceEstimator().influence(x_test)
    with pytest.raises(NotFittedError):
        MultiStageInfluenceEstimator().score(x_test)


def test_fit_returns_self_and_sets_fitted_attributes():
    estimator, _ = _fit(hessian="auto")
    assert estimator.hessian_ == {"pretrain": "exact", "finetune": "exact"}
    assert estimator.n_pretrain_ == 20 and estimator.n_finetune_ == 15
    assert estimator.shared_parameters_ == ["0.0.weight", "0.0.bias"]
    assert estimator.n_params_ == {"W": 16, "U": 15, "Theta": 10}
    assert estimator.hessian_indices_ is None


def test_auto_picks_cg_above_the_documented_size(monkeypatch):
    from skmsif import _estimator

    monkeypatch.setattr(_estimator, "AUTO_EXACT_MAX_PARAMS", 20)
    estimator, _ = _fit(hessian="auto")
    # resolved per stage: the pretrain model is above the size, the finetune head below
    assert estimator.hessian_ == {"pretrain": "cg", "finetune": "exact"}


def test_score_is_the_sum_of_influence_over_test_points():
    for case in ("fixed", "updated"):
        estimator, x_test = _fit(case, hessian="exact")
        influence = estimator.influence(x_test)
        assert influence.shape == (4, 20) and influence.dtype == np.float64
        np.testing.assert_allclose(estimator.score(x_test), influence.sum(0), rtol=1e-10,
                                   atol=1e-12)


def test_inputs_as_numpy_tensors_or_dataset_give_the_same_influence():
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem()
    estimator = MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-2)
    reference = estimator.fit(pretrain_model, finetune_model, Z, X).influence(x_test)

    def as_numpy(data):
        return data[0].numpy(), data[1].numpy()

    def as_dataset(data):
        return torch.utils.data.TensorDataset(*data)

    for convert in (as_numpy, as_dataset):
        got = clone(estimator).fit(pretrain_model, finetune_model, convert(Z),
                                   convert(X)).influence(convert(x_test))
        np.testing.assert_allclose(got, reference, rtol=1e-12, atol=1e-14)


def test_batch_size_does_not_change_results():
    reference = _fit(hessian="exact")[0]
    _, x_test = _fit()
    for batch_size in (1, 7):
        estimator, _ = _fit(hessian="exact", batch_size=batch_size)
        np.testing.assert_allclose(estimator.influence(x_test),
                                   reference.influence(x_test), rtol=1e-10, atol=1e-12)


def test_float32_models_are_scored_in_float64_copies():
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem()
    estimator = MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-2)
    reference = estimator.fit(pretrain_model, finetune_model, Z, X).influence(x_test)
    pretrain32, finetune32 = copy.deepcopy((pretrain_model, finetune_model))
    pretrain32.float()
    finetune32.float()
    got = clone(estimator).fit(pretrain32, finetune32, (Z[0].float(), Z[1]),
                               (X[0].float(), X[1])).influence(x_test)
    # Only the rounding of the weights to float32 differs.
    np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-6)


def test_verbose_shows_progress(capsys):
    for hessian in ("exact", "cg"):
        estimator, x_test = _fit(hessian=hessian, verbose=1)
        estimator.score(x_test)
    assert "scoring pretrain set" in capsys.readouterr().err


# ------------------------------------------------------------ no mutation


class _NetWithDropoutAndBatchNorm(nn.Module):
    def __init__(self, embedding, classes):
        super().__init__()
        self.embedding = embedding
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, classes))

    def forward(self, inputs):
        return self.head(self.embedding(inputs))


def _models_with_state():
    torch.manual_seed(0)
    embedding = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh()).double()
    pretrain_model = _NetWithDropoutAndBatchNorm(embedding, 3).double()
    finetune_model = _NetWithDropoutAndBatchNorm(embedding, 2).double()
    # Leave the models as a user might: in train mode, with gradients lying around,
    # the embedding frozen for finetuning.
    _, _, Z, X, x_test = tiny_problem()
    pretrain_model(Z[0]).sum().backward()
    embedding.requires_grad_(False)
    pretrain_model.train()
    finetune_model.head.eval()
    return pretrain_model, finetune_model, Z, X, x_test


@pytest.mark.parametrize("hessian", ["exact", "cg", "identity"])
def test_models_unchanged_and_evaluated_deterministically(hessian):
    pretrain_model, finetune_model, Z, X, x_test = _models_with_state()
    before = (snapshot(pretrain_model), snapshot(finetune_model))
    estimator = MultiStageInfluenceEstimator(hessian=hessian, finetune_damping=1e-2)
    estimator.fit(pretrain_model, finetune_model, Z, X)
    first = estimator.influence(x_test)
    second = estimator.influence(x_test)
    estimator.score(x_test)
    assert_unchanged(pretrain_model, before[0])
    assert_unchanged(finetune_model, before[1])
    # Dropout off and batch norm on running statistics: repeated calls agree exactly.
    np.testing.assert_array_equal(first, second)


def test_models_unchanged_in_case_2():
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem("updated")
    before = (snapshot(pretrain_model), snapshot(finetune_model))
    estimator = MultiStageInfluenceEstimator(embedding="updated", shared="0",
                                             hessian="cg", finetune_damping=1e-2)
    estimator.fit(pretrain_model, finetune_model, Z, X).influence(x_test)
    assert_unchanged(pretrain_model, before[0])
    assert_unchanged(finetune_model, before[1])


# ------------------------------------------------------------ bad input


def _bad_fit(match, error=ValueError, case="fixed", change=None, **params):
    pretrain_model, finetune_model, Z, X, x_test = tiny_problem(case)
    arguments = {"pretrain_model": pretrain_model, "finetune_model": finetune_model,
                 "Z": Z, "X": X}
    if change:
        arguments.update(change(arguments))
    with pytest.raises(error, match=match):
        MultiStageInfluenceEstimator(**params).fit(**arguments)


def test_inputs_and_targets_of_different_length():
    _bad_fit(r"Z: inputs have 20 examples but targets have 19",
             change=lambda a: {"Z": (a["Z"][0], a["Z"][1][:19])})


def test_empty_data():
    _bad_fit(r"X is empty",
             change=lambda a: {"X": (a["X"][0][:0], a["X"][1][:0])})
    _bad_fit(r"Z is empty", change=lambda a: {
        "Z": torch.utils.data.TensorDataset(a["Z"][0][:0], a["Z"][1][:0])})


def test_nan_or_inf_in_inputs():
    def with_nan(arguments):
        inputs = arguments["Z"][0].clone()
        inputs[3, 1] = float("nan")
        return {"Z": (inputs, arguments["Z"][1])}

    def with_inf(arguments):
        inputs = arguments["X"][0].clone()
        inputs[0, 0] = float("inf")
        return {"X": (inputs, arguments["X"][1])}

    _bad_fit(r"Z: the inputs of example 3 contain NaN or infinite", change=with_nan)
    _bad_fit(r"X: the inputs of example 0 contain NaN or infinite", change=with_inf)


def test_nan_in_parameters():
    def poisoned(arguments):
        model = copy.deepcopy(arguments["pretrain_model"])
        with torch.no_grad():
            model[1].weight[0, 0] = float("nan")
        return {"pretrain_model": model}

    _bad_fit(r"pretrain_model has NaN or infinite values in parameter '1.weight'",
             change=poisoned, case="updated", embedding="updated", shared="0")


def test_labels_out_of_range():
    _bad_fit(r"X: labels range from 0 to 5, but finetune_model outputs 2 classes",
             change=lambda a: {"X": (a["X"][0], a["X"][1] * 5)})
    _bad_fit(r"Z: labels range from -1", change=lambda a: {"Z": (a["Z"][0], a["Z"][1] - 1)})


def test_float_labels_for_cross_entropy():
    _bad_fit(r"integer class labels.*y.astype\(int\)", error=TypeError,
             change=lambda a: {"Z": (a["Z"][0], a["Z"][1].double())})


def test_outputs_that_do_not_fit_the_loss():
    def flat_outputs(arguments):
        model = nn.Sequential(arguments["pretrain_model"], nn.Flatten(0))
        return {"pretrain_model": model}

    _bad_fit(r"pretrain_loss='cross_entropy' needs pretrain_model to output logits of "
             r"shape \(n_examples, n_classes\)", change=flat_outputs)
    _bad_fit(r"finetune_loss='mse' needs finetune_model's outputs",
             change=lambda a: {"X": (a["X"][0], a["X"][1].double()[:, None].repeat(1, 3))},
             finetune_loss="mse")


def test_callable_loss_that_does_not_return_one_loss_per_example():
    def mean_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)

    _bad_fit(r"finetune_loss must return one loss per example", finetune_loss=mean_loss)


def test_inputs_the_model_cannot_take():
    _bad_fit(r"pretrain_model could not be evaluated on Z",
             change=lambda a: {"Z": (a["Z"][0][:, :2], a["Z"][1])})


def test_no_shared_parameters():
    def separate(arguments):
        return {"finetune_model": copy.deepcopy(arguments["finetune_model"])}

    _bad_fit(r"shared=None found no parameter object .* pass shared=", change=separate)
    _bad_fit(r"shared prefix 'embedding' matches no parameter", shared="embedding")


def test_ambiguous_shared_parameters():
    # "1" names the pretrain head (3 classes) and the finetune head (2 classes).
    _bad_fit(r"shared parameter '1.weight' has shape \(3, 4\) in pretrain_model but "
             r"\(2, 4\)", case="updated", embedding="updated", shared=["0", "1"])

    def extra_layer(arguments):
        model = copy.deepcopy(arguments["finetune_model"])
        model[0].append(nn.Linear(4, 4).double())
        return {"finetune_model": nn.Sequential(model[0], nn.Linear(4, 2).double())}

    _bad_fit(r"shared='0' is ambiguous", case="updated", embedding="updated",
             shared="0", change=extra_layer)


def test_fixed_embedding_that_was_changed():
    _bad_fit(r"embedding='fixed' but shared parameter '0.0.weight' differs.*"
             r"embedding='updated'", case="updated", shared="0")


def test_updated_embedding_needs_positive_alpha():
    _bad_fit(r"embedding='updated' needs alpha > 0", case="updated",
             embedding="updated", shared="0", alpha=0.0)


@pytest.mark.parametrize("params,match", [
    ({"pretrain_damping": -1.0}, r"'pretrain_damping' parameter .* range \[0"),
    ({"finetune_damping": -1e-3}, r"'finetune_damping' parameter"),
    ({"hessian": "lissa"}, r"'hessian' parameter.*'cg'"),
    ({"embedding": "frozen"}, r"'embedding' parameter"),
    ({"alpha": -0.1}, r"'alpha' parameter"),
    ({"hessian_samples": 0}, r"'hessian_samples' parameter"),
])
def test_invalid_parameters_name_the_parameter(params, match):
    _bad_fit(match, **params)


def test_exact_refuses_beyond_its_memory_budget_and_names_cg():
    _bad_fit(r"hessian='exact' needs dense 31 x 31 .* Use hessian='cg'", hessian="exact",
             exact_max_memory=1000)


def test_models_and_data_of_the_wrong_type():
    _bad_fit(r"pretrain_model must be a torch.nn.Module", error=TypeError,
             change=lambda a: {"pretrain_model": "not a model"})
    _bad_fit(r"Z must be an \(inputs, targets\) pair", error=TypeError,
             change=lambda a: {"Z": a["Z"][0]})


def test_unavailable_device():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present, so device='cuda' is valid here")
    _bad_fit(r"device='cuda' but torch.cuda.is_available\(\) is False", device="cuda")


def test_bad_test_points_are_reported_as_x_test():
    estimator, x_test = _fit()
    with pytest.raises(ValueError, match=r"x_test: labels range from 7 to 7"):
        estimator.influence((x_test[0], x_test[1] + 6))
    with pytest.raises(ValueError, match=r"x_test: the inputs of example 0 contain NaN"):
        estimator.score((x_test[0] * float("nan"), x_test[1]))

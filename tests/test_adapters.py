"""Models the estimator accepts besides plain modules (``skmsif._adapters``).

A skorch net, or a fitted scikit-learn ``Pipeline`` ending in one, must give exactly the
influence of the equivalent plain module: the net's ``module_`` with a per-example version
of its criterion, on the data passed through the Pipeline's preprocessing. The skorch
tests skip when skorch (an optional extra) is not installed.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from skmsif import MultiStageInfluenceEstimator
from skmsif._adapters import CriterionLoss, transform_data, unwrap_model

SKORCH_MISSING = "skorch is not installed (pip install skorch, or the package's test extra)"


@pytest.fixture(scope="module")
def skorch():
    return pytest.importorskip("skorch", reason=SKORCH_MISSING)


def _data(seed, count, n_classes, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    inputs = (shift + scale * rng.normal(size=(count, 3))).astype(np.float32)
    return inputs, rng.integers(0, n_classes, size=count)


def _modules(case, seed=0, softmax=False):
    """Float32 modules as skorch trains them: Case 1 shares the embedding object."""
    torch.manual_seed(seed)
    embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    pretrain = nn.Sequential(embedding, nn.Linear(4, 3))
    if case == "updated":
        embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        embedding.load_state_dict(pretrain[0].state_dict())
        with torch.no_grad():
            embedding[0].weight.add_(0.1)
    head = [nn.Linear(4, 2)] + ([nn.Softmax(dim=-1)] if softmax else [])
    finetune = nn.Sequential(embedding, *head)
    return pretrain, finetune


def _estimator(case, **params):
    shared = {"shared": "0"} if case == "updated" else {}
    # float64 passes whatever the models' dtype: the tests compare two routes to 1e-9.
    return MultiStageInfluenceEstimator(embedding=case, alpha=0.1, hessian="exact",
                                        pretrain_damping=0.1, finetune_damping=0.1,
                                        dtype="float64", **shared, **params)


def _classifier(skorch, module, **params):
    settings = {"criterion": nn.CrossEntropyLoss, "train_split": None, "max_epochs": 3,
                "lr": 0.1, "verbose": 0}
    settings.update(params)
    return skorch.NeuralNetClassifier(module, **settings)


# ------------------------------------------------------------------ plain modules


def test_plain_module_passes_through():
    module = nn.Linear(3, 2)
    assert unwrap_model(module, "pretrain_model") == (module, None, None)
    assert transform_data((1, 2), None, "Z") == (1, 2)


def test_other_models_are_refused_with_the_accepted_kinds():
    with pytest.raises(TypeError, match="skorch NeuralNet"):
        unwrap_model(object(), "pretrain_model")
    with pytest.raises(TypeError, match="finetune_model must be a torch.nn.Module"):
        _estimator("fixed").fit(nn.Linear(3, 2), "not a model", _data(0, 5, 2),
                                _data(1, 5, 2))


def test_pipeline_not_ending_in_a_net_is_refused():
    pipeline = Pipeline([("scale", StandardScaler())]).fit(np.ones((3, 2)))
    with pytest.raises(TypeError, match="last step is StandardScaler"):
        unwrap_model(pipeline, "pretrain_model")


# ------------------------------------------------------------------ skorch nets


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_skorch_nets_give_the_influence_of_their_modules(skorch, case):
    pretrain, finetune = _modules(case)
    Z, X, x_test = _data(0, 30, 3), _data(1, 20, 2), _data(2, 4, 2)
    pretrain_net = _classifier(skorch, pretrain).initialize()
    finetune_net = _classifier(skorch, finetune).initialize()

    expected = _estimator(case).fit(pretrain, finetune, Z, X).influence(x_test)
    got = _estimator(case).fit(pretrain_net, finetune_net, Z, X).influence(x_test)
    np.testing.assert_array_equal(got, expected)
    # A net and a plain module can be mixed.
    mixed = _estimator(case).fit(pretrain_net, finetune, Z, X).influence(x_test)
    np.testing.assert_array_equal(mixed, expected)


def test_pipeline_ending_in_a_net_applies_its_preprocessing(skorch):
    """Both Pipelines are fitted by skorch (a few epochs; the embedding is frozen while
    the finetune net trains, Case 1); the plain reference gets the scaled data."""
    pretrain, finetune = _modules("fixed")
    Z, X, x_test = _data(0, 30, 3, 3.0, 1.0), _data(1, 20, 2, 2.0, -1.0), _data(2, 4, 2)
    pretrain_pipe = Pipeline([("scale", StandardScaler()),
                              ("net", _classifier(skorch, pretrain))]).fit(*Z)
    for parameter in pretrain[0].parameters():
        parameter.requires_grad_(False)
    finetune_pipe = Pipeline([("scale", StandardScaler()),
                              ("net", _classifier(skorch, finetune))]).fit(*X)
    assert torch.equal(pretrain_pipe[-1].module_[0][0].weight, finetune[0][0].weight)

    def scaled(data, pipe):
        return pipe[0].transform(data[0]), data[1]

    expected = _estimator("fixed").fit(
        pretrain, finetune, scaled(Z, pretrain_pipe), scaled(X, finetune_pipe)
    ).influence(scaled(x_test, finetune_pipe))
    estimator = _estimator("fixed").fit(pretrain_pipe, finetune_pipe, Z, X)
    np.testing.assert_array_equal(estimator.influence(x_test), expected)
    # Tensors are accepted as Pipeline inputs too.
    as_tensors = (torch.from_numpy(x_test[0]), torch.from_numpy(x_test[1]))
    np.testing.assert_array_equal(estimator.influence(as_tensors), expected)


def test_default_nll_criterion_takes_the_log_of_probabilities(skorch):
    """skorch's NeuralNetClassifier defaults to NLLLoss on probabilities."""
    pretrain, finetune = _modules("fixed", softmax=True)
    Z, X, x_test = _data(0, 30, 3), _data(1, 20, 2), _data(2, 4, 2)
    finetune_net = skorch.NeuralNetClassifier(finetune, train_split=None).initialize()
    assert isinstance(finetune_net.criterion_, nn.NLLLoss)
    got = _estimator("fixed").fit(pretrain, finetune_net, Z, X).influence(x_test)
    logits = nn.Sequential(*list(finetune)[:-1])  # the same parameter objects
    expected = _estimator("fixed").fit(pretrain, logits, Z, X).influence(x_test)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_regressor_and_binary_classifier_criteria(skorch):
    pretrain, finetune = _modules("fixed")
    Z, X, x_test = _data(0, 30, 3), _data(1, 20, 2), _data(2, 4, 2)
    X_reg = (X[0], X[0][:, :2] * 2.0)
    x_test_reg = (x_test[0], x_test[0][:, :2] * 2.0)
    regressor = skorch.NeuralNetRegressor(finetune, train_split=None).initialize()
    got = _estimator("fixed").fit(pretrain, regressor, Z, X_reg).influence(x_test_reg)
    expected = _estimator("fixed", finetune_loss="mse").fit(
        pretrain, finetune, Z, X_reg).influence(x_test_reg)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)

    binary_model = nn.Sequential(finetune[0], nn.Linear(4, 1))
    binary = skorch.NeuralNetBinaryClassifier(binary_model, train_split=None).initialize()
    X_bin, x_test_bin = (X[0], X[1].astype(np.float32)), (x_test[0], np.array([0., 1, 1, 0]))

    def bce(outputs, targets):
        return nnf.binary_cross_entropy_with_logits(outputs.reshape(-1), targets,
                                                    reduction="none")

    got = _estimator("fixed").fit(pretrain, binary, Z, X_bin).influence(x_test_bin)
    expected = _estimator("fixed", finetune_loss=bce).fit(
        pretrain, binary_model, Z, X_bin).influence(x_test_bin)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_class_weights_and_explicit_losses(skorch):
    pretrain, finetune = _modules("fixed")
    Z, X, x_test = _data(0, 30, 3), _data(1, 20, 2), _data(2, 4, 2)
    weight = torch.tensor([1.0, 3.0])  # float32, as the net holds it
    net = _classifier(skorch, finetune, criterion__weight=weight).initialize()

    def weighted(outputs, targets):
        return nnf.cross_entropy(outputs, targets, weight=weight.to(outputs.dtype),
                                 reduction="none")

    got = _estimator("fixed").fit(pretrain, net, Z, X).influence(x_test)
    expected = _estimator("fixed", finetune_loss=weighted).fit(
        pretrain, finetune, Z, X).influence(x_test)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert net.criterion_.reduction == "mean"  # the net's criterion was copied
    # A loss the user passes (anything but the default "cross_entropy") wins over the
    # net's criterion: this one is not per-example, and is refused as such.
    explicit = _estimator("fixed", finetune_loss=nnf.cross_entropy)
    with pytest.raises(ValueError, match="one loss per example"):
        explicit.fit(pretrain, net, Z, X)


def test_criterion_loss_reshapes_and_averages():
    loss = CriterionLoss(nn.MSELoss())
    outputs = torch.arange(6.0).reshape(3, 2)
    np.testing.assert_allclose(loss(outputs, torch.zeros(3, 2)).numpy(),
                               [0.5, 6.5, 20.5])
    single = CriterionLoss(nn.MSELoss())(torch.ones(3, 1), torch.zeros(3))
    assert single.shape == (3,)
    assert "MSELoss" in repr(loss)


def test_skorch_errors(skorch):
    pretrain, finetune = _modules("fixed")
    Z, X = _data(0, 30, 3), _data(1, 20, 2)
    with pytest.raises(NotFittedError, match="finetune_model is not initialized"):
        _estimator("fixed").fit(pretrain, _classifier(skorch, finetune), Z, X)

    unfitted_scaler = Pipeline([("scale", StandardScaler()),
                                ("net", _classifier(skorch, finetune).initialize())])
    with pytest.raises(NotFittedError, match="step 'scale' is not fitted"):
        _estimator("fixed").fit(pretrain, unfitted_scaler, Z, X)

    pipe = Pipeline([("scale", StandardScaler()),
                     ("net", _classifier(skorch, finetune))]).fit(*X)
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(X[0]), torch.from_numpy(X[1]))
    with pytest.raises(TypeError, match="X must be an \\(inputs, targets\\) pair"):
        _estimator("fixed").fit(pretrain, pipe, Z, dataset)

    class Criterion(nn.Module):  # no `reduction`
        def forward(self, outputs, targets):
            return nnf.cross_entropy(outputs, targets)

    custom = _classifier(skorch, finetune, criterion=Criterion).initialize()
    with pytest.raises(TypeError, match="no 'reduction' attribute.*finetune_loss"):
        _estimator("fixed").fit(pretrain, custom, Z, X)
    # ... unless the user passes a loss (the string "cross_entropy" is the default, which
    # a net's criterion replaces, so it takes a callable).

    def per_example(outputs, targets):
        return nnf.cross_entropy(outputs, targets, reduction="none")

    _estimator("fixed", finetune_loss=per_example).fit(pretrain, custom, Z, X)


def test_a_plain_cross_entropy_criterion_is_the_named_loss(skorch):
    """A net's default ``nn.CrossEntropyLoss`` is the named loss (its closed forms apply);
    a weighted or smoothed one stays the net's own criterion."""
    pretrain, _ = _modules("fixed")
    plain = _classifier(skorch, pretrain).initialize()
    assert unwrap_model(plain, "pretrain_model")[2] == "cross_entropy"
    for params in ({"criterion__weight": torch.tensor([1.0, 2.0, 3.0])},
                   {"criterion__label_smoothing": 0.1}):
        net = _classifier(skorch, pretrain, **params).initialize()
        assert isinstance(unwrap_model(net, "pretrain_model")[2], CriterionLoss), params

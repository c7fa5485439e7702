"""Derivatives of the model-as-a-function objective against independent computations."""


import pytest
import torch
from _models import tiny_problem
from torch.autograd.functional import hessian as autograd_hessian

from skmsif._curvature import JVP_MAX_VECTORS, Objective
from skmsif._data import as_data
from skmsif._model import ModelAdapter, private_copies
from skmsif._params import flatten

CPU = torch.device("cpu")


@pytest.fixture
def objective_and_data():
    pretrain_model, _, Z, _, _ = tiny_problem(seed=1)
    (module,) = private_copies([pretrain_model], torch.float64, CPU)
    names = [name for name, _ in module.named_parameters()]
    objective = Objective(ModelAdapter(module, "cross_entropy", "pretrain_model",
                                       "pretrain_loss"), names)
    return objective, as_data(Z, "Z", torch.float64), pretrain_model


def _mean_loss_function(model, data):
    """The mean loss as a function of one flat vector, written with plain autograd."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]

    def mean_loss(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = flat[start:start + size].reshape(shape)
            start += size
        outputs = torch.func.functional_call(model, params, (data.inputs,))
        return torch.nn.functional.cross_entropy(outputs, data.targets)

    point = flatten([p.detach() for p in model.parameters()])
    return mean_loss, point


def test_hvp_matches_finite_differences_of_gradients(objective_and_data):
    objective, data, model = objective_and_data
    mean_loss, point = _mean_loss_function(model, data)
    gen = torch.Generator().manual_seed(3)
    vectors = torch.randn(3, objective.n_params, generator=gen, dtype=torch.float64)
    hvps = objective.hvp(vectors, data, batch_size=7, device=CPU)
    step = 1e-5
    for vector, hvp in zip(vectors, hvps):
        plus = torch.func.grad(mean_loss)(point + step * vector)
        minus = torch.func.grad(mean_loss)(point - step * vector)
        finite_difference = (plus - minus) / (2 * step)
        error = (hvp - finite_difference).norm() / finite_difference.norm()
        assert error < 1e-7


def test_dense_hessian_matches_autograd_and_batch_size(objective_and_data):
    objective, data, model = objective_and_data
    mean_loss, point = _mean_loss_function(model, data)
    reference = autograd_hessian(mean_loss, point)
    for batch_size in (1, 6, 100):
        dense = objective.dense_hessian(data, batch_size, CPU, chunk=5)
        assert torch.allclose(dense, reference, rtol=1e-10, atol=1e-12)


def test_hessian_on_a_subsample_uses_only_those_examples(objective_and_data):
    objective, data, model = objective_and_data
    indices = torch.tensor([0, 3, 4, 11])
    sub = as_data((data.inputs[indices], data.targets[indices]), "Z", torch.float64)
    mean_loss, point = _mean_loss_function(model, sub)
    dense = objective.dense_hessian(data, 3, CPU, indices=indices)
    assert torch.allclose(dense, autograd_hessian(mean_loss, point), rtol=1e-10,
                          atol=1e-12)


def test_per_example_gradients_match_a_loop(objective_and_data):
    objective, data, model = objective_and_data
    rows = objective.gradient_rows(data, 6, CPU, summed=False)
    for i in (0, 7, 19):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data.inputs[i:i + 1]),
                                                 data.targets[i:i + 1])
        expected = torch.autograd.grad(loss, list(model.parameters()))
        assert torch.allclose(rows[i], flatten(expected), rtol=1e-12, atol=1e-14)
    summed = objective.gradient_rows(data, 6, CPU, summed=True)
    assert torch.allclose(summed[0], rows.sum(0), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("n_vectors", [1, JVP_MAX_VECTORS + 3])
def test_directional_derivatives_equal_per_example_gradients(objective_and_data,
                                                             n_vectors):
    """The forward-mode pass and the per-example-gradient path give the same scores."""
    objective, data, _ = objective_and_data
    gen = torch.Generator().manual_seed(5)
    vectors = torch.randn(n_vectors, objective.n_params, generator=gen,
                          dtype=torch.float64)
    expected = vectors @ objective.gradient_rows(data, 4, CPU, summed=False).T
    for batch_size in (3, 50):
        got = objective.directional(vectors, data, batch_size, CPU)
        assert torch.allclose(got, expected, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("wrapped", [False, "sequential", "sliced"])
@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
def test_dense_curvature_of_one_linear_layer_in_closed_form(loss, bias, wrapped, curvature):
    """A lone ``nn.Linear`` (a Case 1 head on cached features, ``model[1:]``) gets its
    dense curvature from the closed form; it equals autograd's Hessian of the mean loss,
    and the products with unit vectors (the general route)."""
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(5, 3, bias=bias).double()
    module = {False: layer, "sequential": torch.nn.Sequential(layer),
              "sliced": torch.nn.Sequential(torch.nn.Tanh(), layer)[1:]}[wrapped]
    inputs = torch.randn(23, 5, generator=gen, dtype=torch.float64)
    targets = (torch.randint(0, 3, (23,), generator=gen) if loss == "cross_entropy"
               else torch.randn(23, 3, generator=gen, dtype=torch.float64))
    names = [name for name, _ in module.named_parameters()][::-1]  # bias first, if any
    objective = Objective(ModelAdapter(module, loss, "model", "loss"), names)
    assert objective._linear_layer() is not None
    data = as_data((inputs, targets), "X", torch.float64)
    closed = objective.dense_hessian(data, batch_size=7, device=CPU, curvature=curvature)

    def mean_loss(flat):
        start, params = 0, {}
        for name in names:
            shape = dict(module.named_parameters())[name].shape
            params[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        outputs = torch.func.functional_call(module, params, (inputs,))
        if loss == "cross_entropy":
            return torch.nn.functional.cross_entropy(outputs, targets)
        return ((outputs - targets) ** 2).mean(dim=1).mean()

    point = flatten([dict(module.named_parameters())[name].detach() for name in names])
    expected = autograd_hessian(mean_loss, point)
    assert torch.allclose(closed, expected, atol=1e-12, rtol=1e-10)
    objective._dense_linear = lambda *args, **kwargs: None  # the general route
    general = objective.dense_hessian(data, batch_size=7, device=CPU, curvature=curvature)
    assert torch.allclose(closed, general, atol=1e-12, rtol=1e-10)


def test_closed_form_only_for_a_lone_linear_layer_with_a_named_loss(objective_and_data):
    objective, _, _ = objective_and_data
    assert objective._linear_layer() is None  # embedding + head
    layer = torch.nn.Linear(4, 2).double()
    partly = Objective(ModelAdapter(layer, "cross_entropy", "model", "loss"), ["weight"])
    assert partly._linear_layer() is None  # the bias is not free
    custom = Objective(ModelAdapter(layer, lambda out, y: (out - y).abs().sum(1), "model",
                                    "loss"), ["weight", "bias"])
    assert custom._linear_layer() is None

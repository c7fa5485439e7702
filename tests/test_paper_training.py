"""The paper reproduction's models and trainers (``paper/models.py``, ``paper/training.py``).

The trainers run on skmsif's training engine (``skmsif/_training.py``); these tests check
what they promise: stationary points of the stated objectives, frozen parameters left
alone, seeded minibatches, and evaluation helpers that leave the model's mode as it was.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from paper.models import make_digits_mlp, make_mnist_cnn
from paper.training import accuracy, fit_adam, fit_lbfgs, per_example_loss, total_loss
from skmsif.datasets import load_digits_split

torch.set_num_threads(1)


# --------------------------------------------------------------------------- models


def test_mnist_cnn_is_table_a():
    embedding, pretrain_model, finetune_model = make_mnist_cnn(4, 6, seed=0)
    convs = [m for m in embedding.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in embedding.modules() if isinstance(m, nn.MaxPool2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (5, 5), (1, 1)), (64, (5, 5), (1, 1))]
    assert [(p.kernel_size, p.stride) for p in pools] == [(2, 2), (2, 2)]
    assert sum(isinstance(m, nn.Tanh) for m in embedding.modules()) == 2
    inputs = torch.randn(3, 1, 28, 28)
    assert embedding(inputs).shape == (3, 1024)
    assert pretrain_model(inputs).shape == (3, 4)
    assert finetune_model(inputs).shape == (3, 6)
    assert pretrain_model[0] is embedding and finetune_model[0] is embedding
    # Pooling before Tanh is the same function as Tanh before pooling.
    conv = convs[0](inputs)
    np.testing.assert_allclose(F.max_pool2d(torch.tanh(conv), 2).detach(),
                               torch.tanh(F.max_pool2d(conv, 2)).detach(), atol=1e-6)


def test_models_are_seeded_without_touching_global_rng():
    state = torch.random.get_rng_state()
    _, a, _ = make_mnist_cnn(seed=1)
    _, b, _ = make_mnist_cnn(seed=1)
    _, c, _ = make_digits_mlp(seed=2)
    _, d, _ = make_digits_mlp(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(c[0][0].weight, d[0][0].weight)
    assert c[0][0].weight.dtype == torch.float64


# --------------------------------------------------------------------------- training


@pytest.fixture
def digits_small():
    return load_digits_split(0, n_pretrain=80, n_finetune=40, n_test=20)


def _objective(model, data, params, damping, anchors=(), alpha=0.0):
    inputs = torch.as_tensor(data[0])
    loss = F.cross_entropy(model(inputs), torch.as_tensor(data[1]))
    loss = loss + 0.5 * damping * sum((p * p).sum() for p in params)
    return loss + alpha * sum(((p - bar) ** 2).sum() for p, bar in anchors)


def test_fit_lbfgs_reaches_a_stationary_point(digits_small):
    embedding, pretrain_model, finetune_model = make_digits_mlp(4)
    info = fit_lbfgs(pretrain_model, digits_small.Z, damping=0.1, tol=1e-9)
    assert info["grad_max"] < 1e-7
    params = list(pretrain_model.parameters())
    grads = torch.autograd.grad(_objective(pretrain_model, digits_small.Z, params, 0.1),
                                params)
    assert max(float(g.abs().max()) for g in grads) < 1e-7

    # Case 1: only the head moves.
    before = copy.deepcopy(embedding.state_dict())
    head = list(finetune_model[1].parameters())
    fit_lbfgs(finetune_model, digits_small.X, params=head, damping=0.1, tol=1e-9)
    for key, value in embedding.state_dict().items():
        assert torch.equal(value, before[key])
    grads = torch.autograd.grad(_objective(finetune_model, digits_small.X, head, 0.1), head)
    assert max(float(g.abs().max()) for g in grads) < 1e-7


def test_fit_lbfgs_proximity_term(digits_small):
    embedding, _, template = make_digits_mlp(4)
    model = nn.Sequential(copy.deepcopy(embedding), template[1])
    anchors = list(zip(model[0].parameters(), embedding.parameters()))
    params = list(model.parameters())
    fit_lbfgs(model, digits_small.X, damping=0.01, anchors=anchors, alpha=0.5, tol=1e-7)
    grads = torch.autograd.grad(
        _objective(model, digits_small.X, params, 0.01, anchors, 0.5), params)
    assert max(float(g.abs().max()) for g in grads) < 1e-6
    # A strong pull keeps W closer to W_bar than a weak one.
    distance = sum(float(((p - q) ** 2).sum().detach()) for p, q in anchors)
    weak = nn.Sequential(copy.deepcopy(embedding), copy.deepcopy(template[1]))
    weak_anchors = list(zip(weak[0].parameters(), embedding.parameters()))
    fit_lbfgs(weak, digits_small.X, damping=0.01, anchors=weak_anchors, alpha=0.005,
              tol=1e-7)
    assert distance < sum(float(((p - q) ** 2).sum().detach()) for p, q in weak_anchors)


def test_fit_adam_is_seeded_and_lowers_the_loss(digits_small):
    def train(seed):
        _, model, _ = make_digits_mlp(8)
        start = total_loss(model, digits_small.Z)
        fit_adam(model, digits_small.Z, n_steps=60, batch_size=16, lr=1e-2,
                 random_state=seed)
        return model, start

    a, start = train(0)
    b, _ = train(0)
    c, _ = train(1)
    assert total_loss(a, digits_small.Z) < 0.5 * start
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_evaluation_helpers_agree_and_leave_the_mode_alone(digits_small):
    """``total_loss``, ``per_example_loss`` and ``accuracy`` evaluate with dropout off
    (batching does not matter) and leave every module's train/eval mode as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 4))
    model.train()
    model[1].eval()  # a mixed state, to be restored as is
    modes = [m.training for m in model.modules()]
    Z = digits_small.Z
    losses = per_example_loss(model, Z, batch_size=7)
    assert [m.training for m in model.modules()] == modes
    total = total_loss(model, Z, batch_size=1024)
    assert [m.training for m in model.modules()] == modes
    share = accuracy(model, Z, batch_size=5)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(Z[0], dtype=torch.float32))
    targets = torch.as_tensor(Z[1])
    expected = F.cross_entropy(logits, targets, reduction="none")
    np.testing.assert_allclose(losses, expected.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(total, float(expected.sum()), rtol=1e-5)
    assert share == float((logits.argmax(1) == targets).double().mean())

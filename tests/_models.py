"""Tiny float64 problems shared by the tests."""

import copy

import torch
from torch import nn


def tiny_problem(case="fixed", seed=0, m=20, n=15, n_test=4, hidden=4):
    """Untrained tiny models and data: (pretrain_model, finetune_model, Z, X, x_test).

    ``case="fixed"`` shares the embedding object; ``"updated"`` gives the finetune model
    its own copy of the embedding under the name prefix ``"0"``.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def labels(count, classes):
        return torch.randint(0, classes, (count,), generator=gen)

    torch.manual_seed(seed)
    embedding = nn.Sequential(nn.Linear(3, hidden), nn.Tanh()).double()
    pretrain_model = nn.Sequential(embedding, nn.Linear(hidden, 3)).double()
    if case == "updated":
        embedding = copy.deepcopy(embedding)
        with torch.no_grad():
            for parameter in embedding.parameters():
                parameter.add_(0.1 * randn(*parameter.shape))
    finetune_model = nn.Sequential(embedding, nn.Linear(hidden, 2)).double()
    Z = (randn(m, 3), labels(m, 3))
    X = (randn(n, 3), labels(n, 2))
    x_test = (randn(n_test, 3), labels(n_test, 2))
    return pretrain_model, finetune_model, Z, X, x_test


def snapshot(model):
    """Everything about a module that no call may change."""
    return {
        "values": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "grad": {k: None if p.grad is None else p.grad.clone()
                 for k, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    for key, value in before["values"].items():
        assert torch.equal(after["values"][key], value), key
    for key, value in before["grad"].items():
        if value is None:
            assert after["grad"][key] is None, key
        else:
            assert torch.equal(after["grad"][key], value), key

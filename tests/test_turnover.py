"""Turn-over dropout: masks, the layer, training isolation and the estimator."""

import copy
import gc
import re

import numpy as np
import pytest
import torch
from _models import assert_unchanged, snapshot
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from torch import nn

from skmsif.turnover import (
    TurnOverDropout,
    TurnOverDropoutEstimator,
    train_turnover,
    turnover_mask,
    turnover_masks,
)


def _data(n=24, d=5, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen))


def _mlp(seed=0, d=5, hidden=12, classes=3):
    torch.manual_seed(seed)
    return nn.Sequential(
        TurnOverDropout(nn.Sequential(nn.Linear(d, hidden), nn.Tanh()), seed=1),
        TurnOverDropout(nn.Sequential(nn.Linear(hidden, 10), nn.Tanh()), seed=2),
        nn.Linear(10, classes),
    ).double()


def _trained(seed=0):
    data = _data(seed=seed)
    return train_turnover(_mlp(seed), data, weight_decay=1e-3, max_iter=200), data


# --------------------------------------------------------------------------- masks


def test_masks_are_deterministic_per_seed_and_id():
    ids = [0, 5, 123456789012, 5]
    first = turnover_mask(ids, 64, seed=3)
    again = turnover_mask(ids, 64, seed=3)
    assert torch.equal(first, again)
    assert torch.equal(first[1], first[3])  # the same id, the same mask
    assert not torch.equal(first[0], first[1])  # another id, another mask
    assert not torch.equal(first, turnover_mask(ids, 64, seed=4))  # another seed
    # The mask of an id does not depend on the batch it comes in.
    assert torch.equal(turnover_mask([5], 64, seed=3)[0], first[1])


def test_masks_are_complementary_and_keep_about_p():
    ids = np.arange(2000)
    own = turnover_mask(ids, 32, seed=0)
    flipped = turnover_mask(ids, 32, seed=0, flipped=True)
    assert ((own > 0) ^ (flipped > 0)).all()  # every unit in exactly one sub-network
    torch.testing.assert_close(own + flipped, torch.full_like(own, 2.0))  # 1/p - m, p=.5
    assert abs(float((own > 0).double().mean()) - 0.5) < 0.01
    # Units are not correlated across examples (pairwise agreement about one half).
    agree = ((own[:, 0] > 0) == (own[:, 1] > 0)).double().mean()
    assert abs(float(agree) - 0.5) < 0.05
    p = turnover_mask(ids, 32, seed=0, p=0.25)
    assert abs(float((p > 0).double().mean()) - 0.25) < 0.01
    assert set(p.unique().tolist()) == {0.0, 4.0}
    flipped = turnover_mask(ids, 32, seed=0, p=0.25, flipped=True)
    assert set(flipped.unique().tolist()) == {0.0, 4 / 3}  # mean one, like the own mask


def test_masks_cost_no_memory_per_example():
    layer = TurnOverDropout(nn.Linear(4, 8))
    assert list(layer.state_dict()) == ["module.weight", "module.bias"]
    assert not list(layer.buffers())
    before = {k: v for k, v in vars(layer).items() if not k.startswith("_")}
    data = (torch.randn(500, 4), torch.randint(0, 8, (500,)))
    model = nn.Sequential(layer)
    train_turnover(model, data, solver="sgd", n_epochs=1, batch_size=50,
                   ids=np.arange(10**9, 10**9 + 500), random_state=0)
    gc.collect()
    assert {k: v for k, v in vars(layer).items() if not k.startswith("_")} == before
    assert layer._ids is None and not list(layer.buffers())
    assert list(layer.state_dict()) == ["module.weight", "module.bias"]


def test_bad_mask_arguments_raise():
    with pytest.raises(ValueError, match="p="):
        turnover_mask([0], 3, p=1.0)
    with pytest.raises(TypeError, match="integers"):
        turnover_mask([0.5], 3)
    with pytest.raises(ValueError, match="non-negative"):
        turnover_mask([-1], 3)
    with pytest.raises(TypeError, match="nn.Linear"):
        TurnOverDropout(nn.Tanh())
    with pytest.raises(ValueError, match="only the first module"):
        TurnOverDropout(nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3)))


# --------------------------------------------------------------------------- the layer


def test_layer_is_the_plain_module_outside_the_context_and_restores_it():
    layer = TurnOverDropout(nn.Linear(3, 6), seed=2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    plain = layer.module(x)
    torch.testing.assert_close(layer(x), plain)
    with turnover_masks(layer, [1, 2, 3, 4]):
        masked = layer(x)
        with turnover_masks(layer, [1, 2, 3, 4], flipped=True):
            flipped = layer(x)
        torch.testing.assert_close(layer(x), masked)  # nested contexts restore
    torch.testing.assert_close(layer(x), plain)
    torch.testing.assert_close(masked + flipped, 2 * plain)  # the two halves, p = 0.5
    with pytest.raises(ValueError, match="one id per example"):
        with turnover_masks(layer, [1, 2]):
            layer(x)
    with pytest.raises(ValueError, match="no TurnOverDropout"):
        with turnover_masks(nn.Linear(2, 2), [0]):
            pass


def test_conv_masks_whole_channels():
    layer = TurnOverDropout(nn.Conv2d(2, 6, 3), seed=5).double()
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64)
    with turnover_masks(layer, [10, 11, 12]):
        out = layer(x)
    mask = turnover_mask([10, 11, 12], 6, seed=5)
    torch.testing.assert_close(out, layer.module(x) * mask[:, :, None, None])


# --------------------------------------------------------------------------- isolation


def test_flipped_subnetwork_gets_no_update_from_the_example():
    """One SGD step on example 7 alone: the rows of every masked layer that belong to
    its flipped sub-network are bit-for-bit unchanged; its own rows moved."""
    model = _mlp()
    before = copy.deepcopy(model)
    inputs, targets = _data(n=1)
    train_turnover(model, (inputs, targets), ids=[7], solver="sgd", lr=0.5, n_epochs=1,
                   batch_size=1)
    for index, seed in ((0, 1), (1, 2)):
        own = turnover_mask([7], model[index].module[0].out_features, seed=seed)[0] > 0
        new, old = model[index].module[0], before[index].module[0]
        assert torch.equal(new.weight[~own], old.weight[~own])
        assert torch.equal(new.bias[~own], old.bias[~own])
        assert (new.weight[own] != old.weight[own]).any(dim=1).all()
    assert not torch.equal(model[2].weight, before[2].weight)  # unmasked layers leak


def test_each_example_of_a_batch_gives_no_gradient_to_its_flipped_subnetwork():
    torch.manual_seed(0)
    model = nn.Sequential(TurnOverDropout(nn.Conv2d(1, 6, 3), seed=3), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6 * 5 * 5, 2)).double()
    inputs = torch.randn(4, 1, 7, 7, dtype=torch.float64)
    targets = torch.tensor([0, 1, 1, 0])
    ids = torch.tensor([3, 9, 27, 81])
    conv = model[0].module
    for k in range(4):
        with turnover_masks(model, ids):
            losses = nn.functional.cross_entropy(model(inputs), targets, reduction="none")
        weight_grad, bias_grad = torch.autograd.grad(losses[k], [conv.weight, conv.bias])
        flipped = turnover_mask(ids[k:k + 1], 6, seed=3, flipped=True)[0] > 0
        assert torch.count_nonzero(weight_grad[flipped]) == 0
        assert torch.count_nonzero(bias_grad[flipped]) == 0
        assert torch.count_nonzero(weight_grad[~flipped]) > 0


def test_train_turnover_restores_requires_grad_and_trains_only_params():
    model = _mlp()
    model[2].weight.requires_grad_(False)
    frozen = copy.deepcopy(model[0].module[0].weight)
    train_turnover(model, _data(), params=list(model[2].parameters()), max_iter=20)
    assert torch.equal(model[0].module[0].weight, frozen)
    assert model[2].weight.requires_grad is False and model[2].weight.grad is None
    with pytest.raises(ValueError, match="no TurnOverDropout"):
        train_turnover(nn.Linear(5, 3).double(), _data())
    with pytest.raises(ValueError, match="one id per example"):
        train_turnover(_mlp(), _data(), ids=[1, 2])


# --------------------------------------------------------------------------- estimator


def test_estimator_conventions():
    estimator = TurnOverDropoutEstimator(batch_size=64, loss="mse")
    assert estimator.get_params()["batch_size"] == 64
    cloned = clone(estimator)
    assert cloned.get_params() == estimator.get_params()
    cloned.set_params(batch_size=7)
    assert estimator.batch_size == 64
    assert re.search(r"TurnOverDropoutEstimator\(.*batch_size=64", repr(estimator))
    x_test = _data(n=3)
    for method in ("influence", "score", "removal_effect"):
        with pytest.raises(NotFittedError):
            getattr(TurnOverDropoutEstimator(), method)(x_test)
    with pytest.raises(NotFittedError):
        TurnOverDropoutEstimator().self_influence()
    with pytest.raises(ValueError, match="batch_size"):
        TurnOverDropoutEstimator(batch_size=0).fit(*_trained())


def test_estimator_never_changes_the_users_models():
    model, Z = _trained()
    model.train()
    model[0].module[0].weight.grad = torch.ones_like(model[0].module[0].weight)
    before = snapshot(model)
    estimator = TurnOverDropoutEstimator().fit(model, Z)
    estimator.score(_data(n=5, seed=1))
    estimator.self_influence()
    assert_unchanged(model, before)
    assert all(layer._ids is None for layer in (model[0], model[1]))


def test_removal_effect_is_the_flipped_minus_own_loss_of_each_pair():
    model, Z = _trained()
    x_test = _data(n=5, seed=1)
    ids = np.arange(100, 124)
    estimator = TurnOverDropoutEstimator(batch_size=7).fit(model, Z, ids=ids)
    delta = estimator.removal_effect(x_test)
    assert delta.shape == (5, 24) and delta.dtype == np.float64
    for t, i in ((0, 0), (4, 23), (2, 11)):
        inputs, target = x_test[0][t:t + 1], x_test[1][t:t + 1]
        losses = []
        for flipped in (True, False):
            with turnover_masks(model, [ids[i]], flipped=flipped), torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(model(inputs), target)))
        assert delta[t, i] == pytest.approx(losses[0] - losses[1], rel=1e-12, abs=1e-14)
    # Harmfulness: sign flipped and scaled by m, so that -influence/m is the removal change.
    np.testing.assert_allclose(estimator.influence(x_test), -24 * delta)
    np.testing.assert_allclose(estimator.score(x_test), -24 * delta.sum(0))
    # Batching does not change the result.
    other = TurnOverDropoutEstimator(batch_size=4096).fit(model, Z, ids=ids)
    np.testing.assert_allclose(other.removal_effect(x_test), delta, rtol=1e-12, atol=1e-15)


def test_flipped_subnetwork_has_not_learned_its_example():
    """Paper Sec. 4.2: on random labels a wide model memorises each example with its own
    sub-network only, so the flipped one has a higher loss on it (self-influence < 0)."""
    gen = torch.Generator().manual_seed(0)
    Z = (torch.randn(30, 8, generator=gen, dtype=torch.float64),
         torch.randint(0, 2, (30,), generator=gen))
    torch.manual_seed(0)
    model = nn.Sequential(TurnOverDropout(nn.Sequential(nn.Linear(8, 64), nn.Tanh())),
                          nn.Linear(64, 2)).double()
    train_turnover(model, Z, weight_decay=1e-4, max_iter=500)
    self_influence = TurnOverDropoutEstimator().fit(model, Z).self_influence()
    assert (self_influence < 0).mean() > 0.8


def test_multi_stage_evaluates_the_finetune_model_under_pretrain_masks():
    torch.manual_seed(0)
    embedding = TurnOverDropout(nn.Sequential(nn.Linear(5, 8), nn.Tanh()), seed=4)
    pretrain_model = nn.Sequential(embedding, nn.Linear(8, 3)).double()
    finetune_model = nn.Sequential(embedding, nn.Linear(8, 2)).double()
    Z = _data(n=20)
    X = _data(n=15, classes=2, seed=1)
    train_turnover(pretrain_model, Z, weight_decay=1e-2, max_iter=100)
    train_turnover(finetune_model, X, params=list(finetune_model[1].parameters()),
                   ids=np.arange(20, 35), weight_decay=1e-2, max_iter=100)
    before = snapshot(finetune_model)
    estimator = TurnOverDropoutEstimator().fit(pretrain_model, Z,
                                               finetune_model=finetune_model)
    assert estimator.multi_stage_ and estimator.n_train_ == 20
    x_test = _data(n=4, classes=2, seed=2)
    delta = estimator.removal_effect(x_test)
    assert delta.shape == (4, 20)
    losses = []
    for flipped in (True, False):
        with turnover_masks(finetune_model, [6], flipped=flipped), torch.no_grad():
            losses.append(float(nn.functional.cross_entropy(
                finetune_model(x_test[0][1:2]), x_test[1][1:2])))
    assert delta[1, 6] == pytest.approx(losses[0] - losses[1], rel=1e-12)
    assert_unchanged(finetune_model, before)

    foreign = nn.Sequential(TurnOverDropout(nn.Linear(5, 8), seed=99),
                            nn.Linear(8, 2)).double()
    with pytest.raises(ValueError, match=r"seed, p"):
        TurnOverDropoutEstimator().fit(pretrain_model, Z, finetune_model=foreign)


def test_estimator_errors_name_the_argument():
    model, Z = _trained()
    with pytest.raises(ValueError, match="model has no TurnOverDropout"):
        TurnOverDropoutEstimator().fit(nn.Linear(5, 3).double(), Z)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        TurnOverDropoutEstimator().fit("not a model", Z)
    with pytest.raises(ValueError, match="ids must have one id per example"):
        TurnOverDropoutEstimator().fit(model, Z, ids=[0, 1])
    with pytest.raises(ValueError, match="repeated"):
        TurnOverDropoutEstimator().fit(model, Z, ids=np.zeros(24, dtype=int))
    with pytest.raises(ValueError, match="labels range"):
        TurnOverDropoutEstimator().fit(model, Z).score(
            (torch.randn(3, 5, dtype=torch.float64), torch.tensor([0, 1, 7])))

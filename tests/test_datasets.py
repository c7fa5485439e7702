"""Data sets, models and training routines of the experiments (``skmsif.datasets``)."""

import copy
import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skmsif import datasets
from skmsif.datasets import (
    fashion_mnist_available,
    fashion_mnist_split,
    fit_adam,
    fit_lbfgs,
    load_digits_split,
    load_fashion_mnist,
    make_digits_mlp,
    make_mnist_cnn,
)

torch.set_num_threads(1)

needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(),
    reason=f"Fashion-MNIST is not in {datasets.FASHION_MNIST_PATH}; install the Debian "
           "package dataset-fashion-mnist to run this test")


# --------------------------------------------------------------------------- digits


def test_digits_split_tasks_and_sizes():
    data = load_digits_split(random_state=0)
    z_inputs, z_labels = data.Z
    assert z_inputs.shape == (720, 64) and z_inputs.dtype == np.float64
    assert 0.0 <= z_inputs.min() and z_inputs.max() <= 1.0
    assert sorted(np.unique(z_labels)) == [0, 1, 2, 3]
    assert sorted(np.unique(data.X[1])) == list(range(6))
    assert sorted(np.unique(data.x_test[1])) == list(range(6))
    # All 1,077 digits 4-9, split in half, stratified.
    assert len(data.X[1]) + len(data.x_test[1]) == 1797 - 720
    assert abs(len(data.X[1]) - len(data.x_test[1])) <= 1
    # Z really holds digits 0-3 of load_digits, with their own labels.
    from sklearn.datasets import load_digits

    digits = load_digits()
    np.testing.assert_array_equal(digits.target[data.Z_index], z_labels)
    np.testing.assert_array_equal(digits.data[data.Z_index] / 16.0, z_inputs)


def test_digits_split_is_reproducible_and_disjoint():
    a = load_digits_split(random_state=3, n_pretrain=50, n_finetune=40, n_test=30,
                          pretrain_holdout=0.4)
    b = load_digits_split(random_state=3, n_pretrain=50, n_finetune=40, n_test=30,
                          pretrain_holdout=0.4)
    c = load_digits_split(random_state=4, n_pretrain=50, n_finetune=40, n_test=30,
                          pretrain_holdout=0.4)
    for key in ("Z", "X", "x_test", "Z_holdout"):
        np.testing.assert_array_equal(a[key][0], b[key][0])
    assert not np.array_equal(a.X[0], c.X[0])
    assert (len(a.Z[1]), len(a.X[1]), len(a.x_test[1])) == (50, 40, 30)
    assert len(a.Z_holdout[1]) == 288  # 40% of the 720 digits 0-3
    rows = {row.tobytes() for row in a.Z_holdout[0]}
    assert not any(row.tobytes() in rows for row in a.Z[0])
    test_rows = {row.tobytes() for row in a.x_test[0]}
    assert not any(row.tobytes() in test_rows for row in a.X[0])


# --------------------------------------------------------------------------- Fashion-MNIST


def _write_idx(path, array, type_code):
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


def _fake_fashion(folder, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images, 0x08)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels, 0x08)
    return folder


def test_load_fashion_mnist_reads_idx_files(tmp_path):
    _fake_fashion(tmp_path)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz") as handle:
        raw = np.frombuffer(handle.read()[16:], dtype=np.uint8).reshape(40, 28, 28)
    data = load_fashion_mnist(tmp_path)
    images, labels = data.train
    assert images.shape == (40, 1, 28, 28) and images.dtype == np.float32
    np.testing.assert_allclose(images[:, 0] * 255.0, raw, atol=1e-4)
    np.testing.assert_array_equal(labels, np.arange(40) % 10)
    assert data.test[0].shape == (20, 1, 28, 28)
    assert fashion_mnist_available(tmp_path)

    split = fashion_mnist_split(0, path=tmp_path, n_finetune=10, n_holdout=4)
    assert sorted(np.unique(split.Z[1])) == [0, 1, 2, 3]
    assert len(split.Z[1]) == 16 - 4  # classes 0-3 of 40 training images, less the holdout
    assert len(split.X[1]) == 10 and set(np.unique(split.X[1])) <= set(range(6))
    assert len(split.x_test[1]) == 12  # classes 4-9 of the 20 test images
    assert len(split.Z_holdout[1]) == 4


def test_fashion_mnist_missing_names_the_package(tmp_path):
    assert not fashion_mnist_available(tmp_path)
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_bad_idx_file_is_refused(tmp_path):
    _fake_fashion(tmp_path)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(b"\x12\x34\x08\x01" + (3).to_bytes(4, "big") + b"\x00\x01\x02")
    with pytest.raises(ValueError, match="not an IDX file"):
        load_fashion_mnist(tmp_path)


@needs_fashion_mnist
def test_installed_fashion_mnist_split_follows_the_paper():
    data = load_fashion_mnist()
    assert data.train[0].shape == (60000, 1, 28, 28)
    assert data.test[0].shape == (10000, 1, 28, 28)
    split = fashion_mnist_split(0, data=data)
    assert len(split.Z[1]) == 24000
    assert np.bincount(split.Z[1]).tolist() == [6000] * 4
    assert len(split.X[1]) == 5000 and sorted(np.unique(split.X[1])) == list(range(6))
    assert len(split.x_test[1]) == 6000


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
        start = datasets.total_loss(model, digits_small.Z)
        fit_adam(model, digits_small.Z, n_steps=60, batch_size=16, lr=1e-2,
                 random_state=seed)
        return model, start

    a, start = train(0)
    b, _ = train(0)
    c, _ = train(1)
    assert datasets.total_loss(a, digits_small.Z) < 0.5 * start
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
    losses = datasets.per_example_loss(model, Z, batch_size=7)
    assert [m.training for m in model.modules()] == modes
    total = datasets.total_loss(model, Z, batch_size=1024)
    assert [m.training for m in model.modules()] == modes
    share = datasets.accuracy(model, Z, batch_size=5)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(Z[0], dtype=torch.float32))
    targets = torch.as_tensor(Z[1])
    expected = F.cross_entropy(logits, targets, reduction="none")
    np.testing.assert_allclose(losses, expected.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(total, float(expected.sum()), rtol=1e-5)
    assert share == float((logits.argmax(1) == targets).double().mean())

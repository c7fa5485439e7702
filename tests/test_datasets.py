"""The data loaders of ``skmsif.datasets``: digits and Fashion-MNIST splits."""

import gzip

import numpy as np
import pytest

from skmsif import datasets
from skmsif.datasets import (
    fashion_mnist_available,
    fashion_mnist_split,
    load_digits_split,
    load_fashion_mnist,
)

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

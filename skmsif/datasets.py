"""Data loaders: two pretrain/finetune tasks, as in the paper's experiments (Chen et al.).

Both are "pretrain on some classes, finetune on the others", and both run offline:

* :func:`load_digits_split`: scikit-learn's 8x8 digits (shipped with scikit-learn),
  pretrain on digits 0-3, finetune on digits 4-9.
* :func:`load_fashion_mnist` and :func:`fashion_mnist_split`: Fashion-MNIST read from the
  MNIST-format files of the Debian package ``dataset-fashion-mnist``, pretrain on classes
  0-3, finetune on a 5,000-example subsample of classes 4-9 (the paper's MNIST protocol,
  Appendix B); :func:`fashion_mnist_available` says whether the files are there.

Notation: ``doc/guide/influence.md``. ``Z`` is the pretrain data, ``X`` the finetune data,
``x_test`` finetune test points; each is an ``(inputs, targets)`` pair of numpy arrays.
The models and training loops of the paper's experiments are not part of the package:
they live with the reproduction, in the repository's ``paper/`` folder.
"""

import gzip
import os
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state

__all__ = [
    "FASHION_MNIST_PATH",
    "FASHION_MNIST_CLASSES",
    "load_digits_split",
    "load_fashion_mnist",
    "fashion_mnist_available",
    "fashion_mnist_split",
]

FASHION_MNIST_PATH = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
PRETRAIN_CLASSES = (0, 1, 2, 3)
FINETUNE_CLASSES = (4, 5, 6, 7, 8, 9)


# --------------------------------------------------------------------------- digits


def _pair(inputs, targets):
    return (np.ascontiguousarray(inputs), np.ascontiguousarray(targets, dtype=np.int64))


def load_digits_split(random_state=0, *, test_size=0.5, pretrain_classes=PRETRAIN_CLASSES,
                      finetune_classes=FINETUNE_CLASSES, n_pretrain=None, n_finetune=None,
                      n_test=None, pretrain_holdout=0.0):
    """Load scikit-learn's 8x8 digits as a pretrain task and a finetune task.

    Pixels are divided by 16 (to [0, 1]). The pretrain set ``Z`` holds the digits of
    ``pretrain_classes`` (labelled ``0, 1, ...`` in that order); the digits of
    ``finetune_classes`` are relabelled ``0, 1, ...`` the same way and split, stratified,
    into the finetune training set ``X`` and the finetune test set ``x_test``.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=0
        Draws the finetune train/test split and the subsamples.
    test_size : float, default=0.5
        Fraction of the finetune digits that go to ``x_test``.
    pretrain_classes, finetune_classes : sequence of int
        Digits of each task; they may overlap (the same digits as two tasks).
    n_pretrain, n_finetune, n_test : int, default=None
        Keep a random subsample of this many examples of ``Z``, ``X``, ``x_test``
        (``None``: all). Used for quick runs.
    pretrain_holdout : float, default=0.0
        Fraction of the pretrain-class digits kept out of ``Z`` (before ``n_pretrain``)
        and returned as ``Z_holdout``: unseen examples of the pretrain task, e.g. to
        finetune on the pretrain task itself (paper Sec. 4.2).

    Returns
    -------
    data : sklearn.utils.Bunch
        ``Z``, ``X``, ``x_test``, ``Z_holdout``: ``(inputs, targets)`` pairs of arrays
        of shape ``(n, 64)`` (float64) and ``(n,)`` (int64); ``Z_index``: positions of
        ``Z``'s digits in ``load_digits()``; ``image_shape`` ``(8, 8)``;
        ``pretrain_classes``, ``finetune_classes``: the original digits of each label.

    Examples
    --------
    >>> import numpy as np
    >>> from skmsif.datasets import load_digits_split
    >>> data = load_digits_split(random_state=0)
    >>> data.Z[0].shape, np.unique(data.Z[1]).tolist(), np.unique(data.X[1]).tolist()
    ((720, 64), [0, 1, 2, 3], [0, 1, 2, 3, 4, 5])
    """
    rng = check_random_state(random_state)
    digits = load_digits()
    images, labels = digits.data / 16.0, digits.target

    def relabel(classes):
        mask = np.isin(labels, classes)
        mapping = {c: k for k, c in enumerate(classes)}
        return np.flatnonzero(mask), np.array([mapping[c] for c in labels[mask]])

    z_index, z_labels = relabel(list(pretrain_classes))
    f_index, f_labels = relabel(list(finetune_classes))
    train_pos, test_pos = train_test_split(np.arange(len(f_index)), test_size=test_size,
                                           stratify=f_labels, random_state=rng)
    held = np.zeros(len(z_index), dtype=bool)
    if pretrain_holdout > 0:
        held[train_test_split(np.arange(len(z_index)), test_size=pretrain_holdout,
                              stratify=z_labels, random_state=rng)[1]] = True
    holdout_index, holdout_labels = z_index[held], z_labels[held]
    z_index, z_labels = z_index[~held], z_labels[~held]
    z_keep = _subsample(len(z_index), n_pretrain, rng)
    train_pos = np.sort(train_pos[_subsample(len(train_pos), n_finetune, rng)])
    test_pos = np.sort(test_pos[_subsample(len(test_pos), n_test, rng)])
    z_index, z_labels = z_index[z_keep], z_labels[z_keep]
    return Bunch(
        Z=_pair(images[z_index], z_labels),
        Z_holdout=_pair(images[holdout_index], holdout_labels),
        X=_pair(images[f_index[train_pos]], f_labels[train_pos]),
        x_test=_pair(images[f_index[test_pos]], f_labels[test_pos]),
        Z_index=z_index,
        image_shape=(8, 8),
        pretrain_classes=tuple(int(c) for c in pretrain_classes),
        finetune_classes=tuple(int(c) for c in finetune_classes),
    )


def _subsample(n, size, rng):
    """Sorted positions of a random subsample of ``size`` of ``range(n)`` (all if None)."""
    if size is None or size >= n:
        return np.arange(n)
    return np.sort(rng.choice(n, size=int(size), replace=False))


# --------------------------------------------------------------------------- Fashion-MNIST


def _missing_message(path, missing):
    return (
        f"Fashion-MNIST not found: {missing} is missing from {os.fspath(path)!r}. Install "
        "the Debian package 'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist), "
        "or pass path= to a folder holding the four MNIST-format files "
        f"{sorted(f for pair in FASHION_MNIST_FILES.values() for f in pair)}."
    )


def fashion_mnist_available(path=FASHION_MNIST_PATH):
    """Whether the four Fashion-MNIST files are in ``path``.

    Tests that need the data skip with a clear message when it is absent::

        needs_fashion_mnist = pytest.mark.skipif(
            not fashion_mnist_available(),
            reason="Fashion-MNIST is not installed (Debian package dataset-fashion-mnist)")

    Parameters
    ----------
    path : str or os.PathLike, default="/usr/share/datasets/fashion-mnist"
        Folder that should hold ``train-images-idx3-ubyte.gz``,
        ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
        ``t10k-labels-idx1-ubyte.gz`` (where the Debian package ``dataset-fashion-mnist``
        installs them).

    Returns
    -------
    available : bool
        True when all four files are there; their contents are not checked.

    See Also
    --------
    load_fashion_mnist : Read the four files.

    Examples
    --------
    >>> import tempfile
    >>> from skmsif.datasets import fashion_mnist_available
    >>> isinstance(fashion_mnist_available(), bool)  # True where the package is installed
    True
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     fashion_mnist_available(folder)
    False
    """
    folder = Path(path)
    return all((folder / name).is_file()
               for pair in FASHION_MNIST_FILES.values() for name in pair)


def _read_idx(filename):
    """One gzip-compressed IDX file (the MNIST format) as a numpy array."""
    with gzip.open(filename, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{os.fspath(filename)!r} is not an IDX file (bad magic number).")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
              0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{os.fspath(filename)!r}: unknown IDX data type {raw[2]:#x}.")
    n_dims = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(n_dims))
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * n_dims)
    if data.size != int(np.prod(shape)):
        raise ValueError(
            f"{os.fspath(filename)!r} holds {data.size} values, its header says {shape}.")
    return data.reshape(shape)


def load_fashion_mnist(path=FASHION_MNIST_PATH):
    """Fashion-MNIST from its four MNIST-format ``.gz`` files, with numpy only.

    Parameters
    ----------
    path : str or os.PathLike, default="/usr/share/datasets/fashion-mnist"
        Folder with ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` (where the
        Debian package ``dataset-fashion-mnist`` installs them).

    Returns
    -------
    data : sklearn.utils.Bunch
        ``train`` and ``test``: ``(images, labels)`` pairs, images float32 of shape
        ``(n, 1, 28, 28)`` scaled to [0, 1], labels int64 in 0-9 (60,000 and 10,000
        examples); ``classes``: the class names.

    Raises
    ------
    FileNotFoundError
        When a file is missing; the message names the package to install.
    ValueError
        When a file is not in the IDX format, or images and labels do not match.

    See Also
    --------
    fashion_mnist_available : Whether the files are there.
    fashion_mnist_split : The pretrain and finetune tasks of the paper's protocol.

    Examples
    --------
    ``load_fashion_mnist()`` reads the real data set where the Debian package is
    installed. Here it reads a tiny stand-in written in the same format: 20 training
    and 10 test images of random pixels, labelled 0-9 in turn.

    >>> import gzip
    >>> import os
    >>> import tempfile
    >>> import numpy as np
    >>> from skmsif.datasets import fashion_mnist_available, load_fashion_mnist
    >>> def write_idx(filename, array):
    ...     # IDX header: two zero bytes, type 0x08 (uint8), number of dimensions, sizes
    ...     header = bytes([0, 0, 0x08, array.ndim])
    ...     header += b"".join(n.to_bytes(4, "big") for n in array.shape)
    ...     with gzip.open(filename, "wb") as handle:
    ...         handle.write(header + array.astype(np.uint8).tobytes())
    >>> rng = np.random.RandomState(0)
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     for prefix, n in (("train", 20), ("t10k", 10)):
    ...         write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte.gz"),
    ...                   rng.randint(0, 256, size=(n, 28, 28)))
    ...         write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte.gz"),
    ...                   np.arange(n) % 10)
    ...     available = fashion_mnist_available(folder)
    ...     data = load_fashion_mnist(folder)
    >>> available
    True
    >>> images, labels = data.train
    >>> images.shape, images.dtype, labels.dtype
    ((20, 1, 28, 28), dtype('float32'), dtype('int64'))
    >>> bool(images.min() >= 0.0), bool(images.max() <= 1.0)
    (True, True)
    >>> data.test[1].tolist()
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> data.classes[:3]
    ('T-shirt/top', 'Trouser', 'Pullover')
    """
    folder = Path(path)
    parts = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        for name in (images_name, labels_name):
            if not (folder / name).is_file():
                raise FileNotFoundError(_missing_message(folder, name))
        images = _read_idx(folder / images_name)
        labels = _read_idx(folder / labels_name)
        if images.ndim != 3 or len(images) != len(labels):
            raise ValueError(
                f"{split} images of shape {images.shape} do not match {len(labels)} labels.")
        images = (images.astype(np.float32) / 255.0)[:, None, :, :]
        parts[split] = (images, labels.astype(np.int64))
    return Bunch(train=parts["train"], test=parts["test"], classes=FASHION_MNIST_CLASSES)


def fashion_mnist_split(random_state=0, *, path=FASHION_MNIST_PATH, data=None,
                        pretrain_classes=PRETRAIN_CLASSES, finetune_classes=FINETUNE_CLASSES,
                        n_pretrain=None, n_finetune=5000, n_test=None, n_holdout=0):
    """Fashion-MNIST as a pretrain task and a finetune task (the paper's MNIST protocol).

    ``Z``: every training image of ``pretrain_classes`` (24,000 for classes 0-3),
    labelled ``0, 1, ...`` in that order. ``X``: a random subsample of ``n_finetune``
    training images of ``finetune_classes``, relabelled the same way. ``x_test``: the
    test-set (t10k) images of ``finetune_classes``.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=0
        Draws the subsamples.
    path : str or os.PathLike, default="/usr/share/datasets/fashion-mnist"
        Passed to :func:`load_fashion_mnist` when ``data`` is None.
    data : sklearn.utils.Bunch, default=None
        The output of :func:`load_fashion_mnist`, to avoid reading the files again.
    pretrain_classes, finetune_classes : sequence of int
        Class labels of each task.
    n_pretrain, n_finetune, n_test : int or None
        Sizes of random subsamples of ``Z``, ``X`` and ``x_test`` (``None``: all). The
        defaults are ``None``, 5000 and ``None``.
    n_holdout : int, default=0
        Training images of ``pretrain_classes`` kept out of ``Z`` (drawn first) and
        returned as ``Z_holdout``, with the test images of those classes as
        ``Z_holdout_test``: unseen data of the pretrain task (paper Sec. 4.2).

    Returns
    -------
    split : sklearn.utils.Bunch
        ``Z``, ``X``, ``x_test``, ``Z_holdout``, ``Z_holdout_test`` as ``(images,
        labels)`` pairs (float32 ``(n, 1, 28, 28)`` and int64); ``image_shape``
        ``(28, 28)``; ``pretrain_classes``, ``finetune_classes``; ``class_names``.

    Raises
    ------
    FileNotFoundError
        When ``data`` is None and a file is missing from ``path``.

    See Also
    --------
    load_fashion_mnist : The data set itself.
    load_digits_split : The same two tasks on scikit-learn's 8x8 digits.

    Examples
    --------
    ``fashion_mnist_split()`` reads the real data set where the Debian package is
    installed. Here the split is made of a small synthetic stand-in for the output of
    :func:`load_fashion_mnist`: 40 training and 20 test images, labelled 0-9 in turn.

    >>> import numpy as np
    >>> from sklearn.utils import Bunch
    >>> from skmsif.datasets import FASHION_MNIST_CLASSES, fashion_mnist_split
    >>> rng = np.random.RandomState(0)
    >>> def fake(n):
    ...     return rng.rand(n, 1, 28, 28).astype(np.float32), np.arange(n) % 10
    >>> data = Bunch(train=fake(40), test=fake(20), classes=FASHION_MNIST_CLASSES)
    >>> split = fashion_mnist_split(random_state=0, data=data, n_finetune=6, n_holdout=2)
    >>> {name: len(split[name][1]) for name in ("Z", "Z_holdout", "X", "x_test")}
    {'Z': 14, 'Z_holdout': 2, 'X': 6, 'x_test': 12}
    >>> np.unique(split.Z[1]).tolist(), np.unique(split.x_test[1]).tolist()
    ([0, 1, 2, 3], [0, 1, 2, 3, 4, 5])
    >>> split.X[0].shape, split.X[0].dtype, split.finetune_classes
    ((6, 1, 28, 28), dtype('float32'), (4, 5, 6, 7, 8, 9))
    """
    rng = check_random_state(random_state)
    data = load_fashion_mnist(path) if data is None else data

    def select(images, labels, classes, size, exclude=()):
        mask = np.setdiff1d(np.flatnonzero(np.isin(labels, classes)), exclude)
        mask = mask[_subsample(len(mask), size, rng)]
        mapping = np.full(10, -1)
        mapping[list(classes)] = np.arange(len(classes))
        return mask, _pair(images[mask], mapping[labels[mask]])

    train_images, train_labels = data.train
    test_images, test_labels = data.test
    pretrain_classes, finetune_classes = list(pretrain_classes), list(finetune_classes)
    held, holdout = select(train_images, train_labels, pretrain_classes, n_holdout)
    if not n_holdout:
        held, holdout = held[:0], (holdout[0][:0], holdout[1][:0])
    return Bunch(
        Z=select(train_images, train_labels, pretrain_classes, n_pretrain, held)[1],
        Z_holdout=holdout,
        Z_holdout_test=select(test_images, test_labels, pretrain_classes, n_test)[1],
        X=select(train_images, train_labels, finetune_classes, n_finetune)[1],
        x_test=select(test_images, test_labels, finetune_classes, n_test)[1],
        image_shape=(28, 28),
        pretrain_classes=tuple(int(c) for c in pretrain_classes),
        finetune_classes=tuple(int(c) for c in finetune_classes),
        class_names=FASHION_MNIST_CLASSES,
    )

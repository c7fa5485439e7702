"""Data sets, models and training routines of the paper's experiments (Chen et al., Sec. 4).

Two pretrain/finetune set-ups, both "pretrain on some classes, finetune on the others":

* :func:`load_digits_split`: scikit-learn's 8x8 digits (offline, tiny), pretrain on
  digits 0-3, finetune on digits 4-9; with :func:`make_digits_mlp`.
* :func:`load_fashion_mnist` and :func:`fashion_mnist_split`: Fashion-MNIST read from the
  MNIST-format files of the Debian package ``dataset-fashion-mnist``, pretrain on classes
  0-3, finetune on a 5,000-example subsample of classes 4-9 (the paper's MNIST protocol,
  Appendix B); with :func:`make_mnist_cnn`, the paper's Table A "MNIST" network.

:func:`fit_lbfgs` and :func:`fit_adam` train one stage on exactly the objectives that
:func:`skmsif.validation.leave_one_out` retrains (its Notes): the mean per-example loss,
plus ``(damping / 2) ||params||^2``, plus ``alpha ||W - W_bar||^2`` for the ``anchors``
(Case 2's finetune stage). Training with ``damping`` equal to the estimator's damping
makes the damped Hessians the estimator inverts the true Hessians of what was minimised.

Notation: ``doc/guide/influence.md``. ``Z`` is the pretrain data, ``X`` the finetune data,
``x_test`` finetune test points; each is an ``(inputs, targets)`` pair of numpy arrays.
"""

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils import Bunch, check_random_state
from torch import nn

from ._data import TensorData
from ._losses import cross_entropy
from ._training import Stage, minimise

__all__ = [
    "FASHION_MNIST_PATH",
    "FASHION_MNIST_CLASSES",
    "load_digits_split",
    "load_fashion_mnist",
    "fashion_mnist_available",
    "fashion_mnist_split",
    "make_digits_mlp",
    "make_mnist_cnn",
    "fit_lbfgs",
    "fit_adam",
    "total_loss",
    "per_example_loss",
    "accuracy",
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


# --------------------------------------------------------------------------- models


def make_digits_mlp(hidden=16, *, n_inputs=64, n_pretrain_classes=4, n_finetune_classes=6,
                    seed=0, dtype=torch.float64):
    """A one-hidden-layer MLP for the 8x8 digits: ``Linear(64, hidden) + Tanh`` embedding.

    Parameters
    ----------
    hidden : int, default=16
        Width of the embedding.
    n_inputs : int, default=64
        Input features.
    n_pretrain_classes, n_finetune_classes : int
        Outputs of the two linear task heads.
    seed : int, default=0
        Seeds the initialisation (torch's global generator is left as it was).
    dtype : torch.dtype, default=torch.float64
        Dtype of the parameters.

    Returns
    -------
    embedding, pretrain_model, finetune_model : torch.nn.Module
        ``pretrain_model = Sequential(embedding, head)`` and likewise ``finetune_model``;
        both hold the *same* embedding object (Case 1). For Case 2 give the finetune
        model a deep copy: ``Sequential(copy.deepcopy(embedding), finetune_model[1])``.

    See Also
    --------
    load_digits_split : The data these models are for.

    Examples
    --------
    >>> import copy
    >>> import torch
    >>> from skmsif.datasets import make_digits_mlp
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=8, seed=0)
    >>> inputs = torch.zeros(5, 64, dtype=torch.float64)
    >>> pretrain_model(inputs).shape, finetune_model(inputs).shape
    (torch.Size([5, 4]), torch.Size([5, 6]))
    >>> finetune_model[0] is embedding, embedding[0].weight.dtype
    (True, torch.float64)
    >>> case2_model = torch.nn.Sequential(copy.deepcopy(embedding), finetune_model[1])
    >>> case2_model[0] is embedding
    False
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = nn.Sequential(nn.Linear(n_inputs, hidden), nn.Tanh())
        pretrain_head = nn.Linear(hidden, n_pretrain_classes)
        finetune_head = nn.Linear(hidden, n_finetune_classes)
    pretrain_model = nn.Sequential(embedding, pretrain_head).to(dtype)
    finetune_model = nn.Sequential(embedding, finetune_head).to(dtype)
    return embedding, pretrain_model, finetune_model


def make_mnist_cnn(n_pretrain_classes=4, n_finetune_classes=6, seed=0, *,
                   dtype=torch.float32):
    """The paper's Table A "MNIST" network, for inputs of shape ``(N, 1, 28, 28)``.

    Embedding: ``CONV 32 5x5 + 1``, ``MAX-POOL 2x2 + 2``, ``CONV 64 5x5 + 1``,
    ``MAX-POOL 2x2 + 2``, Tanh activations, flattened to 1,024 features; task heads
    ``FC <#classes>`` without activation. Max-pooling is applied before each Tanh: Tanh
    is increasing, so ``pool(tanh(x)) == tanh(pool(x))`` and the network is the same
    function at a quarter of the Tanh evaluations.

    Parameters
    ----------
    n_pretrain_classes, n_finetune_classes : int
        Outputs of the two heads.
    seed : int, default=0
        Seeds the initialisation (torch's global generator is left as it was).
    dtype : torch.dtype, default=torch.float32
        Dtype of the parameters.

    Returns
    -------
    embedding, pretrain_model, finetune_model : torch.nn.Module
        ``Sequential(embedding, head)`` each, sharing the embedding object (Case 1); for
        Case 2 deep-copy the embedding into the finetune model.

    Examples
    --------
    >>> import torch
    >>> from skmsif.datasets import make_mnist_cnn
    >>> embedding, pretrain_model, finetune_model = make_mnist_cnn()
    >>> pretrain_model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 4])
    >>> finetune_model[0] is embedding
    True
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        embedding = nn.Sequential(
            nn.Conv2d(1, 32, kernel_size=5, stride=1), nn.MaxPool2d(2, stride=2), nn.Tanh(),
            nn.Conv2d(32, 64, kernel_size=5, stride=1), nn.MaxPool2d(2, stride=2), nn.Tanh(),
            nn.Flatten())
        pretrain_head = nn.Linear(64 * 4 * 4, n_pretrain_classes)
        finetune_head = nn.Linear(64 * 4 * 4, n_finetune_classes)
    pretrain_model = nn.Sequential(embedding, pretrain_head).to(dtype)
    finetune_model = nn.Sequential(embedding, finetune_head).to(dtype)
    return embedding, pretrain_model, finetune_model


# --------------------------------------------------------------------------- training


def _tensors(data, model):
    """``(inputs, targets)`` as tensors, inputs in the model's dtype."""
    inputs, targets = data
    dtype = next(model.parameters()).dtype
    return (torch.as_tensor(np.asarray(inputs)).to(dtype),
            torch.as_tensor(np.asarray(targets)).long())



def _outputs(model, data, batch_size):
    """Outputs of ``model`` in eval mode on ``data``, batch by batch, and the targets;
    each module's train/eval mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        inputs, targets = _tensors(data, model)
        with torch.no_grad():
            outputs = torch.cat([model(inputs[s:s + batch_size])
                                 for s in range(0, len(inputs), batch_size)])
    finally:
        for module, training in modes:
            module.training = training
    return outputs, targets

def _regulariser(params, damping, anchors, alpha):
    value = 0.0
    if damping:
        value = value + 0.5 * damping * sum((p * p).sum() for p in params)
    if alpha and anchors:
        value = value + alpha * sum(((p - bar) ** 2).sum() for p, bar in anchors)
    return value


def _prepare(model, params, anchors):
    params = list(model.parameters()) if params is None else list(params)
    anchors = [(p, bar.detach().clone()) for p, bar in (anchors or [])]
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    return params, anchors


def fit_lbfgs(model, data, *, params=None, damping=0.0, anchors=None, alpha=0.0,
              max_iter=2000, tol=1e-10, batch_size=None):
    """Minimise a stage's full-batch objective with L-BFGS (strong Wolfe), in place.

    The objective is ``mean_j loss(x_j) + (damping/2) ||params||^2
    + alpha sum ||W - W_bar||^2`` over ``(W, W_bar)`` in ``anchors``, with the
    per-example cross-entropy, the model in eval mode: the same minimiser as the
    "converged" recipe of :func:`skmsif.validation.leave_one_out` (L-BFGS while it makes
    progress, then Newton-CG steps), until the largest gradient entry is at most ``tol``
    or ``max_iter`` iterations are spent.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place.
    data : (inputs, targets) pair of arrays or tensors
        The stage's training data: inputs of ``model`` and integer class labels (the
        loss is the cross-entropy).
    params : list of torch.nn.Parameter, default=None
        The parameters to train (``None``: all of ``model``'s); the others are frozen
        (``requires_grad=False``).
    damping : float, default=0.0
        L2 weight; use the estimator's damping of this stage.
    anchors : list of (torch.nn.Parameter, torch.Tensor), default=None
        Case 2's proximity term: parameters and the values they are pulled towards.
    alpha : float, default=0.0
        Weight of the proximity term.
    max_iter : int, default=2000
        L-BFGS iterations at most.
    tol : float, default=1e-10
        Target for the largest absolute gradient entry.
    batch_size : int, default=None
        Rows per forward pass (memory only; the objective is always the full mean).

    Returns
    -------
    info : dict
        ``objective``, ``grad_max`` (largest absolute gradient entry at the end),
        ``n_iter``, ``converged`` (``grad_max <= tol``).

    See Also
    --------
    fit_adam : The paper's fixed-step recipe instead of a tight minimum.

    Examples
    --------
    Pretrain a small MLP on the digits 0-3, then finetune its head alone on the digits
    4-9 (Case 1: the embedding is frozen):

    >>> from skmsif.datasets import accuracy, fit_lbfgs, load_digits_split, make_digits_mlp
    >>> data = load_digits_split(random_state=0, n_pretrain=60, n_finetune=40)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=4, seed=0)
    >>> info = fit_lbfgs(pretrain_model, data.Z, damping=1e-3)
    >>> info["converged"], round(info["objective"], 3), accuracy(pretrain_model, data.Z)
    (True, 0.036, 1.0)
    >>> head = list(finetune_model[1].parameters())
    >>> info = fit_lbfgs(finetune_model, data.X, params=head, damping=1e-3)
    >>> info["converged"], embedding[0].weight.requires_grad
    (True, False)
    """
    model.eval()
    params, anchors = _prepare(model, params, anchors)
    inputs, targets = _tensors(data, model)
    device = inputs.device
    stage = Stage(model, params, TensorData(inputs.cpu(), targets.cpu(), "data"),
                  cross_entropy, torch.ones(len(inputs), dtype=inputs.dtype), damping,
                  batch_size, device, anchors=anchors, alpha=alpha)
    result = minimise(stage, max_iter, tol)
    objective, _ = stage.evaluate()
    for p in params:
        p.grad = None
    return {"objective": objective, "grad_max": result["grad_norm"],
            "n_iter": result["n_iter"], "converged": result["converged"]}


def fit_adam(model, data, *, params=None, damping=0.0, anchors=None, alpha=0.0,
             n_steps=1000, batch_size=512, lr=1e-3, random_state=0):
    """Take ``n_steps`` Adam steps on shuffled minibatches of a stage's objective, in place.

    The minibatch objective is the minibatch mean of the cross-entropy plus the same
    regularisers as :func:`fit_lbfgs` (the "paper" recipe of
    :func:`skmsif.validation.leave_one_out`). Epochs are reshuffled with
    ``random_state``; the last minibatch of an epoch may be short.

    Parameters
    ----------
    model : torch.nn.Module
        Trained in place (eval mode: no dropout, frozen batch-norm statistics).
    data : (inputs, targets) pair of arrays or tensors
        The stage's training data: inputs of ``model`` and integer class labels (the
        loss is the cross-entropy).
    params : list of torch.nn.Parameter, default=None
        As in :func:`fit_lbfgs`: the parameters to train (``None``: all of ``model``'s);
        the others are frozen.
    damping : float, default=0.0
        As in :func:`fit_lbfgs`: the L2 weight.
    anchors : list of (torch.nn.Parameter, torch.Tensor), default=None
        As in :func:`fit_lbfgs`: Case 2's proximity term.
    alpha : float, default=0.0
        As in :func:`fit_lbfgs`: the weight of the proximity term.
    n_steps : int, default=1000
        Number of Adam steps (minibatches).
    batch_size : int, default=512
        Examples per minibatch.
    lr : float, default=1e-3
        Adam's learning rate.
    random_state : int, default=0
        Seeds the shuffling of the epochs.

    Returns
    -------
    info : dict
        ``n_steps`` and ``last_loss`` (mean minibatch objective over the last 20 steps).

    See Also
    --------
    fit_lbfgs : Minimise the full-batch objective to a tight gradient instead.

    Examples
    --------
    >>> from skmsif.datasets import fit_adam, load_digits_split, make_digits_mlp, total_loss
    >>> data = load_digits_split(random_state=0, n_pretrain=60)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=4, seed=0)
    >>> before = total_loss(pretrain_model, data.Z)
    >>> info = fit_adam(pretrain_model, data.Z, n_steps=50, batch_size=16, lr=0.05)
    >>> info["n_steps"], bool(total_loss(pretrain_model, data.Z) < before / 10)
    (50, True)
    """
    model.eval()
    params, anchors = _prepare(model, params, anchors)
    inputs, targets = _tensors(data, model)
    n = len(inputs)
    rng = np.random.RandomState(random_state)
    optimizer = torch.optim.Adam(params, lr=lr)
    recent, done = [], 0
    while done < n_steps:
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, batch_size):
            if done == n_steps:
                break
            rows = order[start:start + batch_size]
            optimizer.zero_grad()
            value = F.cross_entropy(model(inputs[rows]), targets[rows])
            value = value + _regulariser(params, damping, anchors, alpha)
            value.backward()
            optimizer.step()
            recent = (recent + [float(value.detach())])[-20:]
            done += 1
    for p in params:
        p.grad = None
    return {"n_steps": done, "last_loss": float(np.mean(recent)) if recent else np.nan}


def total_loss(model, data, batch_size=1024):
    """Summed cross-entropy of ``model`` (eval mode) over ``data``.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier, evaluated in eval mode (its own mode is left as it was).
    data : (inputs, targets) pair of arrays or tensors
        Inputs of ``model`` and integer class labels.
    batch_size : int, default=1024
        Rows per forward pass (memory only).

    Returns
    -------
    loss : float
        The sum over the examples of ``data`` of their cross-entropy.

    See Also
    --------
    per_example_loss : The cross-entropy of each example.

    Examples
    --------
    With the head's weights and bias at zero, every one of the 4 classes gets the
    probability 1/4, so each of the 10 examples has the loss ``log(4)``:

    >>> import math
    >>> import torch
    >>> from skmsif.datasets import load_digits_split, make_digits_mlp, total_loss
    >>> data = load_digits_split(random_state=0, n_pretrain=10)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(seed=0)
    >>> with torch.no_grad():
    ...     _ = pretrain_model[1].weight.zero_(), pretrain_model[1].bias.zero_()
    >>> round(total_loss(pretrain_model, data.Z), 4), round(10 * math.log(4), 4)
    (13.8629, 13.8629)
    """
    outputs, targets = _outputs(model, data, batch_size)
    return float(F.cross_entropy(outputs, targets, reduction="sum"))


def per_example_loss(model, data, batch_size=1024):
    """Cross-entropy of every example of ``data``, shape ``(n,)`` numpy float64.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier, evaluated in eval mode (its own mode is left as it was).
    data : (inputs, targets) pair of arrays or tensors
        Inputs of ``model`` and integer class labels.
    batch_size : int, default=1024
        Rows per forward pass (memory only).

    Returns
    -------
    losses : ndarray of shape (n,)
        The cross-entropy of each example of ``data`` (float64), in order.

    See Also
    --------
    total_loss : Their sum.

    Examples
    --------
    >>> import numpy as np
    >>> from skmsif.datasets import (load_digits_split, make_digits_mlp,
    ...                              per_example_loss, total_loss)
    >>> data = load_digits_split(random_state=0, n_pretrain=10)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(seed=0)
    >>> losses = per_example_loss(pretrain_model, data.Z)
    >>> losses.shape, losses.dtype, bool((losses > 0).all())
    ((10,), dtype('float64'), True)
    >>> bool(np.isclose(losses.sum(), total_loss(pretrain_model, data.Z)))
    True
    """
    outputs, targets = _outputs(model, data, batch_size)
    return F.cross_entropy(outputs, targets, reduction="none").double().numpy()


def accuracy(model, data, batch_size=1024):
    """Fraction of ``data`` that ``model`` (eval mode) classifies right.

    Parameters
    ----------
    model : torch.nn.Module
        A classifier, evaluated in eval mode (its own mode is left as it was).
    data : (inputs, targets) pair of arrays or tensors
        Inputs of ``model`` and integer class labels.
    batch_size : int, default=1024
        Rows per forward pass (memory only).

    Returns
    -------
    accuracy : float
        In ``[0, 1]``: the fraction of examples whose largest output is at their label.

    Examples
    --------
    >>> from skmsif.datasets import accuracy, fit_adam, load_digits_split, make_digits_mlp
    >>> data = load_digits_split(random_state=0, n_pretrain=60)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=4, seed=0)
    >>> info = fit_adam(pretrain_model, data.Z, n_steps=50, batch_size=16, lr=0.05)
    >>> bool(accuracy(pretrain_model, data.Z) > 0.9)
    True
    """
    outputs, targets = _outputs(model, data, batch_size)
    return float((outputs.argmax(1) == targets).double().mean())

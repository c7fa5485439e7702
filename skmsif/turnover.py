"""Turn-over dropout: influence from instance-specific sub-networks, no Hessian at all.

Kobayashi et al., "Efficient Estimation of Influence of a Training Instance" (2020). Every
training example ``z`` (identified by an integer id) has its own deterministic dropout mask
``m(z)``; training on ``z`` updates only the sub-network ``f^m(z)``, so the *flipped*
sub-network ``f^m~(z)`` never sees ``z``. The influence of ``z`` on a test point ``x_t`` is
estimated by two forward passes (the paper's Eq. 2)::

    delta(z, x_t) = L(x_t; f^m~(z)) - L(x_t; f^m(z))

``delta`` estimates the change of the test loss when ``z`` is removed from training. To
line up with :class:`~skmsif.MultiStageInfluenceEstimator`, whose ``I`` predicts that
change as ``-I / m``, :class:`TurnOverDropoutEstimator` reports ``influence = -m * delta``:
positive means harmful (``z`` raises the test loss; removing it would lower it), and
``-influence / m`` is the raw ``delta`` (:meth:`TurnOverDropoutEstimator.removal_effect`).

What this module provides:

* :func:`turnover_mask`: the masks, generated on demand from ``(seed, id)`` by an integer
  hash ("volatile" masks, paper Sec. 3.3); nothing is stored per example.
* :class:`TurnOverDropout`: a wrapper around a ``Linear`` or ``Conv2d`` layer (optionally
  followed by parameter-free modules such as an activation) that multiplies the output
  units / channels of each example of a batch by that example's mask.
* :func:`turnover_masks`: a context manager that feeds the ids of a batch (and whether
  to use the own or the flipped masks) to every such layer of a model.
* :func:`train_turnover`: a training helper that feeds example ids through.
* :class:`TurnOverDropoutEstimator`: single-stage influence (paper Eq. 2) and our
  multi-stage extension (masks on the shared embedding during pretraining; the finetuned
  model is evaluated with the embedding under the flipped vs the own mask).
"""

import contextlib
import copy
import time
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params
from sklearn.utils.validation import check_is_fitted
from torch import nn

from ._checks import probe_model, resolve_device
from ._data import as_data
from ._losses import LOSSES, check_losses, check_outputs, resolve_loss
from ._progress import progress
from ._training import Stage, n_minibatch_steps, run_lbfgs, run_steps

__all__ = [
    "turnover_mask",
    "TurnOverDropout",
    "turnover_masks",
    "train_turnover",
    "TurnOverDropoutEstimator",
]

_M32 = 0xFFFFFFFF
# Constants of a 32-bit integer finaliser (multipliers < 2**31, so that products of
# 32-bit values fit in int64 without overflow).
_MULTIPLIER = 0x45D9F3B
_GOLDEN = 0x9E3779B1
# Layers whose parameters are partitioned into per-unit slices by an output mask.
_PARTITIONED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- masks


def _mix(x):
    """32-bit integer hash of an int64 tensor holding values in ``[0, 2**32)``."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _M32
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER) & _M32
    return x ^ (x >> 16)


def _keep_bits(ids, n_units, seed, p):
    """Boolean ``(len(ids), n_units)``: which units example ``id`` keeps."""
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    seed_key = _mix(torch.tensor(int(seed) & _M32, dtype=torch.int64))
    seed_key = _mix(seed_key ^ ((int(seed) >> 32) & _M32))
    id_key = _mix(_mix(ids & _M32) ^ _mix((ids >> 32) & _M32) ^ seed_key)
    units = torch.arange(n_units, dtype=torch.int64)
    bits = _mix(_mix((id_key[:, None] + units[None, :] * _GOLDEN) & _M32))
    return bits < int(round(p * 2**32))


def turnover_mask(ids, n_units, *, seed=0, p=0.5, flipped=False, dtype=torch.float64):
    """Instance-specific dropout masks, generated on demand (never stored).

    Unit ``j`` of example ``id`` is kept when a 32-bit integer hash of
    ``(seed, id, j)`` falls below ``p * 2**32``: a deterministic function of its
    arguments, so the same example gets the same mask in every epoch, and no memory is
    spent per example (the paper's "volatile" masks, Sec. 3.3).

    Parameters
    ----------
    ids : array-like of int of shape (n,)
        Example ids (non-negative integers, e.g. positions in the training set).
    n_units : int
        Number of units (output features or channels) of the masked layer.
    seed : int, default=0
        Selects the family of masks; layers with different seeds get independent masks.
    p : float, default=0.5
        Probability that a unit is kept in the own mask ``m(z)``.
    flipped : bool, default=False
        Return the flipped mask ``m~(z)``, which keeps exactly the units ``m(z)`` drops.
    dtype : torch.dtype, default=torch.float64
        Data type (dtype) of the returned mask.

    Returns
    -------
    mask : torch.Tensor of shape (n, n_units)
        Own mask: ``1/p`` on kept units, ``0`` elsewhere. Flipped mask: ``1/(1-p)`` on
        the units the own mask drops, ``0`` elsewhere (for ``p = 0.5`` this is the paper's
        ``1/p - m(z)``).

    Examples
    --------
    >>> from skmsif.turnover import turnover_mask
    >>> own = turnover_mask([0, 1, 0], 6, seed=3)
    >>> flipped = turnover_mask([0, 1, 0], 6, seed=3, flipped=True)
    >>> bool((own[0] == own[2]).all()), bool(((own > 0) ^ (flipped > 0)).all())
    (True, True)
    >>> sorted(set(own.flatten().tolist()))
    [0.0, 2.0]
    """
    if not 0 < p < 1:
        raise ValueError(f"p={p!r} must lie strictly between 0 and 1 (the paper uses 0.5).")
    ids = torch.as_tensor(ids)
    if ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"ids must be integers (example ids); got dtype {ids.dtype}.")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"ids must be non-negative; got {int(ids.min())}.")
    keep = _keep_bits(ids, int(n_units), seed, p)
    if flipped:
        return (~keep).to(dtype) / (1 - p)
    return keep.to(dtype) / p


# --------------------------------------------------------------------------- the layer


class TurnOverDropout(nn.Module):
    """Wrap a layer so that each example of a batch uses its own half of its units.

    The wrapped module's output ``y`` (shape ``(batch, units, ...)``) is multiplied, per
    example, by :func:`turnover_mask` of that example's id, broadcast over any trailing
    (spatial) dimensions: units for ``Linear``, channels for ``Conv2d``. Which ids, and
    whether the own or the flipped masks are used, is set by :func:`turnover_masks`
    (:func:`train_turnover` and :class:`TurnOverDropoutEstimator` do it for you).
    Outside that context the layer is the plain wrapped module: the full network
    ``f_D`` (masks have mean one, as in inverted dropout).

    Because a dropped unit's output is multiplied by zero, the loss of an example has
    zero gradient with respect to every parameter of the wrapped layer that only feeds
    that unit (its weight row / filter and bias entry). The parameters of the wrapped
    layer are thereby split into the example's own sub-network and the flipped one, which
    never receives a gradient from the example. Parameters outside wrapped layers are
    shared by both sub-networks and "leak" (paper Sec. 4.1).

    Parameters
    ----------
    module : torch.nn.Module
        ``nn.Linear``, ``nn.Conv1d/2d/3d``, or an ``nn.Sequential`` whose first module is
        one of those and whose other modules have no parameters and act per unit (an
        activation, pooling). Masking after the activation, as in standard dropout, is
        ``TurnOverDropout(nn.Sequential(nn.Linear(64, 16), nn.Tanh()))``.
    seed : int, default=0
        Mask family of this layer; give different layers different seeds for
        independent masks.
    p : float, default=0.5
        Keep probability of the own mask.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.turnover import TurnOverDropout, turnover_masks
    >>> layer = TurnOverDropout(nn.Linear(3, 4), seed=1).double()
    >>> x = torch.ones(2, 3, dtype=torch.float64)
    >>> with turnover_masks(layer, ids=[7, 7]):
    ...     out = layer(x)
    >>> bool(torch.equal(out[0], out[1]))
    True
    >>> with turnover_masks(layer, ids=[7, 7], flipped=True):
    ...     flipped = layer(x)
    >>> bool(((out == 0) | (flipped == 0)).all())
    True
    """

    def __init__(self, module, seed=0, p=0.5):
        super().__init__()
        first = module[0] if isinstance(module, nn.Sequential) and len(module) else module
        if not isinstance(first, _PARTITIONED):
            raise TypeError(
                f"TurnOverDropout wraps nn.Linear or nn.Conv1d/2d/3d (or an nn.Sequential "
                f"starting with one); got {type(first).__name__}. Wrap the layer whose "
                "output units should be split between examples."
            )
        if isinstance(module, nn.Sequential):
            for extra in list(module)[1:]:
                if any(True for _ in extra.parameters()):
                    raise ValueError(
                        f"TurnOverDropout(nn.Sequential(...)): only the first module may "
                        f"have parameters, but {type(extra).__name__} has some; wrap each "
                        "parameterised layer in its own TurnOverDropout."
                    )
        if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int.")
        if not (isinstance(p, Real) and 0 < p < 1):
            raise ValueError(f"p={p!r} must lie strictly between 0 and 1 (the paper: 0.5).")
        self.module = module
        self.seed = int(seed)
        self.p = float(p)
        self._ids = None
        self._flipped = False

    def forward(self, inputs):
        """Apply the wrapped module, then the masks of the current ids (if any).

        Parameters
        ----------
        inputs : torch.Tensor of shape (batch, ...)
            Input of the wrapped module.

        Returns
        -------
        outputs : torch.Tensor of shape (batch, units, ...)
            Output of the wrapped module. Inside :func:`turnover_masks`, example ``k``'s
            output is multiplied by the own (or flipped) mask of the ``k``-th id,
            broadcast over trailing dimensions; outside it, the output is unchanged.
        """
        outputs = self.module(inputs)
        if self._ids is None:
            return outputs
        if outputs.ndim < 2 or len(self._ids) != outputs.shape[0]:
            raise ValueError(
                f"turnover_masks got {len(self._ids)} ids but the layer's output has shape "
                f"{tuple(outputs.shape)}; pass one id per example of the batch."
            )
        mask = turnover_mask(self._ids, outputs.shape[1], seed=self.seed, p=self.p,
                             flipped=self._flipped, dtype=outputs.dtype)
        mask = mask.to(outputs.device).reshape(*mask.shape, *([1] * (outputs.ndim - 2)))
        return outputs * mask

    def extra_repr(self):
        """Describe the layer's mask settings in its ``repr``.

        Returns
        -------
        extra : str
            ``"seed=<seed>, p=<p>"``.
        """
        return f"seed={self.seed}, p={self.p}"


def turnover_layers(model):
    """The :class:`TurnOverDropout` layers of ``model``, in module order."""
    return [module for module in model.modules() if isinstance(module, TurnOverDropout)]


@contextlib.contextmanager
def turnover_masks(model, ids, flipped=False):
    """Make every :class:`TurnOverDropout` layer of ``model`` use the masks of ``ids``.

    Inside the context, example ``k`` of each batch uses the own mask of ``ids[k]``
    (``flipped=False``) or its flipped mask (``flipped=True``); on exit the layers return
    to the full network. Contexts nest; the previous setting is restored.

    Parameters
    ----------
    model : torch.nn.Module
        A model with at least one :class:`TurnOverDropout` layer.
    ids : array-like of int of shape (batch,)
        The example ids of the batch about to be passed through ``model``.
    flipped : bool, default=False
        Use the flipped sub-networks (those that never learned from these examples).

    Yields
    ------
    model : torch.nn.Module
        The same ``model``, its :class:`TurnOverDropout` layers set to the masks of
        ``ids`` until the context exits.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.turnover import TurnOverDropout, turnover_masks
    >>> model = nn.Sequential(TurnOverDropout(nn.Linear(2, 8)), nn.Linear(8, 1))
    >>> with turnover_masks(model, ids=torch.arange(5)):
    ...     model(torch.zeros(5, 2)).shape
    torch.Size([5, 1])
    """
    layers = turnover_layers(model)
    if not layers:
        raise ValueError(
            "model has no TurnOverDropout layer; wrap the layers to split between "
            "examples, e.g. TurnOverDropout(nn.Linear(64, 16))."
        )
    ids = torch.as_tensor(ids)
    if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"ids must be a 1-D array of integer example ids; got dtype {ids.dtype} and "
            f"shape {tuple(ids.shape)}."
        )
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"ids must be non-negative; got {int(ids.min())}.")
    ids = ids.to(torch.int64).cpu()
    previous = [(layer._ids, layer._flipped) for layer in layers]
    try:
        for layer in layers:
            layer._ids, layer._flipped = ids, bool(flipped)
        yield model
    finally:
        for layer, (old_ids, old_flipped) in zip(layers, previous):
            layer._ids, layer._flipped = old_ids, old_flipped


# --------------------------------------------------------------------------- training


@validate_params(
    {
        "model": [nn.Module],
        "data": "no_validation",
        "ids": [None, "array-like"],
        "params": [None, list, tuple],
        "loss": [StrOptions(set(LOSSES)), callable],
        "solver": [StrOptions({"lbfgs", "adam", "sgd"})],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "lr": [None, Interval(Real, 0, None, closed="neither")],
        "n_epochs": [Interval(Integral, 0, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def train_turnover(model, data, *, ids=None, params=None, loss="cross_entropy",
                   solver="lbfgs", weight_decay=0.0, max_iter=1000, tol=1e-9, lr=None,
                   n_epochs=10, batch_size=64, random_state=None):
    """Train ``model`` in place, each example through its own turn-over sub-network.

    Every batch is passed through ``model`` inside :func:`turnover_masks` with the ids of
    its examples, so example ``z`` only ever updates its own sub-network of every
    :class:`TurnOverDropout` layer. With fixed masks the training objective

        ``(1/n) sum_z loss(f^m(z)(x_z), y_z) + (weight_decay / 2) ||params||^2``

    is deterministic, so ``solver="lbfgs"`` minimises it full-batch to convergence;
    ``"adam"`` and ``"sgd"`` take minibatch steps on it instead.

    Parameters
    ----------
    model : torch.nn.Module
        Has at least one :class:`TurnOverDropout` layer. Trained in place (this is the
        one function of the package that changes a model: training is its job).
    data : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
        The training set, in the model's dtype.
    ids : array-like of int of shape (n,), default=None
        Example ids; ``None`` means the positions ``0..n-1``. Pass the same ids to
        :class:`TurnOverDropoutEstimator`. Use ids that do not collide between data sets
        whose influences you want to tell apart.
    params : list of torch.nn.Parameter, default=None
        Parameters to train (e.g. only a finetune head); ``None``: every parameter of
        ``model``. Others are left exactly as they are.
    loss : {"cross_entropy", "mse"} or callable, default="cross_entropy"
        Per-example loss, as in the estimators.
    solver : {"lbfgs", "adam", "sgd"}, default="lbfgs"
        Full-batch L-BFGS (strong Wolfe) or minibatch Adam / SGD.
    weight_decay : float, default=0.0
        L2 weight of the objective (all solvers).
    max_iter : int, default=1000
        ``"lbfgs"``: iterations at most.
    tol : float, default=1e-9
        ``"lbfgs"``: stop when the largest absolute gradient entry is below ``tol``.
    lr : float, default=None
        Step size; ``None``: 1 for ``"lbfgs"``, 1e-3 for ``"adam"``, 0.1 for ``"sgd"``.
    n_epochs : int, default=10
        ``"adam"`` / ``"sgd"``: passes over ``data``.
    batch_size : int, default=64
        ``"adam"`` / ``"sgd"``: minibatch size.
    random_state : int, RandomState instance or None, default=None
        ``"adam"`` / ``"sgd"``: shuffles the minibatches.

    Returns
    -------
    model : torch.nn.Module
        The same object, trained.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.turnover import TurnOverDropout, train_turnover
    >>> gen = torch.Generator().manual_seed(0)
    >>> data = (torch.randn(40, 3, generator=gen, dtype=torch.float64),
    ...         torch.randint(0, 2, (40,), generator=gen))
    >>> model = nn.Sequential(TurnOverDropout(nn.Sequential(nn.Linear(3, 8), nn.Tanh())),
    ...                       nn.Linear(8, 2)).double()
    >>> train_turnover(model, data, weight_decay=1e-2) is model
    True
    """
    if not turnover_layers(model):
        raise ValueError(
            "model has no TurnOverDropout layer, so training would not split it between "
            "examples; wrap a layer, e.g. TurnOverDropout(nn.Linear(64, 16))."
        )
    first = next(iter(model.parameters()), None)
    if first is None:
        raise ValueError("model has no parameters to train.")
    data = as_data(data, "data", first.dtype if first.is_floating_point()
                   else torch.float64)
    n = len(data)
    ids = _check_ids(ids, n, "ids", "data")
    params = list(model.parameters()) if params is None else list(params)
    if not params:
        raise ValueError("params is empty: pass the parameters to train, or None for all.")
    stage = _TurnOverStage(model, params, data, resolve_loss(loss), None, weight_decay,
                           None, first.device, ids=ids, loss_name=loss)
    requires = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        if solver == "lbfgs":
            run_lbfgs(stage, max_iter, tol, lr=1.0 if lr is None else lr,
                      tolerance_change=1e-15)
        else:
            default_lr = 1e-3 if solver == "adam" else 0.1
            run_steps(stage, torch.optim.Adam if solver == "adam" else torch.optim.SGD,
                      default_lr if lr is None else lr,
                      n_minibatch_steps(n, batch_size, n_epochs), batch_size,
                      check_random_state(random_state), shuffle_full_batch=True,
                      final_gradient=False)
    finally:
        for p, flag in zip(params, requires):
            p.grad = None
            p.requires_grad_(flag)
    return model


class _TurnOverStage(Stage):
    """A training stage whose examples pass through their own turn-over masks."""

    def __init__(self, *args, ids, loss_name, **kwargs):
        super().__init__(*args, **kwargs)
        self.ids = ids
        self.loss_name = loss_name

    def losses(self, rows):
        inputs = self.data.inputs[rows].to(self.device)
        targets = self.data.targets[rows].to(self.device)
        with turnover_masks(self.model, self.ids[rows]):
            outputs = self.model(inputs)
        if isinstance(self.loss_name, str):
            check_outputs(outputs, self.data, self.loss_name, "loss", "model")
        losses = self.loss(outputs, targets)
        check_losses(losses, len(targets), "loss")
        return losses


def _check_ids(ids, n, name, data_name):
    if ids is None:
        return torch.arange(n)
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(
            f"{name} must have one id per example of {data_name}, shape ({n},); got shape "
            f"{ids.shape}."
        )
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"{name} must hold integers; got dtype {ids.dtype}.")
    if n and ids.min() < 0:
        raise ValueError(f"{name} must be non-negative; got {int(ids.min())}.")
    return torch.from_numpy(ids.astype(np.int64))


# --------------------------------------------------------------------------- estimator


class TurnOverDropoutEstimator(BaseEstimator):
    """Influence of training examples from turn-over dropout sub-networks (no Hessian).

    The model must have been trained with :class:`TurnOverDropout` layers and example ids
    (e.g. by :func:`train_turnover`). For a training example ``z`` and a test point
    ``x_t`` the estimator evaluates the test loss through the sub-network that never
    learned ``z`` (flipped mask) and the one that did (own mask), Kobayashi et al. Eq. 2::

        delta(z, x_t) = L(x_t; flipped mask of z) - L(x_t; own mask of z)

    ``delta`` estimates ``L(without z) - L(with z)``, the change of the test loss when
    ``z`` is removed (:meth:`removal_effect`). :meth:`influence` reports
    ``-m * delta`` (``m`` training examples), on the sign and scale of
    :class:`~skmsif.MultiStageInfluenceEstimator`: positive means harmful, and
    ``-influence / m`` is the predicted removal change, as for ``I``.

    Single stage (``fit(model, Z)``): the test loss is that of ``model`` itself.
    Multi-stage (``fit(pretrain_model, Z, finetune_model=...)``, our extension, not in
    the paper): the masks sit on the embedding shared by both models and were applied
    while pretraining on ``Z``; the test loss is the finetuned model's, evaluated with
    the embedding under the flipped vs the own mask of each pretrain example, the
    finetune head held as it is. See Notes for the assumptions.

    Parameters
    ----------
    loss : {"cross_entropy", "mse"} or callable, default="cross_entropy"
        Per-example test loss (of the finetune model in the multi-stage case).
    train_loss : {"cross_entropy", "mse"} or callable, default="cross_entropy"
        Per-example loss on ``Z`` (of the pretrain model), used by
        :meth:`self_influence`.
    batch_size : int, default=4096
        Rows per forward pass; a pass evaluates (training example, test point) pairs, so
        this bounds memory, not the result.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the evaluation (on copies of the models).
    device : str or torch.device, default="cpu"
        Where the forward passes run.
    verbose : int, default=0
        Show a progress bar over training examples.

    Attributes
    ----------
    n_train_ : int
        Number of training (pretrain) examples ``m``.
    ids_ : ndarray of shape (m,)
        The ids whose masks the training examples were trained with.
    multi_stage_ : bool
        Whether a finetune model was given.
    n_turnover_layers_ : int
        :class:`TurnOverDropout` layers in the evaluated model.
    fit_time_ : float
        Seconds spent in ``fit`` (copying and checking; no computation happens there).

    Notes
    -----
    Cost: two forward passes of the evaluated model per (training example, test point)
    pair, ``O(m * n_test)`` forwards, and nothing else: no gradient, no Hessian, no
    retraining. :meth:`score` needs all pairs too (losses are not additive in the
    masks). Memory: nothing per example (masks are recomputed from ``(seed, id)``).

    Assumptions (and where they fail):

    * The two sub-networks stand in for the models trained with and without ``z``
      (paper footnote 4). They also differ by which other examples and which initial
      weights they got, so ``delta`` carries a per-example mask effect that has nothing
      to do with ``z``; it averages out over many test points only when each
      sub-network is as good as the other.
    * Only the parameters of :class:`TurnOverDropout` layers are split; all others
      learn from every example ("leaky").
    * Multi-stage extension: (a) removing ``z`` from pretraining changes the finetuned
      model only through the embedding, and the flipped embedding stands for the
      embedding pretrained without ``z``; (b) the finetune head is *not* re-finetuned on
      the flipped embedding (the multi-stage influence function accounts for that
      through ``H_W_Theta``; here it is ignored); (c) the head works on half-masked
      embeddings, which holds when it was finetuned through turn-over masks as well
      (e.g. :func:`train_turnover` with ``params`` the head and ids not used by ``Z``);
      with the embedding updated during finetuning (Case 2), its masked parameters must
      still be the ones pretrained through the same masks.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.turnover import (TurnOverDropout, TurnOverDropoutEstimator,
    ...                              train_turnover)
    >>> gen = torch.Generator().manual_seed(0)
    >>> Z = (torch.randn(30, 3, generator=gen, dtype=torch.float64),
    ...      torch.randint(0, 2, (30,), generator=gen))
    >>> model = nn.Sequential(TurnOverDropout(nn.Sequential(nn.Linear(3, 8), nn.Tanh())),
    ...                       nn.Linear(8, 2)).double()
    >>> model = train_turnover(model, Z, weight_decay=1e-2)
    >>> est = TurnOverDropoutEstimator().fit(model, Z)
    >>> x_test = (Z[0][:5], Z[1][:5])
    >>> est.influence(x_test).shape
    (5, 30)
    >>> est.score(x_test).shape
    (30,)
    """

    _parameter_constraints = {
        "loss": [StrOptions(set(LOSSES)), callable],
        "train_loss": [StrOptions(set(LOSSES)), callable],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions({"float64", "float32"})],
        "device": [str, torch.device],
        "verbose": ["verbose"],
    }

    def __init__(self, loss="cross_entropy", train_loss="cross_entropy", batch_size=4096,
                 dtype="float64", device="cpu", verbose=0):
        self.loss = loss
        self.train_loss = train_loss
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device
        self.verbose = verbose

    def fit(self, model, Z, finetune_model=None, ids=None):
        """Check and copy the turn-over trained model(s); nothing is computed yet.

        Parameters
        ----------
        model : torch.nn.Module
            The model trained on ``Z`` with :class:`TurnOverDropout` layers (the pretrain
            model in the multi-stage case).
        Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The training (pretrain) data, in the order of ``ids``.
        finetune_model : torch.nn.Module, default=None
            Multi-stage: the finetuned model, sharing the masked embedding with
            ``model`` (the same layer objects, or copies with the same ``seed`` and
            ``p``). ``None``: single stage.
        ids : array-like of int of shape (m,), default=None
            The ids ``Z``'s examples were trained with; ``None``: ``0..m-1`` (the default
            of :func:`train_turnover`).

        Returns
        -------
        self : TurnOverDropoutEstimator
            The fitted estimator.
        """
        start = time.perf_counter()
        self._validate_params()
        _check_model(model, "model")
        if finetune_model is not None:
            _check_model(finetune_model, "finetune_model")
            known = {(layer.seed, layer.p) for layer in turnover_layers(model)}
            foreign = [(layer.seed, layer.p) for layer in turnover_layers(finetune_model)
                       if (layer.seed, layer.p) not in known]
            if foreign:
                raise ValueError(
                    f"finetune_model has TurnOverDropout layers with (seed, p) {foreign} "
                    f"that model does not have ({sorted(known)}); the masks of the pretrain "
                    "examples only exist in the embedding they were pretrained through. "
                    "Share that embedding (or a copy of it) with the finetune model."
                )
        device = resolve_device(self.device)
        dtype = getattr(torch, self.dtype)
        data = as_data(Z, "Z", dtype)
        self.ids_ = _check_ids(ids, len(data), "ids", "Z").numpy()
        if len(np.unique(self.ids_)) != len(self.ids_):
            raise ValueError(
                "ids has repeated values: two examples with the same id share one "
                "sub-network, so their influences cannot be told apart. Pass distinct ids."
            )
        # One deepcopy of both keeps a shared embedding shared; the user's models are
        # never touched.
        model_copy, finetune_copy = copy.deepcopy((model, finetune_model))
        for module in (model_copy, finetune_copy):
            if module is None:
                continue
            module.to(device=device, dtype=dtype)
            module.eval()
            for parameter in module.parameters():
                parameter.requires_grad_(False)
                parameter.grad = None
        self._model = model_copy
        self._evaluated = model_copy if finetune_copy is None else finetune_copy
        self._Z = data
        self._device = device
        self._dtype = dtype
        self._loss = resolve_loss(self.loss)
        self._train_loss = resolve_loss(self.train_loss)
        self._probe(self._model, data, self.train_loss, "train_loss", "model")
        self.n_train_ = len(data)
        self.multi_stage_ = finetune_model is not None
        self.n_turnover_layers_ = len(turnover_layers(self._evaluated))
        self.fit_time_ = time.perf_counter() - start
        return self

    def _probe(self, module, data, loss, loss_name, model_name):
        probe_model(module, data, loss, loss_name, model_name, 8, self._device)

    def _test_data(self, x_test):
        check_is_fitted(self)
        data = as_data(x_test, "x_test", self._dtype)
        model_name = "finetune_model" if self.multi_stage_ else "model"
        self._probe(self._evaluated, data, self.loss, "loss", model_name)
        return data

    def _pair_losses(self, module, loss_fn, data, ids, flipped):
        """Losses ``(len(ids), len(data))`` of every (training id, test point) pair."""
        n_test = len(data)
        per_chunk = max(1, self.batch_size // n_test) if n_test <= self.batch_size else 1
        test_rows = min(n_test, self.batch_size)
        out = torch.empty(len(ids), n_test, dtype=torch.float64)
        chunks = range(0, len(ids), per_chunk)
        with torch.no_grad():
            for start in progress(chunks, self.verbose, desc="turn-over pairs"):
                chunk = ids[start:start + per_chunk]
                for t0 in range(0, n_test, test_rows):
                    inputs = data.inputs[t0:t0 + test_rows].to(self._device)
                    targets = data.targets[t0:t0 + test_rows].to(self._device)
                    k, b = len(chunk), len(inputs)
                    repeated = inputs.repeat(k, *([1] * (inputs.ndim - 1)))
                    with turnover_masks(module, chunk.repeat_interleave(b), flipped):
                        outputs = module(repeated)
                    losses = loss_fn(outputs, targets.repeat(k, *([1] * (targets.ndim - 1))))
                    check_losses(losses, k * b, "loss")
                    out[start:start + k, t0:t0 + b] = losses.reshape(k, b).double().cpu()
        return out

    def _delta(self, data):
        ids = torch.from_numpy(self.ids_)
        flipped = self._pair_losses(self._evaluated, self._loss, data, ids, True)
        own = self._pair_losses(self._evaluated, self._loss, data, ids, False)
        return (flipped - own).T.numpy()

    def removal_effect(self, x_test):
        """Turn-over estimate of the test-loss change when each example is removed.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points (of the finetune task in the multi-stage case).

        Returns
        -------
        delta : ndarray of shape (n_test, m)
            ``L(x_t; flipped mask of z_i) - L(x_t; own mask of z_i)`` (paper Eq. 2).
            ``delta < 0``: the test loss is lower without ``z_i``, i.e. ``z_i`` is
            harmful.
        """
        return self._delta(self._test_data(x_test))

    def influence(self, x_test):
        """Harmfulness of every training example for every test point.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points (of the finetune task in the multi-stage case).

        Returns
        -------
        influence : ndarray of shape (n_test, m)
            ``-m * removal_effect(x_test)``: positive means harmful, and ``-influence/m``
            is the predicted change of the test loss on removal, as for the ``I`` of
            :class:`~skmsif.MultiStageInfluenceEstimator`.
        """
        delta = self.removal_effect(x_test)  # checks the fit first
        return -self.n_train_ * delta

    def score(self, x_test):
        """Summed harmfulness of every training example over the test points.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points.

        Returns
        -------
        scores : ndarray of shape (m,)
            ``influence(x_test).sum(axis=0)``; positive means harmful to the test set.
        """
        return self.influence(x_test).sum(axis=0)

    def self_influence(self):
        """Harmfulness of each training example for itself (paper Sec. 4.2 sanity check).

        ``-m * (L(z; flipped mask of z) - L(z; own mask of z))`` with ``model`` and
        ``train_loss``. The flipped sub-network never learned ``z``, so this is mostly
        negative (each example helps itself); values near zero everywhere mean the masks
        did not isolate the examples (e.g. the masked layers are too leaky).

        Returns
        -------
        self_influence : ndarray of shape (m,)
            ``-m * (L(z; flipped mask of z) - L(z; own mask of z))`` for each training
            example ``z``; negative means that ``z`` helps its own loss.
        """
        check_is_fitted(self)
        ids = torch.from_numpy(self.ids_)
        values = torch.empty(len(ids), dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, len(ids), self.batch_size):
                rows = slice(start, start + self.batch_size)
                inputs = self._Z.inputs[rows].to(self._device)
                targets = self._Z.targets[rows].to(self._device)
                losses = []
                for flipped in (True, False):
                    with turnover_masks(self._model, ids[rows], flipped):
                        losses.append(self._train_loss(self._model(inputs), targets))
                values[rows] = (losses[0] - losses[1]).double().cpu()
        return -self.n_train_ * values.numpy()


def _check_model(model, name):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}.")
    if not turnover_layers(model):
        raise ValueError(
            f"{name} has no TurnOverDropout layer, so it has no per-example sub-networks "
            "to compare. Wrap a layer (e.g. TurnOverDropout(nn.Linear(64, 16))) and train "
            "with train_turnover, or use MultiStageInfluenceEstimator."
        )

"""Leave-one-out ground truth for multi-stage influence, and how faithful scores are to it.

:func:`leave_one_out` removes (or reweights) pretrain examples, retrains both stages from
the trained weights and measures the true change of the summed finetune test loss; it is
the "real score" of the paper's Section 4.1. :func:`audit_indices` picks which examples to
retrain for (the most influential ones plus a random control) and :func:`faithfulness`
compares predicted and actual changes.

Notation and sign follow ``doc/guide/influence.md``: ``Z`` (``m`` examples) and ``g`` are
the pretrain data and per-example loss, ``X`` and ``f`` the finetune ones, ``W`` the shared
embedding, ``U`` the pretrain head and ``Theta`` the finetune head. Upweighting a pretrain
example ``z`` by ``epsilon`` means minimising ``G + epsilon * g(z)``; removing it is
``epsilon = -1/m``, and the multi-stage influence ``I(z)`` predicts the change of the test
loss on removal as ``-I(z) / m``.
"""

import contextlib
import copy
import math
import os
import warnings
from numbers import Integral, Real

import joblib
import numpy as np
import scipy.stats
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import Bunch, check_random_state
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from ._checks import check_module, probe_model, resolve_device
from ._data import as_data
from ._losses import LOSSES, resolve_loss
from ._model import call_model, private_copies
from ._params import find_shared
from ._progress import progress
from ._training import Stage, minimise, run_steps

__all__ = ["leave_one_out", "audit_indices", "faithfulness"]

# --------------------------------------------------------------------------- one retrain


class _Problem:
    """Everything one retrain needs: prepared model copies, data and settings."""

    def __init__(self, pretrain_model, finetune_model, pairs, Z, X, x_test, settings):
        self.pretrain_model = pretrain_model
        self.finetune_model = finetune_model
        self.pairs = pairs
        self.Z, self.X, self.x_test = Z, X, x_test
        self.settings = settings

    def retrain(self, index, epsilon):
        """Retrain both stages with pretrain example ``index`` reweighted.

        ``index=None`` is the reference (full data); ``epsilon=None`` removes the example.
        """
        s = self.settings
        pretrain_model, finetune_model = copy.deepcopy(
            (self.pretrain_model, self.finetune_model))
        pre = dict(pretrain_model.named_parameters())
        fin = dict(finetune_model.named_parameters())
        device = s["device"]
        m = len(self.Z)

        for p in pre.values():
            p.requires_grad_(True)
        pretrain_start = _snapshot(pre.values())
        if s["pretrain_fn"] is not None:
            keep = torch.ones(m, dtype=torch.bool)
            if index is not None:
                keep[index] = False
            s["pretrain_fn"](pretrain_model, (self.Z.inputs[keep].to(device),
                                              self.Z.targets[keep].to(device)))
            pretrain_info = _custom_info()
        else:
            weights = torch.ones(m, dtype=s["dtype"])
            if index is not None:
                weights[index] = 0.0 if epsilon is None else 1.0 + epsilon * m
            stage = Stage(pretrain_model, pre.values(), self.Z, s["pretrain_loss"], weights,
                           s["pretrain_damping"], s["batch_size"][0], device)
            pretrain_info = self._fit(stage, 0)

        shared_fin = {fin_name for _, fin_name in self.pairs}
        w_bar = {}
        with torch.no_grad():
            for pre_name, fin_name in self.pairs:
                w_bar[fin_name] = pre[pre_name].detach().clone()
                if s["embedding"] == "fixed" and fin[fin_name] is not pre[pre_name]:
                    fin[fin_name].copy_(pre[pre_name])
        trainable = [name for name in fin
                     if s["embedding"] == "updated" or name not in shared_fin]
        for name, p in fin.items():
            p.requires_grad_(name in trainable)
        finetune_start = _snapshot(fin[name] for name in trainable)
        if s["finetune_fn"] is not None:
            s["finetune_fn"](finetune_model, (self.X.inputs.to(device),
                                              self.X.targets.to(device)), pretrain_model)
            finetune_info = _custom_info()
        else:
            anchors = ([(fin[name], bar) for name, bar in w_bar.items()]
                       if s["embedding"] == "updated" else [])
            stage = Stage(finetune_model, [fin[name] for name in trainable], self.X,
                           s["finetune_loss"], torch.ones(len(self.X), dtype=s["dtype"]),
                           s["finetune_damping"], s["batch_size"][1], device,
                           anchors=anchors, alpha=s["alpha"])
            finetune_info = self._fit(stage, 1)

        with torch.no_grad():
            test_loss = sum(
                float(s["finetune_loss"](call_model(finetune_model, inputs, model_name=
                                                    "finetune_model"), targets).sum())
                for inputs, targets in self.x_test.batches(s["eval_batch_size"], device))
        return {
            "loss": test_loss,
            "pretrain_grad_norm": pretrain_info["grad_norm"],
            "finetune_grad_norm": finetune_info["grad_norm"],
            "pretrain_n_iter": pretrain_info["n_iter"],
            "finetune_n_iter": finetune_info["n_iter"],
            "pretrain_distance": _distance(pretrain_start, pre.values()),
            "finetune_distance": _distance(finetune_start, (fin[n] for n in trainable)),
            "converged": bool(pretrain_info["converged"] and finetune_info["converged"]
                              and math.isfinite(test_loss)),
        }

    def _fit(self, stage, which):
        s = self.settings
        if s["recipe"] == "converged":
            return minimise(stage, s["max_iter"], s["tol"])
        return run_steps(stage, s["optimizer"], s["lr"][which], s["n_steps"][which],
                          s["batch_size"][which], s["seeds"][which])


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _distance(start, params):
    """Euclidean distance the retrain moved the parameters from their warm start."""
    return float(sum(((p.detach() - p0) ** 2).sum() for p0, p in zip(start, params)) ** 0.5)


def _custom_info():
    return {"grad_norm": float("nan"), "n_iter": 0, "converged": True}


@contextlib.contextmanager
def _single_thread():
    """One torch thread while retraining (results then do not depend on ``n_jobs``)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _retrain_task(key, index, epsilon, problem):
    """One retrain. ``(key, index, epsilon)`` is what the cache is keyed on; ``key``
    fingerprints ``problem``, which the cache ignores."""
    del key
    with _single_thread():
        return problem.retrain(index, epsilon)


# --------------------------------------------------------------------------- checks


def _per_stage(value, name, check):
    """``value`` or a ``(pretrain, finetune)`` pair of them, as a pair."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(check(v) for v in pair):
        raise ValueError(
            f"{name}={value!r} is not valid: pass one value for both stages or a "
            f"(pretrain, finetune) pair of them."
        )
    return pair


def _check_indices(indices, m):
    array = np.asarray(indices)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(
            f"indices must be a non-empty 1-D array of pretrain example positions; got "
            f"shape {array.shape}."
        )
    if not (np.issubdtype(array.dtype, np.integer) and array.dtype != bool):
        raise TypeError(
            f"indices must hold integers (positions in Z); got dtype {array.dtype}."
        )
    bad = array[(array < 0) | (array >= m)]
    if bad.size:
        raise ValueError(
            f"indices {bad[:5].tolist()} are out of range: Z has {m} examples, so indices "
            f"must lie in [0, {m - 1}]."
        )
    return array.astype(np.int64)


def _fingerprint(problem):
    """Digest of everything a retrain's result depends on, except ``index`` and
    ``epsilon``, by the estimator's own identity rules (:mod:`skmsif._identity`): the
    models' structure, code and values, which parameters they share, the data, the
    settings (callables by their code, closures and globals, not their names) and the
    versions. ``None`` when a part has no identity by value (the reason is in the
    :class:`~skmsif._identity.Unidentified` raised)."""
    import skmsif

    from ._data import new_hasher
    from ._identity import feed, module_code

    hasher = new_hasher()
    for model in (problem.pretrain_model, problem.finetune_model):
        module_code(hasher, model)
        feed(hasher, {name: tensor for name, tensor in list(model.named_parameters())
                      + list(model.named_buffers())})
    pre = dict(problem.pretrain_model.named_parameters())
    fin = dict(problem.finetune_model.named_parameters())
    feed(hasher, [(a, b, pre[a] is fin[b]) for a, b in problem.pairs])
    feed(hasher, [(data.inputs, data.targets)
                  for data in (problem.Z, problem.X, problem.x_test)])
    feed(hasher, problem.settings)
    feed(hasher, [getattr(skmsif, "__version__", "unknown"), torch.__version__,
                  np.__version__])
    return hasher.hexdigest()


# --------------------------------------------------------------------------- public API


@validate_params(
    {
        "pretrain_model": "no_validation",
        "finetune_model": "no_validation",
        "Z": "no_validation",
        "X": "no_validation",
        "x_test": "no_validation",
        "indices": ["array-like"],
        "embedding": [StrOptions({"fixed", "updated"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "shared": [None, str, list, tuple],
        "pretrain_loss": [StrOptions(set(LOSSES)), callable],
        "finetune_loss": [StrOptions(set(LOSSES)), callable],
        "recipe": [StrOptions({"converged", "paper"})],
        "pretrain_damping": [Interval(Real, 0, None, closed="left")],
        "finetune_damping": [Interval(Real, 0, None, closed="left")],
        "epsilon": [None, Interval(Real, None, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "optimizer": [callable],
        "lr": [Interval(Real, 0, None, closed="neither"), tuple, list],
        "n_steps": [Interval(Integral, 0, None, closed="left"), tuple, list],
        "batch_size": [None, Interval(Integral, 1, None, closed="left"), tuple, list],
        "pretrain_fn": [None, callable],
        "finetune_fn": [None, callable],
        "dtype": [StrOptions({"float64", "float32"})],
        "device": [str, torch.device],
        "random_state": ["random_state"],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
        "cache": [None, str, os.PathLike, joblib.Memory],
        "return_info": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def leave_one_out(
    pretrain_model,
    finetune_model,
    Z,
    X,
    x_test,
    indices,
    *,
    embedding="fixed",
    alpha=0.01,
    shared=None,
    pretrain_loss="cross_entropy",
    finetune_loss="cross_entropy",
    recipe="converged",
    pretrain_damping=1e-2,
    finetune_damping=1e-8,
    epsilon=None,
    max_iter=1000,
    tol=1e-10,
    optimizer=torch.optim.Adam,
    lr=1e-3,
    n_steps=1000,
    batch_size=None,
    pretrain_fn=None,
    finetune_fn=None,
    dtype="float64",
    device="cpu",
    random_state=None,
    n_jobs=None,
    verbose=0,
    cache=None,
    return_info=False,
):
    """True change of the summed test loss when pretrain examples are removed.

    For each ``i`` in ``indices``, pretrain example ``z_i`` is removed from ``Z``, the
    pretrain stage is retrained from the pretrained weights, the finetune stage from the
    finetuned weights on the unchanged ``X``, and the summed finetune loss on ``x_test``
    is measured. The "with ``z_i``" reference goes through the very same retraining on
    the full ``Z`` (computed once and shared by all indices), so that what remains of
    the training procedure cancels in the difference (paper Sec. 4.1). Compare with
    ``-I(z_i) / m`` of
    :class:`~skmsif.MultiStageInfluenceEstimator` (``score``), e.g. with
    :func:`faithfulness`.

    Parameters
    ----------
    pretrain_model : torch.nn.Module
        The pretrained model, ``(W, U)`` at its trained values. Never modified.
    finetune_model : torch.nn.Module
        The finetuned model, ``(W, Theta)`` at its trained values. Never modified.
    Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
        The pretrain data (``m`` examples).
    X : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
        The finetune training data.
    x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
        Finetune test points; their losses are summed.
    indices : array-like of int of shape (n_indices,)
        Positions in ``Z`` of the examples to remove, one retrain each (repeated indices
        are retrained once).
    embedding : {"fixed", "updated"}, default="fixed"
        ``"fixed"`` (Case 1): the finetune stage trains only ``Theta``, the shared ``W``
        is the retrained pretrain ``W`` (copied into the finetune model when it holds
        its own copy, ``shared`` given by name). ``"updated"`` (Case 2): the finetune stage
        trains ``(W, Theta)`` of the finetune model, warm-started from its finetuned
        values, with the extra term ``alpha * ||W - W_bar||^2``, ``W_bar`` the retrained
        pretrain ``W``.
    alpha : float, default=0.01
        Proximity weight of Case 2 (unused for ``"fixed"``).
    shared : None, str or list of str, default=None
        Which parameters are ``W``, as in the estimator: ``None`` for the parameter
        objects both models hold, or name prefixes (see
        :func:`skmsif._params.find_shared`).
    pretrain_loss, finetune_loss : {"cross_entropy", "mse"} or callable, \
            default="cross_entropy"
        Per-example losses; a callable maps ``(outputs, targets)`` of a batch to a tensor
        of shape ``(batch,)``.
    recipe : {"converged", "paper"}, default="converged"
        How each stage is retrained (both stages minimise the objectives in the Notes).
        ``"converged"``: full-batch L-BFGS (strong Wolfe line search) followed by
        Newton-CG steps, until the largest absolute entry of the gradient is at most
        ``tol``; this is the exact leave-one-out of the objectives the influence
        function differentiates. ``"paper"``: ``n_steps`` steps of ``optimizer`` on
        shuffled minibatches of ``batch_size`` (the paper's ``T'`` steps); every retrain
        and the reference use the same seeds and minibatch order, the removed example
        keeping its place with weight zero, so optimisation noise cancels.
    pretrain_damping : float, default=1e-2
        L2 weight ``d_p`` of the pretrain objective (the estimator's damping of ``H_G``).
    finetune_damping : float, default=1e-8
        L2 weight ``d_f`` of the finetune objective (on the trained parameters).
    epsilon : float, default=None
        ``None``: remove each example (its weight in the pretrain objective becomes
        zero, ``epsilon = -1/m``). A float: upweight it by ``epsilon`` instead, i.e.
        minimise ``G + epsilon * g(z_i)``; ``(change(eps) - change(-eps)) / (2 eps)``
        then approximates the influence ``I(z_i)``. Not available with ``pretrain_fn``.
    max_iter : int, default=1000
        ``"converged"``: iterations at most per stage and retrain (L-BFGS iterations
        plus Newton steps).
    tol : float, default=1e-10
        ``"converged"``: a stage has converged when the largest absolute entry of its
        objective's gradient is at most ``tol``. The retrained change is only as exact
        as the optima: parameters are off by about ``tol / (smallest Hessian
        eigenvalue)``, to be compared with the size of a change, about ``1/m``.
    optimizer : callable, default=torch.optim.Adam
        ``"paper"``: called as ``optimizer(params, lr=lr)`` to make a
        ``torch.optim.Optimizer`` (for example ``functools.partial(torch.optim.SGD,
        momentum=0.9)``). A new one is made for each stage and retrain.
    lr : float or (float, float), default=1e-3
        ``"paper"``: learning rate, or ``(pretrain, finetune)`` learning rates.
    n_steps : int or (int, int), default=1000
        ``"paper"``: optimiser steps per stage, or ``(pretrain, finetune)`` steps.
    batch_size : int, (int, int) or None, default=None
        ``"paper"``: minibatch size per stage (``None``: full batch). ``"converged"``:
        rows per forward pass when the full objective is evaluated (``None``: all at
        once); it changes memory use, not the objective.
    pretrain_fn : callable, default=None
        Replaces the recipe's pretrain stage: called as ``pretrain_fn(model, Z)`` with a
        copy of the pretrain model (every parameter ``requires_grad``, eval mode, in
        ``dtype``, on ``device``) and ``Z`` an ``(inputs, targets)`` pair of tensors,
        ``z_i`` left out (all of ``Z`` for the reference); it trains the model in place
        and its return value is ignored. It must be deterministic, since it also makes
        the reference.
    finetune_fn : callable, default=None
        Replaces the recipe's finetune stage: called as
        ``finetune_fn(model, X, pretrain_model)`` with a copy of the finetune model,
        ``X`` as tensors and the retrained pretrain model (read ``W_bar`` from it in Case
        2). Exactly the parameters to train have ``requires_grad=True``: ``Theta`` for
        ``"fixed"`` (``W`` already holds the retrained pretrain values), all for
        ``"updated"``. Trains in place; deterministic.
    dtype : {"float64", "float32"}, default="float64"
        Precision of the model copies and data during retraining.
    device : str or torch.device, default="cpu"
        Where retraining runs.
    random_state : int, RandomState instance or None, default=None
        ``"paper"``: seeds the minibatch order of both stages (the same for every
        retrain of one call). Pass an int for reproducible (and cacheable) results.
    n_jobs : int, default=None
        Retrains run in parallel with joblib; ``None`` means 1 unless in a
        ``joblib.parallel_config`` context, ``-1`` all processors. Each retrain uses one
        torch thread (restored afterwards), so results do not depend on ``n_jobs``.
    verbose : int, default=0
        Show a progress bar over retrains.
    cache : str, os.PathLike or joblib.Memory, default=None
        Where retrain results are stored and looked up: a directory (used as
        ``joblib.Memory(str(cache))`` would) or a ``joblib.Memory``. Each retrain,
        the reference included, is an entry, so a later call with other indices reuses
        what is there. The key covers the models' architecture (``repr``) and weights,
        all data, every setting and the index; callables enter by name (and code, for
        lambdas), so clear the cache after editing a model's ``forward`` or a callable
        you pass. ``info.from_cache`` says which results were served from it.
    return_info : bool, default=False
        Also return per-retrain diagnostics.

    Returns
    -------
    change : ndarray of shape (n_indices,)
        ``L(without z_i) - L(with z_i)``, ``L`` the summed loss over ``x_test`` (with
        ``epsilon``: ``L(epsilon) - L(0)``).
    info : sklearn.utils.Bunch
        Only with ``return_info=True``. Arrays of shape ``(n_indices,)``: ``indices``,
        ``loss`` (retrained test loss), ``converged`` (both stages reached ``tol`` and
        the loss is finite; ``tol`` is not checked for ``"paper"`` and custom stages),
        ``pretrain_grad_norm`` and
        ``finetune_grad_norm`` (largest absolute gradient entry of each stage's full
        objective at the end; NaN for custom stages), ``pretrain_n_iter`` and
        ``finetune_n_iter`` (iterations or steps), ``pretrain_distance`` and
        ``finetune_distance`` (Euclidean distance the retrain moved the trained
        parameters from the given weights: removals that move far more than the others
        left the basin of the original optimum, where first-order influence cannot
        follow) and ``from_cache``; ``reference``, a
        Bunch of the same fields (scalars) for the full-data retrain, and ``epsilon``
        (the upweighting used, ``-1/m`` for removal).

    Warns
    -----
    ConvergenceWarning
        When retrains (or the reference) did not reach ``tol`` or ended with a
        non-finite test loss, naming how many.

    Notes
    -----
    With weights ``w_j = 1`` except ``w_i = 1 + m * epsilon`` (``0`` for removal), the
    stages minimise

    * pretrain, over ``(W, U)``: ``(1/m) sum_j w_j g(z_j) + (d_p/2) ||(W, U)||^2``,
      i.e. ``G + epsilon g(z_i)`` plus the L2 term whose Hessian is the estimator's
      damping. Removal keeps the normalisation ``1/m`` (removal is ``epsilon = -1/m``);
      without damping this has the same minimiser as the mean over the ``m - 1``
      remaining examples;
    * finetune, Case 1, over ``Theta``: ``F(W_bar, Theta) + (d_f/2) ||Theta||^2``;
    * finetune, Case 2, over ``(W, Theta)``:
      ``F(W, Theta) + alpha ||W - W_bar||^2 + (d_f/2) ||(W, Theta)||^2``.

    The ``"paper"`` recipe takes minibatch steps on the same objectives (minibatch
    losses averaged over the minibatch, the removed example weighted zero). All losses
    are computed with the model copies in eval mode (no dropout; batch norm uses its
    running statistics), as in the estimator. Every parameter of the pretrain model is
    trained, and every non-shared parameter of the finetune model, whatever their
    ``requires_grad``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.validation import leave_one_out
    >>> gen = torch.Generator().manual_seed(0)
    >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
    >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
    >>> Z = (torch.randn(30, 3, generator=gen), torch.randint(0, 2, (30,), generator=gen))
    >>> X = (torch.randn(20, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    >>> x_test = (X[0][:5], X[1][:5])
    >>> change = leave_one_out(pretrain_model, finetune_model, Z, X, x_test, [0, 1],
    ...                        finetune_damping=1e-3)
    >>> change.shape
    (2,)
    """
    check_module(pretrain_model, "pretrain_model")
    check_module(finetune_model, "finetune_model")
    torch_dtype = getattr(torch, dtype)
    device = resolve_device(device)
    if embedding == "updated" and alpha <= 0:
        raise ValueError(
            f"embedding='updated' needs alpha > 0 (the weight of alpha * ||W - W_bar||^2, "
            f"which ties the finetuned embedding to the retrained pretrain one); got "
            f"alpha={alpha!r}."
        )
    if pretrain_fn is not None and epsilon is not None:
        raise ValueError(
            f"epsilon={epsilon!r} reweights an example inside the built-in pretrain "
            "objective, but pretrain_fn replaces that stage (it only sees Z without the "
            "example). Pass epsilon=None, or drop pretrain_fn."
        )
    lr_pair = _per_stage(lr, "lr", lambda v: isinstance(v, Real) and v > 0)
    steps_pair = _per_stage(
        n_steps, "n_steps", lambda v: isinstance(v, Integral) and not isinstance(v, bool)
        and v >= 0)
    batch_pair = _per_stage(
        batch_size, "batch_size",
        lambda v: v is None or (isinstance(v, Integral) and not isinstance(v, bool) and v >= 1))

    Z_data = as_data(Z, "Z", torch_dtype)
    X_data = as_data(X, "X", torch_dtype)
    test_data = as_data(x_test, "x_test", torch_dtype)
    m = len(Z_data)
    if m < 2:
        raise ValueError("Z has a single example; removing it leaves nothing to pretrain on.")
    index_array = _check_indices(indices, m)
    unique = np.unique(index_array)

    # One deepcopy of both models keeps the parameters they share shared in the copies.
    pretrain_copy, finetune_copy = private_copies((pretrain_model, finetune_model),
                                                  torch_dtype, device)
    pairs = find_shared(pretrain_copy, finetune_copy, shared)
    n_shared_fin = len({fin_name for _, fin_name in pairs})
    if embedding == "fixed" and n_shared_fin == len(dict(finetune_copy.named_parameters())):
        raise ValueError(
            f"shared={shared!r} selects every parameter of finetune_model; with "
            "embedding='fixed' nothing would be finetuned. The finetune model needs a head "
            "(Theta) besides the embedding."
        )
    pretrain_loss_fn = resolve_loss(pretrain_loss)
    finetune_loss_fn = resolve_loss(finetune_loss)
    probe_model(pretrain_copy, Z_data, pretrain_loss, "pretrain_loss", "pretrain_model", 8, device,
                loss_fn=pretrain_loss_fn)
    probe_model(finetune_copy, X_data, finetune_loss, "finetune_loss", "finetune_model", 8,
                device, loss_fn=finetune_loss_fn)
    probe_model(finetune_copy, test_data, finetune_loss, "finetune_loss", "finetune_model", 8,
                device, loss_fn=finetune_loss_fn)

    seeds = (None, None)
    if recipe == "paper":
        seeds = tuple(int(s) for s in check_random_state(random_state).randint(
            np.iinfo(np.int32).max, size=2))
    settings = {
        "embedding": embedding, "alpha": float(alpha), "recipe": recipe,
        "pretrain_loss": pretrain_loss_fn, "finetune_loss": finetune_loss_fn,
        "pretrain_damping": float(pretrain_damping),
        "finetune_damping": float(finetune_damping),
        "pretrain_fn": pretrain_fn, "finetune_fn": finetune_fn,
        "dtype": torch_dtype, "device": device, "eval_batch_size": batch_pair[1] or 256,
        "batch_size": batch_pair,
    }
    if recipe == "converged":
        settings.update({"max_iter": int(max_iter), "tol": float(tol)})
    else:
        settings.update({"optimizer": optimizer, "lr": tuple(float(v) for v in lr_pair),
                         "n_steps": tuple(int(v) for v in steps_pair), "seeds": seeds})
    problem = _Problem(pretrain_copy, finetune_copy, pairs, Z_data, X_data, test_data,
                       settings)

    task = _retrain_task
    key = None
    if cache is not None:
        memory = cache if isinstance(cache, joblib.Memory) else joblib.Memory(
            os.fspath(cache), verbose=0)
        from ._identity import Unidentified

        try:
            key = _fingerprint(problem)
        except Unidentified as exc:
            warnings.warn(
                f"cache is not used: a setting of this leave_one_out call cannot be "
                f"identified across calls ({exc}), so a stored retrain could belong to "
                "another computation. Pass module-level functions (or objects whose "
                "attributes are plain values) to use the cache.", UserWarning,
                stacklevel=3)
            cache = None
        else:
            task = memory.cache(_retrain_task, ignore=["problem"])
    eps = None if epsilon is None else float(epsilon)
    jobs = [(None, None)] + [(int(i), eps) for i in unique]
    from_cache = [cache is not None and task.check_call_in_cache(key, i, e, None)
                  for i, e in jobs]
    results = joblib.Parallel(n_jobs=n_jobs, return_as="generator")(
        joblib.delayed(task)(key, i, e, problem) for i, e in jobs)
    results = list(progress(results, verbose, total=len(jobs),
                            desc="leave-one-out retrains"))

    reference = Bunch(**results[0], from_cache=bool(from_cache[0]))
    position = {int(i): k + 1 for k, i in enumerate(unique)}
    rows = [results[position[int(i)]] for i in index_array]
    change = np.array([row["loss"] - reference.loss for row in rows], dtype=np.float64)

    failed = [row for row in results[1:] if not row["converged"]]
    if failed or not reference.converged:
        worst = max([row["pretrain_grad_norm"] for row in failed + [reference]]
                    + [row["finetune_grad_norm"] for row in failed + [reference]],
                    key=lambda v: -math.inf if math.isnan(v) else v)
        warnings.warn(
            f"{len(failed)} of {len(unique)} leave-one-out retrains"
            f"{'' if reference.converged else ' and the full-data reference'} did not "
            f"converge (a final gradient entry above tol={tol:g}, largest {worst:.3g}, or "
            "a non-finite test loss); their changes are inexact. Increase max_iter, loosen "
            "tol or increase the dampings; return_info=True reports each retrain.",
            ConvergenceWarning,
            stacklevel=3,  # the caller of the validate_params wrapper
        )
    if not return_info:
        return change
    info = Bunch(
        indices=index_array,
        loss=np.array([row["loss"] for row in rows], dtype=np.float64),
        converged=np.array([row["converged"] for row in rows], dtype=bool),
        from_cache=np.array([from_cache[position[int(i)]] for i in index_array], dtype=bool),
        reference=reference,
        epsilon=-1.0 / m if epsilon is None else float(epsilon),
    )
    for field in ("pretrain_grad_norm", "finetune_grad_norm", "pretrain_distance",
                  "finetune_distance"):
        info[field] = np.array([row[field] for row in rows], dtype=np.float64)
    for field in ("pretrain_n_iter", "finetune_n_iter"):
        info[field] = np.array([row[field] for row in rows], dtype=np.int64)
    return change, info


# --------------------------------------------------------------------------- metrics


@validate_params(
    {
        "scores": ["array-like"],
        "n_top": [Interval(Integral, 0, None, closed="left")],
        "n_random": [Interval(Integral, 0, None, closed="left")],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def audit_indices(scores, *, n_top=100, n_random=100, random_state=None):
    """Pick pretrain examples to retrain for: the most influential and a random control.

    The paper (Sec. 4.1) retrains for the 100 examples of largest ``|I|``; those are
    where influence is easiest to get right in sign and scale, so a random control of
    typical examples is drawn as well and both are reported by :func:`faithfulness`.

    Parameters
    ----------
    scores : array-like of shape (m,)
        Influence scores of the pretrain examples, e.g.
        ``MultiStageInfluenceEstimator.score(x_test)``.
    n_top : int, default=100
        How many examples of largest ``|scores|`` (ties broken by position).
    n_random : int, default=100
        How many further examples drawn uniformly, without replacement, from the others.
    random_state : int, RandomState instance or None, default=None
        Draws the random control.

    Returns
    -------
    audit : sklearn.utils.Bunch
        ``indices``: ndarray of shape (n_top + n_random,), the top examples (largest
        ``|scores|`` first) then the random ones, to pass to :func:`leave_one_out`;
        ``groups``: dict ``{"top": positions, "random": positions}`` of positions in
        ``indices``, to pass to :func:`faithfulness`.

    Examples
    --------
    >>> import numpy as np
    >>> from skmsif.validation import audit_indices
    >>> audit = audit_indices(np.array([0.1, -3.0, 2.0, 0.0, 0.5]), n_top=2, n_random=1,
    ...                       random_state=0)
    >>> audit.indices[:2]
    array([1, 2])
    >>> audit.groups["random"]
    array([2])
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(
            f"scores must be 1-D, one score per pretrain example; got shape {scores.shape}. "
            "For influence(x_test) of shape (n_test, m), pass its sum over axis 0 (or "
            "score(x_test))."
        )
    m = len(scores)
    if n_top + n_random > m:
        raise ValueError(
            f"n_top + n_random = {n_top + n_random} exceeds the {m} pretrain examples; "
            "lower n_top or n_random."
        )
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN; check the influence computation.")
    top = np.argsort(-np.abs(scores), kind="stable")[:n_top]
    rest = np.setdiff1d(np.arange(m), top)
    rng = check_random_state(random_state)
    random = np.sort(rng.choice(rest, size=n_random, replace=False))
    return Bunch(
        indices=np.concatenate([top, random]).astype(np.int64),
        groups={"top": np.arange(n_top), "random": np.arange(n_top, n_top + n_random)},
    )


def _metrics(predicted, actual):
    n = len(predicted)
    result = {"n": n, "pearson": np.nan, "spearman": np.nan, "slope": np.nan,
              "median_ratio": np.nan}
    if n >= 2 and np.ptp(predicted) > 0 and np.ptp(actual) > 0:
        result["pearson"] = float(scipy.stats.pearsonr(predicted, actual)[0])
        result["spearman"] = float(scipy.stats.spearmanr(predicted, actual)[0])
    if n and np.dot(actual, actual) > 0:
        result["slope"] = float(np.dot(predicted, actual) / np.dot(actual, actual))
    nonzero = actual != 0
    if nonzero.any():
        result["median_ratio"] = float(np.median(predicted[nonzero] / actual[nonzero]))
    return result


@validate_params(
    {"predicted": ["array-like"], "actual": ["array-like"], "groups": [None, dict]},
    prefer_skip_nested_validation=True,
)
def faithfulness(predicted, actual, *, groups=None):
    """How well predicted changes of the test loss match retrained (actual) ones.

    Parameters
    ----------
    predicted : array-like of shape (n,)
        Predicted change of the summed test loss on removing each example:
        ``-scores[indices] / m`` for the estimator's ``score`` (removal is upweighting
        by ``epsilon = -1/m``), or ``est.removal_effect(x_test, indices,
        newton_steps=k)`` directly. Not the raw scores, whose sign is the opposite.
    actual : array-like of shape (n,)
        The change from :func:`leave_one_out` for the same examples.
    groups : dict of str to array-like, default=None
        Subsets to report besides ``"all"``: positions (or boolean masks) into
        ``predicted``/``actual``, e.g. ``audit_indices(...).groups``.

    Returns
    -------
    metrics : dict of str to dict
        For ``"all"`` and each group: ``n``; ``pearson`` and ``spearman`` correlations
        (``scipy.stats``; NaN for fewer than two points or a constant input); ``slope``,
        the least-squares slope through the origin of predicted on actual,
        ``sum(p a) / sum(a^2)``, i.e. the predicted/actual scale (1: right scale, above
        1: influence overstates the changes); and ``median_ratio``, the median of
        ``p / a`` over examples with ``a != 0`` (robust to outliers, noisy when ``a``
        is near zero).

    Examples
    --------
    >>> import numpy as np
    >>> from skmsif.validation import faithfulness
    >>> metrics = faithfulness([0.1, 0.2, -0.3, 0.4], [0.05, 0.1, -0.15, 0.2],
    ...                        groups={"first two": [0, 1]})
    >>> round(metrics["all"]["pearson"], 6), round(metrics["all"]["slope"], 6)
    (1.0, 2.0)
    >>> metrics["first two"]["n"]
    2
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if predicted.ndim != 1 or predicted.shape != actual.shape:
        raise ValueError(
            f"predicted and actual must be 1-D arrays of the same length; got shapes "
            f"{predicted.shape} and {actual.shape}."
        )
    if not (np.isfinite(predicted).all() and np.isfinite(actual).all()):
        raise ValueError(
            "predicted or actual contain NaN or infinite values; drop those examples "
            "(e.g. retrains that diverged) first."
        )
    selections = {"all": np.arange(len(predicted))}
    for name, selection in (groups or {}).items():
        selection = np.asarray(selection)
        if selection.dtype == bool:
            if selection.shape != predicted.shape:
                raise ValueError(
                    f"groups[{name!r}] is a boolean mask of shape {selection.shape}; it "
                    f"must have the shape of predicted, {predicted.shape}."
                )
            selection = np.flatnonzero(selection)
        elif selection.size and (not np.issubdtype(selection.dtype, np.integer)
                                 or selection.min() < 0
                                 or selection.max() >= len(predicted)):
            raise ValueError(
                f"groups[{name!r}] must hold positions in [0, {len(predicted) - 1}] (or be "
                "a boolean mask)."
            )
        selections[name] = selection.astype(np.int64).reshape(-1)
    return {name: _metrics(predicted[sel], actual[sel]) for name, sel in selections.items()}

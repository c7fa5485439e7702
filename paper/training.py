"""Training and evaluation of the paper reproduction's models, on skmsif's training engine.

:func:`fit_lbfgs` and :func:`fit_adam` train one stage on exactly the objectives that
:func:`skmsif.validation.leave_one_out` retrains (its Notes): the mean per-example
cross-entropy, plus ``(damping / 2) ||params||^2``, plus ``alpha ||W - W_bar||^2`` for
the ``anchors`` (Case 2's finetune stage). Training with ``damping`` equal to the
estimator's damping makes the damped Hessians the estimator inverts the true Hessians of
what was minimised. Both run on the package's one training engine
(``skmsif/_training.py``: a ``Stage`` is the objective, ``minimise`` and ``run_steps``
the two recipes), the same code that retrains for leave-one-out.

:func:`total_loss`, :func:`per_example_loss` and :func:`accuracy` evaluate a classifier
in eval mode, batch by batch, and leave its train/eval mode as it was.
"""

import numpy as np
import torch
import torch.nn.functional as F

from skmsif._training import Stage, minimise, run_steps

__all__ = ["fit_lbfgs", "fit_adam", "total_loss", "per_example_loss", "accuracy"]


def _cross_entropy(outputs, targets):
    """Per-example cross-entropy of logits and integer labels."""
    return F.cross_entropy(outputs, targets, reduction="none")


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


def _stage(model, data, params, damping, anchors, alpha, batch_size):
    """The stage's objective on ``model``: trains ``params`` (all by default), freezes
    the rest, pulls each anchored parameter towards a copy of its anchor."""
    model.eval()
    params = list(model.parameters()) if params is None else list(params)
    anchors = [(p, bar.detach().clone()) for p, bar in (anchors or [])]
    trained = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    inputs, targets = _tensors(data, model)
    return Stage(model, params, (inputs.cpu(), targets.cpu()), _cross_entropy, None,
                 damping, batch_size, inputs.device, anchors=anchors, alpha=alpha)


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

    >>> from skmsif.datasets import load_digits_split
    >>> from paper.models import make_digits_mlp
    >>> from paper.training import accuracy, fit_lbfgs
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
    stage = _stage(model, data, params, damping, anchors, alpha, batch_size)
    result = minimise(stage, max_iter, tol)
    objective, _ = stage.evaluate()
    for p in stage.params:
        p.grad = None
    return {"objective": objective, "grad_max": result["grad_norm"],
            "n_iter": result["n_iter"], "converged": result["converged"]}


def fit_adam(model, data, *, params=None, damping=0.0, anchors=None, alpha=0.0,
             n_steps=1000, batch_size=512, lr=1e-3, random_state=0):
    """Take ``n_steps`` Adam steps on shuffled minibatches of a stage's objective, in place.

    The minibatch objective is the minibatch mean of the cross-entropy plus the same
    regularisers as :func:`fit_lbfgs` (the "paper" recipe of
    :func:`skmsif.validation.leave_one_out`). Every epoch is a permutation drawn with
    ``random_state``, even when one minibatch holds all of ``data``; the last minibatch
    of an epoch may be short.

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
    >>> from skmsif.datasets import load_digits_split
    >>> from paper.models import make_digits_mlp
    >>> from paper.training import fit_adam, total_loss
    >>> data = load_digits_split(random_state=0, n_pretrain=60)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=4, seed=0)
    >>> before = total_loss(pretrain_model, data.Z)
    >>> info = fit_adam(pretrain_model, data.Z, n_steps=50, batch_size=16, lr=0.05)
    >>> info["n_steps"], bool(total_loss(pretrain_model, data.Z) < before / 10)
    (50, True)
    """
    stage = _stage(model, data, params, damping, anchors, alpha, None)
    result = run_steps(stage, torch.optim.Adam, lr, n_steps, batch_size, random_state,
                       shuffle_full_batch=True, final_gradient=False)
    for p in stage.params:
        p.grad = None
    return {"n_steps": result["n_iter"], "last_loss": result["recent_loss"]}


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
    >>> from skmsif.datasets import load_digits_split
    >>> from paper.models import make_digits_mlp
    >>> from paper.training import total_loss
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
    >>> from skmsif.datasets import load_digits_split
    >>> from paper.models import make_digits_mlp
    >>> from paper.training import per_example_loss, total_loss
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
    >>> from skmsif.datasets import load_digits_split
    >>> from paper.models import make_digits_mlp
    >>> from paper.training import accuracy, fit_adam
    >>> data = load_digits_split(random_state=0, n_pretrain=60)
    >>> embedding, pretrain_model, finetune_model = make_digits_mlp(hidden=4, seed=0)
    >>> info = fit_adam(pretrain_model, data.Z, n_steps=50, batch_size=16, lr=0.05)
    >>> bool(accuracy(pretrain_model, data.Z) > 0.9)
    True
    """
    outputs, targets = _outputs(model, data, batch_size)
    return float((outputs.argmax(1) == targets).double().mean())

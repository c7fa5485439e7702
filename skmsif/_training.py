"""The package's one training engine: a stage's objective and the loops that train it.

Used by the leave-one-out retrains of :mod:`skmsif.validation`, by
:func:`skmsif.turnover.train_turnover`, and by the paper reproduction's trainers
(``paper/training.py`` in the repository). A :class:`Stage` is the objective: the mean
per-example loss (with per-example weights), plus ``(damping / 2) ||params||^2``, plus
``alpha ||W - W_bar||^2`` for Case 2's anchors. Three loops train it:

* :func:`minimise`: full-batch L-BFGS, then Newton-CG, to a tight gradient (the
  "converged" recipe);
* :func:`run_lbfgs`: one full-batch L-BFGS run with the caller's stopping rules;
* :func:`run_steps`: a fixed number of optimiser steps on seeded minibatches (the
  paper's fixed-step recipe).
"""

import math
from collections import deque

import numpy as np
import torch
from sklearn.utils import check_random_state

from ._params import flatten, unflatten
from ._solvers import truncated_cg

# L-BFGS memory of the "converged" recipe.
LBFGS_HISTORY = 50
# Newton-CG polish after L-BFGS: torch's L-BFGS stores a curvature pair only when
# y.s > 1e-10, so it slows to gradient descent near |grad| ~ 1e-9; Newton steps with
# Hessian-vector products need only gradients and reach the float64 floor.
NEWTON_STEPS = 10
CG_RTOL = 1e-8
CG_MAX_ITER = 500
# Minibatch objectives :func:`run_steps` remembers (the mean is its ``recent_loss``).
RECENT_STEPS = 20


class _Pair:
    """``(inputs, targets)`` tensors seen as a data set: ``.inputs``, ``.targets``, len."""

    def __init__(self, inputs, targets):
        self.inputs = inputs
        self.targets = targets

    def __len__(self):
        return len(self.targets)


def _take(inputs, rows, device):
    """Rows of the inputs (a tensor, or a dict of tensors for ``model(**inputs)``)."""
    if isinstance(inputs, dict):
        return {key: value[rows].to(device) for key, value in inputs.items()}
    return inputs[rows].to(device)


def forward(model, inputs):
    """``model(inputs)``, or ``model(**inputs)`` for a dict of keyword inputs."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


# --------------------------------------------------------------------------- objectives


class Stage:
    """The objective one stage minimises, on a private copy of a model.

    ``(1/n) sum_j weight_j * loss(x_j) + (damping/2) ||params||^2
    + alpha * sum ||W - W_bar||^2`` (the last term only for the ``anchors``: pairs of a
    parameter and the value it is pulled towards, Case 2's finetune stage).

    Subclasses change how a batch's per-example losses are computed by overriding
    :meth:`losses` (turn-over dropout passes each batch through its example masks).

    Parameters
    ----------
    model : torch.nn.Module
        The model being trained (in place; eval mode is the caller's choice).
    params : list of torch.nn.Parameter
        The parameters optimised.
    data : skmsif._data.TensorData or (inputs, targets) pair of tensors
        The stage's training data: anything with ``inputs`` (a tensor or a dict of
        tensors, passed as ``model(**inputs)``), ``targets`` and a length.
    loss : callable
        Per-example loss ``loss(outputs, targets) -> (batch,)``.
    weights : torch.Tensor of shape (n,) or None
        Per-example weights: ones, except ``1 + epsilon * m`` for a perturbed example
        (``None``: ones).
    damping : float
        L2 weight (the damping of the stage's Hessian).
    batch_size : int or None
        Rows per forward pass when the whole data set is evaluated (``None``: all).
    device : torch.device
    anchors : list of (torch.nn.Parameter, torch.Tensor)
        ``(W, W_bar)`` pairs of the proximity term.
    alpha : float
        Weight of the proximity term.
    """

    def __init__(self, model, params, data, loss, weights, damping, batch_size, device,
                 anchors=(), alpha=0.0):
        if isinstance(data, (tuple, list)):
            data = _Pair(*data)
        self.model = model
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.data = data
        self.loss = loss
        self.n = len(data)
        if weights is None:
            dtype = self.params[0].dtype if self.params else torch.float64
            weights = torch.ones(self.n, dtype=dtype)
        self.weights = weights
        self.damping = float(damping)
        self.chunk = self.n if batch_size is None else int(batch_size)
        self.device = device
        self.anchors = list(anchors)
        self.alpha = float(alpha)
        anchored = {id(p) for p, _ in self.anchors}
        self.anchor_mask = flatten([
            torch.full(p.shape, 1.0 if id(p) in anchored else 0.0, dtype=p.dtype,
                       device=p.device) for p in self.params])

    def losses(self, rows):
        """Per-example losses of ``rows`` (a slice or an index tensor), shape ``(k,)``."""
        inputs = _take(self.data.inputs, rows, self.device)
        targets = self.data.targets[rows].to(self.device)
        return self.loss(forward(self.model, inputs), targets)

    def _data_sum(self, rows):
        """``sum_j weight_j * loss(x_j)`` over ``rows``."""
        weights = self.weights[rows].to(self.device)
        return (self.losses(rows) * weights).sum()

    def _chunks(self):
        return [slice(start, start + self.chunk) for start in range(0, self.n, self.chunk)]

    def _regulariser(self):
        terms = []
        if self.damping:
            terms.append(0.5 * self.damping * sum((p * p).sum() for p in self.params))
        if self.alpha and self.anchors:
            terms.append(self.alpha * sum(((p - bar) ** 2).sum() for p, bar in self.anchors))
        return sum(terms) if terms else None

    def _zero_grad(self):
        for p in self.params:
            p.grad = None

    def closure(self):
        """Full objective; its gradient is left in the parameters' ``.grad``."""
        self._zero_grad()
        total = 0.0
        for rows in self._chunks():
            value = self._data_sum(rows) / self.n
            value.backward()
            total = total + value.detach()
        regulariser = self._regulariser()
        if regulariser is not None:
            regulariser.backward()
            total = total + regulariser.detach()
        return total

    def minibatch_closure(self, rows):
        """Objective on a minibatch (normalised by its size), gradient in ``.grad``."""
        self._zero_grad()
        value = self._data_sum(rows) / len(rows)
        regulariser = self._regulariser()
        if regulariser is not None:
            value = value + regulariser
        value.backward()
        return value.detach()

    def evaluate(self):
        """Value and flat gradient of the full objective."""
        with torch.enable_grad():
            value = self.closure()
        return float(value), flatten([torch.zeros_like(p) if p.grad is None else p.grad
                                      for p in self.params])

    def gradient(self):
        """Flat gradient of the full objective."""
        return self.evaluate()[1]

    def hvp(self, vector):
        """Hessian of the full objective times a flat ``vector``."""
        pieces = unflatten(vector, self.shapes)
        result = torch.zeros_like(vector)
        with torch.enable_grad():
            for rows in self._chunks():
                value = self._data_sum(rows) / self.n
                grads = torch.autograd.grad(value, self.params, create_graph=True,
                                            allow_unused=True)
                dot = sum((g * v).sum() for g, v in zip(grads, pieces) if g is not None)
                if not (isinstance(dot, torch.Tensor) and dot.requires_grad):
                    continue  # the loss is linear in the parameters on this chunk
                products = torch.autograd.grad(dot, self.params, allow_unused=True)
                result += flatten([torch.zeros_like(p) if h is None else h
                                   for p, h in zip(self.params, products)])
        return result + self.damping * vector + 2 * self.alpha * self.anchor_mask * vector

    def add_(self, step):
        with torch.no_grad():
            for p, piece in zip(self.params, unflatten(step, self.shapes)):
                p.add_(piece)


def run_lbfgs(stage, max_iter, tol, *, lr=1.0, max_eval=None, tolerance_change=1e-15,
              history_size=LBFGS_HISTORY):
    """One run of torch's full-batch L-BFGS (strong Wolfe line search) on ``stage``.

    It stops at ``max_iter`` iterations or ``max_eval`` evaluations (``None``: torch's
    default, ``1.25 * max_iter``), when the largest gradient entry is at most ``tol``,
    or when a step or the objective changes by less than ``tolerance_change``.
    Returns the number of iterations taken.
    """
    optimizer = torch.optim.LBFGS(
        stage.params, lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tol,
        tolerance_change=tolerance_change, history_size=history_size,
        line_search_fn="strong_wolfe")
    optimizer.step(stage.closure)
    return optimizer.state[optimizer._params[0]].get("n_iter", 0)


def minimise(stage, max_iter, tol):
    """Full-batch L-BFGS (strong Wolfe) then Newton-CG polish; returns diagnostics."""
    value, gradient = stage.evaluate()
    grad_max = float(gradient.abs().max())
    # L-BFGS stops once the objective changes by less than its rounding error; from
    # there on Newton steps, which need only gradients, take over.
    resolution = 4 * torch.finfo(gradient.dtype).eps * (1 + abs(value))
    n_iter = 0
    while grad_max > tol and n_iter < max_iter:
        budget = max_iter - n_iter
        n_iter += max(1, run_lbfgs(stage, budget, tol, max_eval=2 * budget + 10,
                                   tolerance_change=resolution))
        previous, grad_max = grad_max, float(stage.gradient().abs().max())
        if not grad_max < 0.5 * previous:  # stalled (or NaN): restarts will not help
            break

    n_params = sum(p.numel() for p in stage.params)
    for _ in range(NEWTON_STEPS):
        if not grad_max > tol or n_iter >= max_iter:  # converged (or NaN), or budget spent
            break
        gradient = stage.gradient()
        step = truncated_cg(stage.hvp, -gradient, min(2 * n_params, CG_MAX_ITER),
                                   CG_RTOL)
        if step is None:
            break
        stage.add_(step)
        new_max = float(stage.gradient().abs().max())
        n_iter += 1
        if not new_max < grad_max:
            stage.add_(-step)
            break
        grad_max = new_max
    return {"grad_norm": grad_max, "n_iter": n_iter, "converged": grad_max <= tol}


def minibatches(n, batch_size, n_steps, random_state, *, shuffle_full_batch=False):
    """``n_steps`` index batches: shuffled epochs (the last batch of one may be short).

    Each epoch is a permutation of ``range(n)`` drawn from ``random_state`` (an int, a
    ``RandomState`` or ``None``, as :func:`sklearn.utils.check_random_state` reads it),
    and no permutation is drawn beyond the last step. With ``batch_size`` ``None`` or at
    least ``n``, every step is the whole data in order, unless ``shuffle_full_batch``.
    """
    full = batch_size is None or batch_size >= n
    if full and not shuffle_full_batch:
        everything = torch.arange(n)
        for _ in range(n_steps):
            yield everything
        return
    step = n if full else batch_size
    rng = check_random_state(random_state)
    done = 0
    while done < n_steps:
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, step):
            if done == n_steps:
                return
            yield order[start:start + step]
            done += 1


def n_minibatch_steps(n, batch_size, n_epochs):
    """Steps in ``n_epochs`` passes over ``n`` examples in batches of ``batch_size``."""
    return n_epochs * max(1, math.ceil(n / batch_size)) if n else 0


def run_steps(stage, optimizer, lr, n_steps, batch_size, seed, *,
              shuffle_full_batch=False, final_gradient=True):
    """The "paper" recipe: ``n_steps`` optimiser steps on seeded minibatches.

    ``optimizer(stage.params, lr=lr)`` takes one step per minibatch of
    :func:`minibatches` (``seed`` is its ``random_state``) on the minibatch objective.
    Returns ``grad_norm`` (largest entry of the full gradient at the end; NaN without
    ``final_gradient``, which spares that full pass), ``n_iter``, ``converged`` (always
    true: a fixed budget has no convergence test) and ``recent_loss``, the mean
    minibatch objective over the last ``RECENT_STEPS`` steps (NaN without steps).
    """
    recent = deque(maxlen=RECENT_STEPS)
    if n_steps:
        opt = optimizer(stage.params, lr=lr)
        for rows in minibatches(stage.n, batch_size, n_steps, seed,
                                shuffle_full_batch=shuffle_full_batch):
            recent.append(float(stage.minibatch_closure(rows)))
            opt.step()
    grad_max = float(stage.gradient().abs().max()) if final_gradient else float("nan")
    return {"grad_norm": grad_max, "n_iter": n_steps, "converged": True,
            "recent_loss": float(np.mean(recent)) if recent else float("nan")}

"""Training one stage on exactly the objective the estimator's Hessians describe.

Shared by the leave-one-out retrains of :mod:`skmsif.validation` and the training helpers
of :mod:`skmsif.datasets`: the mean per-example loss (with per-example weights), plus
``(damping / 2) ||params||^2``, plus ``alpha ||W - W_bar||^2`` for Case 2's anchors;
minimised to a tight gradient (L-BFGS, then Newton-CG) or stepped with a seeded optimiser
(the paper's fixed-step recipe).
"""

import numpy as np
import torch

from ._params import flatten, unflatten

# L-BFGS memory of the "converged" recipe.
LBFGS_HISTORY = 50
# Newton-CG polish after L-BFGS: torch's L-BFGS stores a curvature pair only when
# y.s > 1e-10, so it slows to gradient descent near |grad| ~ 1e-9; Newton steps with
# Hessian-vector products need only gradients and reach the float64 floor.
NEWTON_STEPS = 10
CG_RTOL = 1e-8
CG_MAX_ITER = 500


# --------------------------------------------------------------------------- objectives


class Stage:
    """The objective one stage minimises, on a private copy of a model.

    ``(1/n) sum_j weight_j * loss(x_j) + (damping/2) ||params||^2
    + alpha * sum ||W - W_bar||^2`` (the last term only for the ``anchors``: pairs of a
    parameter and the value it is pulled towards, Case 2's finetune stage).

    Parameters
    ----------
    model : torch.nn.Module
        The copy being trained (eval mode).
    params : list of torch.nn.Parameter
        The parameters optimised.
    data : skmsif._data.TensorData
        The stage's training data.
    loss : callable
        Per-example loss ``loss(outputs, targets) -> (batch,)``.
    weights : torch.Tensor of shape (n,)
        Per-example weights: ones, except ``1 + epsilon * m`` for a perturbed example.
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
        self.model = model
        self.params = list(params)
        self.shapes = [p.shape for p in self.params]
        self.data = data
        self.loss = loss
        self.weights = weights
        self.damping = float(damping)
        self.n = len(data)
        self.chunk = self.n if batch_size is None else int(batch_size)
        self.device = device
        self.anchors = list(anchors)
        self.alpha = float(alpha)
        anchored = {id(p) for p, _ in self.anchors}
        self.anchor_mask = flatten([
            torch.full(p.shape, 1.0 if id(p) in anchored else 0.0, dtype=p.dtype,
                       device=p.device) for p in self.params])

    def _data_sum(self, rows):
        """``sum_j weight_j * loss(x_j)`` over ``rows`` (a slice or an index tensor)."""
        inputs = self.data.inputs[rows].to(self.device)
        targets = self.data.targets[rows].to(self.device)
        weights = self.weights[rows].to(self.device)
        return (self.loss(self.model(inputs), targets) * weights).sum()

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


def _conjugate_gradient(hvp, rhs, max_iter, rtol):
    """CG for ``H x = rhs``, truncated where ``H`` shows non-positive curvature.

    Returns ``None`` when the very first direction has non-positive curvature.
    """
    x = torch.zeros_like(rhs)
    residual = rhs.clone()
    direction = residual.clone()
    rs = residual.dot(residual)
    target = (rtol * rhs.norm()) ** 2
    for _ in range(max_iter):
        if rs <= target:
            break
        product = hvp(direction)
        curvature = direction.dot(product)
        if curvature <= 0:
            return x if x.any() else None
        step = rs / curvature
        x += step * direction
        residual -= step * product
        rs_new = residual.dot(residual)
        direction = residual + (rs_new / rs) * direction
        rs = rs_new
    return x


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
        optimizer = torch.optim.LBFGS(
            stage.params, lr=1, max_iter=budget, max_eval=2 * budget + 10,
            tolerance_grad=tol, tolerance_change=resolution, history_size=LBFGS_HISTORY,
            line_search_fn="strong_wolfe")
        optimizer.step(stage.closure)
        n_iter += max(1, optimizer.state[optimizer._params[0]].get("n_iter", 0))
        previous, grad_max = grad_max, float(stage.gradient().abs().max())
        if not grad_max < 0.5 * previous:  # stalled (or NaN): restarts will not help
            break

    n_params = sum(p.numel() for p in stage.params)
    for _ in range(NEWTON_STEPS):
        if not grad_max > tol or n_iter >= max_iter:  # converged (or NaN), or budget spent
            break
        gradient = stage.gradient()
        step = _conjugate_gradient(stage.hvp, -gradient, min(2 * n_params, CG_MAX_ITER),
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


def _minibatches(n, batch_size, n_steps, seed):
    """``n_steps`` index batches: shuffled epochs (last batch of an epoch may be short)."""
    if batch_size is None or batch_size >= n:
        everything = torch.arange(n)
        for _ in range(n_steps):
            yield everything
        return
    rng = np.random.RandomState(seed)
    done = 0
    while True:
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, batch_size):
            if done == n_steps:
                return
            yield order[start:start + batch_size]
            done += 1


def run_steps(stage, optimizer, lr, n_steps, batch_size, seed):
    """The "paper" recipe: ``n_steps`` optimiser steps on seeded minibatches."""
    if n_steps:
        opt = optimizer(stage.params, lr=lr)
        for rows in _minibatches(stage.n, batch_size, n_steps, seed):
            stage.minibatch_closure(rows)
            opt.step()
    grad_max = float(stage.gradient().abs().max())
    return {"grad_norm": grad_max, "n_iter": n_steps, "converged": True}

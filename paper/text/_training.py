"""One stage's objective on tokenised data, and the optimisers that minimise it.

The objective is exactly the one :class:`skmsif.MultiStageInfluenceEstimator` assumes
for a stage (the model in eval mode)::

    (1/n) sum_j w_j CE(model(**inputs_j).logits, labels_j)
        + (damping / 2) ||params||^2 + alpha ||W - W_bar||^2

with ``w_j = 1`` except ``0`` for removed examples (removal keeps the normalisation
``1/n``, as in :func:`skmsif.validation.leave_one_out`), and the last term only for
Case 2's finetune stage (``anchors``: pairs of a parameter and its pretrained value).

Data are dicts of equal-length tensors ``{"input_ids", "attention_mask", "labels"}``,
right-padded. Each forward pass drops the padding columns that no row of its batch uses:
with absolute positions and masked keys this is the same function (up to rounding), for
less work.
"""

import numpy as np
import torch
import torch.nn.functional as F

from skmsif._solvers import truncated_cg

LABEL_KEY = "labels"
# Rows per forward pass when the full objective is evaluated (memory and speed only).
CHUNK = 256
LBFGS_HISTORY = 50


def model_inputs(data, rows=slice(None)):
    """The model's keyword arguments for ``rows`` of ``data``, padding columns trimmed."""
    mask = data["attention_mask"][rows]
    width = max(int(mask.sum(1).max()), 1)
    return {key: value[rows][:, :width] for key, value in data.items() if key != LABEL_KEY}


def logits(model, data, rows=slice(None)):
    return model(**model_inputs(data, rows)).logits


def per_example_loss(model, data, batch_size=CHUNK):
    """Cross-entropy of every example (eval mode, no gradient), float64 numpy array."""
    n = len(data[LABEL_KEY])
    with torch.no_grad():
        losses = [F.cross_entropy(logits(model, data, slice(s, s + batch_size)),
                                  data[LABEL_KEY][s:s + batch_size], reduction="none")
                  for s in range(0, n, batch_size)]
    return torch.cat(losses).double().numpy()


def predictions(model, data, batch_size=CHUNK):
    n = len(data[LABEL_KEY])
    with torch.no_grad():
        return torch.cat([logits(model, data, slice(s, s + batch_size)).argmax(1)
                          for s in range(0, n, batch_size)])


def accuracy(model, data):
    return float((predictions(model, data) == data[LABEL_KEY]).double().mean())


class Objective:
    """A stage's objective over ``params`` of ``model`` on ``data`` (see the module doc).

    ``features`` (optional): a callable ``rows -> (inputs, labels)`` replacing the model's
    forward pass, used to train a head on fixed encoder outputs; then ``model`` is the
    head itself.
    """

    def __init__(self, model, params, data, *, damping, weights=None, anchors=(), alpha=0.0,
                 chunk=CHUNK):
        self.model = model
        self.params = list(params)
        self.data = data
        self.n = len(data[LABEL_KEY])
        dtype = self.params[0].dtype
        self.weights = (torch.ones(self.n, dtype=dtype) if weights is None
                        else weights.to(dtype))
        self.damping = float(damping)
        self.anchors = [(p, bar.detach().clone()) for p, bar in anchors]
        self.alpha = float(alpha)
        self.chunk = chunk
        if isinstance(data, HeadData):
            self.order = torch.arange(self.n)
        else:  # rows by length, so that each chunk trims most of its padding
            self.order = torch.argsort(data["attention_mask"].sum(1), stable=True)

    def _chunks(self):
        return [self.order[start:start + self.chunk] for start in range(0, self.n, self.chunk)]

    def _forward(self, rows):
        if isinstance(self.data, HeadData):
            return self.model(self.data.features[rows])
        return logits(self.model, self.data, rows)

    def data_sum(self, rows):
        """``sum_j w_j CE_j`` over ``rows``."""
        losses = F.cross_entropy(self._forward(rows), self.data[LABEL_KEY][rows],
                                 reduction="none")
        return (losses * self.weights[rows]).sum()

    def regulariser(self):
        value = 0.5 * self.damping * sum((p * p).sum() for p in self.params)
        if self.alpha and self.anchors:
            value = value + self.alpha * sum(((p - bar) ** 2).sum() for p, bar in self.anchors)
        return value

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def closure(self):
        """The full objective; its gradient is left in the parameters' ``.grad``."""
        self.zero_grad()
        total = 0.0
        with torch.enable_grad():
            for rows in self._chunks():
                value = self.data_sum(rows) / self.n
                value.backward()
                total += float(value.detach())
            regulariser = self.regulariser()
            regulariser.backward()
        return torch.tensor(total + float(regulariser.detach()), dtype=self.params[0].dtype)

    def minibatch_closure(self, rows):
        """Objective on a minibatch (data term averaged over the minibatch)."""
        self.zero_grad()
        with torch.enable_grad():
            value = self.data_sum(rows) / len(rows) + self.regulariser()
            value.backward()
        return float(value.detach())

    def gradient(self):
        """Value and flat gradient of the full objective."""
        value = float(self.closure())
        grad = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                          for p in self.params])
        self.zero_grad()
        return value, grad


class HeadData(dict):
    """Labels plus fixed encoder outputs ``features``: a head's training data."""

    def __init__(self, features, labels):
        super().__init__(labels=labels)
        self.features = features


def gradient_norms(objective):
    """``{"objective", "grad_max", "grad_norm"}``: value, largest absolute entry and
    Euclidean norm of the gradient of the full objective."""
    value, grad = objective.gradient()
    return {"objective": value, "grad_max": float(grad.abs().max()),
            "grad_norm": float(grad.norm())}


def minibatches(n, batch_size, n_steps, seed):
    """``n_steps`` index batches: epochs shuffled by ``RandomState(seed)`` (the last
    batch of an epoch may be short); the same for every call with the same arguments."""
    if batch_size is None or batch_size >= n:
        for _ in range(n_steps):
            yield torch.arange(n)
        return
    rng = np.random.RandomState(seed)
    done = 0
    while done < n_steps:
        order = torch.from_numpy(rng.permutation(n))
        for start in range(0, n, batch_size):
            if done == n_steps:
                return
            yield order[start:start + batch_size]
            done += 1


def run_adam(objective, n_steps, lr, batch_size, seed, final_lr=None):
    """``n_steps`` Adam steps on seeded minibatches; the learning rate decays
    geometrically from ``lr`` to ``final_lr`` (constant when ``None``)."""
    if not n_steps:
        return {"n_steps": 0, "last_loss": float("nan")}
    optimizer = torch.optim.Adam(objective.params, lr=lr)
    decay = 1.0 if final_lr is None else (final_lr / lr) ** (1.0 / max(n_steps - 1, 1))
    recent = []
    for step, rows in enumerate(minibatches(objective.n, batch_size, n_steps, seed)):
        for group in optimizer.param_groups:
            group["lr"] = lr * decay ** step
        recent = (recent + [objective.minibatch_closure(rows)])[-20:]
        optimizer.step()
    objective.zero_grad()
    return {"n_steps": n_steps, "last_loss": float(np.mean(recent))}


def run_lbfgs(objective, max_iter, tol, block=50):
    """Full-batch L-BFGS (strong Wolfe, history ``LBFGS_HISTORY``) until the largest
    absolute gradient entry is at most ``tol`` or ``max_iter`` iterations are spent;
    checked every ``block`` iterations, one optimiser throughout (its history kept)."""
    value, grad = objective.gradient()
    grad_max = float(grad.abs().max())
    optimizer = torch.optim.LBFGS(
        objective.params, lr=1, max_iter=block, max_eval=3 * block,
        tolerance_grad=tol, tolerance_change=0.0, history_size=LBFGS_HISTORY,
        line_search_fn="strong_wolfe")
    n_iter = 0
    while grad_max > tol and n_iter < max_iter:
        optimizer.param_groups[0]["max_iter"] = min(block, max_iter - n_iter)
        before = optimizer.state[optimizer._params[0]].get("n_iter", 0)
        optimizer.step(objective.closure)
        done = optimizer.state[optimizer._params[0]].get("n_iter", 0) - before
        _, grad = objective.gradient()
        grad_max = float(grad.abs().max())
        if done == 0 or not np.isfinite(grad_max):
            break
        n_iter += done
    objective.zero_grad()
    return {"n_iter": n_iter, "grad_max": grad_max, "converged": grad_max <= tol}


def _hvp(objective, vector):
    """Hessian of the full objective times a flat ``vector`` (needs double backward)."""
    shapes = [p.shape for p in objective.params]
    pieces = list(torch.split(vector, [p.numel() for p in objective.params]))
    pieces = [piece.reshape(shape) for piece, shape in zip(pieces, shapes)]
    result = torch.zeros_like(vector)
    with torch.enable_grad():
        for rows in objective._chunks():
            value = objective.data_sum(rows) / objective.n
            grads = torch.autograd.grad(value, objective.params, create_graph=True,
                                        allow_unused=True)
            dot = sum((g * v).sum() for g, v in zip(grads, pieces) if g is not None)
            products = torch.autograd.grad(dot, objective.params, allow_unused=True)
            result += torch.cat([(torch.zeros_like(p) if h is None else h).reshape(-1)
                                 for p, h in zip(objective.params, products)])
    result += objective.damping * vector
    if objective.alpha and objective.anchors:
        anchored = {id(p) for p, _ in objective.anchors}
        mask = torch.cat([torch.full((p.numel(),), float(id(p) in anchored), dtype=p.dtype)
                          for p in objective.params])
        result += 2 * objective.alpha * mask * vector
    return result


def run_newton(objective, model, n_steps, tol, cg_max_iter=200):
    """Newton-CG steps after L-BFGS, which stalls near the optimum: CG on the Hessian
    (stopped at negative curvature), the step halved until the largest gradient entry
    drops (at most 6 halvings, else stop). Attention is switched to the eager
    implementation meanwhile (the SDPA kernel has no double backward) and restored."""
    attention = model.config._attn_implementation
    model.set_attn_implementation("eager")

    def move(step, scale):
        offset = 0
        with torch.no_grad():
            for p in objective.params:
                p.add_(scale * step[offset:offset + p.numel()].view_as(p))
                offset += p.numel()

    try:
        _, grad = objective.gradient()
        grad_max = float(grad.abs().max())
        done = 0
        while done < n_steps and grad_max > tol:
            step = truncated_cg(lambda v: _hvp(objective, v), -grad, cg_max_iter, 1e-8)
            if step is None:
                break
            scale, accepted = 1.0, False
            for _ in range(7):
                move(step, scale)
                _, new_grad = objective.gradient()
                if float(new_grad.abs().max()) < grad_max:
                    accepted = True
                    break
                move(step, -scale)
                scale /= 2
            done += 1
            if not accepted:
                break
            grad, grad_max = new_grad, float(new_grad.abs().max())
    finally:
        model.set_attn_implementation(attention)
        objective.zero_grad()
    return {"n_steps": done, "grad_max": grad_max, "converged": grad_max <= tol}

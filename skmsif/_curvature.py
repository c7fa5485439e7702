"""A model's mean loss as a function of one flat parameter vector, and its derivatives.

Everything goes through :func:`torch.func.functional_call` on a private copy of the user's
module, so the user's module is never touched. Derivatives (``torch.func``):

* ``hvp``: Hessian-vector products of the mean loss, forward-over-reverse, batched over
  several vectors with ``vmap``;
* ``per_example_grads``: gradients of each example's loss alone (``vmap(grad)``);
* ``directional``: the derivative of every per-example loss along a few vectors, one
  forward-mode pass (``jvp``), no per-example gradient stored (``doc/guide/cases.md``, step 4).
"""

import torch
from torch.func import functional_call, grad, jvp, vmap

from ._losses import check_losses
from ._params import flatten, unflatten
from ._progress import progress

# Below this many vectors, ``directional`` scores with forward-mode passes (one per
# vector); above it, with per-example gradients times the matrix of vectors.
JVP_MAX_VECTORS = 8
# Vectors pushed through one vmapped call at a time (vmap keeps one copy of the
# activations per vector).
HVP_MAX_VECTORS = 16


class Objective:
    """Per-example losses of ``module`` as a function of the flat vector of ``free`` params.

    Parameters
    ----------
    module : torch.nn.Module
        A private copy of the user's model, in eval mode.
    state : dict of str to torch.Tensor
        Every parameter and buffer of ``module``, in the compute dtype and on the device.
    free : list of str
        Names of the parameters the flat vector holds, in its order.
    loss : callable
        ``loss(outputs, targets) -> (n,)`` per-example losses.
    loss_name : str
        Argument name of the loss, for error messages.
    """

    def __init__(self, module, state, free, loss, loss_name):
        self.module = module
        self.state = state
        self.free = list(free)
        self.shapes = [state[name].shape for name in self.free]
        self.loss = loss
        self.loss_name = loss_name
        self.point = flatten([state[name] for name in self.free])
        # vmap over tangent vectors batches the weights' tangents; for convolutions that
        # runs several times slower than one call per vector (measured on the paper's
        # CNN), for linear layers it is the faster way.
        self.vectorize = not any(isinstance(m, torch.nn.modules.conv._ConvNd)
                                 for m in module.modules())

    def _map(self, function, vectors):
        """``function`` applied to each row of ``vectors``, stacked."""
        if self.vectorize:
            return torch.cat([vmap(function)(vectors[start:start + HVP_MAX_VECTORS])
                              for start in range(0, len(vectors), HVP_MAX_VECTORS)])
        return torch.stack([function(vector) for vector in vectors])

    @property
    def n_params(self):
        return self.point.numel()

    def offsets(self, names):
        """Index tensor of the coordinates of ``names`` in the flat vector."""
        index, start = {}, 0
        for name, shape in zip(self.free, self.shapes):
            size = int(torch.Size(shape).numel())
            index[name] = torch.arange(start, start + size)
            start += size
        return torch.cat([index[name] for name in names]) if names else torch.empty(
            0, dtype=torch.long)

    def losses(self, flat, inputs, targets):
        """Per-example losses of a batch at the parameters ``flat``."""
        state = dict(self.state)
        state.update(zip(self.free, unflatten(flat, self.shapes)))
        return self.loss(functional_call(self.module, state, (inputs,)), targets)

    def _one_loss(self, flat, inputs, targets):
        return self.losses(flat, inputs.unsqueeze(0), targets.unsqueeze(0)).sum()

    def check(self, data, batch_size, device):
        """Evaluate the first batch once and check the losses' shape and values."""
        inputs, targets = next(data.batches(batch_size, device))
        with torch.no_grad():
            check_losses(self.losses(self.point, inputs, targets), len(inputs),
                         self.loss_name)

    def hvp(self, vectors, data, batch_size, device, indices=None):
        """Hessian of the mean loss over ``data`` times each row of ``vectors`` (k, p)."""
        n = len(data) if indices is None else len(indices)
        out = torch.zeros_like(vectors)
        for inputs, targets in data.batches(batch_size, device, indices):
            def batch_sum(flat, inputs=inputs, targets=targets):
                return self.losses(flat, inputs, targets).sum()

            gradient = grad(batch_sum)

            def one(vector, gradient=gradient):
                return jvp(gradient, (self.point,), (vector,))[1]

            out += self._map(one, vectors)
        return out / n

    def per_example_grads(self, inputs, targets):
        """Gradient of each example's own loss, ``(batch, p)``."""
        return vmap(grad(self._one_loss), in_dims=(None, 0, 0))(self.point, inputs, targets)

    def gradient_rows(self, data, batch_size, device, summed):
        """Per-example gradients over ``data`` ``(n, p)``, or their sum ``(1, p)``."""
        rows = []
        for inputs, targets in data.batches(batch_size, device):
            if summed:
                rows.append(grad(lambda flat: self.losses(flat, inputs, targets).sum())(
                    self.point)[None])
            else:
                rows.append(self.per_example_grads(inputs, targets))
        stacked = torch.cat(rows)
        return stacked.sum(0, keepdim=True) if summed else stacked

    def directional(self, vectors, data, batch_size, device, verbose=0):
        """Derivative of every example's loss along each row of ``vectors``: ``(k, n)``.

        Equals ``vectors @ per_example_grads(data).T`` without materialising the
        ``(n, p)`` gradients.
        """
        columns = []
        batches = data.batches(batch_size, device)
        total = -(-len(data) // batch_size)
        for inputs, targets in progress(batches, verbose, total, "scoring pretrain set"):
            if len(vectors) <= JVP_MAX_VECTORS:
                def batch_losses(flat, inputs=inputs, targets=targets):
                    return self.losses(flat, inputs, targets)

                def along(vector, batch_losses=batch_losses):
                    return jvp(batch_losses, (self.point,), (vector,))[1]

                columns.append(self._map(along, vectors))
            else:
                columns.append(vectors @ self.per_example_grads(inputs, targets).T)
        return torch.cat(columns, dim=1)

    def dense_hessian(self, data, batch_size, device, indices=None, verbose=0,
                      chunk=64):
        """The dense Hessian of the mean loss, ``(p, p)``, from batched HVPs."""
        p = self.n_params
        eye = torch.eye(p, dtype=self.point.dtype, device=self.point.device)
        blocks = []
        starts = range(0, p, chunk)
        for start in progress(starts, verbose, len(starts), "dense Hessian"):
            blocks.append(self.hvp(eye[start:start + chunk], data, batch_size, device,
                                   indices))
        hessian = torch.cat(blocks)
        return (hessian + hessian.T) / 2

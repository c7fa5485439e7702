"""One stage's loss as a function of a flat parameter vector, and its curvature.

:class:`Objective` is a model adapter (``skmsif._model``) restricted to some of its
parameters (the "free" ones, flattened in a fixed order). Everything goes through
:func:`torch.func.functional_call` on the adapter's private copy, so the user's module is
never touched. Derivatives (``torch.func``):

* ``per_example_grads``: gradients of each example's loss alone (``vmap(grad)``);
* ``directional``: the derivative of every per-example loss along a few vectors, one
  forward-mode pass (``jvp``), no per-example gradient stored (``doc/guide/cases.md``,
  step 4);
* ``curvature_product``: the Hessian (forward over reverse) or the Gauss-Newton matrix
  ``J^T H_out J`` (``H_out`` the loss's Hessian with respect to the outputs) of the mean
  loss, times a batch of vectors.

:class:`CurvatureOperator` binds an objective to its data and a curvature: the linear
operator every backend (``skmsif._backends``) solves with. It knows the parameter blocks
(``W``, ``U``, ``Theta``) and, through the objective, the model's layers.
"""

import torch
from torch.func import grad, jvp, vjp, vmap

from ._losses import check_losses
from ._params import flatten, unflatten
from ._progress import progress

# Below this many vectors, ``directional`` scores with forward-mode passes (one per
# vector); above it, with per-example gradients times the matrix of vectors.
JVP_MAX_VECTORS = 8
# Vectors pushed through one vmapped call at a time (vmap keeps one copy of the
# activations per vector).
HVP_MAX_VECTORS = 16
# A Gauss-Newton block product for more vectors than this runs as one pass of per-example
# pseudo-gradients over the data (a cost independent of the number of vectors) instead
# of one Gauss-Newton product per vector.
FACTOR_PASS_MIN_VECTORS = 16

CURVATURES = ("hessian", "gauss_newton")


def _unsqueeze(inputs):
    if isinstance(inputs, dict):
        return {key: value.unsqueeze(0) for key, value in inputs.items()}
    return inputs.unsqueeze(0)


def _index_rows(inputs, rows):
    if isinstance(inputs, dict):
        return {key: value[rows] for key, value in inputs.items()}
    return inputs[rows]


class Objective:
    """Per-example losses of one model as a function of the flat vector of ``free`` params.

    Parameters
    ----------
    adapter : skmsif._model.ModelAdapter
        The model (a private copy) and its loss.
    free : list of str
        Names of the parameters the flat vector holds, in its order.
    state : dict of str to torch.Tensor, default=None
        Values of every parameter and buffer; ``None``: the adapter's.
    """

    def __init__(self, adapter, free, state=None):
        self.adapter = adapter
        self.module = adapter.module
        self.state = dict(adapter.state if state is None else state)
        self.free = list(free)
        self.shapes = [self.state[name].shape for name in self.free]
        self.loss_name = adapter.loss_name
        self.point = flatten([self.state[name] for name in self.free])
        # vmap over tangent vectors batches the weights' tangents; for convolutions that
        # runs several times slower than one call per vector (measured on the paper's
        # CNN), for linear layers it is the faster way.
        self.vectorize = not any(isinstance(m, torch.nn.modules.conv._ConvNd)
                                 for m in self.module.modules())
        self.loop_examples = False

    # -------------------------------------------------------------- structure

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

    def with_point(self, flat):
        """A copy of this objective at other values ``flat`` of the free parameters."""
        state = dict(self.state)
        state.update(zip(self.free, unflatten(flat, self.shapes)))
        return Objective(self.adapter, self.free, state)

    def _state_at(self, flat):
        state = dict(self.state)
        state.update(zip(self.free, unflatten(flat, self.shapes)))
        return state

    def _map(self, function, vectors):
        """``function`` applied to each row of ``vectors``, stacked."""
        if self.vectorize:
            return torch.cat([vmap(function)(vectors[start:start + HVP_MAX_VECTORS])
                              for start in range(0, len(vectors), HVP_MAX_VECTORS)])
        return torch.stack([function(vector) for vector in vectors])

    # -------------------------------------------------------------- values

    def outputs(self, flat, inputs):
        return self.adapter.outputs(self._state_at(flat), inputs)

    def losses(self, flat, inputs, targets):
        """Per-example losses of a batch at the parameters ``flat``."""
        return self.adapter.losses(self._state_at(flat), inputs, targets)

    def _one_loss(self, flat, inputs, targets):
        return self.losses(flat, _unsqueeze(inputs), targets.unsqueeze(0)).sum()

    def check(self, data, batch_size, device):
        """Evaluate the first batch once and check the losses' shape and values.

        The losses must also depend on the parameters through torch operations: a loss
        computed through numpy or on ``.detach()``-ed outputs has no derivative, and its
        influence would be zero everywhere. Its gradient on the first batch must exist,
        be finite, and not be exactly zero while the losses are not.
        """
        inputs, targets = data.first_batch(batch_size, device)
        with torch.no_grad():
            losses = self.losses(self.point, inputs, targets)
            check_losses(losses, len(targets), self.loss_name)
        model_name = getattr(self.adapter, "model_name", "the model")
        detached = (
            f"{self.loss_name} must be computed with torch operations on {model_name}'s "
            "outputs: a loss computed through numpy, or on .detach()-ed outputs, does not "
            "depend on the parameters, so every influence would be zero."
        )
        try:
            gradient = grad(lambda flat: self.losses(flat, inputs, targets).sum())(self.point)
        except RuntimeError as exc:
            raise ValueError(
                f"{self.loss_name} could not be differentiated with respect to the "
                f"parameters of {model_name} on the first batch of {data.name} ({exc}). "
                f"{detached}"
            ) from exc
        if not bool(torch.isfinite(gradient).all()):
            per_example = self.per_example_grads(inputs, targets)
            bad = ~torch.isfinite(per_example.reshape(len(targets), -1)).all(dim=1)
            where = (f"example {int(bad.nonzero()[0])} of {data.name}" if bool(bad.any())
                     else f"the first batch of {data.name}")
            raise ValueError(
                f"The gradient of {self.loss_name} with respect to {model_name}'s "
                f"parameters is NaN or infinite on {where} (the loss or the model's "
                "outputs overflow, or the loss is not differentiable there)."
            )
        if self.n_params and bool((gradient == 0).all()) and bool((losses != 0).any()):
            raise ValueError(
                f"The gradient of {self.loss_name} with respect to every parameter of "
                f"{model_name} is exactly zero on the first batch of {data.name}, though "
                f"the losses are not zero. {detached}"
            )
        if (getattr(self.adapter, "loss_spec", None) == "cross_entropy"
                and not isinstance(getattr(data, "targets", None), torch.Tensor)):
            # The probe saw the labels of the first batch only (a Dataset or DataLoader
            # is streamed): a label out of range later would fail deep inside torch.
            with torch.no_grad():
                n_classes = self.outputs(self.point, inputs).shape[-1]
            offset = 0
            for _, batch_targets in data.batches(batch_size, device):
                bad = (batch_targets < 0) | (batch_targets >= n_classes)
                if bool(bad.any()):
                    row = int(bad.reshape(len(batch_targets), -1).any(dim=1).nonzero()[0])
                    raise ValueError(
                        f"{data.name}: example {offset + row} has label "
                        f"{batch_targets[row].tolist()}, but {model_name} outputs "
                        f"{n_classes} classes, so labels must lie in [0, {n_classes - 1}]."
                        " Relabel the classes from 0 or give the model's head more outputs."
                    )
                offset += len(batch_targets)

    def mean_gradient(self, data, batch_size, device):
        """Gradient of the mean loss over ``data`` at the current point ``(p,)``, float64."""
        total = torch.zeros_like(self.point, dtype=torch.float64)
        for inputs, targets in data.batches(batch_size, device):
            total += grad(lambda flat: self.losses(flat, inputs, targets).sum())(
                self.point).to(torch.float64)
        return total / len(data)

    # -------------------------------------------------------------- curvature

    def curvature_product(self, vectors, inputs, targets, curvature="hessian"):
        """Summed over the batch: ``sum_i C_i v`` for each row ``v`` of ``vectors``.

        ``C_i`` is the Hessian of example ``i``'s loss, or its Gauss-Newton matrix
        ``J_i^T H_out,i J_i``.
        """
        if curvature == "hessian":
            def batch_sum(flat):
                return self.losses(flat, inputs, targets).sum()

            gradient = grad(batch_sum)

            def one(vector):
                return jvp(gradient, (self.point,), (vector,))[1]

            return self._map(one, vectors)

        def forward(flat):
            return self.outputs(flat, inputs)

        outputs, pullback = vjp(forward, self.point)
        outputs = outputs.detach()

        def one_gn(vector):
            tangent = jvp(forward, (self.point,), (vector,))[1]
            curved = self.adapter.output_hessian_product(outputs, targets, tangent)
            return pullback(curved)[0]

        return self._map(one_gn, vectors)

    def curvature_vectors(self, vectors, data, batch_size, device, indices=None,
                          curvature="hessian"):
        """The curvature of the mean loss over ``data`` times each row of ``vectors``.

        The products run in the model's dtype (``self.point``); they are accumulated,
        and returned, in the dtype of ``vectors`` when that is wider (float64 solves
        over float32 passes).
        """
        n = len(data) if indices is None else len(indices)
        out_dtype = torch.promote_types(vectors.dtype, self.point.dtype)
        out = torch.zeros(vectors.shape, dtype=out_dtype, device=vectors.device)
        tangents = vectors.to(self.point.dtype)
        for inputs, targets in data.batches(batch_size, device, indices):
            out += self.curvature_product(tangents, inputs, targets, curvature).to(out_dtype)
        return out / n

    def hvp(self, vectors, data, batch_size, device, indices=None):
        """Hessian of the mean loss over ``data`` times each row of ``vectors`` (k, p)."""
        return self.curvature_vectors(vectors, data, batch_size, device, indices,
                                      "hessian")

    def dense_hessian(self, data, batch_size, device, indices=None, verbose=0, chunk=64,
                      curvature="hessian"):
        """The dense curvature matrix of the mean loss, ``(p, p)``, from batched products.

        A single ``nn.Linear`` layer under a named loss (a Case 1 head on cached
        features) takes the closed form of :meth:`_dense_linear` instead.
        """
        linear = self._dense_linear(data, batch_size, device, indices)
        if linear is not None:
            return linear
        p = self.n_params
        eye = torch.eye(p, dtype=torch.float64, device=self.point.device)
        blocks = []
        starts = range(0, p, chunk)
        for start in progress(starts, verbose, len(starts), f"dense {curvature}"):
            blocks.append(self.curvature_vectors(eye[start:start + chunk], data, batch_size,
                                                 device, indices, curvature))
        matrix = torch.cat(blocks)
        return (matrix + matrix.T) / 2

    def _linear_layer(self):
        """The ``nn.Linear`` whose weight (and bias) are exactly the free parameters, when
        the model is that layer alone (or an ``nn.Sequential`` of it), else ``None``."""
        layer = self.module
        if isinstance(layer, torch.nn.Sequential) and len(layer) == 1:
            # The key of a sliced Sequential is the original position ("1" for model[1:]).
            key, layer = next(iter(layer.named_children()))
            prefix = key + "."
        else:
            prefix = ""
        if type(layer) is not torch.nn.Linear:
            return None
        names = {prefix + "weight"} | ({prefix + "bias"} if layer.bias is not None else set())
        if set(self.free) != names or self.adapter.loss_spec not in ("cross_entropy", "mse"):
            return None
        return prefix

    def _dense_linear(self, data, batch_size, device, indices=None):
        """The curvature of one ``nn.Linear`` layer with a named loss, in closed form.

        Its outputs ``o_i = W a_i + b`` are linear in the parameters, so the Hessian and
        the Gauss-Newton matrix agree: ``(1/n) sum_i J_i^T H_i J_i`` with ``J_i = I (x)
        [a_i; 1]^T``, i.e. the block of output rows ``(c, c')`` is ``(1/n) sum_i
        H_i[c, c'] [a_i; 1] [a_i; 1]^T``. That costs ``C^2 n d^2 / 2`` operations, where
        products with every unit vector would cost about ``4 C n d (C d)``. ``None`` when
        the model is not such a layer (or its inputs are not ``(batch, features)``).
        """
        prefix = self._linear_layer()
        if prefix is None:
            return None
        weight = self.state[prefix + "weight"]
        bias_name = prefix + "bias"
        has_bias = bias_name in self.free
        n_out, n_in = weight.shape
        width = n_in + 1
        total = torch.zeros(n_out, width, n_out, width, dtype=torch.float64,
                            device=self.point.device)
        count = 0
        for inputs, targets in data.batches(batch_size, device, indices):
            if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
                return None
            with torch.no_grad():
                outputs = self.outputs(self.point, inputs).to(torch.float64)
            rows = torch.cat([inputs.to(torch.float64),
                              torch.ones(len(inputs), 1, dtype=torch.float64,
                                         device=inputs.device)], dim=1)
            if self.adapter.loss_spec == "mse":
                block = rows.T @ rows * (2.0 / n_out)
                for c in range(n_out):
                    total[c, :, c, :] += block
            else:
                probabilities = torch.softmax(outputs, dim=1)
                hessians = (torch.diag_embed(probabilities)
                            - probabilities[:, :, None] * probabilities[:, None, :])
                for c in range(n_out):
                    for other in range(c, n_out):
                        block = (rows * hessians[:, c, other, None]).T @ rows
                        total[c, :, other, :] += block
                        if other != c:
                            total[other, :, c, :] += block.T
            count += len(inputs)
        # From the (out, in + 1) layout to the flat vector's order of the free parameters.
        position = torch.empty(n_out, width, dtype=torch.long)
        offsets = {name: index for name, index in zip(
            self.free, torch.split(torch.arange(self.n_params),
                                   [int(torch.Size(shape).numel()) for shape in self.shapes]))}
        position[:, :n_in] = offsets[prefix + "weight"].reshape(n_out, n_in)
        keep = torch.ones(n_out, width, dtype=torch.bool)
        if has_bias:
            position[:, n_in] = offsets[bias_name]
        else:
            keep[:, n_in] = False
        flat = total.reshape(n_out * width, n_out * width)
        kept = keep.reshape(-1).nonzero().flatten()
        order = position.reshape(-1)[kept]
        matrix = torch.empty(self.n_params, self.n_params, dtype=torch.float64,
                             device=self.point.device)
        matrix[order[:, None], order[None, :]] = flat[kept][:, kept] / count
        return matrix

    # -------------------------------------------------------------- gradients

    def per_example_grads(self, inputs, targets):
        """Gradient of each example's own loss, ``(batch, p)``.

        Vectorised over the examples with ``vmap``; a model whose forward branches on the
        values of its inputs (``transformers`` checks whether an attention mask masks
        anything) cannot be vmapped over examples, and gets one gradient per example.
        """
        if not self.loop_examples:
            try:
                return vmap(grad(self._one_loss), in_dims=(None, 0, 0))(self.point, inputs,
                                                                       targets)
            except RuntimeError as exc:
                if "vmap" not in str(exc) or "data-dependent" not in str(exc):
                    raise
                self.loop_examples = True
        rows = []
        for row in range(len(targets)):
            def loss(flat, row=row):
                return self.losses(flat, _index_rows(inputs, slice(row, row + 1)),
                                   targets[row:row + 1]).sum()

            rows.append(grad(loss)(self.point))
        return torch.stack(rows)

    def pseudo_gradients(self, inputs, targets, loss_factor):
        """Per-example Gauss-Newton pseudo-gradients ``J_i^T L_i[:, r]``: ``(batch * R, p)``.

        ``L_i`` is the loss's factor (``L_i L_i^T`` the Hessian of example ``i``'s loss in
        its outputs, :func:`skmsif._kfac.loss_factor_for`), so that the Gauss-Newton
        matrix of the batch is ``P^T P``. Rows are ordered example by example.
        """
        with torch.no_grad():
            outputs = self.outputs(self.point, inputs)
        factor = loss_factor(outputs.detach(), targets).to(self.point.dtype)
        n, _, columns = factor.shape

        def along(flat, example, column):
            return (self.outputs(flat, _unsqueeze(example)).reshape(-1) * column).sum()

        rows = []
        for r in range(columns):
            if not self.loop_examples:
                try:
                    rows.append(vmap(grad(along), in_dims=(None, 0, 0))(
                        self.point, inputs, factor[:, :, r]))
                    continue
                except RuntimeError as exc:
                    if "vmap" not in str(exc) or "data-dependent" not in str(exc):
                        raise
                    self.loop_examples = True
            rows.append(torch.stack([
                grad(along)(self.point, _index_rows(inputs, i), factor[i, :, r])
                for i in range(n)]))
        # (R, n, p) -> (n * R, p), example-major.
        return torch.stack(rows, dim=1).reshape(n * columns, -1)

    def gradient_rows(self, data, batch_size, device, summed):
        """Per-example gradients over ``data`` ``(n, p)``, or their sum ``(1, p)``; float64."""
        if summed:
            total = torch.zeros(1, self.n_params, dtype=torch.float64,
                                device=self.point.device)
            for inputs, targets in data.batches(batch_size, device):
                total += grad(lambda flat: self.losses(flat, inputs, targets).sum())(
                    self.point)[None].to(torch.float64)
            return total
        return torch.cat([self.per_example_grads(inputs, targets).to(torch.float64)
                          for inputs, targets in data.batches(batch_size, device)])

    def directional(self, vectors, data, batch_size, device, verbose=0):
        """Derivative of every example's loss along each row of ``vectors``: ``(k, n)``.

        Equals ``vectors @ per_example_grads(data).T`` without materialising the
        ``(n, p)`` gradients. The pass runs in the model's dtype; the result is float64.
        """
        vectors = vectors.to(self.point.dtype)
        columns = []
        batches = data.batches(batch_size, device)
        total = -(-len(data) // batch_size)
        for inputs, targets in progress(batches, verbose, total, "scoring pretrain set"):
            if len(vectors) <= JVP_MAX_VECTORS:
                def batch_losses(flat, inputs=inputs, targets=targets):
                    return self.losses(flat, inputs, targets)

                def along(vector, batch_losses=batch_losses):
                    return jvp(batch_losses, (self.point,), (vector,))[1]

                columns.append(self._map(along, vectors).to(torch.float64))
            else:
                columns.append((vectors @ self.per_example_grads(inputs, targets).T).to(
                    torch.float64))
        return torch.cat(columns, dim=1)


class CurvatureOperator:
    """A stage's curvature on its data: the linear operator the backends solve with.

    Parameters
    ----------
    objective : Objective
        The stage's model, loss and free parameters.
    data : skmsif._data.DataSource
        The stage's data (the mean over it is taken).
    curvature : {"hessian", "gauss_newton"}
    batch_size : int
    device : torch.device
    indices : torch.Tensor or None
        A subsample of ``data`` (``hessian_samples``).
    blocks : dict of str to torch.Tensor
        Named index sets of the flat vector (``"W"``, ``"U"``, ``"Theta"``).
    name : str
        ``"pretrain"`` or ``"finetune"``, for messages.
    verbose : int
    """

    def __init__(self, objective, data, curvature, batch_size, device, indices=None,
                 blocks=None, name="", verbose=0):
        self.objective = objective
        self.data = data
        self.curvature = curvature
        self.batch_size = batch_size
        self.device = device
        self.indices = indices
        self.blocks = dict(blocks or {})
        self.name = name
        self.verbose = verbose

    @property
    def n_params(self):
        return self.objective.n_params

    @property
    def n_examples(self):
        return len(self.data) if self.indices is None else len(self.indices)

    def matvec(self, vectors):
        """The curvature times each row of ``vectors`` ``(k, p)``."""
        return self.objective.curvature_vectors(vectors, self.data, self.batch_size,
                                                self.device, self.indices, self.curvature)

    def block_product(self, vectors, rows, cols):
        """``C[rows][:, cols] v`` for each row ``v`` of ``vectors`` ``(k, len(cols))``.

        A product with an off-diagonal block, such as the mixed block ``H_WTheta`` of
        Case 1 applied to one vector per test point. For the Gauss-Newton matrix and
        more than ``FACTOR_PASS_MIN_VECTORS`` vectors it is computed from one pass of
        per-example pseudo-gradients ``P`` over the data, ``P[:, rows]^T (P[:, cols]
        v)``, whose cost does not grow with ``k`` (beyond the matrix products); else from
        one curvature product per vector (and for a callable loss, whose output Hessian
        may be indefinite). Returns ``(k, len(rows))`` in the wider dtype
        of ``vectors`` and the model.
        """
        k = len(vectors)
        out_dtype = torch.promote_types(vectors.dtype, self.objective.point.dtype)
        if (self.curvature == "gauss_newton" and k > FACTOR_PASS_MIN_VECTORS
                and self._has_loss_factor()):
            from ._kfac import loss_factor_for

            loss_factor = loss_factor_for(self.objective.adapter.loss_spec)
            tangents = vectors.to(self.objective.point.dtype)
            out = torch.zeros(k, len(rows), dtype=out_dtype, device=vectors.device)
            for inputs, targets in self.batches():
                pseudo = self.objective.pseudo_gradients(inputs, targets, loss_factor)
                out += ((tangents @ pseudo[:, cols].T) @ pseudo[:, rows]).to(out_dtype)
            return out / self.n_examples
        padded = torch.zeros(k, self.n_params, dtype=vectors.dtype, device=vectors.device)
        padded[:, cols] = vectors
        return self.matvec(padded)[:, rows].to(out_dtype)

    def _has_loss_factor(self):
        """Whether the loss has the closed-form factor the pseudo-gradients need: the
        named losses (a callable's output Hessian may be indefinite, which a factor,
        clipped to positive semi-definite, would not reproduce), and for cross-entropy
        logits of shape ``(n, classes)`` (not per-token sequence logits)."""
        loss = self.objective.adapter.loss_spec
        if loss == "mse":
            return True
        if loss != "cross_entropy":
            return False
        inputs, _ = next(iter(self.batches()))
        with torch.no_grad():
            return self.objective.outputs(self.objective.point, inputs).ndim == 2

    def dense(self):
        """The dense ``(p, p)`` curvature matrix."""
        return self.objective.dense_hessian(self.data, self.batch_size, self.device,
                                            self.indices, self.verbose,
                                            curvature=self.curvature)

    def batches(self):
        """The operator's data batches on its device (a fresh iterator each call)."""
        return self.data.batches(self.batch_size, self.device, self.indices)

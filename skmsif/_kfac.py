"""Kronecker-factored approximations (K-FAC, EK-FAC) of a model's Gauss-Newton matrix.

The Gauss-Newton matrix (GGN) of the mean of ``n`` per-example losses, over the flat vector
``theta`` of the ``free`` parameters, is

    G = (1/n) sum_i J_i^T H_i J_i,   J_i = d outputs_i / d theta,
                                     H_i = d^2 loss_i / d outputs_i^2 = L_i L_i^T.

With the columns ``L_i[:, r]`` backpropagated as output gradients, the *pseudo-gradients*
``J_i^T L_i[:, r]`` give ``G = (1/n) sum_i sum_r (J_i^T L_i[:, r]) (J_i^T L_i[:, r])^T``
(:func:`loss_factor_for` builds ``L``).

Layers (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``) get one Kronecker block each
(Martens & Grosse 2015; George et al. 2018; Grosse et al. 2023). Write the layer's weight,
and its bias as a last column when the bias is in ``free``, as one ``(out, in')`` matrix
(``in' = in + 1`` with a bias). Per example ``i`` the layer sees input rows ``a_it`` (with a
trailing 1 for the bias) and, for output-factor column ``r``, output pseudo-gradients
``s_irt`` at positions ``t = 1..T_i``:

* ``nn.Linear`` on ``(batch, in)``: one position. On ``(batch, ..., in)`` (sequences, as in
  attention blocks) every index between the batch and the feature dimension is a position.
* ``nn.Conv2d``: the positions are the output pixels, ``a_it`` the unfolded input patch
  feeding pixel ``t`` (channel-major, matching the row-major flattening of the weight
  ``(out, in, kh, kw)``), ``s_irt`` the pseudo-gradient at that pixel (KFC, Grosse & Martens
  2016).
* A layer called several times in one forward pass: every call's positions count as more
  positions of the same example.

The per-example pseudo-gradient of the layer matrix is ``Grad_ir = sum_t s_irt a_it^T``
(exact), and the factors are

    A = (sum_i sum_t a_it a_it^T) / (sum_i T_i)       (mean over all positions seen),
    S = (1/n) sum_i sum_r sum_t s_irt s_irt^T,

so that the layer's GGN block is approximated by ``S (x) A`` in the row-major order of the
``(out, in')`` matrix (``torch.kron(S, A)``). With one position per example this is the usual
K-FAC; with ``T`` positions it is K-FAC-expand (Eschenhagen et al. 2023) and KFC, both of
which equal ``(1/(nT)) sum aa^T (x) (1/n) sum ss^T``. kronfluence divides both factors by the
number of positions, i.e. its K-FAC is ``T`` times smaller on such layers; its EK-FAC
eigenvalues, and hence its EK-FAC, agree with the ones here.

Eigendecompose ``A = Q_A diag(e_A) Q_A^T`` and ``S = Q_S diag(e_S) Q_S^T``. K-FAC's
eigenvalues are ``Lambda[j, k] = e_S[j] e_A[k]``; EK-FAC (George et al. 2018) replaces them by
the second moments of the projected per-example pseudo-gradients,
``Lambda[j, k] = (1/n) sum_i sum_r (Q_S^T Grad_ir Q_A)[j, k]^2``, fitted in a second pass over
the data. Either way the block is ``(Q_S (x) Q_A) diag(vec Lambda) (Q_S (x) Q_A)^T``, applied
by matrix products in the eigenbasis.

Every other coordinate of ``theta`` (LayerNorm, embeddings, ``groups > 1`` convolutions,
parameters tied to another name, a bias whose weight is not in ``free``, layers whose
recorded activations fail the check below) gets the *exact diagonal* of the GGN,
``(1/n) sum_i sum_r (J_i^T L_i[:, r])_j^2``, from per-example pseudo-gradients
(``torch.func.vmap``). The approximation is block-diagonal: one block per layer, one
``1 x 1`` block per fallback coordinate.

A layer is trusted only if its hooks see the whole of its weight's gradient: on the first
batch, the pseudo-gradient of one example (a random combination of its factor columns)
rebuilt from the recorded activations and output gradients must equal the weight's gradient
from autograd. This catches layers whose ``forward`` is bypassed (``nn.MultiheadAttention``'s
``out_proj``), weights also used outside the layer, and a batch dimension that is not the
first one; such layers fall back to the diagonal.

Not handled: padding masks in sequence inputs (padded positions count in ``A``; their
pseudo-gradients are zero when the loss ignores them, so ``S`` is unaffected).
"""

import math
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import hessian, vjp, vmap

from ._progress import progress

# Factor columns ``L[:, :, r]`` backpropagated together (one batched backward pass).
COLUMN_CHUNK = 32
# Most elements of a temporary projected per-example gradient, or of per-example fallback
# gradients, held at once.
ELEMENT_BUDGET = 2 ** 24


# --------------------------------------------------------------------------- loss factors

def _cross_entropy_factor(outputs, targets):
    """``L`` with ``L L^T = diag(p) - p p^T``, ``p = softmax(outputs)``: ``(n, C, C - 1)``.

    ``M = diag(sqrt p) - p sqrt(p)^T`` has ``M M^T = diag(p) - p p^T`` and ``M sqrt(p) =
    0``, so that Hessian has rank ``C - 1``: ``L = M Q``, with ``Q`` the ``C - 1`` columns
    of the Householder reflection taking ``sqrt(p)`` to ``-e_k`` (``k`` its largest
    entry) other than column ``k``, an orthonormal basis of the complement of
    ``sqrt(p)``. One column fewer to backpropagate than ``M`` itself.
    """
    del targets
    if outputs.ndim != 2:
        raise ValueError(
            "loss='cross_entropy' needs logits of shape (n_examples, n_classes); got "
            f"outputs of shape {tuple(outputs.shape)}."
        )
    probabilities = torch.softmax(outputs.detach(), dim=1)
    root = probabilities.sqrt()
    full = torch.diag_embed(root) - probabilities[:, :, None] * root[:, None, :]
    n, classes = probabilities.shape
    if classes < 2:
        return full
    rows = torch.arange(n, device=outputs.device)
    largest = root.argmax(dim=1)
    direction = root.clone()
    direction[rows, largest] += 1.0            # w = sqrt(p) + e_k; w^T w = 2 + 2 sqrt(p_k)
    # M H = M - 2 (M w) w^T / (w^T w), and M w = M e_k because M sqrt(p) = 0.
    reflected = full - (2 * full[rows, :, largest])[:, :, None] * direction[:, None, :] / (
        direction.square().sum(dim=1))[:, None, None]
    keep = torch.ones(n, classes, dtype=torch.bool, device=outputs.device)
    keep[rows, largest] = False
    return reflected.transpose(1, 2)[keep].reshape(n, classes - 1, classes).transpose(1, 2)


def _mse_factor(outputs, targets):
    """``L = sqrt(2/D) I``: the Hessian of the mean over ``D`` squared errors is ``(2/D) I``."""
    del targets
    batch, width = len(outputs), outputs[0].numel()
    eye = torch.eye(width, dtype=outputs.dtype, device=outputs.device)
    return (math.sqrt(2.0 / width) * eye).expand(batch, width, width)


def _unsqueeze(tree):
    """Add a leading batch dimension of one to a tensor, or to each tensor of a dict."""
    if isinstance(tree, dict):
        return {key: _unsqueeze(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_unsqueeze(value) for value in tree)
    return tree.unsqueeze(0) if isinstance(tree, torch.Tensor) else tree


def _first_row(tree):
    """Drop the leading batch dimension (of one) of a tensor, or of each tensor of a dict."""
    if isinstance(tree, dict):
        return {key: _first_row(value) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_first_row(value) for value in tree)
    return tree[0] if isinstance(tree, torch.Tensor) else tree


def _slice(tree, start, stop):
    """Rows ``start:stop`` of a tensor, or of each tensor of a dict."""
    if isinstance(tree, dict):
        return {key: _slice(value, start, stop) for key, value in tree.items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_slice(value, start, stop) for value in tree)
    return tree[start:stop] if isinstance(tree, torch.Tensor) else tree


def _hessian_factor(loss):
    """Factor of the per-example Hessian of a callable loss, by eigendecomposition."""

    def one_loss(output, target):
        return loss(output.unsqueeze(0), _unsqueeze(target)).sum()

    def factor(outputs, targets):
        outputs = outputs.detach()
        in_dims = (0, None if targets is None else 0)
        hessians = vmap(hessian(one_loss), in_dims=in_dims)(outputs, targets)
        batch, width = len(outputs), outputs[0].numel()
        hessians = hessians.reshape(batch, width, width)
        hessians = (hessians + hessians.mT) / 2
        eigenvalues, eigenvectors = torch.linalg.eigh(hessians)
        # A non-convex loss has an indefinite Hessian: its negative part is dropped, so the
        # result is the Gauss-Newton matrix of the loss's convex part.
        return eigenvectors * eigenvalues.clamp(min=0).sqrt()[:, None, :]

    return factor


def loss_factor_for(loss):
    """Return ``loss_factor(outputs, targets) -> L`` with ``L_i L_i^T`` the loss's Hessian.

    Parameters
    ----------
    loss : {"cross_entropy", "mse"} or callable
        ``"cross_entropy"``: logits ``(n, C)`` and integer labels; ``L = diag(sqrt p) -
        p sqrt(p)^T`` (exact, ``C`` columns). ``"mse"``: the squared error averaged over the
        ``D`` output values; ``L = sqrt(2/D) I``. A callable ``loss(outputs, targets) -> (n,)``
        of per-example losses: its Hessian in each example's outputs (``torch.func``) is
        eigendecomposed and negative eigenvalues are clipped to zero.

    Returns
    -------
    loss_factor : callable
        ``loss_factor(outputs, targets)`` returns ``L`` of shape ``(n, C, R)``, where ``C``
        is the number of output values per example; ``L`` carries no gradient.

    Examples
    --------
    >>> import torch
    >>> logits = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    >>> L = loss_factor_for("cross_entropy")(logits, torch.tensor([1]))
    >>> p = torch.softmax(logits, 1)[0]
    >>> torch.allclose(L[0] @ L[0].T, torch.diag(p) - torch.outer(p, p))
    True
    """
    if isinstance(loss, str):
        factors = {"cross_entropy": _cross_entropy_factor, "mse": _mse_factor}
        if loss not in factors:
            raise ValueError(
                f"loss={loss!r} has no Gauss-Newton factor; use 'cross_entropy', 'mse' or a "
                "callable (outputs, targets) -> per-example losses."
            )
        return factors[loss]
    if not callable(loss):
        raise TypeError(f"loss must be a string or a callable; got {type(loss).__name__}.")
    return _hessian_factor(loss)


# --------------------------------------------------------------------------- layers

class _Layer:
    """One Kronecker block: a layer, where its matrix lives in ``theta``, its running sums."""

    def __init__(self, name, module, weight_name, bias_name, index):
        self.name = name
        self.module = module
        self.kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
        self.weight_name = weight_name
        self.bias_name = bias_name
        # (out, in') positions in theta of the layer matrix [weight | bias].
        self.index = index
        self.calls = []

    @property
    def param_names(self):
        return [self.weight_name] + ([self.bias_name] if self.bias_name else [])

    def rows(self, batch):
        """Recorded inputs as ``(batch, positions, in')`` over all calls, float64."""
        parts = []
        for layer_input, _ in self.calls:
            if self.kind == "conv2d":
                patches = _patches(self.module, layer_input)
            else:
                patches = layer_input.reshape(batch, -1, layer_input.shape[-1])
            parts.append(patches.to(torch.float64))
        rows = torch.cat(parts, dim=1)
        if self.bias_name:
            rows = torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)
        return rows

    def pseudo_gradients(self, grads, columns, batch):
        """Output gradients of all calls as ``(columns, batch, positions, out)``, float64."""
        parts = []
        for (_, layer_output), grad in zip(self.calls, grads):
            if grad is None:
                grad = torch.zeros((columns,) + layer_output.shape, dtype=layer_output.dtype,
                                   device=layer_output.device)
            if self.kind == "conv2d":
                grad = grad.reshape(columns, batch, grad.shape[2], -1).transpose(2, 3)
            else:
                grad = grad.reshape(columns, batch, -1, grad.shape[-1])
            parts.append(grad.to(torch.float64))
        return torch.cat(parts, dim=2)


def _conv_padding(module):
    """``F.pad`` amounts ``(left_w, right_w, top_h, bottom_h)`` of a ``Conv2d``."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for size, dilation in zip(module.kernel_size, module.dilation):
            total = dilation * (size - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    height, width = module.padding
    return (width, width, height, height)


def _patches(module, inputs):
    """Unfolded input patches of a ``Conv2d``: ``(batch, positions, in * kh * kw)``."""
    pads = _conv_padding(module)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, pads, mode=mode)
    columns = F.unfold(inputs, module.kernel_size, dilation=module.dilation,
                       stride=module.stride)
    return columns.transpose(1, 2)


def _offsets(state, free):
    """Positions in ``theta`` of each free parameter, shaped like the parameter."""
    offsets, start = {}, 0
    for name in free:
        if name not in state:
            raise KeyError(f"free parameter {name!r} is not in state; state holds "
                           f"{sorted(state)[:8]}...")
        size = state[name].numel()
        offsets[name] = torch.arange(start, start + size).reshape(state[name].shape)
        start += size
    return offsets, start


def _candidate_layers(module, free, offsets):
    """Supported layers whose weight is free and belongs to this layer alone."""
    names_of = {}
    for name, parameter in module.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(parameter), []).append(name)
    tied = {name for names in names_of.values() if len(names) > 1 for name in names}
    free_set = set(free)
    layers = []
    for module_name, layer in module.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            continue
        prefix = f"{module_name}." if module_name else ""
        weight_name = prefix + "weight"
        bias_name = prefix + "bias" if layer.bias is not None else None
        if weight_name not in free_set or weight_name in tied or bias_name in tied:
            continue
        if bias_name not in free_set:
            bias_name = None        # the bias, if any, is fixed: a weight-only block
        weight_index = offsets[weight_name].reshape(len(offsets[weight_name]), -1)
        if bias_name:
            index = torch.cat([weight_index, offsets[bias_name].reshape(-1, 1)], dim=1)
        else:
            index = weight_index
        layers.append(_Layer(module_name, layer, weight_name, bias_name, index))
    return layers


def _check_factor(factor, outputs):
    batch, width = outputs.shape[0], outputs[0].numel()
    if factor.ndim != 3 or factor.shape[0] != batch or factor.shape[1] != width:
        raise ValueError(
            f"loss_factor returned shape {tuple(factor.shape)}; expected (batch, C, R) with "
            f"batch={batch} and C={width}, the number of output values per example."
        )
    return factor.detach().to(outputs.dtype)


# --------------------------------------------------------------------------- the operator

class KroneckerCurvature:
    """Fitted K-FAC / EK-FAC factors of one model's Gauss-Newton matrix.

    Build it with :meth:`fit`. The approximation ``G_approx`` is block-diagonal over the
    layers in ``layers_`` (one Kronecker-factored block each) and the coordinates of the
    parameters in ``fallback_`` (their exact Gauss-Newton diagonal); see the module
    docstring for the definitions.

    Attributes
    ----------
    layers_ : list of (str, str)
        ``(module name, kind)`` of every layer with a Kronecker block, ``kind`` being
        ``"linear"`` or ``"conv2d"``.
    fallback_ : list of str
        Free parameters approximated by the exact diagonal of the Gauss-Newton matrix.
    factors_ : dict of str to dict
        Per layer name, float64 tensors: ``"activation_covariance"`` ``A`` ``(in', in')``,
        ``"gradient_covariance"`` ``S`` ``(out, out)``, their eigenvectors
        ``"activation_eigenvectors"`` / ``"gradient_eigenvectors"`` (columns) and
        ``"eigenvalues"`` ``Lambda`` ``(out, in')`` (corrected for EK-FAC, ``e_S e_A^T`` for
        K-FAC).
    fallback_diagonal_ : torch.Tensor
        The Gauss-Newton diagonal on the fallback coordinates (float64), in ``theta`` order.
    eigen_correction_ : bool
        Whether the eigenvalues are EK-FAC's (True) or K-FAC's (False).
    n_params_ : int
        Length of ``theta``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from torch.func import functional_call
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4),
    ...                       nn.Linear(4, 2)).double()
    >>> state = dict(model.named_parameters())
    >>> free = list(state)
    >>> X = torch.randn(10, 3, dtype=torch.float64)
    >>> y = torch.randint(0, 2, (10,))
    >>> curvature = KroneckerCurvature.fit(
    ...     model, state, free, lambda: iter([(X, y)]),
    ...     lambda state, inputs: functional_call(model, state, (inputs,)),
    ...     loss_factor_for("cross_entropy"), n_examples=10)
    >>> curvature.layers_
    [('0', 'linear'), ('3', 'linear')]
    >>> curvature.fallback_
    ['2.weight', '2.bias']
    >>> rhs = torch.randn(2, curvature.n_params_, dtype=torch.float64)
    >>> shift = torch.full((curvature.n_params_,), 0.1, dtype=torch.float64)
    >>> x = curvature.solve(rhs, shift)
    >>> torch.allclose(curvature.matvec(x) + shift * x, rhs)
    True
    """

    @classmethod
    def fit(cls, module, state, free, batches, forward, loss_factor, *, eigen_correction=True,
            n_examples, verbose=0):
        """Fit the factors in one pass over the data (two for EK-FAC).

        Parameters
        ----------
        module : torch.nn.Module
            A private copy of the model. Forward hooks are added to its layers for the
            duration of the fit and removed afterwards; nothing else is changed.
        state : dict of str to torch.Tensor
            Every parameter and buffer of ``module`` in the compute dtype and on the device,
            as used with :func:`torch.func.functional_call`.
        free : list of str
            Names of the parameters forming the flat vector ``theta``, in its order.
        batches : callable
            ``batches()`` returns a fresh iterator over ``(inputs, targets)``; ``inputs`` is
            a tensor or a dict of tensors whose first dimension is the batch.
        forward : callable
            ``forward(state, inputs) -> outputs`` ``(batch, ...)``; it calls
            ``functional_call(module, state, ...)`` itself.
        loss_factor : callable
            ``loss_factor(outputs, targets) -> L`` ``(batch, C, R)`` with
            ``L_i L_i^T`` the Hessian of example ``i``'s loss in its ``C`` output values
            (:func:`loss_factor_for`).
        eigen_correction : bool, default=True
            EK-FAC (corrected eigenvalues, a second pass) when True, K-FAC when False.
        n_examples : int
            ``n`` of the ``1/n`` in the mean loss.
        verbose : int, default=0
            Show progress bars when positive.

        Returns
        -------
        curvature : KroneckerCurvature
            The fitted factors.
        """
        try:
            valid = not isinstance(n_examples, bool) and operator.index(n_examples) >= 1
        except TypeError:
            valid = False
        if not valid:
            raise ValueError(f"n_examples must be a positive integer; got {n_examples!r}.")
        n_examples = operator.index(n_examples)
        self = cls()
        self.eigen_correction_ = bool(eigen_correction)
        free = list(free)
        offsets, self.n_params_ = _offsets(state, free)
        reference = state[free[0]] if free else next(iter(state.values()))
        self.device_ = reference.device
        layers = _candidate_layers(module, free, offsets)
        recording = [False]

        def make_hook(layer):
            def hook(_, args, kwargs, output):
                if recording[0]:
                    first = args[0] if args else next(iter(kwargs.values()))
                    layer.calls.append((first.detach(), output))
            return hook

        handles = [layer.module.register_forward_hook(make_hook(layer), with_kwargs=True)
                   for layer in layers]
        try:
            with torch.enable_grad():
                self._fit(layers, state, free, offsets, batches, forward, loss_factor,
                          n_examples, recording, verbose)
        finally:
            for handle in handles:
                handle.remove()
            for layer in layers:
                layer.calls = []
        return self

    # ------------------------------------------------------------------ fitting passes

    def _fit(self, layers, state, free, offsets, batches, forward, loss_factor, n_examples,
             recording, verbose):
        tracked = dict(state)
        for layer in layers:
            for name in layer.param_names:
                tracked[name] = state[name].detach().requires_grad_(True)
        self._batched_backward = True
        sums = None
        for inputs, targets in progress(batches(), verbose, desc="K-FAC factors"):
            outputs, factor = self._forward(tracked, forward, loss_factor, inputs, targets,
                                            recording)
            if sums is None:
                layers = self._verify(layers, tracked, outputs, factor)
                self._set_blocks(layers, state, free, offsets)
                sums = {layer.name: {"rows": 0.0, "count": 0, "pseudo": 0.0}
                        for layer in layers}
            batch = outputs.shape[0]
            for layer in layers:
                rows = layer.rows(batch) if layer.calls else None
                if rows is not None:
                    rows = rows.reshape(-1, rows.shape[-1])
                    sums[layer.name]["rows"] = sums[layer.name]["rows"] + rows.T @ rows
                    sums[layer.name]["count"] += rows.shape[0]
            for pseudo in self._pseudo_gradients(layers, outputs, factor):
                for name, values in pseudo.items():
                    values = values.reshape(-1, values.shape[-1])
                    sums[name]["pseudo"] = sums[name]["pseudo"] + values.T @ values
            _clear(layers)
            if self._fallback_names:
                self._accumulate_diagonal(state, forward, inputs, factor)
        if sums is None:
            raise ValueError("batches() yielded no batch; the factors need data.")
        self._finish_factors(layers, sums, n_examples)
        if self.eigen_correction_ and layers:
            self._correct_eigenvalues(layers, tracked, batches, forward, loss_factor,
                                      n_examples, recording, verbose)
        self._layers = [(layer.index.to(self.device_), layer.name) for layer in layers]

    def _forward(self, tracked, forward, loss_factor, inputs, targets, recording):
        """Outputs of one batch (layer calls recorded) and their loss factor."""
        recording[0] = True
        try:
            outputs = forward(tracked, inputs)
        finally:
            recording[0] = False
        factor = _check_factor(loss_factor(outputs.detach(), targets), outputs)
        return outputs, factor

    def _verify(self, layers, tracked, outputs, factor):
        """Keep the layers whose hooks rebuild one example's pseudo-gradient exactly.

        The example is the one with the largest loss factor in the first batch; its
        pseudo-gradient along a random combination of its factor columns is rebuilt as
        ``sum_t s_t a_t^T`` from the recorded calls and compared with autograd's gradient
        of the layer's weight (and bias).
        """
        called = [layer for layer in layers if layer.calls]
        if not called:
            return []
        example = int(factor.reshape(len(factor), -1).norm(dim=1).argmax())
        generator = torch.Generator().manual_seed(0)
        weights = torch.randn(factor.shape[2], generator=generator, dtype=torch.float64)
        direction = torch.zeros(factor.shape[:2], dtype=factor.dtype, device=factor.device)
        direction[example] = factor[example] @ weights.to(factor.device, factor.dtype)
        params = [tracked[name] for layer in called for name in layer.param_names]
        call_outputs = [out for layer in called for _, out in layer.calls]
        grads = torch.autograd.grad(outputs, params + call_outputs,
                                    direction.reshape(outputs.shape),
                                    retain_graph=True, allow_unused=True)
        param_grads, output_grads = grads[:len(params)], grads[len(params):]
        tolerance = 1e-6 if outputs.dtype == torch.float64 else 1e-2
        kept, batch = [], outputs.shape[0]
        for layer in called:
            count, calls = len(layer.param_names), len(layer.calls)
            own, param_grads = param_grads[:count], param_grads[count:]
            out_grads, output_grads = output_grads[:calls], output_grads[calls:]
            try:
                rows = layer.rows(batch)[example:example + 1]
                pseudo = layer.pseudo_gradients(
                    [None if g is None else g[None] for g in out_grads], 1, batch)[0]
                pseudo = pseudo[example:example + 1]
                rebuilt = torch.einsum("bto,bti->oi", pseudo, rows)
                scale = torch.einsum("bto,bti->oi", pseudo.abs(), rows.abs()).norm()
            except (RuntimeError, ValueError, IndexError):
                continue
            actual = []
            for name, grad in zip(layer.param_names, own):
                grad = torch.zeros_like(tracked[name]) if grad is None else grad
                actual.append(grad.reshape(len(grad), -1))
            actual = torch.cat(actual, dim=1).to(torch.float64)
            if (actual.shape == rebuilt.shape
                    and float((rebuilt - actual).norm()) <= tolerance * float(scale)):
                kept.append(layer)
        return kept

    def _set_blocks(self, layers, state, free, offsets):
        covered = {name for layer in layers for name in layer.param_names}
        self._fallback_names = [name for name in free if name not in covered]
        self.fallback_ = list(self._fallback_names)
        self.layers_ = [(layer.name, layer.kind) for layer in layers]
        self._fallback_index = torch.cat(
            [offsets[name].reshape(-1) for name in self._fallback_names]
            + [torch.empty(0, dtype=torch.long)]).to(self.device_)
        self._diagonal_sums = {
            name: torch.zeros(state[name].shape, dtype=torch.float64, device=self.device_)
            for name in self._fallback_names}

    def _pseudo_gradients(self, layers, outputs, factor):
        """Yield, per chunk of factor columns, ``{layer: (k, batch, positions, out)}``."""
        layers = [layer for layer in layers if layer.calls]
        call_outputs = [out for layer in layers for _, out in layer.calls]
        if not call_outputs:
            return
        batch = outputs.shape[0]
        for start in range(0, factor.shape[2], COLUMN_CHUNK):
            chunk = factor[:, :, start:start + COLUMN_CHUNK]
            grads = self._output_grads(outputs, call_outputs, chunk)
            pseudo = {}
            for layer in layers:
                own, grads = grads[:len(layer.calls)], grads[len(layer.calls):]
                pseudo[layer.name] = layer.pseudo_gradients(own, chunk.shape[2], batch)
            yield pseudo

    def _output_grads(self, outputs, call_outputs, chunk):
        """Gradients at the layer outputs for each factor column: tuple of ``(k, ...)``."""
        columns = chunk.shape[2]
        grad_outputs = chunk.permute(2, 0, 1).reshape((columns,) + outputs.shape)
        if self._batched_backward:
            try:
                return torch.autograd.grad(outputs, call_outputs, grad_outputs,
                                           retain_graph=True, allow_unused=True,
                                           is_grads_batched=True)
            except (RuntimeError, NotImplementedError):
                self._batched_backward = False      # an op without a batching rule
        per_column = [torch.autograd.grad(outputs, call_outputs, grad_outputs[column],
                                          retain_graph=True, allow_unused=True)
                      for column in range(columns)]
        return tuple(None if parts[0] is None else torch.stack(parts)
                     for parts in zip(*per_column))

    def _accumulate_diagonal(self, state, forward, inputs, factor):
        """Add ``sum_i sum_r`` squared per-example pseudo-gradients of fallback params."""
        state = {name: value.detach() for name, value in state.items()}
        params = {name: state[name] for name in self._fallback_names}
        size = sum(param.numel() for param in params.values())
        batch = factor.shape[0]
        step = max(1, ELEMENT_BUDGET // max(1, size * factor.shape[2]))

        def squared(params, one_input, one_factor):
            def outputs_of(params):
                local = dict(state)
                local.update(params)
                return forward(local, _unsqueeze(one_input)).reshape(-1)

            _, pull = vjp(outputs_of, params)
            (grads,) = vmap(pull)(one_factor.T)
            return {name: grad.square().sum(0) for name, grad in grads.items()}

        for start in range(0, batch, step):
            stop = min(batch, start + step)
            if not getattr(self, "_loop_examples", False):
                try:
                    result = vmap(squared, in_dims=(None, 0, 0))(
                        params, _slice(inputs, start, stop), factor[start:stop])
                except RuntimeError as exc:
                    # A forward that branches on its inputs' values (transformers' mask
                    # checks) cannot be vmapped over examples: one example at a time.
                    if "vmap" not in str(exc) or "data-dependent" not in str(exc):
                        raise
                    self._loop_examples = True
                else:
                    for name, value in result.items():
                        self._diagonal_sums[name] += value.to(torch.float64).sum(0)
                    continue
            for row in range(start, stop):
                one_input = _first_row(_slice(inputs, row, row + 1))
                result = squared(params, one_input, factor[row])
                for name, value in result.items():
                    self._diagonal_sums[name] += value.to(torch.float64)

    def _finish_factors(self, layers, sums, n_examples):
        """Normalise the sums, eigendecompose, and set K-FAC's eigenvalues."""
        self.factors_ = {}
        for layer in layers:
            out, width = layer.index.shape
            layer_sums = sums[layer.name]
            activation = _as_matrix(layer_sums["rows"], width, self.device_)
            activation = activation / max(1, layer_sums["count"])
            gradient = _as_matrix(layer_sums["pseudo"], out, self.device_) / n_examples
            activation = (activation + activation.T) / 2
            gradient = (gradient + gradient.T) / 2
            activation_values, activation_vectors = torch.linalg.eigh(activation)
            gradient_values, gradient_vectors = torch.linalg.eigh(gradient)
            self.factors_[layer.name] = {
                "activation_covariance": activation,
                "gradient_covariance": gradient,
                "activation_eigenvectors": activation_vectors,
                "gradient_eigenvectors": gradient_vectors,
                "eigenvalues": torch.outer(gradient_values.clamp(min=0),
                                           activation_values.clamp(min=0)),
            }
        self.fallback_diagonal_ = torch.cat(
            [self._diagonal_sums[name].reshape(-1) for name in self._fallback_names]
            + [torch.empty(0, dtype=torch.float64, device=self.device_)]) / n_examples
        del self._diagonal_sums

    def _correct_eigenvalues(self, layers, tracked, batches, forward, loss_factor,
                             n_examples, recording, verbose):
        """EK-FAC: second moments of per-example pseudo-gradients in the eigenbasis."""
        sums = {layer.name: 0.0 for layer in layers}
        for inputs, targets in progress(batches(), verbose, desc="EK-FAC eigenvalues"):
            outputs, factor = self._forward(tracked, forward, loss_factor, inputs, targets,
                                            recording)
            batch = outputs.shape[0]
            rows = {layer.name: layer.rows(batch)
                    @ self.factors_[layer.name]["activation_eigenvectors"]
                    for layer in layers if layer.calls}
            for pseudo in self._pseudo_gradients(layers, outputs, factor):
                for name, values in pseudo.items():
                    values = values @ self.factors_[name]["gradient_eigenvectors"]
                    sums[name] = sums[name] + _projected_second_moment(values, rows[name])
            _clear(layers)
        for layer in layers:
            moment = _as_matrix(sums[layer.name], layer.index.shape, self.device_)
            self.factors_[layer.name]["eigenvalues"] = moment / n_examples

    # ------------------------------------------------------------------ the operator

    def _apply(self, vectors, layer_scale, fallback_scale):
        """``vectors`` (k, p) through each block's eigenbasis, scaled, and back."""
        squeeze = vectors.ndim == 1
        values = (vectors[None] if squeeze else vectors)
        if values.ndim != 2 or values.shape[1] != self.n_params_:
            raise ValueError(
                f"expected vectors of shape (k, {self.n_params_}); got {tuple(vectors.shape)}.")
        dtype, device = vectors.dtype, vectors.device
        values = values.to(self.device_, torch.float64)
        result = torch.empty_like(values)
        for index, name in self._layers:
            factors = self.factors_[name]
            left = factors["gradient_eigenvectors"]
            right = factors["activation_eigenvectors"]
            block = left.T @ values[:, index] @ right
            block = block * layer_scale(name, index, factors["eigenvalues"])
            result[:, index] = left @ block @ right.T
        if len(self._fallback_index):
            result[:, self._fallback_index] = (values[:, self._fallback_index]
                                               * fallback_scale(self._fallback_index))
        result = result.to(device, dtype)
        return result[0] if squeeze else result

    def matvec(self, vectors):
        """``G_approx @ v`` for each row ``v`` of ``vectors``.

        Parameters
        ----------
        vectors : torch.Tensor
            ``(k, p)`` (or ``(p,)``).

        Returns
        -------
        torch.Tensor
            Same shape, dtype and device as ``vectors``.
        """
        return self._apply(vectors, lambda name, index, eigenvalues: eigenvalues,
                           lambda index: self.fallback_diagonal_)

    def solve(self, rhs, shift):
        """``(G_approx + diag(shift))^-1 rhs`` for each row of ``rhs``, in the eigenbases.

        Parameters
        ----------
        rhs : torch.Tensor
            ``(k, p)`` (or ``(p,)``) right-hand sides.
        shift : torch.Tensor or float
            ``(p,)`` per-coordinate damping. It must be constant over each layer's block
            (exactly, up to ``1e-12`` relative); it may vary between fallback coordinates.

        Returns
        -------
        torch.Tensor
            The solutions, same shape, dtype and device as ``rhs``.

        Raises
        ------
        ValueError
            When ``shift`` varies within a layer's block, has the wrong length, or makes a
            block singular (a zero eigenvalue plus a zero shift).
        """
        shift = torch.as_tensor(shift, dtype=torch.float64).to(self.device_)
        if shift.ndim == 0:
            shift = shift.expand(self.n_params_)
        if shift.shape != (self.n_params_,):
            raise ValueError(f"shift must have shape ({self.n_params_},); got "
                             f"{tuple(shift.shape)}.")

        def layer_scale(name, index, eigenvalues):
            block_shift = shift[index]
            value = block_shift.reshape(-1)[0]
            if (block_shift - value).abs().max() > 1e-12 * value.abs():
                raise ValueError(
                    f"shift must be constant within the Kronecker block of layer {name!r} "
                    f"(its weight and bias); it ranges from {float(block_shift.min())} to "
                    f"{float(block_shift.max())} there.")
            return _reciprocal(eigenvalues + value, name)

        def fallback_scale(index):
            return _reciprocal(self.fallback_diagonal_ + shift[index], "the fallback diagonal")

        return self._apply(rhs, layer_scale, fallback_scale)

    def dense(self):
        """The approximation as a dense matrix (tests and small models only).

        Returns
        -------
        torch.Tensor
            ``G_approx``, float64, ``(p, p)``, on the factors' device.
        """
        eye = torch.eye(self.n_params_, dtype=torch.float64, device=self.device_)
        matrix = self.matvec(eye)
        return (matrix + matrix.T) / 2

    def __repr__(self):
        kind = "EK-FAC" if getattr(self, "eigen_correction_", True) else "K-FAC"
        layers = len(getattr(self, "layers_", []))
        fallback = len(getattr(self, "fallback_", []))
        return (f"KroneckerCurvature({kind}, {layers} layer blocks, {fallback} parameters on "
                "the diagonal)")


def _clear(layers):
    for layer in layers:
        layer.calls = []


def _as_matrix(value, shape, device):
    """``value`` if a running sum was started, else zeros of ``shape`` (float64)."""
    if isinstance(value, torch.Tensor):
        return value
    shape = (shape, shape) if isinstance(shape, int) else tuple(shape)
    return torch.zeros(shape, dtype=torch.float64, device=device)


def _reciprocal(values, where):
    if bool((values == 0).any()):
        raise ValueError(f"the damped curvature is singular in {where}: a zero eigenvalue "
                         "with zero shift; pass a positive shift (damping).")
    return 1.0 / values


def _projected_second_moment(pseudo, rows):
    """``sum_r sum_i (sum_t s'_irt a'_it^T)^2``, elementwise: ``(out, in')``.

    ``pseudo`` ``(k, batch, T, out)`` and ``rows`` ``(batch, T, in')`` are already in the
    eigenbases. With one position the square factorises and no per-example matrix is formed.
    """
    if pseudo.shape[2] == 1:
        return torch.einsum("kbj,bi->ji", pseudo[:, :, 0].square(), rows[:, 0].square())
    columns, batch, _, out = pseudo.shape
    width = rows.shape[-1]
    step = max(1, ELEMENT_BUDGET // max(1, columns * out * width))
    total = 0.0
    for start in range(0, batch, step):
        per_example = torch.einsum("kbtj,bti->kbji", pseudo[:, start:start + step],
                                   rows[start:start + step])
        total = total + per_example.square().sum(dim=(0, 1))
    return total

"""K-FAC / EK-FAC Gauss-Newton factors against independent dense constructions.

The references here never use ``skmsif._kfac``'s loss factors or hooks: the per-example
Hessian of the loss in the outputs comes from ``torch.autograd.functional.hessian``, the
layer inputs from running the front of an ``nn.Sequential``, the output Jacobians of a layer
from ``torch.func.jacrev`` of the back of it, convolution patches from explicit loops, and
the definitions are those of ``skmsif/_kfac.py``'s module docstring:

* ``A = sum_i sum_t a_it a_it^T / sum_i T_i``, ``S = (1/n) sum_i sum_t J_it^T H_i J_it``;
* EK-FAC ``Lambda[j, k] = (1/n) sum_i m_ijk^T H_i m_ijk``, ``m_ijk`` the output-space vector
  with ``m_ijk . v = (Q_S^T Grad_i(v) Q_A)[j, k]`` and ``Grad_i(v) = sum_t (J_it^T v) a_it^T``
  (which equals ``sum_r (Q_S^T Grad_ir Q_A)[j, k]^2`` for any factor ``H_i = L_i L_i^T``).
"""

import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from _models import assert_unchanged, snapshot
from torch import nn
from torch.autograd.functional import hessian as autograd_hessian
from torch.func import functional_call, grad, jacrev, vmap

from skmsif._kfac import KroneckerCurvature, _patches, loss_factor_for
from skmsif._losses import cross_entropy, mse

DTYPE = torch.float64


# --------------------------------------------------------------------------- problems

def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _mlp(seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4, bias=bias), nn.Tanh(), nn.Linear(4, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


def _sequence_model(seed=0):
    """A Linear applied to (batch, positions=2, 3) inputs, as in an attention block."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()


def _data(kind, n, loss, seed=1):
    gen = _generator(seed)
    shape = {"mlp": (n, 3), "cnn": (n, 2, 4, 4), "sequence": (n, 2, 3)}[kind]
    X = torch.randn(*shape, generator=gen, dtype=DTYPE)
    if loss == "cross_entropy":
        y = torch.randint(0, 3, (n,), generator=gen)
    else:
        y = torch.randn(n, 3, generator=gen, dtype=DTYPE)
    return X, y


def _model(kind, seed=0):
    return {"mlp": _mlp, "cnn": _cnn, "sequence": _sequence_model}[kind](seed)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def _fit(model, X, y, loss, eigen_correction, batch_size=None, free=None):
    state = {name: value.detach() for name, value in
             [*model.named_parameters(), *model.named_buffers()]}
    free = [name for name, _ in model.named_parameters()] if free is None else free
    batch_size = batch_size or len(X)

    def batches():
        for start in range(0, len(X), batch_size):
            yield X[start:start + batch_size], y[start:start + batch_size]

    def forward(state, inputs):
        return functional_call(model, state, (inputs,))

    factor = loss if callable(loss) and not isinstance(loss, str) else loss_factor_for(loss)
    return KroneckerCurvature.fit(model, state, free, batches, forward, factor,
                                  eigen_correction=eigen_correction, n_examples=len(X))


# --------------------------------------------------------------------------- references

def _hessians(model, X, y, loss):
    """Per-example Hessians of the loss in the outputs, ``(n, C, C)``, by autograd."""
    with torch.no_grad():
        outputs = model(X)
    function = LOSSES[loss]
    result = []
    for i in range(len(X)):
        h = autograd_hessian(lambda o: function(o[None], y[i:i + 1]).sum(), outputs[i])
        result.append(h.reshape(outputs[i].numel(), -1))
    return torch.stack(result)


def _rows(layer, layer_input):
    """Layer input rows ``(T, in')`` of one example; conv patches by explicit loops."""
    if isinstance(layer, nn.Conv2d):
        (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
        padded = F.pad(layer_input, (pw, pw, ph, ph))
        out_h = (padded.shape[1] - kh) // sh + 1
        out_w = (padded.shape[2] - kw) // sw + 1
        rows = [padded[:, h * sh:h * sh + kh, w * sw:w * sw + kw].reshape(-1)
                for h in range(out_h) for w in range(out_w)]
        rows = torch.stack(rows)
    else:
        rows = layer_input.reshape(-1, layer.in_features)
    if layer.bias is not None:
        rows = torch.cat([rows, torch.ones(len(rows), 1, dtype=DTYPE)], dim=1)
    return rows


def _jacobian_positions(layer, jacobian):
    """Output Jacobian ``(C, *layer_output)`` of one example as ``(C, T, out)``."""
    C = jacobian.shape[0]
    if isinstance(layer, nn.Conv2d):
        return jacobian.reshape(C, layer.out_channels, -1).transpose(1, 2)
    return jacobian.reshape(C, -1, layer.out_features)


def _reference_blocks(model, X, hessians, tracked):
    """``{index: (kfac_block, ekfac_block)}`` in the row-major order of [weight | bias]."""
    n = len(X)
    blocks = {}
    for index in tracked:
        layer, front, back = model[index], model[:index], model[index + 1:]
        A, S, count, maps = 0.0, 0.0, 0, []
        for i in range(n):
            with torch.no_grad():
                layer_input = front(X[i:i + 1])
                layer_output = layer(layer_input)
            rows = _rows(layer, layer_input[0])
            jacobian = jacrev(lambda z: back(z).reshape(-1))(layer_output)[:, 0]
            jacobian = _jacobian_positions(layer, jacobian)
            A = A + rows.T @ rows
            count += len(rows)
            S = S + torch.einsum("ctj,cd,dtk->jk", jacobian, hessians[i], jacobian)
            maps.append(torch.einsum("ctj,ti->cji", jacobian, rows))
        A, S = (A / count).contiguous(), (S / n).contiguous()
        _, QA = torch.linalg.eigh(A)
        _, QS = torch.linalg.eigh(S)
        Lambda = 0.0
        for i in range(n):
            projected = QS.T @ maps[i] @ QA
            Lambda = Lambda + torch.einsum("cjk,cd,djk->jk", projected, hessians[i], projected)
        Lambda = Lambda / n
        basis = torch.kron(QS.contiguous(), QA.contiguous())
        blocks[index] = (torch.kron(S, A), basis @ torch.diag(Lambda.reshape(-1)) @ basis.T)
    return blocks


def _theta_positions(model):
    """Positions in theta (named_parameters order) of each layer's [weight | bias] matrix."""
    offsets, start = {}, 0
    for name, parameter in model.named_parameters():
        offsets[name] = torch.arange(start, start + parameter.numel()).reshape(parameter.shape)
        start += parameter.numel()
    positions = {}
    for name, layer in model.named_children():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            weight = offsets[f"{name}.weight"].reshape(layer.weight.shape[0], -1)
            columns = [weight]
            if layer.bias is not None:
                columns.append(offsets[f"{name}.bias"].reshape(-1, 1))
            positions[int(name)] = torch.cat(columns, dim=1).reshape(-1)
    return positions, start


def _reference_dense(model, X, y, loss, eigen_correction):
    positions, p = _theta_positions(model)
    blocks = _reference_blocks(model, X, _hessians(model, X, y, loss), list(positions))
    dense = torch.zeros(p, p, dtype=DTYPE)
    for index, where in positions.items():
        dense[where[:, None], where[None, :]] = blocks[index][1 if eigen_correction else 0]
    return dense


def _flat_function(model):
    """``outputs(flat, X)`` of the model at the flat parameters, and the current ``flat``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [parameter.shape for _, parameter in model.named_parameters()]

    def outputs(flat, X):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, params, (X,))

    flat = torch.cat([parameter.detach().reshape(-1) for parameter in model.parameters()])
    return outputs, flat


def _exact_ggn(model, X, y, loss):
    """``(1/n) sum_i J_i^T H_i J_i`` with ``J`` from jacrev over the flat parameters."""
    outputs, flat = _flat_function(model)
    jacobian = jacrev(lambda theta: outputs(theta, X).reshape(len(X), -1))(flat)
    hessians = _hessians(model, X, y, loss)
    return torch.einsum("ncp,ncd,ndq->pq", jacobian, hessians, jacobian) / len(X)


def _relative(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- tests

@pytest.mark.parametrize("kind", ["mlp", "cnn", "sequence"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("eigen_correction", [False, True])
def test_dense_matches_independent_construction(kind, loss, eigen_correction):
    model = _model(kind)
    X, y = _data(kind, 12, loss)
    curvature = _fit(model, X, y, loss, eigen_correction, batch_size=5)
    expected = _reference_dense(model, X, y, loss, eigen_correction)
    assert curvature.fallback_ == []
    assert _relative(curvature.dense(), expected) < 1e-10
    # It is an approximation: on these models it differs from the exact GGN.
    assert _relative(curvature.dense(), _exact_ggn(model, X, y, loss)) > 1e-3


def test_kinds_and_factor_shapes():
    curvature = _fit(_cnn(), *_data("cnn", 6, "mse"), "mse", True)
    assert curvature.layers_ == [("0", "conv2d"), ("3", "linear")]
    factors = curvature.factors_["0"]
    assert factors["activation_covariance"].shape == (2 * 3 * 3 + 1,) * 2
    assert factors["gradient_covariance"].shape == (3, 3)
    assert factors["eigenvalues"].shape == (3, 2 * 3 * 3 + 1)
    assert all(value.dtype == DTYPE for value in factors.values())


@pytest.mark.parametrize("eigen_correction", [False, True])
def test_exact_for_one_linear_layer_with_mse(eigen_correction):
    """One Linear layer and mse: ``G = (2/D) I (x) (1/n) sum a a^T`` exactly, any ``n``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    X, y = torch.randn(7, 3, dtype=DTYPE), torch.randn(7, 2, dtype=DTYPE)
    curvature = _fit(model, X, y, "mse", eigen_correction, batch_size=3)
    assert _relative(curvature.dense(), _exact_ggn(model, X, y, "mse")) < 1e-12


@pytest.mark.parametrize("eigen_correction", [False, True])
def test_exact_for_one_linear_layer_and_one_example(eigen_correction):
    """One example: ``G = sum_r (s_r (x) a)(s_r (x) a)^T = S (x) A`` exactly."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    X, y = torch.randn(1, 3, dtype=DTYPE), torch.tensor([2])
    curvature = _fit(model, X, y, "cross_entropy", eigen_correction)
    assert _relative(curvature.dense(), _exact_ggn(model, X, y, "cross_entropy")) < 1e-12


def test_batch_size_does_not_matter():
    model = _cnn()
    X, y = _data("cnn", 9, "cross_entropy")
    whole = _fit(model, X, y, "cross_entropy", True).dense()
    for batch_size in (1, 4):
        split = _fit(model, X, y, "cross_entropy", True, batch_size=batch_size).dense()
        assert _relative(split, whole) < 1e-12


@pytest.mark.parametrize("eigen_correction", [False, True])
def test_solve_inverts_matvec_plus_shift(eigen_correction):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    X, y = _data("mlp", 10, "cross_entropy")
    curvature = _fit(model, X, y, "cross_entropy", eigen_correction)
    assert curvature.fallback_ == ["2.weight", "2.bias"]
    p = curvature.n_params_
    # Constant per layer block (different between blocks), free on the fallback coordinates.
    shift = torch.full((p,), 0.3, dtype=DTYPE)
    shift[:16] = 0.05
    shift[16:24] = torch.linspace(0.01, 0.2, 8, dtype=DTYPE)    # the LayerNorm
    rhs = torch.randn(3, p, generator=_generator(2), dtype=DTYPE)
    solution = curvature.solve(rhs, shift)
    assert _relative(curvature.matvec(solution) + shift * solution, rhs) < 1e-10
    expected = torch.linalg.solve(curvature.dense() + torch.diag(shift), rhs.T).T
    assert _relative(solution, expected) < 1e-10
    assert curvature.solve(rhs[0], shift).shape == (p,)
    assert curvature.solve(rhs.float(), shift).dtype == torch.float32

    bad = shift.clone()
    bad[3] = 0.06                           # inside the first Linear's block
    with pytest.raises(ValueError, match="constant within the Kronecker block of layer '0'"):
        curvature.solve(rhs, bad)
    with pytest.raises(ValueError, match="shape"):
        curvature.solve(rhs, shift[:-1])


def test_fallback_is_exact_ggn_diagonal_and_blocks_are_separate():
    """LayerNorm parameters and a bias without its weight: exact GGN diagonal, no coupling."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    X, y = _data("mlp", 8, "cross_entropy")
    free = ["2.weight", "0.weight", "3.bias", "3.weight", "2.bias", "0.bias"]
    # Blocks need not be contiguous in theta: 0.weight and 0.bias are far apart.
    curvature = _fit(model, X, y, "cross_entropy", True, free=free)
    assert curvature.layers_ == [("0", "linear"), ("3", "linear")]
    assert curvature.fallback_ == ["2.weight", "2.bias"]

    names = [name for name, _ in model.named_parameters()]
    sizes = {name: parameter.numel() for name, parameter in model.named_parameters()}
    exact = _exact_ggn(model, X, y, "cross_entropy")
    starts = dict(zip(names, torch.cumsum(torch.tensor([0] + [sizes[k] for k in names]),
                                          0).tolist()))
    # Permute the exact GGN from named_parameters order into `free` order.
    order = torch.cat([torch.arange(starts[name], starts[name] + sizes[name])
                       for name in free])
    exact = exact[order][:, order]
    dense = curvature.dense()
    ln = torch.arange(0, 4).tolist() + torch.arange(4 + 12 + 3 + 12, 4 + 12 + 3 + 12 + 4).tolist()
    ln = torch.tensor(ln)
    assert torch.allclose(torch.diagonal(dense)[ln], torch.diagonal(exact)[ln], rtol=1e-10,
                          atol=0)
    off = dense[ln][:, ln] - torch.diag(torch.diagonal(dense)[ln])
    assert float(off.abs().max()) == 0.0
    others = torch.tensor([i for i in range(len(dense)) if i not in set(ln.tolist())])
    assert float(dense[ln][:, others].abs().max()) == 0.0
    # The first layer's block (weight then bias) in `free` order sits at 4..15 and 38..41.
    first = torch.cat([torch.arange(4, 16), torch.arange(35, 39)])
    second = torch.arange(16, 31)
    assert float(dense[first][:, second].abs().max()) == 0.0


def test_weight_without_its_bias_and_bias_without_its_weight():
    """``0.weight`` free with ``0.bias`` fixed: a weight-only block; ``2.bias`` alone: diag."""
    model = _mlp()
    X, y = _data("mlp", 10, "mse")
    curvature = _fit(model, X, y, "mse", True, free=["0.weight", "2.bias"])
    assert curvature.layers_ == [("0", "linear")]
    assert curvature.fallback_ == ["2.bias"]
    assert curvature.factors_["0"]["activation_covariance"].shape == (3, 3)
    hessians = _hessians(model, X, y, "mse")
    dense = curvature.dense()
    assert _relative(dense[:12, :12], _reference_blocks_no_bias(model, X, hessians)) < 1e-10
    assert float(dense[:12, 12:].abs().max()) == 0.0
    exact = _exact_ggn(model, X, y, "mse")
    bias_positions = torch.arange(12 + 4 + 12, 12 + 4 + 12 + 3)
    assert torch.allclose(torch.diagonal(dense)[12:], torch.diagonal(exact)[bias_positions],
                          rtol=1e-10, atol=0)


def _reference_blocks_no_bias(model, X, hessians):
    """EK-FAC block of ``model[0].weight`` alone (activations without the trailing 1)."""
    layer, back = model[0], model[1:]
    n = len(X)
    A, S, maps = 0.0, 0.0, []
    for i in range(n):
        rows = X[i:i + 1]
        with torch.no_grad():
            z = layer(rows)
        jacobian = jacrev(lambda z: back(z).reshape(-1))(z)[:, 0][:, None, :]
        A = A + rows.T @ rows
        S = S + torch.einsum("ctj,cd,dtk->jk", jacobian, hessians[i], jacobian)
        maps.append(torch.einsum("ctj,ti->cji", jacobian, rows))
    A, S = (A / n).contiguous(), (S / n).contiguous()
    _, QA = torch.linalg.eigh(A)
    _, QS = torch.linalg.eigh(S)
    Lambda = sum(torch.einsum("cjk,cd,djk->jk", QS.T @ m @ QA, hessians[i], QS.T @ m @ QA)
                 for i, m in enumerate(maps)) / n
    basis = torch.kron(QS.contiguous(), QA.contiguous())
    return basis @ torch.diag(Lambda.reshape(-1)) @ basis.T


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_callable_loss_factor_matches_named(loss):
    model = _mlp()
    X, y = _data("mlp", 10, loss)
    outputs = model(X).detach()
    named = loss_factor_for(loss)(outputs, y)
    generic = loss_factor_for(LOSSES[loss])(outputs, y)
    assert generic.shape == (10, 3, 3)
    # Cross-entropy's Hessian has rank C - 1, and its named factor as many columns.
    assert named.shape == ((10, 3, 2) if loss == "cross_entropy" else (10, 3, 3))
    assert torch.allclose(generic @ generic.mT, named @ named.mT, atol=1e-12)
    assert torch.allclose(named @ named.mT, _hessians(model, X, y, loss), atol=1e-12)
    for eigen_correction in (False, True):
        a = _fit(model, X, y, loss, eigen_correction).dense()
        b = _fit(model, X, y, loss_factor_for(LOSSES[loss]), eigen_correction).dense()
        assert _relative(b, a) < 1e-10


def test_callable_loss_clips_negative_curvature():
    """A concave loss has a negative-definite Hessian: its factor is zero."""
    factor = loss_factor_for(lambda outputs, targets: -(outputs ** 2).sum(1))
    L = factor(torch.randn(4, 3, dtype=DTYPE), None)
    assert L.shape == (4, 3, 3) and float(L.abs().max()) == 0.0


def test_loss_factor_errors():
    with pytest.raises(ValueError, match="no Gauss-Newton factor"):
        loss_factor_for("hinge")
    with pytest.raises(ValueError, match="n_classes"):
        loss_factor_for("cross_entropy")(torch.zeros(2, 3, 4), None)
    model = _mlp()
    X, y = _data("mlp", 4, "mse")
    with pytest.raises(ValueError, match=r"expected \(batch, C, R\)"):
        _fit(model, X, y, lambda outputs, targets: torch.zeros(4, 2, 1, dtype=DTYPE), True)
    for n_examples in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_examples"):
            KroneckerCurvature.fit(model, dict(model.state_dict()), [], lambda: iter([]),
                                   None, None, n_examples=n_examples)
    with pytest.raises(ValueError, match="no batch"):
        KroneckerCurvature.fit(model, dict(model.named_parameters()), ["0.weight"],
                               lambda: iter([]), None, None, n_examples=4)


def test_layer_called_twice_counts_as_positions():
    """One Linear applied to two halves equals it applied to a length-2 sequence."""

    class Twice(nn.Module):
        def __init__(self, seq):
            super().__init__()
            self.lin, self.head = copy.deepcopy(seq[0]), copy.deepcopy(seq[3])

        def forward(self, x):
            hidden = torch.cat([torch.tanh(self.lin(x[:, 0])), torch.tanh(self.lin(x[:, 1]))],
                               dim=1)
            return self.head(hidden)

    sequence = _sequence_model()
    twice = Twice(sequence)
    X, y = _data("sequence", 8, "cross_entropy")
    for eigen_correction in (False, True):
        a = _fit(sequence, X, y, "cross_entropy", eigen_correction).dense()
        b = _fit(twice, X, y, "cross_entropy", eigen_correction).dense()
        assert _relative(b, a) < 1e-12


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_unverifiable_layers_fall_back_to_the_diagonal():
    """Weights used outside their layer, tied weights, a batch dimension that is not first,
    and MultiheadAttention's out_proj (its forward is bypassed)."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            hidden = torch.tanh(self.lin(x)) @ self.lin.weight     # weight used again
            return self.head(hidden)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)
            self.b.weight = self.a.weight
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].flatten(1))

    class SequenceFirst(nn.Module):
        """Positions before the batch: rows cannot be told apart by example."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            hidden = torch.tanh(self.lin(x.transpose(0, 1))).transpose(0, 1)
            return self.head(hidden.flatten(1))

    torch.manual_seed(0)
    gen = _generator(3)
    y = torch.randint(0, 2, (6,), generator=gen)
    for model, X, layers in [
        (SequenceFirst(), torch.randn(6, 2, 3, generator=gen), [("head", "linear")]),
        (Reuse(), torch.randn(6, 3, generator=gen), [("head", "linear")]),
        (Tied(), torch.randn(6, 3, generator=gen), [("head", "linear")]),
        (Attention(), torch.randn(6, 2, 4, generator=gen), [("head", "linear")]),
    ]:
        model = model.double().eval()
        X = X.double()
        curvature = _fit(model, X, y, "cross_entropy", True)
        assert curvature.layers_ == layers, type(model).__name__
        names = [name for name, _ in model.named_parameters()]
        assert curvature.fallback_ == [name for name in names if not name.startswith("head")]
        # The fallback coordinates carry the exact Gauss-Newton diagonal.
        exact = torch.diagonal(_exact_ggn(model, X, y, "cross_entropy"))
        dense = torch.diagonal(curvature.dense())
        head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head"))
        assert torch.allclose(dense[:-head], exact[:-head], rtol=1e-10, atol=1e-14)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("options", [
    dict(padding=1), dict(padding=(0, 2)), dict(padding="same"), dict(padding="valid"),
    dict(padding=1, stride=2), dict(padding=2, dilation=2), dict(padding=1,
                                                                 padding_mode="reflect"),
    dict(padding="same", padding_mode="circular"), dict(padding=1, padding_mode="replicate"),
])
def test_conv_patches_reproduce_the_convolution(options):
    torch.manual_seed(0)
    kernel = (2, 3) if options.get("padding") == "same" else 3
    conv = nn.Conv2d(2, 3, kernel, **options).double()
    x = torch.randn(2, 2, 6, 7, dtype=DTYPE)
    patches = _patches(conv, x)
    rebuilt = patches @ conv.weight.reshape(3, -1).T + conv.bias
    expected = conv(x)
    assert torch.allclose(rebuilt.transpose(1, 2).reshape(expected.shape), expected,
                          atol=1e-12)


def test_module_left_as_found():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.LayerNorm(48), nn.Linear(48, 3)).double()
    before = snapshot(model)
    X, y = _data("cnn", 5, "cross_entropy")
    _fit(model, X, y, "cross_entropy", True)
    assert_unchanged(model, before)
    assert all(not module._forward_hooks for module in model.modules())


def test_float32_activations_accumulate_in_float64():
    model = _mlp().float()
    X, y = _data("mlp", 10, "cross_entropy")
    curvature = _fit(model, X.float(), y, "cross_entropy", True)
    reference = _fit(_mlp(), X, y, "cross_entropy", True)
    assert curvature.factors_["0"]["eigenvalues"].dtype == DTYPE
    assert _relative(curvature.dense(), reference.dense()) < 1e-4
    rhs = torch.randn(2, curvature.n_params_)
    assert curvature.solve(rhs, torch.full((curvature.n_params_,), 0.1)).dtype == torch.float32


# --------------------------------------------------------------------------- kronfluence

KRONFLUENCE_VERSION = "1.0.1"


def _import_kronfluence():
    """kronfluence (pinned), installed without its torchvision dependency.

    Install: ``pip install --no-deps -r requirements-peers.txt``.
    """
    try:
        kronfluence = importlib.import_module("kronfluence")
        analyzer = importlib.import_module("kronfluence.analyzer")
        arguments = importlib.import_module("kronfluence.arguments")
        task = importlib.import_module("kronfluence.task")
    except ImportError as error:
        pytest.skip(f"kronfluence=={KRONFLUENCE_VERSION} is not importable ({error}); install "
                    "it with `pip install --no-deps -r requirements-peers.txt`")
    version = getattr(kronfluence, "__version__", "unknown")
    assert version == KRONFLUENCE_VERSION, (
        f"the cross-check is written against kronfluence {KRONFLUENCE_VERSION}; found "
        f"{version}")
    return analyzer, arguments, task


def _kronfluence_scores(model, loss, X, y, X_query, y_query, damping, tmp_path, modules):
    """kronfluence's EK-FAC pairwise scores of ``(query, train)`` pairs, all float64.

    kronfluence fits its factors from the output gradients of ``compute_train_loss(...,
    sample=True)`` (one backward per example), meant for labels sampled from the model (the
    "true Fisher"). To make it fit the *exact* Gauss-Newton matrix deterministically, its
    factor data set holds every example ``R`` times, copy ``r`` with the pseudo-loss
    ``sqrt(R) <outputs_i, L_i[:, r]>`` (``L_i`` written here from the formulas, detached), so
    the backpropagated output gradient is ``sqrt(R) L_i[:, r]``. kronfluence divides its
    covariances and Lambda by the number of rows it saw, ``n R``, so its factors are exactly
    ``(1/n) sum_i sum_r`` of the pseudo-gradients' terms, as here. (With one position per
    example its covariance normalisation agrees with ours; for convolutions its ``A`` and
    ``S`` are both divided by ``n T`` - a scale that EK-FAC's eigenbasis ignores and its
    Lambda, divided by ``n R``, does not have.) Damping is absolute (``damping_factor``).
    """
    analyzer_module, arguments, task_module = _import_kronfluence()
    n_classes = 3

    def factor_of(outputs):
        if loss == "cross_entropy":
            p = torch.softmax(outputs, dim=1)
            return torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]
        eye = torch.eye(n_classes, dtype=DTYPE) * math.sqrt(2.0 / n_classes)
        return eye.expand(len(outputs), n_classes, n_classes)

    class ExactGaussNewtonTask(task_module.Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, targets, columns = batch
            outputs = model(inputs)
            if not sample:
                return LOSSES[loss](outputs, targets).sum()
            factor = factor_of(outputs.detach())
            picked = factor[torch.arange(len(outputs)), :, columns]
            return math.sqrt(n_classes) * (outputs * picked).sum()

        def compute_measurement(self, batch, model):
            inputs, targets, _ = batch
            return LOSSES[loss](model(inputs), targets).sum()

        def get_influence_tracked_modules(self):
            return modules

    task = ExactGaussNewtonTask()
    model = analyzer_module.prepare_model(copy.deepcopy(model), task)
    analyzer = analyzer_module.Analyzer("kfac_check", model, task, cpu=True,
                                        disable_tqdm=True, output_dir=str(tmp_path))
    R = n_classes
    repeated = torch.utils.data.TensorDataset(
        X.repeat_interleave(R, dim=0), y.repeat_interleave(R, dim=0),
        torch.arange(R).repeat(len(X)))
    as_dataset = lambda A, b: torch.utils.data.TensorDataset(  # noqa: E731
        A, b, torch.zeros(len(A), dtype=torch.long))
    float64 = dict(activation_covariance_dtype=DTYPE, gradient_covariance_dtype=DTYPE,
                   per_sample_gradient_dtype=DTYPE, lambda_dtype=DTYPE,
                   eigendecomposition_dtype=DTYPE)
    factor_args = arguments.FactorArguments(strategy="ekfac", use_empirical_fisher=False,
                                            **float64)
    analyzer.fit_all_factors("ekfac", repeated, per_device_batch_size=7,
                             factor_args=factor_args, overwrite_output_dir=True)
    score_args = arguments.ScoreArguments(
        damping_factor=damping, per_sample_gradient_dtype=DTYPE, precondition_dtype=DTYPE,
        score_dtype=DTYPE)
    analyzer.compute_pairwise_scores(
        "scores", "ekfac", query_dataset=as_dataset(X_query, y_query),
        train_dataset=as_dataset(X, y), per_device_query_batch_size=4,
        per_device_train_batch_size=5, score_args=score_args, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores("scores")["all_modules"]


def _our_scores(model, loss, X, y, X_query, y_query, damping, eigen_correction=True):
    curvature = _fit(model, X, y, loss, eigen_correction, batch_size=4)
    outputs, flat = _flat_function(model)

    def one_loss(theta, x, target):
        return LOSSES[loss](outputs(theta, x[None]), target[None]).sum()

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))
    train, query = per_example(flat, X, y), per_example(flat, X_query, y_query)
    shift = torch.full((curvature.n_params_,), damping, dtype=DTYPE)
    return curvature.solve(query, shift) @ train.T


@pytest.mark.filterwarnings("ignore:`torch.cuda.amp.GradScaler:FutureWarning")
@pytest.mark.parametrize("kind, loss", [("mlp", "cross_entropy"), ("mlp", "mse"),
                                        ("cnn", "cross_entropy"), ("sequence", "mse")])
def test_matches_kronfluence_ekfac_pairwise_scores(kind, loss, tmp_path):
    """Influence ``query_grad^T (G_ekfac + damping I)^-1 train_grad`` vs kronfluence's.

    Both sides are exact float64 computations of the same quantity, so they agree to
    rounding (about 1e-14 here); the bound asked for is 1e-5, the one used 1e-9. K-FAC's
    scores on the same data differ by more than 1e-3, so the check tells the two apart.
    """
    _import_kronfluence()
    model = _model(kind)
    X, y = _data(kind, 12, loss)
    X_query, y_query = _data(kind, 4, loss, seed=5)
    damping = 1e-3
    theirs = _kronfluence_scores(model, loss, X, y, X_query, y_query, damping, tmp_path,
                                 None).to(DTYPE)
    ours = _our_scores(model, loss, X, y, X_query, y_query, damping)
    assert theirs.shape == ours.shape == (4, 12)
    assert _relative(ours, theirs) < 1e-9, (ours, theirs)
    kfac = _our_scores(model, loss, X, y, X_query, y_query, damping, eigen_correction=False)
    assert _relative(kfac, theirs) > 1e-3


def test_cross_entropy_factor_has_one_column_fewer_than_classes():
    """The cross-entropy Hessian ``diag(p) - p p^T`` has rank ``C - 1``; its factor has
    ``C - 1`` columns and reproduces it, saturated softmax included."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 6, generator=gen, dtype=torch.float64) * torch.tensor(
        [0.1, 1.0, 10.0, 60.0], dtype=torch.float64).repeat_interleave(10)[:, None]
    factor = loss_factor_for("cross_entropy")(logits, None)
    assert factor.shape == (40, 6, 5)
    p = torch.softmax(logits, dim=1)
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(factor @ factor.mT, hessians, atol=1e-14)

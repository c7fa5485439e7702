"""A tiny BERT from ``transformers``, both cases, against a dense reference written here.

The estimator gets the models as a user has them: the default attention kernel (SDPA,
which has neither forward-mode AD nor a double backward on the CPU), dropout in the config,
the models in train mode, data as a Mapping (a tokenizer's output plus ``"labels"``). The
reference builds every matrix densely with ``torch.func`` on a copy with eager attention
in eval mode, from the formulas of ``doc/guide/cases.md``, without the package.
"""

import copy
import functools

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, hessian

transformers = pytest.importorskip(
    "transformers", reason="transformers is a test extra: pip install -e '.[test]'")

from skmsif import MultiStageInfluenceEstimator  # noqa: E402

torch.set_num_threads(1)
PRETRAIN_DAMPING, FINETUNE_DAMPING, ALPHA = 0.1, 0.05, 0.3
M, N, N_TEST, SEQ, VOCAB = 12, 8, 3, 5, 11


def _bert(num_labels, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=6, max_position_embeddings=SEQ, type_vocab_size=1,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).double()


def _mapping(count, n_classes, seed):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (count, SEQ), generator=gen)
    lengths = torch.randint(2, SEQ + 1, (count,), generator=gen)
    attention_mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
    input_ids = input_ids * attention_mask
    labels = torch.randint(0, n_classes, (count,), generator=gen)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def make_problem(case):
    pretrain = _bert(3, seed=0)
    finetune = _bert(2, seed=1)
    if case == "fixed":
        finetune.bert = pretrain.bert  # the very same Parameter objects
    else:
        finetune.bert = copy.deepcopy(pretrain.bert)
        with torch.no_grad():
            for parameter in finetune.bert.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    pretrain.train()
    finetune.train()
    assert pretrain.config._attn_implementation == "sdpa"
    return pretrain, finetune, _mapping(M, 3, 10), _mapping(N, 2, 11), _mapping(N_TEST, 2, 12)


# ------------------------------------------------------------------- the reference


def _plain_layer_norm(module, inputs):
    """Layer norm from its definition (PyTorch's fused kernel has wrong second derivatives)."""
    mean = inputs.mean(-1, keepdim=True)
    variance = ((inputs - mean) ** 2).mean(-1, keepdim=True)
    return (inputs - mean) / torch.sqrt(variance + module.eps) * module.weight + module.bias


class _Flat:
    """A model's per-example losses as a function of one flat vector of named params."""

    def __init__(self, model, names):
        self.model = copy.deepcopy(model).eval()
        self.model.set_attn_implementation("eager")
        for module in self.model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.forward = functools.partial(_plain_layer_norm, module)
        self.names = names
        params = dict(self.model.named_parameters())
        self.shapes = [params[name].shape for name in names]
        self.point = torch.cat([params[name].detach().reshape(-1) for name in names])

    def losses(self, flat, data):
        state, start = {}, 0
        for name, shape in zip(self.names, self.shapes):
            state[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        inputs = {key: value for key, value in data.items() if key != "labels"}
        logits = functional_call(self.model, state, (), inputs).logits
        return torch.nn.functional.cross_entropy(logits, data["labels"], reduction="none")

    def mean_hessian(self, data):
        return hessian(lambda flat: self.losses(flat, data).mean())(self.point)

    def per_example_grads(self, data):
        def one(flat, row):
            return self.losses(flat, {k: v[None] for k, v in row.items()}).sum()

        return torch.stack([grad(one)(self.point, {k: v[i] for k, v in data.items()})
                            for i in range(len(data["labels"]))])


def reference_influence(pretrain, finetune, Z, X, x_test, case):
    pre_names = [name for name, _ in pretrain.named_parameters()]
    fin_names = [name for name, _ in finetune.named_parameters()]
    shared = [name for name in fin_names if name.startswith("bert.")]
    theta = [name for name in fin_names if not name.startswith("bert.")]
    pre = _Flat(pretrain, pre_names)
    fin = _Flat(finetune, shared + theta)  # W first, then Theta
    n_w = sum(fin.shapes[i].numel() for i in range(len(shared)))
    test_grads = fin.per_example_grads(x_test)
    H_F = fin.mean_hessian(X)
    if case == "fixed":
        H_tt = H_F[n_w:, n_w:] + FINETUNE_DAMPING * torch.eye(len(H_F) - n_w,
                                                                dtype=torch.float64)
        v1 = torch.linalg.solve(H_tt, test_grads[:, n_w:].T).T
        w = test_grads[:, :n_w] - v1 @ H_F[n_w:, :n_w]
    else:
        K = H_F + FINETUNE_DAMPING * torch.eye(len(H_F), dtype=torch.float64)
        K[:n_w, :n_w] += 2 * ALPHA * torch.eye(n_w, dtype=torch.float64)
        v1 = torch.linalg.solve(K, test_grads.T).T
        w = 2 * ALPHA * v1[:, :n_w]
    # The pretrain vector in the pretrain model's own order.
    pre_index = {name: i for i, name in enumerate(pre_names)}
    sizes = [s.numel() for s in pre.shapes]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rhs = torch.zeros(len(w), len(pre.point), dtype=torch.float64)
    offset = 0
    for name, shape in zip(shared, fin.shapes[:len(shared)]):
        i = pre_index[name]
        rhs[:, starts[i]:starts[i + 1]] = w[:, offset:offset + shape.numel()]
        offset += shape.numel()
    H_G = pre.mean_hessian(Z) + PRETRAIN_DAMPING * torch.eye(len(pre.point),
                                                              dtype=torch.float64)
    v2 = torch.linalg.solve(H_G, rhs.T).T
    return -(v2 @ pre.per_example_grads(Z).T).numpy()


# ------------------------------------------------------------------- tests


def _estimator(case, **params):
    params.setdefault("hessian", "exact")
    return MultiStageInfluenceEstimator(
        embedding=case, alpha=ALPHA, pretrain_damping=PRETRAIN_DAMPING,
        finetune_damping=FINETUNE_DAMPING, shared=None if case == "fixed" else "bert",
        batch_size=5, **params)


def _snapshot(model):
    return ({name: p.detach().clone() for name, p in model.named_parameters()},
            model.training, model.config._attn_implementation,
            {name: p.requires_grad for name, p in model.named_parameters()})


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_exact_matches_dense_reference_on_a_tiny_bert(case):
    pretrain, finetune, Z, X, x_test = make_problem(case)
    before = [_snapshot(pretrain), _snapshot(finetune)]
    estimator = _estimator(case).fit(pretrain, finetune, Z, X)
    got = estimator.influence(x_test)
    expected = reference_influence(pretrain, finetune, Z, X, x_test, case)
    assert got.shape == (N_TEST, M)
    assert np.linalg.norm(got - expected) <= 1e-8 * np.linalg.norm(expected)
    np.testing.assert_allclose(estimator.score(x_test), expected.sum(axis=0), rtol=1e-8,
                               atol=1e-12)
    assert estimator.attention_switched_ == [""]
    # The user's models: same values, mode, attention kernel and requires_grad.
    for model, (params, training, attention, requires) in zip((pretrain, finetune), before):
        assert model.training == training and model.config._attn_implementation == attention
        for name, parameter in model.named_parameters():
            assert torch.equal(parameter, params[name])
            assert parameter.requires_grad == requires[name] and parameter.grad is None


@pytest.mark.parametrize("hessian", ["cg", "lowrank", "identity", "kfac", "ekfac"])
def test_every_backend_runs_on_a_default_bert(hessian):
    """Hessian-vector products and forward-mode scoring work on the default model."""
    pretrain, finetune, Z, X, x_test = make_problem("fixed")
    estimator = _estimator("fixed", hessian=hessian, rank=400, tol=1e-9)
    scores = estimator.fit(pretrain, finetune, Z, X).score(x_test)
    assert scores.shape == (M,) and np.isfinite(scores).all()
    if hessian == "cg":
        expected = reference_influence(pretrain, finetune, Z, X, x_test, "fixed").sum(0)
        np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9)


def test_a_model_without_logits_gets_a_clear_error():
    pretrain, finetune, Z, X, _ = make_problem("fixed")

    class Tuple(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, **inputs):
            return (self.model(**inputs).logits,)

    with pytest.raises(TypeError, match="returned a tuple.*Wrap the model"):
        _estimator("fixed").fit(Tuple(pretrain), Tuple(finetune), Z, X)


def test_layer_norm_second_derivatives_match_finite_differences():
    """The private copy's layer norm has right Hessian-vector products (PyTorch's fused
    kernel does not: its weight-gradient's derivative in the input is wrong)."""
    from skmsif._model import DecomposedLayerNorm

    torch.manual_seed(0)
    layer = torch.nn.LayerNorm(4).double()
    with torch.no_grad():
        layer.weight.normal_()
    inputs = torch.randn(3, 4, dtype=torch.float64)
    decomposed = copy.deepcopy(layer)
    decomposed.__class__ = DecomposedLayerNorm

    def objective(module):
        def f(flat):
            x, weight = flat[:12].reshape(3, 4), flat[12:]
            out = functional_call(module, {"weight": weight, "bias": module.bias}, (x,))
            return torch.tanh(out).pow(2).sum()
        return f

    point = torch.cat([inputs.reshape(-1), layer.weight.detach()])
    gradient = grad(objective(decomposed))
    step = 1e-6
    finite = torch.stack([(gradient(point + step * e) - gradient(point - step * e)) / (2 * step)
                          for e in torch.eye(16, dtype=torch.float64)])
    assert torch.allclose(hessian(objective(decomposed))(point), finite, atol=1e-7)
    np.testing.assert_allclose(decomposed(inputs).detach(), layer(inputs).detach(),
                               atol=1e-12)

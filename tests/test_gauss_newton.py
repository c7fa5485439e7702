"""Gauss-Newton curvature and the K-FAC / EK-FAC backends inside the estimator.

The reference builds ``G = (1/n) sum_i J_i^T H_i J_i`` densely in this file, with
``torch.func.jacrev`` for the Jacobians of the outputs and the closed-form cross-entropy
Hessian ``diag(p) - p p^T``, then follows the formulas of ``doc/guide/cases.md`` with every
second-derivative block (``H_G``; ``H_ThetaTheta`` and ``H_WTheta`` in Case 1; ``K`` in
Case 2) taken from the matching Gauss-Newton matrix.
"""

import numpy as np
import pytest
import torch
from _models import tiny_problem
from scipy.stats import spearmanr
from torch.func import functional_call, jacrev

from skmsif import MultiStageInfluenceEstimator

torch.set_num_threads(1)
PRETRAIN_DAMPING, FINETUNE_DAMPING, ALPHA = 0.05, 0.02, 0.2


def _flat(model):
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    point = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def outputs(flat, inputs):
        state, start = {}, 0
        for name, shape in zip(names, shapes):
            state[name] = flat[start:start + shape.numel()].reshape(shape)
            start += shape.numel()
        return functional_call(model, state, (inputs,))

    return names, shapes, point, outputs


def _gauss_newton(outputs, point, inputs):
    jacobian = jacrev(lambda flat: outputs(flat, inputs))(point)  # (n, C, p)
    p = torch.softmax(outputs(point, inputs), dim=1)
    hessians = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", jacobian, hessians, jacobian) / len(inputs)


def _per_example_grads(outputs, point, inputs, targets):
    def loss(flat, x, y):
        return torch.nn.functional.cross_entropy(outputs(flat, x[None]), y[None])

    return torch.stack([torch.func.grad(loss)(point, x, y) for x, y in zip(inputs, targets)])


def reference(case, pretrain, finetune, Z, X, x_test, pretrain_matrix=None,
              finetune_matrix=None):
    """Dense influence; ``*_matrix`` replace the inverted curvatures (K-FAC checks)."""
    pre_names, pre_shapes, pre_point, pre_out = _flat(pretrain)
    fin_names, fin_shapes, fin_point, fin_out = _flat(finetune)
    sizes = [s.numel() for s in fin_shapes]
    w_mask = torch.cat([torch.full((size,), name.startswith("0."))
                        for name, size in zip(fin_names, sizes)])
    pre_w_mask = torch.cat([torch.full((s.numel(),), name.startswith("0."))
                            for name, s in zip(pre_names, pre_shapes)])
    G_F = _gauss_newton(fin_out, fin_point, X[0])
    test_grads = _per_example_grads(fin_out, fin_point, *x_test)
    W, T = w_mask, ~w_mask
    if case == "fixed":
        H_tt = G_F[T][:, T] if finetune_matrix is None else finetune_matrix
        H_tt = H_tt + FINETUNE_DAMPING * torch.eye(int(T.sum()), dtype=torch.float64)
        v1 = torch.linalg.solve(H_tt, test_grads[:, T].T).T
        w = test_grads[:, W] - v1 @ G_F[T][:, W]
    else:
        K = G_F if finetune_matrix is None else finetune_matrix
        K = K + FINETUNE_DAMPING * torch.eye(len(G_F), dtype=torch.float64)
        K[W.nonzero()[:, 0], W.nonzero()[:, 0]] += 2 * ALPHA
        v1 = torch.linalg.solve(K, test_grads.T).T
        w = 2 * ALPHA * v1[:, W]
    rhs = torch.zeros(len(w), len(pre_point), dtype=torch.float64)
    rhs[:, pre_w_mask] = w
    G_G = (_gauss_newton(pre_out, pre_point, Z[0]) if pretrain_matrix is None
           else pretrain_matrix) + PRETRAIN_DAMPING * torch.eye(
        len(pre_point), dtype=torch.float64)
    v2 = torch.linalg.solve(G_G, rhs.T).T
    return -(v2 @ _per_example_grads(pre_out, pre_point, *Z).T).numpy()


def _estimator(case, **params):
    return MultiStageInfluenceEstimator(
        embedding=case, alpha=ALPHA, pretrain_damping=PRETRAIN_DAMPING,
        finetune_damping=FINETUNE_DAMPING, shared=None if case == "fixed" else "0",
        batch_size=6, **params)


@pytest.mark.parametrize("case", ["fixed", "updated"])
def test_gauss_newton_exact_and_cg_match_a_dense_reference(case):
    problem = tiny_problem(case)
    expected = reference(case, *problem)
    exact = _estimator(case, hessian="exact", curvature="gauss_newton").fit(*problem[:4])
    assert exact.curvature_ == {"pretrain": "gauss_newton", "finetune": "gauss_newton"}
    got = exact.influence(problem[4])
    assert np.linalg.norm(got - expected) <= 1e-9 * np.linalg.norm(expected)
    cg = _estimator(case, hessian="cg", curvature="gauss_newton", iterative_solver="cg",
                    tol=1e-12).fit(*problem[:4])
    assert np.linalg.norm(cg.influence(problem[4]) - expected) <= 1e-7 * np.linalg.norm(
        expected)
    # The Hessian gives other numbers on this untrained problem (the test can fail).
    hessian = _estimator(case, hessian="exact").fit(*problem[:4]).influence(problem[4])
    assert np.linalg.norm(hessian - expected) > 1e-3 * np.linalg.norm(expected)


@pytest.mark.parametrize("case", ["fixed", "updated"])
@pytest.mark.parametrize("backend", ["kfac", "ekfac"])
def test_kronecker_backends_are_wired_as_the_formulas_say(case, backend):
    """With the backends' own (K-FAC / EK-FAC) matrices in place of the Gauss-Newton
    matrices that are inverted, the dense reference gives the estimator's numbers: the
    dampings, the 2 alpha of Case 2, the blocks and the exact Gauss-Newton mixed block of
    Case 1 are where the formulas put them. (The matrices themselves are checked against
    their definitions in tests/test_kfac.py.)"""
    problem = tiny_problem(case, m=40, hidden=5)
    estimator = _estimator(case, hessian=backend).fit(*problem[:4])
    assert estimator.curvature_["pretrain"] == "gauss_newton"
    got = estimator.influence(problem[4])
    expected = reference(case, *problem,
                         pretrain_matrix=estimator.pretrain_solver_.solver.dense(),
                         finetune_matrix=estimator.finetune_solver_.solver.dense())
    assert np.linalg.norm(got - expected) <= 1e-9 * np.linalg.norm(expected)
    exact = _estimator(case, hessian="exact", curvature="gauss_newton").fit(*problem[:4])
    print(backend, case, "Spearman with exact Gauss-Newton:",
          spearmanr(estimator.score(problem[4]), exact.score(problem[4])).statistic)


def test_each_stage_has_its_own_backend():
    problem = tiny_problem("fixed")
    mixed = _estimator("fixed", hessian="ekfac", finetune_hessian="exact").fit(*problem[:4])
    assert mixed.hessian_ == {"pretrain": "ekfac", "finetune": "exact"}
    assert mixed.curvature_ == {"pretrain": "gauss_newton", "finetune": "hessian"}
    assert np.isfinite(mixed.score(problem[4])).all()


def test_kfac_with_the_hessian_is_refused():
    with pytest.raises(ValueError, match="approximates only.*gauss_newton"):
        _estimator("fixed", hessian="kfac", curvature="hessian").fit(*tiny_problem()[:4])

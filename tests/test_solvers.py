"""Every solver against a dense solve, on positive definite and indefinite matrices."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from skmsif._solvers import ExactSolver, IdentitySolver, IterativeSolver


def _symmetric(p, eigenvalues, seed):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _problem(indefinite, seed=0, p=12):
    rng = np.random.default_rng(seed)
    eigenvalues = rng.uniform(0.5, 3.0, p)
    if indefinite:
        eigenvalues[:4] *= -1
    matrix = _symmetric(p, eigenvalues, seed)
    shift = torch.full((p,), 0.1, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    rhs = torch.randn(3, p, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(matrix + torch.diag(shift), rhs.T).T
    return matrix, shift, rhs, expected


def _relative(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("indefinite", [False, True])
def test_exact_solver(indefinite):
    matrix, shift, rhs, expected = _problem(indefinite)
    solver = ExactSolver(matrix, shift, "test", "damping")
    # Positive definite: Cholesky, and the eigenpairs only when asked for.
    assert (solver.cholesky_ is None) == indefinite
    assert ("eigenvalues_" in vars(solver)) == indefinite
    assert _relative(solver.solve(rhs), expected) < 1e-12
    assert (solver.eigenvalues_.min() < 0) == indefinite
    assert torch.allclose(solver.eigenvalues_,
                          torch.linalg.eigvalsh(matrix + torch.diag(shift)), atol=1e-12)
    rebuilt = (solver.eigenvectors_.T * solver.eigenvalues_) @ solver.eigenvectors_
    assert torch.allclose(rebuilt, matrix + torch.diag(shift), atol=1e-12)


@pytest.mark.parametrize("method,indefinite", [
    ("minres", False), ("minres", True), ("cg_normal", False), ("cg_normal", True),
    ("cg", False),
])
def test_iterative_solver(method, indefinite):
    matrix, shift, rhs, expected = _problem(indefinite)
    solver = IterativeSolver(lambda v: v @ matrix, shift, method, tol=1e-12, max_iter=500,
                             name="test")
    assert _relative(solver.solve(rhs), expected) < 1e-8
    assert len(solver.history_) == 3
    assert all(entry["converged"] and entry["residual"] < 1e-8
               for entry in solver.history_)


def test_iterative_solver_warns_when_it_stops_short():
    matrix, shift, rhs, _ = _problem(True)
    solver = IterativeSolver(lambda v: v @ matrix, shift, "minres", tol=1e-12, max_iter=2,
                             name="pretrain")
    with pytest.warns(ConvergenceWarning, match="pretrain.*2 iterations"):
        solver.solve(rhs[:1])
    assert solver.history_[0]["n_iter"] == 2
    assert not solver.history_[0]["converged"]
    assert solver.history_[0]["residual"] > 1e-3


def test_zero_right_hand_side_is_solved_without_iterating():
    matrix, shift, _, _ = _problem(False)
    solver = IterativeSolver(lambda v: v @ matrix, shift, "minres", 1e-10, 50, "test")
    assert torch.equal(solver.solve(torch.zeros(1, 12, dtype=torch.float64)),
                       torch.zeros(1, 12, dtype=torch.float64))


def test_exact_solver_refuses_a_nearly_singular_positive_definite_matrix():
    eigenvalues = np.linspace(1, 2, 6)
    eigenvalues[0] = 1e-17
    matrix = _symmetric(6, eigenvalues, 0)
    with pytest.raises(ValueError, match="singular.*increase pretrain_damping"):
        ExactSolver(matrix, torch.zeros(6, dtype=torch.float64), "pretrain",
                    "pretrain_damping")


def test_exact_solver_refuses_a_singular_matrix():
    eigenvalues = np.linspace(1, 2, 6)
    eigenvalues[0] = 0.0
    matrix = _symmetric(6, eigenvalues, 0)
    with pytest.raises(ValueError, match="singular.*increase pretrain_damping"):
        ExactSolver(matrix, torch.zeros(6, dtype=torch.float64), "pretrain",
                    "pretrain_damping")


def test_identity_solver_returns_a_copy():
    rhs = torch.ones(2, 3)
    solved = IdentitySolver().solve(rhs)
    assert torch.equal(solved, rhs) and solved is not rhs


def test_lowrank_backend_keeps_the_damping_on_the_dropped_spectrum():
    """With a curvature of rank 3, rank 3 plus the remainder term is an exact solve; the
    eigenpairs alone would drop the part of b outside their span."""
    from types import SimpleNamespace

    from skmsif._backends import LowRankBackend, SolveSettings

    gen = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 3, generator=gen, dtype=torch.float64))
    curvature = basis @ torch.diag(torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)) \
        @ basis.T
    shift = torch.full((12,), 0.1, dtype=torch.float64)
    operator = SimpleNamespace(matvec=lambda v: v @ curvature, name="test")
    backend = LowRankBackend(operator, shift, SolveSettings(rank=3, random_state=0), "d")
    rhs = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    expected = torch.linalg.solve(curvature + torch.diag(shift), rhs.T).T
    assert torch.allclose(backend.solve(rhs), expected, atol=1e-10)
    solution, mapped = backend.solve_and_map(rhs, lambda v: 2 * v[:, :5])
    assert torch.allclose(mapped, 2 * expected[:, :5], atol=1e-10)
    eigen_only = (rhs @ backend.solver.eigenvectors_.T / backend.solver.eigenvalues_) \
        @ backend.solver.eigenvectors_
    assert (eigen_only - expected).norm() > 0.1 * expected.norm()


def test_truncated_cg_is_the_estimators_cg_on_one_system():
    """Training's Newton-CG uses the package's one CG: it solves an SPD system, keeps
    the iterate where curvature turns negative, and returns None when the first
    direction already has non-positive curvature."""
    from skmsif._solvers import truncated_cg

    rng = np.random.RandomState(0)
    a = rng.randn(6, 6)
    spd = torch.as_tensor(a @ a.T + 6 * np.eye(6))
    rhs = torch.as_tensor(rng.randn(6))
    x = truncated_cg(lambda v: spd @ v, rhs, 50, 1e-12)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(spd.numpy(), rhs.numpy()),
                               rtol=1e-9)
    # Negative definite: the first direction has negative curvature.
    assert truncated_cg(lambda v: -spd @ v, rhs, 50, 1e-12) is None
    # Indefinite with the rhs mostly along a positive direction: a partial iterate.
    indefinite = torch.diag(torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64))
    partial = truncated_cg(lambda v: indefinite @ v,
                           torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64), 10, 1e-12)
    assert partial is not None and bool(torch.isfinite(partial).all())
    assert float(partial @ torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)) > 0


def test_preconditioned_cg_solves_the_system_and_needs_fewer_products():
    """PCG with an approximate inverse converges to the dense solve, in fewer products
    than plain CG on an ill-conditioned matrix; a useless preconditioner (the identity)
    reproduces plain CG."""
    p = 40
    rng = np.random.default_rng(3)
    eigenvalues = np.logspace(-3, 2, p)
    matrix = _symmetric(p, eigenvalues, 3)
    shift = torch.full((p,), 1e-3, dtype=torch.float64)
    rhs = torch.as_tensor(rng.standard_normal((2, p)))
    expected = torch.linalg.solve(matrix + torch.diag(shift), rhs.T).T
    # An approximate inverse: the true eigenvectors with eigenvalues off by up to 2x.
    noise = torch.as_tensor(rng.uniform(0.5, 2.0, p))
    q = torch.linalg.eigh(matrix + torch.diag(shift))[1]
    approximate = q @ torch.diag(1 / ((torch.as_tensor(eigenvalues) + 1e-3) * noise)) @ q.T
    products = {"plain": 0, "preconditioned": 0}

    def counted(label):
        def hvp(vectors):
            products[label] += len(vectors)
            return vectors @ matrix
        return hvp

    plain = IterativeSolver(counted("plain"), shift, "cg", 1e-10, 2000, "test")
    preconditioned = IterativeSolver(counted("preconditioned"), shift, "cg", 1e-10, 2000,
                                     "test", precondition=lambda r: r @ approximate)
    assert _relative(plain.solve(rhs), expected) < 1e-7
    assert _relative(preconditioned.solve(rhs), expected) < 1e-7
    assert all(entry["converged"] for entry in preconditioned.history_)
    print(products)
    assert products["preconditioned"] * 3 < products["plain"], products
    identity = IterativeSolver(lambda v: v @ matrix, shift, "cg", 1e-10, 2000, "test",
                               precondition=lambda r: r.clone())
    assert _relative(identity.solve(rhs), plain.solve(rhs)) < 1e-9
    assert [e["n_iter"] for e in identity.history_] == [e["n_iter"] for e in
                                                        plain.history_[-2:]]


def test_a_preconditioner_needs_cg():
    with pytest.raises(ValueError, match="method='cg'"):
        IterativeSolver(lambda v: v, torch.ones(3), "minres", 1e-8, 10, "test",
                        precondition=lambda r: r)

"""Solvers for ``(H + diag(shift)) x = b``; every one answers ``solve(rhs)``.

``H`` is a Hessian (possibly indefinite: trained networks are rarely at an exact minimum)
and ``shift`` the damping, plus ``2 alpha`` on the shared block in Case 2 (MATH.md). The
shift is added here and nowhere else. ``rhs`` holds one right-hand side per row.
"""

import warnings

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, cg, minres
from sklearn.exceptions import ConvergenceWarning

from ._progress import progress

# Restarts of a Krylov run whose true residual is still above tol.
_MAX_RESTARTS = 10


class IdentitySolver:
    """The identity-Hessian baseline (paper Fig. 4): ``solve(b) = b``."""

    def solve(self, rhs):
        return rhs.clone()


class ExactSolver:
    """Eigendecomposition of the dense damped Hessian in float64, reused for every solve.

    Parameters
    ----------
    hessian : torch.Tensor of shape (p, p)
        The symmetric Hessian.
    shift : torch.Tensor of shape (p,)
        Added to the diagonal.
    name : str
        Which Hessian, for messages (for example ``"pretrain"``).
    damping_name : str
        The estimator parameter that sets the damping, named in the fix.
    """

    def __init__(self, hessian, shift, name, damping_name):
        matrix = hessian.to(torch.float64) + torch.diag(shift.to(torch.float64))
        self.eigenvalues_, self.eigenvectors_ = torch.linalg.eigh(matrix)
        magnitudes = self.eigenvalues_.abs()
        p = len(magnitudes)
        if magnitudes.min() <= magnitudes.max() * p * torch.finfo(torch.float64).eps:
            raise ValueError(
                f"The damped {name} Hessian is singular (smallest |eigenvalue| "
                f"{float(magnitudes.min()):.3g}, largest {float(magnitudes.max()):.3g}); "
                f"increase {damping_name}."
            )

    def solve(self, rhs):
        coefficients = rhs.to(torch.float64) @ self.eigenvectors_
        return ((coefficients / self.eigenvalues_) @ self.eigenvectors_.T).to(rhs.dtype)


class IterativeSolver:
    """Krylov solves with Hessian-vector products; no dense matrix.

    Parameters
    ----------
    hvp : callable
        ``hvp(vectors)`` returns ``H @ v`` for each row of a ``(k, p)`` tensor.
    shift : torch.Tensor of shape (p,)
        Added to the diagonal.
    method : {"minres", "cg", "cg_normal"}
        ``"minres"``: MINRES on ``A = H + diag(shift)``, correct for symmetric indefinite
        ``A``. ``"cg"``: conjugate gradients on ``A``, only for positive definite ``A``.
        ``"cg_normal"``: conjugate gradients on ``A^2 x = A b`` (the paper's Sec. 3.3),
        positive definite whenever ``A`` is nonsingular, but squares the condition number.
    tol : float
        A solve has converged when ``||A x - b|| / ||b|| <= tol``, measured on the
        original system (scipy's own stopping rules are restarted past when they differ).
        Floored at ``100 * eps`` of the dtype (about 1e-5 in float32).
    max_iter : int
        Iterations at most per right-hand side.
    name : str
        Which Hessian, for messages.
    verbose : int
        Show a progress bar over right-hand sides.

    Attributes
    ----------
    history_ : list of dict
        One entry per solve: ``n_iter``, ``residual`` (``||A x - b|| / ||b||`` of the
        original system, measured with one extra product) and ``converged``.
    """

    def __init__(self, hvp, shift, method, tol, max_iter, name, verbose=0):
        self.hvp = hvp
        self.shift = shift
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.name = name
        self.verbose = verbose
        self.history_ = []

    def _apply(self, vector):
        return self.hvp(vector[None])[0] + self.shift * vector

    def solve(self, rhs):
        solutions = torch.empty_like(rhs)
        rows = progress(range(len(rhs)), self.verbose, len(rhs),
                        f"{self.name} {self.method} solves")
        for row in rows:
            solutions[row] = self._solve_one(rhs[row])
        return solutions

    def _solve_one(self, b):
        p = b.numel()
        like = b

        def matvec(x):
            vector = torch.from_numpy(np.asarray(x).reshape(-1)).to(like)
            return self._apply(vector).cpu().numpy()

        operator = LinearOperator((p, p), matvec=matvec, dtype=np.float64)
        b_np = b.cpu().numpy().astype(np.float64)
        rhs_norm = float(np.linalg.norm(b_np))
        if rhs_norm == 0.0:
            self.history_.append({"n_iter": 0, "residual": 0.0, "converged": True})
            return torch.zeros_like(b)
        n_iter = [0]

        def count(_):
            n_iter[0] += 1

        # scipy's stopping rules are not relative to ||b|| (MINRES's is relative to
        # ||A|| ||x||), so the true residual is measured after each run; while it is above
        # tol, the solver restarts from where it stopped with a tighter inner tolerance.
        tol = max(self.tol, 100 * torch.finfo(b.dtype).eps)
        x, residual, info, inner_tol = np.zeros(p), 1.0, 0, tol
        for _ in range(_MAX_RESTARTS):
            remaining = self.max_iter - n_iter[0]
            if remaining <= 0:
                break
            x_new, info = self._krylov(operator, matvec, b_np, x, inner_tol, remaining,
                                       count)
            new_residual = float(np.linalg.norm(matvec(x_new) - b_np)) / rhs_norm
            if new_residual >= residual:  # no progress: stop here
                break
            x, residual = x_new, new_residual
            if residual <= tol or info != 0:
                break
            inner_tol = max(inner_tol * min(0.1, tol / residual), np.finfo(np.float64).eps)
        converged = residual <= tol
        self.history_.append(
            {"n_iter": n_iter[0], "residual": residual, "converged": converged})
        if not converged:
            warnings.warn(
                f"The {self.method} solve of the damped {self.name} Hessian stopped after "
                f"{n_iter[0]} iterations (scipy info={info}) with relative residual "
                f"{residual:.3g}, above tol={tol:g}. Raise max_iter or the "
                f"damping, or use iterative_solver='minres' for an indefinite Hessian.",
                ConvergenceWarning,
                stacklevel=4,
            )
        return torch.from_numpy(x).to(b)

    def _krylov(self, operator, matvec, b, x0, rtol, maxiter, callback):
        if self.method == "minres":
            return minres(operator, b, x0=x0, rtol=rtol, maxiter=maxiter,
                          callback=callback)
        if self.method == "cg":
            return cg(operator, b, x0=x0, rtol=rtol, atol=0.0, maxiter=maxiter,
                      callback=callback)
        p = len(b)
        normal = LinearOperator((p, p), matvec=lambda v: matvec(matvec(v)),
                                dtype=np.float64)
        return cg(normal, matvec(b), x0=x0, rtol=rtol, atol=0.0, maxiter=maxiter,
                  callback=callback)

"""Solvers for ``(H + diag(shift)) x = b``; every one answers ``solve(rhs)``.

``H`` is a Hessian (possibly indefinite: trained networks are rarely at an exact minimum)
and ``shift`` the damping, plus ``2 alpha`` on the shared block in Case 2
(``doc/guide/cases.md``). The shift is added here and nowhere else. ``rhs`` holds one
right-hand side per row; the iterative solvers advance all rows together, so each
iteration costs one batched
Hessian-vector product (``hvp`` maps ``(k, p)`` to ``(k, p)``). Everything stays in torch,
on the estimator's device.

No solver returns NaN or infinity, nor zeros in their place: a Hessian, a product with it,
a right-hand side or a solution that is not finite raises :class:`NonFiniteError` (a
``ValueError``) naming the stage, never a ``ConvergenceWarning`` about iterations.

:data:`FORWARD_MODE_LOCK` serialises the sections that use forward-mode differentiation
(``torch.func.jvp``): PyTorch keeps its forward-mode state per process, not per thread,
so two threads in such a section at once break each other (see :func:`locked_call`).
"""

import threading
import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state

from ._progress import progress

# Restarts of a Krylov run whose measured residual is still above tol.
_MAX_RESTARTS = 10

#: Held around every section that uses forward-mode derivatives (``torch.func.jvp``):
#: PyTorch's forward-mode "dual level" is process-global, so two threads inside ``jvp`` at
#: once fail ("no level exists") or corrupt each other's tangents. Reentrant.
FORWARD_MODE_LOCK = threading.RLock()


def locked_call(function, *args, **kwargs):
    """``function(*args, **kwargs)`` while holding :data:`FORWARD_MODE_LOCK`.

    Module level, so that joblib ships it to process workers by reference (each process
    has its own lock; threads of one process share it).
    """
    with FORWARD_MODE_LOCK:
        return function(*args, **kwargs)


class NonFiniteError(ValueError):
    """NaN or infinity met in a stage of the computation.

    Parameters
    ----------
    message : str
    stage : str
        ``"pretrain"``, ``"finetune"`` or another stage name.
    """

    def __init__(self, message, stage=""):
        super().__init__(message)
        self.stage = stage


def _describe_nonfinite(tensor):
    values = tensor.detach()
    n_nan = int(torch.isnan(values).sum())
    n_inf = int(torch.isinf(values).sum())
    return f"{n_nan} NaN and {n_inf} infinite of {values.numel()} values"


def require_finite(tensor, stage, what, advice=""):
    """Raise :class:`NonFiniteError` unless every value of ``tensor`` is finite.

    Parameters
    ----------
    tensor : torch.Tensor
    stage : str
        The stage named in the message (``"pretrain"``, ``"finetune"``).
    what : str
        What ``tensor`` is, for the message.
    advice : str, default=""
        Appended to the message.
    """
    if bool(torch.isfinite(tensor).all()):
        return tensor
    raise NonFiniteError(
        f"Non-finite values in the {stage} stage: {what} ({_describe_nonfinite(tensor)})."
        + (f" {advice}" if advice else ""), stage)


def locate_nonfinite(objective, data, batch_size, device, indices=None):
    """The first example of ``data`` whose loss or gradient is NaN or infinite.

    Parameters
    ----------
    objective : skmsif._curvature.Objective
        The stage's per-example losses at its point.
    data : skmsif._data.DataSource
    batch_size : int
    device : torch.device
    indices : torch.Tensor or None
        Only these positions of ``data`` (a Hessian subsample).

    Returns
    -------
    found : tuple of (int, str) or None
        The example's position in ``data`` and ``"loss"`` or ``"gradient"``; ``None``
        when every example's loss and gradient are finite.
    """
    positions = None if indices is None else [int(i) for i in indices]
    offset = 0
    for inputs, targets in data.batches(batch_size, device, indices):
        count = len(targets)
        with torch.no_grad():
            losses = objective.losses(objective.point, inputs, targets)
        bad = ~torch.isfinite(losses.reshape(count, -1)).all(dim=1)
        kind = "loss"
        if not bool(bad.any()):
            gradients = objective.per_example_grads(inputs, targets)
            bad = ~torch.isfinite(gradients.reshape(count, -1)).all(dim=1)
            kind = "gradient"
        if bool(bad.any()):
            row = offset + int(bad.nonzero()[0])
            return (row if positions is None else positions[row]), kind
        offset += count
    return None


class IdentitySolver:
    """The identity-Hessian baseline (paper Fig. 4): ``solve(b) = b``."""

    def solve(self, rhs):
        return rhs.clone()


class _EigenSolver:
    """Solves with eigenpairs ``(values, vectors)`` of the damped Hessian."""

    name = ""

    def solve(self, rhs):
        require_finite(rhs, self.name, f"a right-hand side of the {self.name} solve")
        coefficients = rhs.to(torch.float64) @ self.eigenvectors_.T
        solution = ((coefficients / self.eigenvalues_) @ self.eigenvectors_).to(rhs.dtype)
        return require_finite(
            solution, self.name, f"the solution of the damped {self.name} Hessian system "
            f"overflows {rhs.dtype}", "Raise the damping, or use dtype='float64'.")


class ExactSolver(_EigenSolver):
    """The dense damped Hessian in float64, factored once and reused for every solve.

    A positive definite damped matrix (always for the Gauss-Newton matrix with a positive
    damping; for the Hessian when the damping outweighs its negative curvature) is
    factored by Cholesky, about 30 times cheaper than an eigendecomposition for
    ``p`` in the thousands (measured: 2.2 s against 63 s for ``p = 6150``, one
    thread). An indefinite or nearly singular one is eigendecomposed, which also gives
    the singularity check. The eigenpairs are computed on first use of
    ``eigenvalues_`` / ``eigenvectors_`` when the Cholesky factor was enough.

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

    Attributes
    ----------
    eigenvalues_ : torch.Tensor of shape (p,)
    eigenvectors_ : torch.Tensor of shape (p, p)
        One eigenvector per row.
    cholesky_ : torch.Tensor of shape (p, p) or None
        The lower Cholesky factor of the damped matrix, when it is positive definite.
    """

    def __init__(self, hessian, shift, name, damping_name):
        self.name = name
        self.damping_name = damping_name
        require_finite(hessian, name, f"the dense {name} Hessian",
                       "An example's loss or its derivatives overflow at the fitted "
                       "weights (model outputs too large for the dtype?).")
        matrix = hessian.to(torch.float64) + torch.diag(shift.to(torch.float64))
        self.cholesky_ = None
        factor, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0:
            # Positive definite; far from singular when the smallest pivot is (the
            # smallest eigenvalue is at most the smallest squared pivot).
            pivots = torch.diagonal(factor).square()
            scale = float(torch.diagonal(matrix).max())
            if float(pivots.min()) > scale * len(pivots) * torch.finfo(torch.float64).eps:
                self.cholesky_ = factor
                return
        self._eigendecompose(matrix)

    def _eigendecompose(self, matrix):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        magnitudes = eigenvalues.abs()
        p = len(magnitudes)
        if magnitudes.min() <= magnitudes.max() * p * torch.finfo(torch.float64).eps:
            raise ValueError(
                f"The damped {self.name} Hessian is singular (smallest |eigenvalue| "
                f"{float(magnitudes.min()):.3g}, largest {float(magnitudes.max()):.3g}); "
                f"increase {self.damping_name}."
            )
        self.__dict__["eigenvalues_"] = eigenvalues
        self.__dict__["eigenvectors_"] = eigenvectors.T

    def __getattr__(self, attribute):
        # Only reached when the attribute is missing: the eigenpairs of a matrix that
        # Cholesky factored, computed on first use.
        if attribute in ("eigenvalues_", "eigenvectors_"):
            factor = self.__dict__.get("cholesky_")
            if factor is not None:
                self._eigendecompose(factor @ factor.T)
                return self.__dict__[attribute]
        raise AttributeError(attribute)

    def solve(self, rhs):
        if self.cholesky_ is None:
            return super().solve(rhs)
        require_finite(rhs, self.name, f"a right-hand side of the {self.name} solve")
        solution = torch.cholesky_solve(rhs.to(torch.float64).T, self.cholesky_).T
        return require_finite(
            solution.to(rhs.dtype), self.name, f"the solution of the damped {self.name} "
            f"Hessian system overflows {rhs.dtype}", "Raise the damping, or use "
            "dtype='float64'.")


class LowRankSolver(_EigenSolver):
    """The ``rank`` eigenpairs of largest magnitude, by Lanczos, computed once.

    ``solve(b) = V diag(1/lambda) V^T b`` over those eigenpairs: the component of ``b``
    outside them is dropped (the Arnoldi/Lanczos influence approximation). With ``rank``
    equal to the number of parameters it is exact.

    Parameters
    ----------
    hvp : callable
        Batched Hessian-vector product, ``(k, p) -> (k, p)``.
    shift : torch.Tensor of shape (p,)
        Added to the diagonal.
    rank : int
        Eigenpairs kept (clipped to ``p``).
    random_state : int, RandomState instance or None
        The Lanczos start vector.
    name : str
        Which Hessian, for progress bars.
    verbose : int
        Show a progress bar over Lanczos steps.

    Attributes
    ----------
    eigenvalues_ : torch.Tensor of shape (rank,)
    eigenvectors_ : torch.Tensor of shape (rank, p)
    n_steps_ : int
        Lanczos steps taken (Hessian-vector products).
    """

    def __init__(self, hvp, shift, rank, random_state, name, verbose=0):
        self.name = name
        p = shift.numel()
        rank = min(rank, p)
        steps = min(p, max(2 * rank, rank + 20))
        seed = int(check_random_state(random_state).randint(2**31 - 1))
        generator = torch.Generator().manual_seed(seed)

        def random_unit(basis, count):
            vector = torch.randn(p, generator=generator, dtype=torch.float64).to(shift)
            for _ in range(2):
                vector -= basis[:count].T @ (basis[:count] @ vector)
            return vector / vector.norm()

        basis = torch.zeros(steps, p, dtype=shift.dtype, device=shift.device)
        alphas = torch.zeros(steps, dtype=torch.float64)
        betas = torch.zeros(steps, dtype=torch.float64)
        vector = random_unit(basis, 0)
        for step in progress(range(steps), verbose, steps, f"{name} Lanczos"):
            basis[step] = vector
            image = require_finite(
                hvp(vector[None])[0] + shift * vector, name,
                f"a product with the {name} Hessian (Lanczos step {step + 1})",
                "An example's loss or its derivatives overflow at the fitted weights.")
            alphas[step] = float(vector @ image)
            # Full reorthogonalisation, twice: the basis stays orthonormal to precision.
            for _ in range(2):
                image -= basis[:step + 1].T @ (basis[:step + 1] @ image)
            beta = float(image.norm())
            if step + 1 == steps:
                break
            if beta <= 1e-10 * max(float(alphas[:step + 1].abs().max()), 1e-300):
                # An invariant subspace: continue from a fresh direction (T splits).
                betas[step] = 0.0
                vector = random_unit(basis, step + 1)
            else:
                betas[step] = beta
                vector = image / beta
        tridiagonal = (torch.diag(alphas) + torch.diag(betas[:-1], 1)
                       + torch.diag(betas[:-1], -1))
        values, ritz = torch.linalg.eigh(tridiagonal)
        keep = torch.argsort(values.abs(), descending=True)[:rank]
        self.eigenvalues_ = values[keep].to(shift.device)
        self.eigenvectors_ = (ritz[:, keep].T.to(basis) @ basis).to(torch.float64)
        self.n_steps_ = steps


class IterativeSolver:
    """Krylov solves with batched Hessian-vector products; no dense matrix.

    Parameters
    ----------
    hvp : callable
        ``hvp(vectors)`` returns ``H @ v`` for each row of a ``(k, p)`` tensor.
    shift : torch.Tensor of shape (p,)
        Added to the diagonal.
    method : {"minres", "cg", "cg_normal"}
        ``"minres"``: MINRES on ``A = H + diag(shift)``, correct for symmetric indefinite
        ``A``. ``"cg"``: conjugate gradients on ``A``, only for positive definite ``A``
        (stops a right-hand side at the first direction of non-positive curvature).
        ``"cg_normal"``: conjugate gradients on ``A^2 x = A b`` (the paper's Sec. 3.3),
        positive definite whenever ``A`` is nonsingular, but it squares the condition
        number, which limits the residual it can reach.
    tol : float
        A solve has converged when ``||A x - b|| / ||b|| <= tol``, measured with one
        extra product at the end of each run; a run that stops early on its own
        estimate is restarted from where it stopped. Floored at ``100 * eps`` of the
        dtype (about 1e-5 in float32).
    max_iter : int
        Iterations at most per right-hand side, restarts included (``cg_normal``
        counts one iteration per product with ``A^2``).
    name : str
        Which Hessian, for messages.
    verbose : int
        Show a progress bar over iterations.
    precondition : callable or None, default=None
        ``M^-1``, for ``method="cg"`` only: ``precondition(r)`` applies a symmetric
        positive definite approximation of ``A^-1`` to each row of ``r`` (preconditioned
        CG). The residual ``||A x - b||`` that decides convergence is the true one.

    Attributes
    ----------
    history_ : list of dict
        One entry per right-hand side: ``n_iter``, ``residual`` (``||A x - b|| / ||b||``)
        and ``converged``.
    """

    def __init__(self, hvp, shift, method, tol, max_iter, name, verbose=0,
                 precondition=None):
        if precondition is not None and method != "cg":
            raise ValueError(f"a preconditioner needs method='cg'; got method={method!r}.")
        self.precondition = precondition
        self.hvp = hvp
        self.shift = shift
        self.method = method
        self.tol = tol
        self.max_iter = max_iter
        self.name = name
        self.verbose = verbose
        self.history_ = []

    def _apply(self, vectors):
        return require_finite(
            self.hvp(vectors) + self.shift * vectors, self.name,
            f"a product with the damped {self.name} Hessian during a {self.method} solve",
            "An example's loss or its derivatives overflow at the fitted weights (model "
            "outputs too large for the dtype?), or the iterates diverged.")

    def solve(self, rhs):
        require_finite(rhs, self.name, f"a right-hand side of the {self.name} solve")
        tol = max(self.tol, 100 * torch.finfo(rhs.dtype).eps)
        rhs_norm = rhs.norm(dim=1)
        x = torch.zeros_like(rhs)
        n_iter = torch.zeros(len(rhs), dtype=torch.long)
        residual = torch.where(rhs_norm > 0, 1.0, 0.0).to(torch.float64)
        inner_tol = torch.full((len(rhs),), tol, dtype=torch.float64)
        stalled = torch.zeros(len(rhs), dtype=torch.bool)
        for _ in range(_MAX_RESTARTS):
            todo = (residual > tol) & (n_iter < self.max_iter) & ~stalled
            if not todo.any():
                break
            rows = todo.nonzero().flatten()
            run = _METHODS[self.method]
            extra = {} if self.precondition is None else {"precondition": self.precondition}
            x_new, steps = run(self._apply, rhs[rows], x[rows], inner_tol[rows],
                               self.max_iter - n_iter[rows], self.verbose, self.name, **extra)
            n_iter[rows] += steps
            new_residual = ((self._apply(x_new) - rhs[rows]).norm(dim=1)
                            / rhs_norm[rows]).to(torch.float64)
            better = new_residual < residual[rows]
            x[rows[better]] = x_new[better]
            residual[rows[better]] = new_residual[better]
            # A run that iterated without improving has stalled; one that took no step
            # only met its inner tolerance at the start and is asked for more below.
            stalled[rows[~better & (steps > 0)]] = True
            # Ask the next run for more, by at least a factor 10.
            factor = torch.clamp(tol / residual[rows], max=0.1)
            inner_tol[rows] = torch.clamp(inner_tol[rows] * factor,
                                          min=torch.finfo(torch.float64).eps)
        require_finite(x, self.name, f"the {self.method} solution of the damped "
                       f"{self.name} Hessian system")
        converged = residual <= tol
        for index in range(len(rhs)):
            self.history_.append({"n_iter": int(n_iter[index]),
                                  "residual": float(residual[index]),
                                  "converged": bool(converged[index])})
        if not converged.all():
            worst = int(torch.argmax(residual))
            warnings.warn(
                f"{int((~converged).sum())} of {len(rhs)} {self.method} solves of the "
                f"damped {self.name} Hessian stopped short: the worst after "
                f"{int(n_iter[worst])} iterations with relative residual "
                f"{float(residual[worst]):.3g}, above tol={tol:g}. Raise max_iter or the "
                "damping, or use iterative_solver='minres' for an indefinite Hessian.",
                ConvergenceWarning,
                stacklevel=3,
            )
        return x


def _dot(a, b):
    return (a * b).sum(dim=1)


def _safe(values):
    return torch.where(values == 0, torch.ones_like(values), values)


def _minres(apply, b, x0, tol, budget, verbose, name):
    """Batched MINRES (Paige and Saunders), no preconditioner; one column per row."""
    x = x0.clone()
    r1 = b - apply(x)
    beta1 = r1.norm(dim=1)
    b_norm = b.norm(dim=1)
    y, r2 = r1.clone(), r1.clone()
    zeros = torch.zeros_like(beta1)
    beta, oldb, dbar, epsln = beta1.clone(), zeros.clone(), zeros.clone(), zeros.clone()
    phibar, cs, sn = beta1.clone(), -torch.ones_like(beta1), zeros.clone()
    w, w2 = torch.zeros_like(b), torch.zeros_like(b)
    active = beta1 > tol.to(beta1) * b_norm
    steps = torch.zeros(len(b), dtype=torch.long)
    max_iter = int(budget.max())
    for itn in progress(range(1, max_iter + 1), verbose, max_iter, f"{name} minres"):
        if not active.any():
            break
        v = y / _safe(beta)[:, None]
        y = torch.zeros_like(v)
        y[active] = apply(v[active])
        if itn >= 2:
            y = y - (beta / _safe(oldb))[:, None] * r1
        alfa = _dot(v, y)
        y = y - (alfa / _safe(beta))[:, None] * r2
        r1, r2 = r2, y
        oldb, beta = beta, y.norm(dim=1)
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.clamp(torch.sqrt(gbar**2 + beta**2), min=torch.finfo(b.dtype).eps)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        x = x + torch.where(active, phi, zeros)[:, None] * w
        steps += active.long()
        # phibar estimates ||b - A x||; beta = 0 means the Krylov space is exhausted.
        active = (active & (phibar > tol.to(phibar) * b_norm) & (beta > 0)
                  & (steps < budget))
    return x, steps


def _cg_on(apply, b, x0, tol, budget, verbose, name, target_norm, label, precondition=None):
    """Batched (preconditioned) CG; ``precondition`` applies ``M^-1`` to rows."""
    x = x0.clone()
    r = b - apply(x)
    residual = r.norm(dim=1)
    active = residual > tol.to(residual) * target_norm
    z = r if precondition is None else _preconditioned(precondition, r, active)
    direction = z.clone()
    rs = _dot(r, z)
    steps = torch.zeros(len(b), dtype=torch.long)
    max_iter = int(budget.max())
    for _ in progress(range(max_iter), verbose, max_iter, f"{name} {label}"):
        if not active.any():
            break
        image = torch.zeros_like(direction)
        image[active] = apply(direction[active])
        curvature = _dot(direction, image)
        # A non-positive curvature direction: plain CG cannot continue on this row.
        active = active & (curvature > 0)
        alpha = torch.where(active, rs / _safe(curvature), torch.zeros_like(rs))
        x = x + alpha[:, None] * direction
        r = r - alpha[:, None] * image
        steps += active.long()
        active = active & (r.norm(dim=1) > tol.to(rs) * target_norm) & (steps < budget)
        z = r if precondition is None else _preconditioned(precondition, r, active)
        rs_new = _dot(r, z)
        direction = z + (rs_new / _safe(rs))[:, None] * direction
        rs = rs_new
    return x, steps


def _preconditioned(precondition, r, active):
    """``M^-1 r`` on the active rows (zeros elsewhere)."""
    z = torch.zeros_like(r)
    if bool(active.any()):
        z[active] = precondition(r[active]).to(r.dtype)
    return z


def _cg(apply, b, x0, tol, budget, verbose, name, precondition=None):
    label = "cg" if precondition is None else "preconditioned cg"
    return _cg_on(apply, b, x0, tol, budget, verbose, name, b.norm(dim=1), label,
                  precondition)


def _cg_normal(apply, b, x0, tol, budget, verbose, name):
    rhs = apply(b)

    def normal(vectors):
        return apply(apply(vectors))

    return _cg_on(normal, rhs, x0, tol, budget, verbose, name, rhs.norm(dim=1),
                  "cg_normal")


_METHODS = {"minres": _minres, "cg": _cg, "cg_normal": _cg_normal}


def truncated_cg(apply, rhs, max_iter, rtol):
    """CG for one system ``H x = rhs`` (1-D), for Newton-CG steps in training.

    The package's one CG (:func:`_cg_on`, the solver the estimator uses), on a single
    right-hand side from zero: it stops at relative residual ``rtol``, after
    ``max_iter`` products, or where ``H`` shows non-positive curvature along a direction
    (keeping the iterate reached). Returns ``None`` when that happens on the very first
    direction, that is, when no descent step was found.
    """
    tol = torch.tensor(rtol, dtype=rhs.dtype)
    budget = torch.tensor([max_iter])

    def apply_rows(vectors):
        return torch.stack([apply(vector) for vector in vectors])

    x, _ = _cg_on(apply_rows, rhs[None], torch.zeros_like(rhs)[None], tol, budget,
                  False, "training", rhs.norm()[None], "cg")
    x = x[0]
    return x if bool(x.any()) else (None if bool(rhs.any()) else x)


"""Backends: how ``(C + diag(shift)) x = b`` is solved for a stage's curvature ``C``.

A backend is one class that registers itself under a name (``hessian="<name>"``) by
subclassing :class:`Backend` with ``name=...``. It receives a
:class:`~skmsif._curvature.CurvatureOperator` (the curvature ``C`` of one stage on its data,
which knows the parameter blocks and the model) and the diagonal ``shift`` (the damping,
plus ``2 alpha`` on ``W`` in Case 2), does its expensive work once at construction (in
``fit``), and answers :meth:`Backend.solve` for a batch of right-hand sides. The
estimator never branches on the backend.
"""

import functools
from dataclasses import dataclass

import torch

from ._solvers import ExactSolver, IdentitySolver, IterativeSolver, LowRankSolver


@dataclass(frozen=True)
class SolveSettings:
    """The estimator's settings a backend may read."""

    tol: float = 1e-10
    max_iter: int = 1000
    iterative_solver: str = "minres"
    rank: int = 100
    random_state: object = None
    exact_max_memory: int = 2**31
    verbose: int = 0
    preconditioner: str = None


class Backend:
    """Base class of the solvers; ``Backend.registry`` maps names to classes.

    Parameters
    ----------
    operator : skmsif._curvature.CurvatureOperator
        The stage's curvature on its data.
    shift : torch.Tensor of shape (p,)
        Added to the diagonal.
    settings : SolveSettings
    damping_name : str
        The estimator parameter that sets the damping, named in messages.

    Attributes
    ----------
    solver : object
        The underlying solver; its fitted attributes (``history_``, ``eigenvalues_``, ...)
        are readable on the backend too.
    """

    registry = {}
    name = None
    #: The curvature this backend works with when the user asked for ``"auto"``.
    default_curvature = "hessian"
    #: Curvatures this backend can approximate.
    curvatures = ("hessian", "gauss_newton")

    def __init_subclass__(cls, name=None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            Backend.registry[name] = cls

    def __init__(self, operator, shift, settings, damping_name):
        self.operator = operator
        self.shift = shift
        self.settings = settings
        self.damping_name = damping_name
        self.solver = None

    @classmethod
    def check_size(cls, n_params, settings):
        """Refuse, before any work, a problem the backend cannot hold."""

    def solve(self, rhs):
        """``(C + diag(shift))^-1`` times each row of ``rhs`` ``(k, p)``."""
        return self.solver.solve(rhs)

    def solve_and_map(self, rhs, linear_map):
        """``x = solve(rhs)`` and ``linear_map(x)``; backends may reuse work across calls.

        Case 1 needs ``H_WTheta x`` for the finetune solution ``x``; ``linear_map`` is that
        product and the same map is passed on every call of one fitted estimator.
        """
        solution = self.solve(rhs)
        return solution, linear_map(solution)

    def __getattr__(self, attribute):
        solver = self.__dict__.get("solver")
        if attribute.endswith("_") and not attribute.startswith("_") and solver is not None:
            return getattr(solver, attribute)
        raise AttributeError(attribute)

    def __getstate__(self):
        return dict(self.__dict__)

    def __setstate__(self, state):
        self.__dict__.update(state)


class IdentityBackend(Backend, name="identity"):
    """The paper's Fig. 4 baseline: both inverse curvatures replaced by the identity."""

    def __init__(self, operator, shift, settings, damping_name):
        super().__init__(operator, shift, settings, damping_name)
        self.solver = IdentitySolver()


class ExactBackend(Backend, name="exact"):
    """Dense curvature in float64 and its eigendecomposition, computed once."""

    @classmethod
    def check_size(cls, n_params, settings):
        needed = 3 * n_params**2 * 8
        if needed > settings.exact_max_memory:
            raise ValueError(
                f"hessian='exact' needs dense {n_params} x {n_params} float64 matrices "
                f"(about {needed / 2**30:.2f} GiB with the eigendecomposition), over "
                f"exact_max_memory={settings.exact_max_memory} bytes. Use hessian='cg' "
                "(curvature-vector products, no dense matrix), 'ekfac', or raise "
                "exact_max_memory."
            )

    def __init__(self, operator, shift, settings, damping_name):
        super().__init__(operator, shift, settings, damping_name)
        self.solver = ExactSolver(operator.dense(), shift, operator.name, damping_name)


class IterativeBackend(Backend, name="cg"):
    """Krylov iterations on curvature-vector products; no dense matrix.

    With ``settings.preconditioner`` (``"kfac"`` or ``"ekfac"``, CG only), the
    Kronecker factors of the stage's Gauss-Newton matrix are fitted once, on the same
    data as the products, and the damped approximation's inverse preconditions every CG
    iteration (``preconditioner_``).
    """

    def __init__(self, operator, shift, settings, damping_name):
        super().__init__(operator, shift, settings, damping_name)
        # Products in float32 cannot bring a residual below about 1e-5: the floor follows
        # the dtype of the passes, not that of the float64 solve.
        floor = 100 * torch.finfo(operator.objective.point.dtype).eps
        precondition = None
        if settings.preconditioner is not None:
            self.preconditioner_ = fit_kronecker(
                operator, settings.preconditioner == "ekfac", settings.verbose)
            precondition = functools.partial(self.preconditioner_.solve, shift=shift)

        self.solver = IterativeSolver(operator.matvec, shift, settings.iterative_solver,
                                      max(settings.tol, floor), settings.max_iter,
                                      operator.name, settings.verbose, precondition)


class LowRankBackend(Backend, name="lowrank"):
    """The ``rank`` eigenpairs of largest magnitude, by Lanczos, plus the damping elsewhere.

    ``solve(b) = V diag(1/lambda) V^T b + (b - V V^T b) / shift``: the kept eigenpairs
    ``(lambda, V)`` of the damped curvature (Lanczos, computed once in ``fit``) and, on the
    dropped part of the spectrum, whose eigenvalues are the smallest in magnitude, only the
    damping (their undamped eigenvalues taken as zero). Without that remainder term the
    dropped part of ``b`` would be lost entirely, which is far from a converged solve when
    most of ``b`` lies there. Exact at full rank, and whenever the undamped curvature has
    rank at most ``rank``.

    In Case 1 the finetune solution's part in the span of ``V`` maps through ``H_WTheta``
    as a combination of the ``H_WTheta v_j``, computed once and reused for every test
    point; the remainder is mapped directly (one product for all test points).
    """

    def __init__(self, operator, shift, settings, damping_name):
        super().__init__(operator, shift, settings, damping_name)
        self.solver = LowRankSolver(operator.matvec, shift, settings.rank,
                                    settings.random_state, operator.name, settings.verbose)
        self._mapped_basis = None
        self._full_rank = len(self.solver.eigenvalues_) >= shift.numel()

    def _parts(self, rhs):
        solver = self.solver
        vectors = solver.eigenvectors_
        wide = rhs.to(torch.float64)
        projections = wide @ vectors.T
        coefficients = projections / solver.eigenvalues_
        remainder = None
        if not self._full_rank:
            remainder = (wide - projections @ vectors) / self.shift.to(torch.float64)
        return coefficients, remainder

    def solve(self, rhs):
        coefficients, remainder = self._parts(rhs)
        solution = coefficients @ self.solver.eigenvectors_
        if remainder is not None:
            solution = solution + remainder
        return solution.to(rhs.dtype)

    def solve_and_map(self, rhs, linear_map):
        if self._mapped_basis is None:
            self._mapped_basis = linear_map(self.solver.eigenvectors_.to(rhs.dtype))
        coefficients, remainder = self._parts(rhs)
        solution = coefficients @ self.solver.eigenvectors_
        mapped = coefficients.to(self._mapped_basis.dtype) @ self._mapped_basis
        if remainder is not None:
            solution = solution + remainder
            mapped = mapped + linear_map(remainder.to(rhs.dtype))
        return solution.to(rhs.dtype), mapped


def backend_class(name):
    """The backend registered under ``name``."""
    try:
        return Backend.registry[name]
    except KeyError:
        raise ValueError(
            f"hessian={name!r} is not a backend; choose one of {sorted(Backend.registry)}."
        ) from None


class KroneckerBackend(Backend, name="kfac"):
    """K-FAC: a Kronecker-factored Gauss-Newton matrix per ``Linear``/``Conv2d`` layer.

    The factors (``skmsif._kfac``) are computed once, in ``fit``, in one pass over the
    stage's data (two for EK-FAC); a solve is a few products in each layer's eigenbasis.
    Parameters outside those layers use the exact diagonal of the Gauss-Newton matrix.
    Approximates the Gauss-Newton matrix, so ``curvature="auto"`` resolves to
    ``"gauss_newton"`` for it.
    """

    default_curvature = "gauss_newton"
    curvatures = ("gauss_newton",)
    eigen_correction = False

    def __init__(self, operator, shift, settings, damping_name):
        super().__init__(operator, shift, settings, damping_name)
        self.solver = fit_kronecker(operator, self.eigen_correction, settings.verbose)

    def solve(self, rhs):
        return self.solver.solve(rhs, self.shift)


class EigenCorrectedKroneckerBackend(KroneckerBackend, name="ekfac"):
    """EK-FAC: K-FAC's eigenbasis with eigenvalues fitted to the Gauss-Newton matrix."""

    eigen_correction = True


def fit_kronecker(operator, eigen_correction, verbose):
    """K-FAC (or EK-FAC) factors of ``operator``'s Gauss-Newton matrix on its data."""
    from ._kfac import KroneckerCurvature, loss_factor_for

    objective = operator.objective
    adapter = objective.adapter
    return KroneckerCurvature.fit(
        objective.module, objective.state, objective.free, operator.batches,
        adapter.outputs, loss_factor_for(adapter.loss_spec),
        eigen_correction=eigen_correction, n_examples=operator.n_examples,
        verbose=verbose)

"""What happens to the test loss if pretrain examples are removed: first order or Newton.

:meth:`MultiStageInfluenceEstimator.removal_effect` delegates here. Notation as in
``doc/guide/influence.md`` and ``doc/guide/removal.md``: pretrain data ``Z`` (``m``
examples, per-example loss ``g``), pretrain weights ``theta = (W, U)`` at their trained
values ``theta_bar``, finetune data ``X`` (loss ``f``), finetune head ``Theta``, dampings
``d_p`` and ``d_f`` (the estimator's ``pretrain_damping`` and ``finetune_damping``).

For a group ``S`` of pretrain examples (a single example is a group of one):

* ``newton_steps = 0``: ``-sum_{i in S} I(z_i) / m`` from one scoring pass.
* ``newton_steps = k >= 1``: ``k`` Newton steps from ``theta_bar`` on

      G_S(theta) = (1 / (m - |S|)) sum_{j not in S} g(z_j; theta) + (d_p / 2) ||theta||^2
                   - r . theta,

  ``r`` the gradient of the full-data objective (``S`` empty) at ``theta_bar``: zero for
  weights trained to convergence on it; otherwise the linear term makes ``theta_bar`` its
  exact minimiser, the assumption the influence function itself makes. The Hessian of
  ``G_S`` is the estimator's damped pretrain Hessian (on the remaining examples). Then
  the finetune stage is re-solved at the new embedding ``W_S`` (Case 1, over ``Theta``:
  ``F(W_S, Theta) + (d_f / 2) ||Theta||^2 - r_f . Theta``; Case 2, over ``(W, Theta)``:
  ``F + (d_f / 2) ||(W, Theta)||^2 + alpha ||W - W_S||^2 - r_f . (W, Theta)``, ``r_f``
  the same correction), by Newton steps with a backtracking line search from the
  finetuned weights until its gradient has shrunk by ``FINETUNE_RTOL``, and the summed
  test loss is evaluated exactly there, minus its value at the finetuned weights.

Each Newton step solves with the estimator's own backend of that stage: ``"exact"``
forms the dense curvature at the current point, ``"cg"`` runs the estimator's Krylov
method on curvature-vector products at the current point, every other backend reuses its
fitted solve (the curvature at the trained weights, with the removed examples) as an
approximation (chord steps).
"""

import math
import warnings
from numbers import Integral

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.exceptions import ConvergenceWarning
from torch.func import grad

from ._backends import ExactBackend, IterativeBackend
from ._data import LoaderSource
from ._progress import progress
from ._solvers import FORWARD_MODE_LOCK, IterativeSolver

__all__ = ["removal_effect"]

# The finetune stage is re-solved until its gradient's norm is this fraction of its value
# at the finetuned weights (or down to the floor rounding sets), in at most this many
# Newton steps.
FINETUNE_RTOL = 1e-10
FINETUNE_MAX_STEPS = 50


# --------------------------------------------------------------------------- checks


def _is_integer(value):
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (Integral, np.integer)):
        return True
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim == 0:
        dtype = value.dtype
        if isinstance(value, torch.Tensor):
            return not dtype.is_floating_point and not dtype.is_complex \
                and dtype != torch.bool
        return np.issubdtype(dtype, np.integer)
    return False


def _is_group(value):
    if isinstance(value, (str, bytes, dict)):
        return False
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.ndim >= 1
    return isinstance(value, (list, tuple, range))


def _as_items(indices):
    """``indices`` as a list of scalars or of groups (each a list of scalars)."""
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    if isinstance(indices, np.ndarray):
        if indices.ndim == 0:
            raise TypeError(
                "indices must be a 1-D sequence of pretrain positions or a list of groups "
                f"(lists of positions); got a scalar {indices!r}."
            )
        if indices.ndim > 2:
            raise ValueError(
                f"indices must be 1-D (single removals) or a list of groups; got an array "
                f"of shape {indices.shape}."
            )
        if indices.size and not (np.issubdtype(indices.dtype, np.integer)
                                 and indices.dtype != bool):
            raise TypeError(
                f"indices must hold integers (positions in Z); got an array of dtype "
                f"{indices.dtype}."
            )
        return [list(row) for row in indices] if indices.ndim == 2 else list(indices)
    if isinstance(indices, (str, bytes, dict)) or not hasattr(indices, "__iter__"):
        raise TypeError(
            "indices must be a 1-D sequence of pretrain positions or a list of groups "
            f"(lists of positions); got {type(indices).__name__}."
        )
    return list(indices)


def check_indices(indices, m):
    """The entries of ``indices`` as sorted ``int64`` arrays, one per removal.

    A 1-D sequence of integers is one single removal per entry; a sequence of sequences
    (or a 2-D array) is one group per entry, removed together.
    """
    items = _as_items(indices)
    if not items:
        raise ValueError("indices is empty: pass at least one pretrain position or group.")
    groups_given = [_is_group(item) for item in items]
    if any(groups_given) and not all(groups_given):
        position = groups_given.index(not groups_given[0])
        raise ValueError(
            f"indices mixes single positions and groups (indices[0] is "
            f"{'a group' if groups_given[0] else 'a position'}, indices[{position}] is "
            f"{'a group' if groups_given[position] else 'a position'}); pass a 1-D "
            "sequence of positions, or a list of groups, e.g. [[3], [5, 8]]."
        )
    entries = []
    for entry, item in enumerate(items):
        members = _as_items(item) if groups_given[0] else [item]
        where = f"indices[{entry}]"
        if not members:
            raise ValueError(f"{where} is an empty group; every group needs at least one "
                             "pretrain position.")
        for member in members:
            if not _is_integer(member):
                raise TypeError(
                    f"indices must hold integers (positions in Z); {where} holds "
                    f"{member!r} ({type(member).__name__})."
                )
        values = np.array([int(member) for member in members], dtype=np.int64)
        bad = values[(values < 0) | (values >= m)]
        if bad.size:
            raise ValueError(
                f"indices out of range: {where} holds {bad[:5].tolist()}, but Z has {m} "
                f"examples, so positions must lie in [0, {m - 1}]."
            )
        unique, counts = np.unique(values, return_counts=True)
        if (counts > 1).any():
            raise ValueError(
                f"indices: {where} holds {unique[counts > 1][:5].tolist()} more than once; "
                "a group removes each example once."
            )
        entries.append(unique)
    return entries


def check_newton_steps(newton_steps):
    if isinstance(newton_steps, (bool, np.bool_)) or not isinstance(
            newton_steps, (Integral, np.integer)) or newton_steps < 0:
        raise ValueError(
            f"newton_steps must be a non-negative int (0: first order, -I/m); got "
            f"{newton_steps!r}."
        )
    return int(newton_steps)


# --------------------------------------------------------------------------- helpers


def _index_mask(n, index):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index.cpu()] = True
    return mask


def _names_in(objective, index):
    """The free parameter names of ``objective`` whose coordinates are in ``index``."""
    mask = _index_mask(objective.n_params, index)
    names = []
    for name in objective.free:
        inside = mask[objective.offsets([name])]
        if inside.all():
            names.append(name)
        elif inside.any():
            raise RuntimeError(f"parameter {name!r} is split between blocks")
    return names


def _summed_gradient(objective, data, batch_size, device, indices=None):
    """Gradient of the summed loss over ``data`` (its ``indices``) at the objective's point."""
    total = torch.zeros_like(objective.point)
    for inputs, targets in data.batches(batch_size, device, indices):
        total += grad(lambda flat: objective.losses(flat, inputs, targets).sum())(
            objective.point)
    return total


def _summed_loss(objective, flat, data, batch_size, device):
    total = 0.0
    with torch.no_grad():
        for inputs, targets in data.batches(batch_size, device):
            total += float(objective.losses(flat, inputs, targets).sum())
    return total


def _solve_dense(matrix, rhs, name, damping_name):
    """``matrix^-1 rhs`` for a symmetric damped curvature, in float64."""
    matrix = matrix.to(torch.float64)
    matrix = (matrix + matrix.T) / 2
    solution, info = torch.linalg.solve_ex(matrix, rhs.to(torch.float64)[:, None])
    solution = solution[:, 0]
    if int(info) != 0 or not torch.isfinite(solution).all():
        raise ValueError(
            f"The damped {name} Hessian of a Newton step of removal_effect is singular; "
            f"increase {damping_name}."
        )
    return solution.to(rhs.dtype)


def _backend_kind(backend):
    if isinstance(backend, ExactBackend):
        return "exact"
    if isinstance(backend, IterativeBackend):
        return "cg"
    return "fitted"


# --------------------------------------------------------------------------- the problem


class _RemovalProblem:
    """Everything a Newton-refined removal needs, computed once and shared by entries.

    Built in the main process from the fitted state; picklable, so that joblib workers
    can run :meth:`effect` on entries of their own.
    """

    def __init__(self, state, test_data, newton_steps):
        s = state.settings
        self.k = newton_steps
        self.batch_size, self.device = state.batch_size, state.device
        self.embedding, self.alpha = state.embedding, state.alpha
        self.Z, self.X, self.test_data = state.Z, state.X, test_data
        self.m = len(state.Z)
        self.solve_settings = (s["iterative_solver"], s["tol"], s["max_iter"])

        # Pretrain stage.
        self.pretrain = state.pretrain
        self.pre_backend = state.pretrain_backend
        self.pre_kind = _backend_kind(state.pretrain_backend)
        self.pre_shift = state.pretrain_backend.shift
        self.pre_curvature = state.pretrain_operator.curvature
        sample = state.pretrain_operator.indices
        self.sample = (torch.arange(self.m) if sample is None
                       else torch.as_tensor(sample).cpu().to(torch.long))
        self.shared_pre_index = state.shared_pre_index
        self.mean_gradient_bar = state.pretrain.mean_gradient(self.Z, self.batch_size,
                                                              self.device)
        self.residual_pre = self.mean_gradient_bar + self.pre_shift * self.pretrain.point
        self.pre_damped_dense = None
        if self.pre_kind == "exact":
            solver = state.pretrain_backend.solver
            vectors = solver.eigenvectors_
            # The fitted damped Hessian on the sample, at theta_bar, without a new pass.
            dense = (vectors.T * solver.eigenvalues_) @ vectors
            self.pre_damped_dense = ((dense + dense.T) / 2).cpu().numpy()

        # Finetune stage.
        self.finetune = state.finetune
        self.fin_backend = state.finetune_backend
        self.fin_kind = _backend_kind(state.finetune_backend)
        self.fin_shift = state.finetune_backend.shift
        self.fin_curvature = state.finetune_backend.operator.curvature
        self.shared_fin_index = state.shared_fin_index
        self.theta_index = state.theta_index
        self.fin_adapter = state.finetune_adapter
        self.features_cached = bool(state.public.get("features_cached_", False))
        self.theta_names = _names_in(self.finetune, self.theta_index)
        self.shared_fin_names = _names_in(self.finetune, self.shared_fin_index)
        self.w_bar = self.pretrain.point[self.shared_pre_index]
        self.base_test_loss = _summed_loss(self.finetune, self.finetune.point, test_data,
                                           self.batch_size, self.device)
        self.residual_fin = None
        self.residual_fin = self._finetune_gradient(*self._finetune_space(self.w_bar),
                                                    self.w_bar)

    # ------------------------------------------------------------------- pretrain

    def _iterative(self, hvp, shift, name):
        method, tol, max_iter = self.solve_settings
        return IterativeSolver(hvp, shift, method, tol, max_iter, name)

    def _pretrain_direction(self, objective, group, gradient, first):
        """``(curvature of G_S + d_p I)^-1 gradient`` at the objective's point."""
        if self.pre_kind == "fitted":
            return self.pre_backend.solve(gradient[None])[0]
        keep = ~_index_mask(self.m, torch.as_tensor(group))[self.sample]
        remaining = self.sample[keep]
        if len(remaining) == 0:
            raise ValueError(
                "indices: a group removes every example the pretrain Hessian is computed "
                "on (hessian_samples); nothing is left to form it."
            )
        if self.pre_kind == "cg":
            def hvp(vectors):
                return objective.curvature_vectors(vectors, self.Z, self.batch_size,
                                                   self.device, remaining,
                                                   self.pre_curvature)

            return self._iterative(hvp, self.pre_shift, "pretrain").solve(
                gradient[None])[0]
        if first:
            # At theta_bar: the fitted sample curvature minus the removed examples'.
            removed = self.sample[~keep]
            n_sample = len(self.sample)
            shift = torch.diag(self.pre_shift.to(torch.float64))
            # A copy: joblib may hand workers the array as a read-only memmap.
            dense = torch.from_numpy(np.array(self.pre_damped_dense)).to(self.device) - shift
            if len(removed):
                removed_dense = objective.dense_hessian(
                    self.Z, self.batch_size, self.device, removed,
                    curvature=self.pre_curvature).to(torch.float64)
                dense = (n_sample * dense - len(removed) * removed_dense) / len(remaining)
            matrix = dense + shift
        else:
            matrix = objective.dense_hessian(
                self.Z, self.batch_size, self.device, remaining,
                curvature=self.pre_curvature).to(torch.float64) + torch.diag(
                    self.pre_shift.to(torch.float64))
        return _solve_dense(matrix, gradient, "pretrain", "pretrain_damping")

    def _pretrain_newton(self, group):
        """``k`` Newton steps on ``G_S`` from ``theta_bar``; the new pretrain weights."""
        count = len(group)
        if count >= self.m:
            raise ValueError(
                f"indices: a group of {count} removes every pretrain example; nothing is "
                "left to retrain on."
            )
        rows = torch.as_tensor(group)
        objective = self.pretrain
        norms = []
        for step in range(self.k):
            removed = _summed_gradient(objective, self.Z, self.batch_size, self.device,
                                       rows)
            if step == 0:
                # Equal to the general form below at theta_bar, without its cancellation.
                gradient = (count * self.mean_gradient_bar - removed) / (self.m - count)
            else:
                mean = objective.mean_gradient(self.Z, self.batch_size, self.device)
                gradient = ((self.m * mean - removed) / (self.m - count)
                            + self.pre_shift * objective.point - self.residual_pre)
            norms.append(float(gradient.norm()))
            direction = self._pretrain_direction(objective, group, gradient, step == 0)
            # The passes keep the estimator's dtype (float32 for float32 models).
            objective = objective.with_point(
                objective.point - direction.to(objective.point.dtype))
        # Below the rounding of the passes' dtype a gradient cannot shrink further.
        terms = float(self.mean_gradient_bar.norm()) + float(
            (self.pre_shift * self.pretrain.point).norm())
        floor = 1e3 * torch.finfo(self.pretrain.point.dtype).eps * max(terms, 1.0)
        return objective.point, _growing(norms, floor)

    # ------------------------------------------------------------------- finetune

    def _finetune_space(self, w_new):
        """The finetune objective over the parameters re-solved, at embedding ``w_new``,
        and its data; its point is the finetuned value of those parameters."""
        flat = self.finetune.point.clone()
        if self.embedding == "updated":
            return self.finetune, self.X
        flat[self.shared_fin_index] = w_new.to(flat.dtype)
        state = self.finetune.with_point(flat).state
        if self.features_cached:
            from ._estimator import _cached_head

            cached = _cached_head(self.fin_adapter.module, state, self.shared_fin_names,
                                  self.theta_names, self.fin_adapter.loss_spec, self.X,
                                  self.batch_size, self.device)
            if cached is not None:
                return cached
        from ._curvature import Objective

        return Objective(self.fin_adapter, self.theta_names, state), self.X

    def _finetune_gradient(self, objective, data, w_new):
        """Gradient of the (tilted) finetune objective at the objective's point."""
        gradient = (objective.mean_gradient(data, self.batch_size, self.device)
                    + self.fin_shift * objective.point)
        if self.embedding == "updated":
            gradient[self.shared_fin_index] -= 2 * self.alpha * w_new
        if self.residual_fin is not None:
            gradient = gradient - self.residual_fin
        return gradient

    def _finetune_direction(self, objective, data, gradient):
        if self.fin_kind == "fitted":
            return self.fin_backend.solve(gradient[None])[0]
        if self.fin_kind == "cg":
            def hvp(vectors):
                return objective.curvature_vectors(vectors, data, self.batch_size,
                                                   self.device, None, self.fin_curvature)

            return self._iterative(hvp, self.fin_shift, "finetune").solve(gradient[None])[0]
        matrix = objective.dense_hessian(data, self.batch_size, self.device,
                                         curvature=self.fin_curvature).to(torch.float64)
        matrix = matrix + torch.diag(self.fin_shift.to(torch.float64))
        # Where a large removal takes the finetune weights through a region of negative
        # curvature, |eigenvalues| keep the step a descent direction (the Newton step
        # wherever the damped curvature is positive definite).
        values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
        magnitudes = values.abs()
        if not magnitudes.min() > magnitudes.max() * len(values) * torch.finfo(
                torch.float64).eps:
            raise ValueError(
                "The damped finetune Hessian of a Newton step of removal_effect is "
                "singular; increase finetune_damping."
            )
        coefficients = vectors.T @ gradient.to(torch.float64)
        return (vectors @ (coefficients / magnitudes)).to(gradient.dtype)

    def _finetune_value(self, objective, data, w_new):
        """The (tilted) finetune objective at the objective's point."""
        total = 0.0
        with torch.no_grad():
            for inputs, targets in data.batches(self.batch_size, self.device):
                total += float(objective.losses(objective.point, inputs, targets).sum())
            x = objective.point
            # The shift carries d_f, plus 2 alpha on W in Case 2: with the linear term
            # below, alpha ||W - w_new||^2 up to a constant.
            value = total / len(data) + float((self.fin_shift * x * x).sum()) / 2
            if self.embedding == "updated":
                value -= 2 * self.alpha * float((x[self.shared_fin_index] * w_new).sum())
            if self.residual_fin is not None:
                value -= float((self.residual_fin * x).sum())
        return value

    def _finetune_resolve(self, w_new):
        """The finetune weights re-optimised at the new embedding ``w_new``, and whether
        that converged.

        Newton steps from the finetuned weights with a backtracking line search (a step
        is halved until the objective decreases enough), until the gradient's norm is
        ``FINETUNE_RTOL`` times its first value, or down to the floor rounding sets.
        Through regions of negative curvature, ``"exact"`` takes the eigenvalues'
        magnitudes and the other backends a gradient step, so that every step descends.
        """
        objective, data = self._finetune_space(w_new)
        eps = torch.finfo(objective.point.dtype).eps
        gradient = self._finetune_gradient(objective, data, w_new)
        # Rounding leaves a gradient of about eps times the size of its terms.
        target = max(FINETUNE_RTOL * float(gradient.norm()),
                     1e3 * eps * (1 + float((self.fin_shift * objective.point).norm())))
        value = self._finetune_value(objective, data, w_new)
        converged = float(gradient.norm()) <= target
        for _ in range(FINETUNE_MAX_STEPS):
            if converged:
                break
            direction = self._finetune_direction(objective, data, gradient)
            slope = float(gradient @ direction)
            if not slope > 0:
                # Not a descent direction (an indefinite curvature, from a Krylov or a
                # fitted solve): a gradient step instead.
                direction, slope = gradient, float(gradient @ gradient)
            step, accepted = 1.0, None
            slack = 16 * eps * (1 + abs(value))
            while step >= 2.0**-30:
                trial = objective.with_point(
                    objective.point - (step * direction).to(objective.point.dtype))
                trial_value = self._finetune_value(trial, data, w_new)
                if trial_value <= value - 1e-4 * step * slope + slack:
                    accepted = trial
                    break
                step /= 2
            if accepted is None:
                break
            objective, value = accepted, trial_value
            gradient = self._finetune_gradient(objective, data, w_new)
            converged = float(gradient.norm()) <= target
        if self.embedding == "updated":
            return objective.point, converged
        flat = self.finetune.point.clone()
        flat[self.shared_fin_index] = w_new.to(flat.dtype)
        flat[self.theta_index] = objective.point.to(flat.dtype)
        return flat, converged

    # ------------------------------------------------------------------- one entry

    def effect(self, group):
        """The entry's effect; whether the pretrain Newton steps left the gradient larger
        than they found it; whether the finetune stage was re-solved."""
        theta, growing = self._pretrain_newton(group)
        finetuned, resolved = self._finetune_resolve(theta[self.shared_pre_index])
        loss = _summed_loss(self.finetune, finetuned, self.test_data, self.batch_size,
                            self.device)
        if not math.isfinite(loss):
            raise ValueError(
                f"removal_effect: removing pretrain examples {group[:5].tolist()}"
                f"{'...' if len(group) > 5 else ''} gives a non-finite test loss after the "
                "Newton steps (they diverged); increase the dampings, or use fewer "
                "newton_steps."
            )
        return loss - self.base_test_loss, growing, resolved


def _growing(norms, floor=0.0):
    """Whether the Newton steps left the gradient larger than they found it: the start
    lies outside the region where they converge (known from ``newton_steps >= 2``).
    A last norm below ``floor`` (the passes' rounding) is converged, whatever the first."""
    return len(norms) >= 2 and norms[-1] > max(norms[0], floor)


def _run_entries(problem, groups, single_thread):
    """Effects of some entries, with the warnings they raised (returned, not shown)."""
    previous = torch.get_num_threads()
    if single_thread:
        torch.set_num_threads(1)
    try:
        # Curvature products use forward mode, whose state is per process (threads of a
        # joblib threading backend take turns).
        with FORWARD_MODE_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            values = [problem.effect(group) for group in groups]
    finally:
        if single_thread:
            torch.set_num_threads(previous)
    return values, [(warning.category, str(warning.message)) for warning in caught]


# --------------------------------------------------------------------------- entry point


def removal_effect(state, x_test, indices, newton_steps):
    """Predicted change of the summed test loss for each entry of ``indices``."""
    newton_steps = check_newton_steps(newton_steps)
    m = len(state.Z)
    groups = check_indices(indices, m)
    test_data = state.test_data(x_test)
    if newton_steps == 0:
        scores = state.influence(test_data, summed=True)[0]
        return np.array([-scores[group].sum() / m for group in groups], dtype=np.float64)

    too_large = [entry for entry, group in enumerate(groups) if len(group) >= m]
    if too_large:
        raise ValueError(
            f"indices[{too_large[0]}] removes all {m} pretrain examples; nothing is left "
            "to retrain on."
        )
    with FORWARD_MODE_LOCK:
        problem = _RemovalProblem(state, test_data, newton_steps)
    workers = effective_n_jobs(state.n_jobs)
    streamed = any(isinstance(data, LoaderSource) for data in (state.Z, state.X, test_data))
    if workers == 1 or streamed or len(groups) == 1:
        results = (_run_entries(problem, [group], False) for group in groups)
    else:
        results = Parallel(n_jobs=state.n_jobs, return_as="generator")(
            delayed(_run_entries)(problem, [group], True) for group in groups)
    effects, growing, resolved, seen = [], [], [], set()
    for values, caught in progress(results, state.verbose, len(groups),
                                   "removal effects"):
        effects.extend(value for value, _, _ in values)
        growing.extend(flag for _, flag, _ in values)
        resolved.extend(flag for _, _, flag in values)
        for category, message in caught:
            if (category, message) not in seen:  # once per distinct warning
                seen.add((category, message))
                warnings.warn(message, category, stacklevel=3)
    if any(growing):
        entries = np.flatnonzero(growing)
        warnings.warn(
            f"For {len(entries)} of {len(groups)} entries of indices (the first: "
            f"{entries[:5].tolist()}) the pretrain Newton steps did not shrink the "
            "gradient (its norm at the last step exceeds the first): the removal moves "
            "the weights beyond the region where the quadratic model holds, and their "
            "effects are unreliable. Take more newton_steps, check them against "
            "retraining (skmsif.validation.leave_one_out), or increase the dampings.",
            ConvergenceWarning, stacklevel=3)
    if not all(resolved):
        entries = np.flatnonzero(~np.array(resolved))
        warnings.warn(
            f"For {len(entries)} of {len(groups)} entries of indices (the first: "
            f"{entries[:5].tolist()}) the finetune stage was not re-solved at the new "
            f"embedding (its gradient not reduced by {FINETUNE_RTOL:g} in "
            f"{FINETUNE_MAX_STEPS} Newton steps with line search, or no step along the "
            "Newton direction decreased the objective): their effects are unreliable. "
            "Increase finetune_damping, or check them against retraining.",
            ConvergenceWarning, stacklevel=3)
    return np.array(effects, dtype=np.float64)

"""The multi-stage influence estimator (Chen et al., Sec. 3; notation in ``doc/guide/cases.md``)."""

import json
import os
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch.func import functional_call

from ._adapters import transform_data, unwrap_model
from ._backends import Backend, SolveSettings, backend_class
from ._checks import check_finite_parameters, check_module, probe_model, resolve_device
from ._curvature import CURVATURES, CurvatureOperator, Objective
from ._data import LoaderSource, TensorSource, as_source, fingerprint_sources, new_hasher
from ._losses import LOSSES
from ._model import ModelAdapter, private_copies
from ._params import find_shared
from ._progress import progress

# fit warns when a stage's objective gradient is above this fraction of its terms' sizes.
STATIONARITY_TOL = 0.05
# hessian="auto" picks "exact" when no Hessian to invert has more parameters than this.
AUTO_EXACT_MAX_PARAMS = 2000


class MultiStageInfluenceEstimator(BaseEstimator):
    """Influence of pretraining examples on a finetuned model's test losses.

    For a pretrain set ``Z`` and a finetune test point ``x_t``, ``I(z, x_t)`` is the
    derivative of the finetune loss ``f(x_t)`` when pretrain example ``z`` is upweighted
    by ``eps`` in the pretrain objective (``G + eps * g(z)``, ``G`` the mean pretrain loss)
    and both stages are re-optimised (Chen et al., "Multi-Stage Influence Function").

    Sign: ``I > 0`` means ``z`` is harmful to ``x_t`` (upweighting it raises the test
    loss). Removing ``z`` from the ``m`` pretrain examples changes the test loss by about
    ``-I(z, x_t) / m``.

    Parameters
    ----------
    embedding : {"fixed", "updated"}, default="fixed"
        ``"fixed"`` (paper Case 1): the shared parameters ``W`` were frozen during
        finetuning and only the finetune head ``Theta`` was trained. ``"updated"`` (Case 2):
        ``W`` was trained too; finetuning is modelled as
        ``argmin F(W, Theta) + alpha * ||W - W_pretrained||^2``.
    alpha : float, default=0.01
        Proximity weight of Case 2; must be > 0 when ``embedding="updated"``. Unused for
        ``"fixed"``.
    hessian : {"auto", "exact", "cg", "lowrank", "identity", "kfac", "ekfac"}, \
            default="auto"
        How ``(C + damping * I) x = b`` is solved for each stage's curvature ``C`` (see
        ``curvature``). ``"exact"``: the dense matrix in float64, factored once
        in ``fit`` (Cholesky when the damped matrix is positive definite, else an
        eigendecomposition); refused when ``3 p^2`` float64 numbers exceed
        ``exact_max_memory``. ``"cg"``: Krylov iterations with
        curvature-vector products (``iterative_solver`` says which), no dense matrix.
        ``"identity"``: the paper's Fig. 4 baseline, both inverse curvatures replaced by
        the identity (dampings unused; the mixed block of Case 1 stays). ``"lowrank"``:
        the ``rank`` eigenpairs of largest magnitude of each damped curvature, by
        Lanczos, computed once in ``fit`` (drops the rest of the spectrum; exact at full
        rank). ``"kfac"`` / ``"ekfac"``: Kronecker-factored Gauss-Newton blocks per
        ``Linear`` and ``Conv2d`` layer (eigenvalue-corrected for ``"ekfac"``), the exact
        Gauss-Newton diagonal for other parameters; factors computed once in ``fit``.
        ``"auto"``: per stage, ``"exact"`` when the stage's matrix to invert has at most
        2,000 parameters, else ``"cg"``. Any other backend registered with
        ``skmsif._backends.Backend`` is accepted by name.
    finetune_hessian : str, default=None
        The finetune stage's backend, when it differs from ``hessian`` (for example a
        small Case 1 head solved exactly while the pretrain stage uses ``"ekfac"``).
        ``None``: ``hessian``.
    curvature : {"auto", "hessian", "gauss_newton"}, default="auto"
        Which second-derivative matrix describes each stage: the Hessian, or the
        Gauss-Newton matrix ``J^T H_out J`` (``H_out`` the loss's Hessian in the model's
        outputs; positive semi-definite for convex losses). Under ``"gauss_newton"`` every
        block (``H_G``; ``H_ThetaTheta`` and the mixed ``H_WTheta`` of Case 1; ``K`` of
        Case 2) is the matching block of the Gauss-Newton matrix. ``"auto"``: the
        Gauss-Newton matrix for ``"kfac"``/``"ekfac"``, the Hessian otherwise.
    pretrain_damping : float, default=1e-2
        Added to the diagonal of the pretrain Hessian ``H_G`` (over ``W`` and ``U``).
    finetune_damping : float, default=1e-8
        Added to the diagonal of the finetune Hessian: ``H_ThetaTheta`` in Case 1, the
        Hessian ``K`` over ``(Theta, W)`` (which carries ``2 * alpha`` on ``W``) in Case 2.
    shared : None, str or list of str, default=None
        Which parameters are ``W``. ``None``: the parameters that are the same
        ``torch.nn.Parameter`` objects in both models (typical for Case 1). A name prefix
        or a list of them (a whole dotted component: ``"0"`` matches ``"0.weight"``):
        parameters with that name in both models (Case 2, where the finetuned ``W`` is a
        different tensor). Every other parameter of the pretrain model is ``U``, and of the
        finetune model ``Theta``.
    pretrain_loss, finetune_loss : {"cross_entropy", "mse"} or callable, \
            default="cross_entropy"
        Per-example loss. A callable takes ``(outputs, targets)`` of a batch and returns
        one loss per example, shape ``(batch,)``. ``"mse"`` averages the squared error
        over output dimensions.
    label_key : str, default="labels"
        Where dict batches, Mappings and dict Datasets keep the target (the
        ``transformers`` convention). The rest of a dict is passed as ``model(**inputs)``.
    hessian_samples : int, default=None
        Size of a random subsample of ``Z`` (without replacement) on which the pretrain
        Hessian is computed (the paper uses 1000). ``None``: all of ``Z``. The gradients
        of every pretrain example are always used for scoring.
    random_state : int, RandomState instance or None, default=None
        Draws the ``hessian_samples`` subsample.
    batch_size : int, default=256
        Examples per batch in every pass over data.
    max_iter : int, default=1000
        Iterations at most per iterative solve.
    tol : float, default=1e-10
        An iterative solve has converged when ``||A x - b|| / ||b|| <= tol``; otherwise
        a ``ConvergenceWarning`` gives the residual and the iteration count.
    iterative_solver : {"minres", "cg", "cg_normal"}, default="minres"
        The Krylov method of ``hessian="cg"``: MINRES (symmetric, indefinite allowed),
        plain CG (positive definite damped Hessians only), or CG on the normal equations
        ``A^2 x = A b`` (the paper's Sec. 3.3; indefinite allowed, slower to converge).
    preconditioner : {None, "kfac", "ekfac"}, default=None
        Preconditions the CG solves of the stages whose backend is ``"cg"`` (with
        ``iterative_solver="cg"``) by the inverse of the damped K-FAC or EK-FAC
        approximation of the stage's Gauss-Newton matrix, its factors fitted once in
        ``fit`` on the same data as the curvature products. The solve still converges to
        ``tol`` on the stage's own curvature; a preconditioner can only change how many
        products that takes. Measured (curvature guide): it helps where the Kronecker
        approximation is close, as on a linear Case 1 head (5 iterations instead of 18
        on the paper's CNN), and it did not on the pretrain stages of the paper's CNN (28
        iterations instead of 17 to residual 0.1) and of a small BERT (after 200
        iterations, residual 0.047 against 0.068 in Case 1, 0.23 against 0.014 in Case
        2), whose layers are coupled more than a block-diagonal approximation can
        express. ``None``: plain iterations.
    dtype : {"auto", "float64", "float32"}, default="auto"
        Precision of the passes over data: the models are evaluated on private copies in
        this dtype, and per-example gradients, forward-mode scoring, curvature products
        and Kronecker factors' inputs are computed in it. Solves, right-hand sides and
        every accumulation (sums over batches, factors, scores) are float64 whatever it
        is. ``"auto"``: the models' own precision, ``"float64"`` when either model has a
        float64 parameter, else ``"float32"`` (measured on the paper's CNN, float32
        passes cost 3x less time than float64 and changed the scores by 3e-4 to 2e-3
        relative, Spearman 0.999999; see the curvature guide). In float32 an iterative
        solve cannot reach a relative residual below about 1e-5 (``tol`` is floored
        there).
    device : str or torch.device, default="cpu"
        Where computations run, for example ``"cuda"``.
    exact_max_memory : int, default=2**31
        Bytes the exact backend may use for dense matrices.
    rank : int, default=100
        Eigenpairs kept by ``hessian="lowrank"`` (clipped to the number of parameters).
    n_jobs : int, default=None
        Workers for the scoring pass over ``Z``, split into chunks through joblib
        (``None``: one, unless a ``joblib.parallel_config`` context says otherwise;
        ``-1``: all). Runs on any joblib backend, a Dask cluster included
        (``with joblib.parallel_config("dask"): est.score(x_test)``). Results do not
        depend on it.
    verbose : int, default=0
        Show progress bars for dense Hessians, solves and scoring.

    Attributes
    ----------
    hessian_ : dict
        The backend of each stage, ``{"pretrain": ..., "finetune": ...}`` (``"auto"``
        resolved).
    curvature_ : dict
        The curvature of each stage (``"auto"`` resolved).
    dtype_ : str
        The precision of the passes (``dtype``, ``"auto"`` resolved).
    stationarity_ : dict
        Per stage, ``gradient_norm`` (of the stage's objective at the given weights) and
        ``relative`` (that norm over the sum of its terms' norms: 0 at a minimum). Above
        0.05, ``fit`` warns with a :class:`StationarityWarning`.
    attention_switched_ : list of str
        Submodules of the private copies switched to eager attention (``transformers``).
    n_pretrain_ : int
        Number of pretrain examples ``m``.
    n_finetune_ : int
        Number of finetune examples ``n``.
    shared_parameters_ : list of str
        Names (in the pretrain model) of the shared parameters ``W``.
    n_params_ : dict
        Number of scalars in ``W``, ``U`` and ``Theta``.
    hessian_indices_ : ndarray or None
        Indices of the pretrain examples the pretrain Hessian was computed on.
    pretrain_solver_, finetune_solver_ : object
        The solvers; an iterative one keeps ``history_`` (iterations and residual of each
        solve).
    features_cached_ : bool
        Case 1 only: whether the finetune-head solves run on embedding outputs computed
        once in ``fit`` (possible when the finetune model is an ``nn.Sequential`` whose
        leading steps hold exactly the shared parameters), rather than on the whole
        network.

    Notes
    -----
    The order of operations never solves once per pretrain example. For the
    test gradients (one row per test point in ``influence``, their sum in ``score``):

    1. Case 1: ``v1 = (H_ThetaTheta + d_f I)^-1 grad_Theta f(x_t)`` and
       ``w = grad_W f(x_t) - H_WTheta v1``. Case 2: ``v1 = (K + d_f I)^-1 grad f(x_t)``
       and ``w = 2 alpha [v1]_W``.
    2. ``v2 = (H_G + d_p I)^-1 [w; 0_U]``, at the pretrain weights.
    3. ``I(z, x_t) = -v2 . grad g(z)`` for every pretrain example, in one forward-mode
       pass over ``Z``.

    The user's models are copied in ``fit`` and never changed; the copies are evaluated
    in eval mode, so dropout is off and batch norm uses its running statistics. In the
    copies, ``transformers`` models use eager attention and ``nn.LayerNorm`` is computed
    with elementary operations, because PyTorch's CPU attention kernel has no second
    derivatives and its fused layer norm has wrong ones.

    Influence describes a minimum: ``fit`` checks, with one gradient pass per stage,
    that the given weights are near a minimum of the objectives above (the mean loss plus
    the damping as L2, and Case 2's ``alpha`` term), and warns when they are not.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif import MultiStageInfluenceEstimator
    >>> gen = torch.Generator().manual_seed(0)
    >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
    >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
    >>> Z = (torch.randn(30, 3, generator=gen), torch.randint(0, 2, (30,), generator=gen))
    >>> X = (torch.randn(20, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    >>> est = MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-3)
    >>> est.fit(pretrain_model, finetune_model, Z, X).hessian_
    {'pretrain': 'exact', 'finetune': 'exact'}
    >>> x_test = (X[0][:5], X[1][:5])
    >>> est.influence(x_test).shape
    (5, 30)
    >>> est.score(x_test).shape
    (30,)
    """

    _parameter_constraints = {
        "embedding": [StrOptions({"fixed", "updated"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        # Checked against the backends registered at fit time (see _check_backend_names).
        "hessian": [str],
        "finetune_hessian": [None, str],
        "curvature": [StrOptions({"auto", *CURVATURES})],
        "pretrain_damping": [Interval(Real, 0, None, closed="left")],
        "finetune_damping": [Interval(Real, 0, None, closed="left")],
        "shared": [None, str, list, tuple],
        "pretrain_loss": [StrOptions(set(LOSSES)), callable],
        "finetune_loss": [StrOptions(set(LOSSES)), callable],
        "label_key": [str],
        "hessian_samples": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "iterative_solver": [StrOptions({"minres", "cg", "cg_normal"})],
        "preconditioner": [None, StrOptions({"kfac", "ekfac"})],
        "dtype": [StrOptions({"auto", "float64", "float32"})],
        "device": [str, torch.device],
        "exact_max_memory": [Interval(Integral, 1, None, closed="left")],
        "rank": [Interval(Integral, 1, None, closed="left")],
        "n_jobs": [None, Integral],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        embedding="fixed",
        alpha=0.01,
        hessian="auto",
        *,
        finetune_hessian=None,
        curvature="auto",
        pretrain_damping=1e-2,
        finetune_damping=1e-8,
        shared=None,
        pretrain_loss="cross_entropy",
        finetune_loss="cross_entropy",
        label_key="labels",
        hessian_samples=None,
        random_state=None,
        batch_size=256,
        max_iter=1000,
        tol=1e-10,
        iterative_solver="minres",
        preconditioner=None,
        dtype="auto",
        device="cpu",
        exact_max_memory=2**31,
        rank=100,
        n_jobs=None,
        verbose=0,
    ):
        self.embedding = embedding
        self.alpha = alpha
        self.hessian = hessian
        self.finetune_hessian = finetune_hessian
        self.curvature = curvature
        self.pretrain_damping = pretrain_damping
        self.finetune_damping = finetune_damping
        self.shared = shared
        self.pretrain_loss = pretrain_loss
        self.finetune_loss = finetune_loss
        self.label_key = label_key
        self.hessian_samples = hessian_samples
        self.random_state = random_state
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.iterative_solver = iterative_solver
        self.preconditioner = preconditioner
        self.dtype = dtype
        self.device = device
        self.exact_max_memory = exact_max_memory
        self.rank = rank
        self.n_jobs = n_jobs
        self.verbose = verbose

    # ------------------------------------------------------------------ fit

    def fit(self, pretrain_model, finetune_model, Z, X):
        """Prepare the influence computation for a pretrained and a finetuned model.

        Parameters
        ----------
        pretrain_model : torch.nn.Module
            The pretrained model, ``(W, U)`` at its trained values.
        finetune_model : torch.nn.Module
            The finetuned model, ``(W, Theta)`` at its trained values.
        Z : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            The pretrain data the pretrain model was trained on (``m`` examples); read
            batch by batch, never held whole (see :ref:`the data forms <data-forms>`).
        X : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            The finetune training data (``n`` examples).

        Returns
        -------
        self : MultiStageInfluenceEstimator
            Fitted. Backends do their expensive work here (dense Hessians and their
            factorisations, Lanczos, Kronecker factors); iterative solves happen in
            :meth:`influence` and :meth:`score`.
        """
        self._validate_params()
        for parameter in ("hessian", "finetune_hessian"):
            value = getattr(self, parameter)
            if value is not None and value != "auto" and value not in Backend.registry:
                raise InvalidParameterError(
                    f"The {parameter!r} parameter of {type(self).__name__} must be 'auto' "
                    f"or a registered backend among {sorted(Backend.registry)}. Got "
                    f"{value!r} instead."
                )
        if n_jobs_is_zero(self.n_jobs):
            raise ValueError("n_jobs=0 is not valid: pass None (one worker), a positive "
                             "number of workers, or -1 (all cores).")
        settings = dict(self.get_params(deep=False))
        from ._solvers import FORWARD_MODE_LOCK

        # Dense curvatures, Lanczos and factors use forward-mode AD, whose state is
        # process-global: fits in several threads take turns.
        with FORWARD_MODE_LOCK:
            fitted = _FittedState.build(settings, pretrain_model, finetune_model, Z, X)
        # Only a fit that succeeded replaces the previous fitted state.
        for key in [key for key in vars(self) if key.endswith("_") and not key.startswith("_")]:
            delattr(self, key)
        self._state = fitted
        for key, value in fitted.public.items():
            setattr(self, key, value)
        return self

    # ------------------------------------------------------------- scoring

    def influence(self, x_test, out=None):
        """Influence of every pretrain example on every test point.

        Parameters
        ----------
        x_test : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            Test points of the finetune task.
        out : str or path-like, default=None
            Write the result to this ``.npy`` file instead of memory, ``batch_size`` test
            points at a time, and return it memory-mapped. An interrupted call, repeated
            with the same arguments, resumes after the last finished chunk (kept in
            ``out + ".partial"`` with ``out + ".progress.json"``); ``out`` itself only
            appears, whole, when every chunk is done.

        Returns
        -------
        influence : ndarray of shape (n_test, n_pretrain)
            ``I(z_i, x_t)``; positive means harmful (see the class docstring). A
            read-only ``numpy.memmap`` when ``out`` is given.
        """
        state = self._fitted()
        data = state.test_data(x_test)
        if out is None:
            return state.influence(data, summed=False)
        return state.influence_to_file(data, os.fspath(out))

    def score(self, x_test):
        """Influence of every pretrain example on the summed loss of the test points.

        Equals ``influence(x_test).sum(axis=0)`` (paper Eq. 9) at the cost of one set of
        solves.

        Parameters
        ----------
        x_test : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            Test points of the finetune task.

        Returns
        -------
        scores : ndarray of shape (n_pretrain,)
            Summed influence; positive means harmful to the test set as a whole.
        """
        state = self._fitted()
        return state.influence(state.test_data(x_test), summed=True)[0]

    def influence_factors(self, x_test, summed=False):
        """The pretrain-space vectors that every pretrain example is scored against.

        ``v2 = (H_G + d_p I)^-1 [w; 0_U]`` of the class Notes, one row per test point
        (or one row for their sum). The expensive part of the computation: once they
        are known, :meth:`influence_from_factors` scores any part of the pretrain data
        with one pass of gradients over it, so a pretrain set of any size can be scored
        in shards, on other machines, from factors saved with ``numpy.save``.

        Parameters
        ----------
        x_test : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            Test points of the finetune task.
        summed : bool, default=False
            One row for the summed loss of the test points (as :meth:`score`).

        Returns
        -------
        factors : ndarray of shape (n_test, n_params) or (1, n_params)
            In the order of the pretrain model's parameters (``named_parameters``),
            float64.
        """
        state = self._fitted()
        return state.factors(state.test_data(x_test), summed).cpu().numpy().astype(
            np.float64)

    def influence_from_factors(self, factors, Z_part):
        """Influence of the examples of ``Z_part`` for factors from :meth:`influence_factors`.

        Parameters
        ----------
        factors : array-like of shape (k, n_params)
            Rows returned by :meth:`influence_factors` (a saved copy is fine).
        Z_part : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            Any pretrain examples: a shard of ``Z`` or the whole of it.

        Returns
        -------
        influence : ndarray of shape (k, len(Z_part))
            ``I(z, x_t)`` for each row of ``factors`` and each example of ``Z_part``;
            equal to the matching columns of :meth:`influence` (or :meth:`score`).
        """
        state = self._fitted()
        return state.influence_from_factors(factors, Z_part)

    def removal_effect(self, x_test, indices, newton_steps=0):
        """Predicted change of the summed test loss when pretrain examples are removed.

        For each entry of ``indices`` (one pretrain example, or a group removed
        together), ``L(without) - L(with)``, ``L`` the summed finetune loss over
        ``x_test``, both stages re-optimised (compare with
        :func:`skmsif.validation.leave_one_out` through
        :func:`skmsif.validation.faithfulness`).

        Parameters
        ----------
        x_test : (inputs, targets) pair, Mapping, torch Dataset or DataLoader
            Test points of the finetune task; their losses are summed.
        indices : sequence of int, or sequence of sequences of int
            Positions in ``Z``. A 1-D sequence: each example removed alone. A list of
            lists (or a 2-D array): each inner list is a group removed together. No
            position may repeat within a group.
        newton_steps : int, default=0
            ``0``: first order, ``-I/m`` with ``I`` from :meth:`score` (summed over a
            group), one scoring pass for all entries. ``k >= 1``: ``k`` Newton steps
            from the pretrain weights on the pretrain objective without the removed
            examples ``S``, ``(1/(m - |S|)) sum_{j not in S} g(z_j) +
            (pretrain_damping / 2) ||(W, U)||^2``, whose Hessian is the estimator's
            damped pretrain Hessian (on the remaining examples); then the finetune
            stage re-solved at the new embedding ``W_S``: ``F(W_S, Theta) +
            (finetune_damping / 2) ||Theta||^2`` over ``Theta``
            (``embedding="fixed"``), or ``F + (finetune_damping / 2) ||(W, Theta)||^2 +
            alpha ||W - W_S||^2`` over ``(W, Theta)`` (``"updated"``; the damped
            Hessian of this objective is the estimator's ``K + finetune_damping I``),
            by Newton steps with a backtracking line search from the finetuned weights
            until its gradient has shrunk by ``1e-10``; the test loss is then evaluated
            exactly there. See Notes.

        Returns
        -------
        effects : ndarray of shape (n_entries,)
            One predicted change per entry of ``indices``; negative means the test loss
            drops when the entry is removed.

        Raises
        ------
        ValueError
            For empty ``indices``, an empty group, a position out of range, a position
            repeated within a group, a group of all of ``Z`` (with ``newton_steps >=
            1``), or a ``newton_steps`` that is not a non-negative int.
        TypeError
            For positions that are not integers.

        Warns
        -----
        ConvergenceWarning
            Naming the entries whose pretrain gradient was larger after the Newton steps
            than before them (``newton_steps >= 2``: the removal moves the weights
            beyond where Newton's method converges), or whose finetune stage could not
            be re-solved; their effects are unreliable.

        Notes
        -----
        The influence function assumes the given weights minimise the full-data
        objectives. Each gradient above is taken minus the full-data objective's
        gradient at the given weights (zero when the models were trained to
        convergence on these objectives, as :func:`~skmsif.validation.leave_one_out`
        retrains them), so that a model not trained exactly to their minimum is not
        pulled towards it: with nothing removed the effect would be zero.

        ``leave_one_out``'s own pretrain stage keeps the normalisation ``1/m`` after a
        removal (``G + epsilon g(z)``, ``epsilon = -1/m``); the mean over the remaining
        examples differs from it by ``pretrain_damping / m`` in the effective L2
        weight. Pass a ``pretrain_fn`` that minimises the mean over the examples it is
        given to compare with the same objective.

        Each Newton step solves with the estimator's backend of that stage:
        ``hessian="exact"`` forms the dense curvature at the current weights;
        ``"cg"`` runs ``iterative_solver`` on curvature-vector products at the current
        weights; any other backend reuses its fitted solve (the curvature at the
        trained weights, removed examples included) as an approximation (chord
        steps, which converge more slowly). ``curvature="gauss_newton"`` makes them
        Gauss-Newton steps. With ``hessian_samples`` the pretrain curvature is the
        subsample's, less the removed examples.

        Cost per entry: each pretrain step is a pass of gradients over ``Z`` and one
        solve (``"exact"``: ``p`` curvature-vector products over ``Z`` for the dense
        curvature, except the first step, which corrects the fitted one with the
        removed examples' curvature alone); each finetune step a pass over ``X`` and
        one solve (in Case 1 over ``Theta`` only, on the embedding outputs when
        ``features_cached_``). Entries run in parallel with ``n_jobs`` workers (one
        torch thread each); the results do not depend on ``n_jobs``.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> from skmsif import MultiStageInfluenceEstimator
        >>> gen = torch.Generator().manual_seed(0)
        >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
        >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
        >>> Z = (torch.randn(30, 3, generator=gen), torch.randint(0, 2, (30,), generator=gen))
        >>> X = (torch.randn(20, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen))
        >>> est = MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-3)
        >>> est = est.fit(pretrain_model, finetune_model, Z, X)
        >>> x_test = (X[0][:5], X[1][:5])
        >>> est.removal_effect(x_test, [0, 1, 2]).shape
        (3,)
        >>> est.removal_effect(x_test, [[0, 1], [2, 3, 4]], newton_steps=1).shape
        (2,)
        """
        from ._removal import removal_effect

        return removal_effect(self._fitted(), x_test, indices, newton_steps)

    def _fitted(self):
        check_is_fitted(self)
        return self._state

    def __sklearn_is_fitted__(self):
        return getattr(self, "_state", None) is not None


def n_jobs_is_zero(n_jobs):
    return n_jobs is not None and int(n_jobs) == 0


class _FittedState:
    """Everything :meth:`MultiStageInfluenceEstimator.fit` computed, and the scoring.

    Built from a snapshot of the estimator's parameters, so that ``set_params`` after
    ``fit`` takes effect at the next ``fit`` only (as in scikit-learn).
    """

    @classmethod
    def build(cls, settings, pretrain_model, finetune_model, Z, X):
        self = cls()
        self.settings = settings
        s = settings
        pretrain_model, pretrain_transform, pretrain_default_loss = unwrap_model(
            pretrain_model, "pretrain_model")
        finetune_model, finetune_transform, finetune_default_loss = unwrap_model(
            finetune_model, "finetune_model")
        check_module(pretrain_model, "pretrain_model")
        check_module(finetune_model, "finetune_model")
        Z = transform_data(Z, pretrain_transform, "Z")
        X = transform_data(X, finetune_transform, "X")
        self.finetune_transform = finetune_transform
        if s["embedding"] == "updated" and s["alpha"] <= 0:
            raise ValueError(
                f"embedding='updated' needs alpha > 0 (the weight of the proximity term "
                f"alpha * ||W - W_pretrained||^2); got alpha={s['alpha']!r}. Pass e.g. "
                "alpha=0.01, or embedding='fixed' if the embedding was frozen."
            )
        device = resolve_device(s["device"])
        dtype = getattr(torch, _resolve_dtype(s["dtype"], pretrain_model, finetune_model))
        self.device, self.dtype, self.batch_size = device, dtype, s["batch_size"]

        pairs = find_shared(pretrain_model, finetune_model, s["shared"])
        fin_names = [name for name, _ in finetune_model.named_parameters()]
        if len(pairs) == len(fin_names):
            raise ValueError(
                f"shared={s['shared']!r} selects every parameter of finetune_model; the "
                "finetune model needs a head of its own (Theta) besides the embedding."
            )
        check_finite_parameters(pretrain_model, "pretrain_model")
        check_finite_parameters(finetune_model, "finetune_model")
        if s["embedding"] == "fixed":
            _check_embedding_unchanged(pretrain_model, finetune_model, pairs)

        pretrain_copy, finetune_copy = private_copies((pretrain_model, finetune_model),
                                                      dtype, device)
        label_key = s["label_key"]
        self.Z = as_source(Z, "Z", dtype, label_key)
        self.X = as_source(X, "X", dtype, label_key)
        # A model that brings its own loss (a skorch net's criterion) sets the default.
        pretrain_loss = _loss_or_default(s["pretrain_loss"], pretrain_default_loss)
        finetune_loss = _loss_or_default(s["finetune_loss"], finetune_default_loss)
        pretrain = ModelAdapter(pretrain_copy, pretrain_loss, "pretrain_model",
                                "pretrain_loss")
        finetune = ModelAdapter(finetune_copy, finetune_loss, "finetune_model",
                                "finetune_loss")
        self.finetune_adapter = finetune
        probe_model(pretrain.outputs_at_state, self.Z, pretrain_loss, "pretrain_loss",
                    "pretrain_model", self.batch_size, device)
        probe_model(finetune.outputs_at_state, self.X, finetune_loss, "finetune_loss",
                    "finetune_model", self.batch_size, device)

        pre_names = [name for name, _ in pretrain_copy.named_parameters()]
        shared_pre = [pre for pre, _ in pairs]
        shared_fin = [fin for _, fin in pairs]
        theta = [name for name in fin_names if name not in set(shared_fin)]
        self.pretrain = Objective(pretrain, pre_names)
        self.finetune = Objective(finetune, fin_names)
        self.pretrain.check(self.Z, self.batch_size, device)
        self.finetune.check(self.X, self.batch_size, device)
        self.shared_pre_index = self.pretrain.offsets(shared_pre).to(device)
        self.shared_fin_index = self.finetune.offsets(shared_fin).to(device)
        self.theta_index = self.finetune.offsets(theta).to(device)
        self.embedding, self.alpha = s["embedding"], float(s["alpha"])
        self.n_jobs, self.verbose = s["n_jobs"], s["verbose"]
        n_pretrain = len(self.Z)

        self.stationarity = _stationarity(self, s, pairs)

        if s["hessian_samples"] is None or s["hessian_samples"] >= n_pretrain:
            hessian_indices = None
        else:
            rng = check_random_state(s["random_state"])
            hessian_indices = np.sort(rng.choice(n_pretrain, s["hessian_samples"],
                                                 replace=False))

        solve_data = self.X
        features_cached = False
        if self.embedding == "fixed":
            # Case 1 inverts the curvature over Theta alone; W is fixed, so that curvature
            # needs only the embedding's outputs, computed once when the model allows it.
            finetune_space = Objective(finetune, theta)
            cached = _cached_head(finetune_copy, finetune.state, shared_fin, theta,
                                  finetune_loss, self.X, self.batch_size, device)
            if cached is not None:
                finetune_space, solve_data = cached
                features_cached = True
            finetune_shift = torch.full((len(self.theta_index),),
                                        float(s["finetune_damping"]), dtype=torch.float64,
                                        device=device)
            finetune_blocks = {"Theta": torch.arange(len(self.theta_index))}
        else:
            finetune_space = self.finetune
            finetune_shift = torch.full((self.finetune.n_params,),
                                        float(s["finetune_damping"]), dtype=torch.float64,
                                        device=device)
            finetune_shift[self.shared_fin_index] += 2 * self.alpha
            finetune_blocks = {"W": self.shared_fin_index.cpu(),
                               "Theta": self.theta_index.cpu()}
        # Solves and their right-hand sides are float64 whatever the passes' dtype.
        pretrain_shift = torch.full((self.pretrain.n_params,), float(s["pretrain_damping"]),
                                    dtype=torch.float64, device=device)
        pre_index = torch.arange(self.pretrain.n_params)
        u_mask = torch.ones(self.pretrain.n_params, dtype=torch.bool)
        u_mask[self.shared_pre_index.cpu()] = False
        pretrain_blocks = {"W": self.shared_pre_index.cpu(), "U": pre_index[u_mask]}

        backends = {}
        for stage, requested, n_params in (
                ("pretrain", s["hessian"], self.pretrain.n_params),
                ("finetune", s["finetune_hessian"] or s["hessian"], finetune_space.n_params)):
            if requested == "auto":
                requested = "exact" if n_params <= AUTO_EXACT_MAX_PARAMS else "cg"
            backends[stage] = requested
        curvatures = {stage: _resolve_curvature(s["curvature"], backend_class(name))
                      for stage, name in backends.items()}
        _check_preconditioner(s, backends)
        for stage, name in backends.items():
            n_params = self.pretrain.n_params if stage == "pretrain" else finetune_space.n_params
            backend_class(name).check_size(n_params, _solve_settings(s))

        indices = None if hessian_indices is None else torch.as_tensor(hessian_indices)
        self.pretrain_operator = CurvatureOperator(
            self.pretrain, self.Z, curvatures["pretrain"], self.batch_size, device, indices,
            pretrain_blocks, "pretrain", s["verbose"])
        finetune_operator = CurvatureOperator(
            finetune_space, solve_data, curvatures["finetune"], self.batch_size, device,
            None, finetune_blocks, "finetune", s["verbose"])
        # Case 1's mixed block H_WTheta is a block of the whole finetune curvature.
        self.finetune_full_operator = CurvatureOperator(
            self.finetune, self.X, curvatures["finetune"], self.batch_size, device, None,
            {"W": self.shared_fin_index.cpu(), "Theta": self.theta_index.cpu()},
            "finetune", s["verbose"])
        solve = _solve_settings(s)
        self.pretrain_backend = backend_class(backends["pretrain"])(
            self.pretrain_operator, pretrain_shift, solve, "pretrain_damping")
        self.finetune_backend = backend_class(backends["finetune"])(
            finetune_operator, finetune_shift, solve, "finetune_damping")

        self.public = {
            "hessian_": dict(backends),
            "curvature_": dict(curvatures),
            "dtype_": str(dtype).replace("torch.", ""),
            "n_pretrain_": n_pretrain,
            "n_finetune_": len(self.X),
            "shared_parameters_": shared_pre,
            "n_params_": {
                "W": int(self.shared_pre_index.numel()),
                "U": int(self.pretrain.n_params - self.shared_pre_index.numel()),
                "Theta": int(self.theta_index.numel()),
            },
            "hessian_indices_": hessian_indices,
            "pretrain_solver_": self.pretrain_backend,
            "finetune_solver_": self.finetune_backend,
            "features_cached_": features_cached,
            "stationarity_": self.stationarity,
            "attention_switched_": sorted(set(pretrain.attention_switched)
                                          | set(finetune.attention_switched)),
        }
        self.n_pretrain = n_pretrain
        return self

    # -------------------------------------------------------------- scoring

    def test_data(self, x_test):
        x_test = transform_data(x_test, self.finetune_transform, "x_test")
        data = as_source(x_test, "x_test", self.dtype, self.settings["label_key"])
        from ._solvers import FORWARD_MODE_LOCK

        # The check differentiates with torch.func, whose transform stack is shared by
        # the threads of a process: it takes its turn like every other such section.
        with FORWARD_MODE_LOCK:
            probe_model(self.finetune_adapter.outputs_at_state, data,
                        self.finetune_adapter.loss_spec, "finetune_loss", "finetune_model",
                        self.batch_size, self.device)
            self.finetune.check(data, self.batch_size, self.device)
        return data

    def _mixed(self, v1):
        """``H_WTheta v1`` (the W rows of the finetune curvature times ``[0; v1]``)."""
        return self.finetune_full_operator.block_product(v1, self.shared_fin_index,
                                                         self.theta_index)

    def factors(self, test_data, summed):
        """Steps 1-2 of the class Notes: ``v2``, ``(k, p_pretrain)`` torch.

        Runs under the forward-mode lock (the solves' curvature products use ``jvp``,
        whose state PyTorch keeps per process). Every step is checked: NaN or infinity
        raises a ``ValueError`` naming the stage and, where one is to blame, the example.
        """
        from ._solvers import FORWARD_MODE_LOCK, NonFiniteError, locate_nonfinite, require_finite

        def blame(objective, data, indices):
            found = locate_nonfinite(objective, data, self.batch_size, self.device, indices)
            if found is None:
                return (f"No single example of {data.name} has a non-finite loss or "
                        "gradient: the curvature products or the solve overflow; raise "
                        "the damping, or use dtype='float64'.")
            return (f"Example {found[0]} of {data.name} has a non-finite {found[1]} at "
                    "the fitted weights (model outputs too large for the dtype?); remove "
                    "it or fix the model.")

        with FORWARD_MODE_LOCK:
            gradients = self.finetune.gradient_rows(test_data, self.batch_size, self.device,
                                                    summed)
            if not bool(torch.isfinite(gradients).all()):
                raise NonFiniteError(
                    "Non-finite values in the finetune stage: the gradients of "
                    f"finetune_loss on {test_data.name} are NaN or infinite. "
                    + blame(self.finetune, test_data, None), "finetune")
            stage = "finetune"
            try:
                if self.embedding == "fixed":
                    _, mixed = self.finetune_backend.solve_and_map(
                        gradients[:, self.theta_index], self._mixed)
                    w = gradients[:, self.shared_fin_index] - mixed
                else:
                    v1 = self.finetune_backend.solve(gradients)
                    w = 2 * self.alpha * v1[:, self.shared_fin_index]
                require_finite(w, "finetune", "the finetune solution mapped to the shared "
                               "parameters (the right-hand side of the pretrain solve)")
                stage = "pretrain"
                rhs = torch.zeros(len(w), self.pretrain.n_params, dtype=w.dtype,
                                  device=w.device)
                rhs[:, self.shared_pre_index] = w
                return require_finite(self.pretrain_backend.solve(rhs), "pretrain",
                                      "the pretrain solution (the influence factors)")
            except NonFiniteError as exc:
                if stage == "pretrain":
                    where = blame(self.pretrain, self.Z, self.pretrain_operator.indices)
                else:
                    operator = self.finetune_backend.operator
                    where = blame(operator.objective, operator.data, operator.indices)
                    if where.startswith("No single"):
                        where = blame(self.finetune, self.X, None)
                raise NonFiniteError(f"{exc} {where}", stage) from exc

    def influence(self, test_data, summed):
        """``(k, m)`` numpy influence (negated in place: one array of the result's size)."""
        result = self.directional(self.factors(test_data, summed), self.Z)
        return np.negative(result, out=result)

    def influence_from_factors(self, factors, Z_part):
        if not isinstance(factors, torch.Tensor):
            try:
                factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))
            except (TypeError, ValueError) as exc:
                raise TypeError(
                    f"factors must be a numeric array of shape (k, {self.pretrain.n_params}) "
                    f"from influence_factors; got {type(factors).__name__} ({exc})."
                ) from exc
        if factors.ndim == 1:
            factors = factors[None]
        if factors.ndim != 2 or factors.shape[1] != self.pretrain.n_params:
            raise ValueError(
                f"factors must have shape (k, {self.pretrain.n_params}) (one row per test "
                f"point, one column per pretrain parameter); got {tuple(factors.shape)}. "
                "Pass what influence_factors returned for this fitted estimator."
            )
        if not torch.isfinite(factors).all():
            raise ValueError("factors contain NaN or infinite values.")
        Z_part = as_source(Z_part, "Z_part", self.dtype, self.settings["label_key"])
        probe_model(self.pretrain.adapter.outputs_at_state, Z_part,
                    self.pretrain.adapter.loss_spec, "pretrain_loss", "pretrain_model",
                    self.batch_size, self.device)
        factors = factors.to(device=self.device, dtype=torch.float64)
        return -self.directional(factors, Z_part)

    def directional(self, vectors, data):
        """``vectors @ grad g(z)`` for every example of ``data``: ``(k, len)`` float64 numpy.

        Filled batch by batch (chunk by chunk with several workers) into one preallocated
        array, so that memory peaks at about the size of the result. Forward-mode sections
        hold the forward-mode lock; every part is checked for NaN and infinity, and an
        error names the example.
        """
        from ._solvers import FORWARD_MODE_LOCK, NonFiniteError, locked_call, require_finite

        require_finite(vectors, "pretrain", "the influence factors scored against the "
                       f"gradients of {data.name}")
        m = len(data)
        result = np.empty((len(vectors), m), dtype=np.float64)

        def store(part, start):
            part = part.detach().cpu().numpy() if isinstance(part, torch.Tensor) else part
            finite = np.isfinite(part).all(axis=0)
            if not finite.all():
                index = start + int(np.flatnonzero(~finite)[0])
                raise NonFiniteError(
                    "Non-finite values in the pretrain stage: the derivative of "
                    f"pretrain_loss on example {index} of {data.name} along the influence "
                    "factors is NaN or infinite (its loss or gradient overflows at the "
                    "pretrain weights: model outputs too large for the dtype?). Remove "
                    "the example or fix the model.", "pretrain")
            result[:, start:start + part.shape[1]] = part

        workers = effective_n_jobs(self.n_jobs)
        if workers == 1 or isinstance(data, LoaderSource):
            start = 0
            batches = data.batches(self.batch_size, self.device)
            total = -(-m // self.batch_size)
            with FORWARD_MODE_LOCK:
                for inputs, targets in progress(batches, self.verbose, total,
                                                "scoring pretrain set"):
                    batch = TensorSource(inputs, targets, data.name, self.dtype)
                    store(self.pretrain.directional(vectors, batch, len(targets),
                                                    self.device), start)
                    start += len(targets)
            return result
        # Chunks small enough that those held by joblib at once stay well below the
        # result, and whole batches, so that every batch is the serial run's (same bits).
        chunk = self.batch_size * max(1, -(-m // (8 * workers * self.batch_size)))
        starts = range(0, m, chunk)
        vectors = vectors.cpu()
        tasks = (delayed(locked_call)(_directional_chunk, self.pretrain, vectors,
                                      data.subset(start, start + chunk), self.batch_size,
                                      self.device)
                 for start in starts)
        parts = Parallel(n_jobs=self.n_jobs, return_as="generator")(tasks)
        for start, part in zip(starts, progress(parts, self.verbose, len(starts),
                                                "scoring pretrain chunks")):
            store(part, start)
        return result

    def influence_to_file(self, data, path):
        """:meth:`influence` written to ``path`` one test chunk at a time, resumably.

        A partial result (``path + ".partial"``) is resumed only when its progress record
        carries this computation's :meth:`fingerprint`; another computation's is discarded
        with a warning that says what differs. An existing file at ``path`` is never
        overwritten, and a directory that does not exist or cannot be written is refused
        before any computing.
        """
        import tempfile

        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(
                f"out={path!r} is a directory; pass the path of a .npy file, for example "
                f"{os.path.join(path, 'influence.npy')!r}.")
        if not os.path.isdir(directory):
            raise ValueError(
                f"out={path!r}: the directory {directory!r} does not exist. Create it "
                "(os.makedirs) or pass another path.")
        try:
            handle, probe = tempfile.mkstemp(dir=directory, prefix=".skmsif-write-test-")
            os.close(handle)
            os.remove(probe)
        except OSError as exc:
            raise ValueError(
                f"out={path!r}: the directory {directory!r} cannot be written ({exc}). "
                "Pass a path in a writable directory.") from exc
        partial, record = path + ".partial", path + ".progress.json"
        shape = (len(data), self.n_pretrain)
        parts = {}
        fingerprint = self.fingerprint(data, parts)
        starts = list(range(0, shape[0], self.batch_size))
        saved = None
        if os.path.exists(record):
            try:
                with open(record, encoding="utf-8") as handle:
                    saved = json.load(handle)
            except (OSError, ValueError):
                saved = None
            if not isinstance(saved, dict):
                saved = None
        ours = (fingerprint is not None and saved is not None
                and saved.get("fingerprint") == fingerprint)
        if os.path.exists(path):
            if ours and not os.path.exists(partial) and \
                    sorted(saved.get("done", [])) == list(range(len(starts))):
                # Interrupted between publishing the result and removing the record.
                os.remove(record)
                return np.load(path, mmap_mode="r")
            raise ValueError(
                f"out={path!r} already exists and is not a partial result of this "
                "computation (no matching progress record); it is not overwritten. Delete "
                f"it (os.remove({path!r})) to compute afresh, or pass another path.")
        if fingerprint is None:
            warnings.warn(
                f"out={path!r}: this computation cannot be resumed if interrupted: "
                f"{parts['unidentified']}. Pass a loss defined with def at module level "
                "(its code, defaults and closure values identify it).", UserWarning,
                stacklevel=3)
        done = set()
        array = None
        if ours and os.path.exists(partial):
            try:
                array = np.lib.format.open_memmap(partial, mode="r+")
            except (OSError, ValueError):
                array = None
            if array is not None and (array.shape != shape or array.dtype != np.float64):
                array = None
            if array is not None:
                done = {int(chunk) for chunk in saved.get("done", [])
                        if 0 <= int(chunk) < len(starts)}
        elif saved is not None and fingerprint is not None and os.path.exists(partial):
            previous = saved.get("parts") or {}
            differing = sorted(key for key in parts if previous.get(key) != parts[key])
            warnings.warn(
                f"out={path!r}: the partial result {partial!r} belongs to another "
                f"computation (differing: {', '.join(differing) or 'unknown'}); it is "
                "discarded and the computation starts afresh.", UserWarning, stacklevel=3)
        if array is None:
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64,
                                              shape=shape)
        for chunk, start in enumerate(progress(starts, self.verbose, len(starts),
                                               "test chunks")):
            if chunk in done:
                continue
            stop = start + self.batch_size
            array[start:stop] = self.influence(data.subset(start, stop), summed=False)
            array.flush()
            done.add(chunk)
            _write_json_atomically(record, {"format": "skmsif.influence-progress/2",
                                            "fingerprint": fingerprint, "parts": parts,
                                            "shape": list(shape), "done": sorted(done)})
        del array
        os.replace(partial, path)
        os.remove(record)
        return np.load(path, mmap_mode="r")

    def fingerprint(self, data, parts=None):
        """Identifies a computation: everything that determines the influence on ``data``.

        A digest of each part: the package and torch versions, the settings that change
        results (``n_jobs`` and ``verbose`` do not), the model copies (architecture, the
        code of user-defined modules, every parameter and buffer), the data ``Z`` and
        ``X`` (streamed digests, computed once and cached here), the drawn Hessian
        subsample, the losses (a callable by its code, constants, defaults, closure values
        and the globals it reads: a name such as ``<lambda>`` identifies nothing), the
        fitted solvers when their random draw cannot be replayed, and ``data``.

        Parameters
        ----------
        data : skmsif._data.DataSource
            The test points.
        parts : dict, default=None
            Receives the digest of each part, and under ``"unidentified"`` the reason
            when a part cannot be identified.

        Returns
        -------
        fingerprint : str or None
            ``None`` when a part cannot be identified (a loss whose closure or globals hold
            an object of unknown kind): such a computation is never resumed.
        """
        import skmsif

        from ._identity import Unidentified, digest as digest_of, feed, module_code
        from ._solvers import FORWARD_MODE_LOCK

        parts = {} if parts is None else parts

        with FORWARD_MODE_LOCK:
            fitted = getattr(self, "_fingerprint_cache", None)
            if fitted is None:
                fitted = {}
                models = new_hasher()
                for adapter in (self.pretrain.adapter, self.finetune_adapter):
                    module_code(models, adapter.module)
                    for name in sorted(adapter.state):
                        models.update(name.encode())
                        feed(models, adapter.state[name], frozenset())
                fitted["models"] = models.hexdigest()
                for key, source in (("Z", self.Z), ("X", self.X)):
                    hasher = new_hasher()
                    fingerprint_sources(hasher, source)
                    fitted[key] = hasher.hexdigest()
                fitted["hessian_sample"] = digest_of(self.public.get("hessian_indices_"))
                self._fingerprint_cache = fitted
        parts.update(fitted)
        parts["version"] = digest_of(getattr(skmsif, "__version__", "unknown"),
                                     torch.__version__, np.__version__)
        settings = {key: value for key, value in self.settings.items()
                    if key not in ("n_jobs", "verbose", "pretrain_loss", "finetune_loss")}
        random_state = settings.get("random_state")
        # Only an int replays its draws; None and a RandomState draw afresh at each fit.
        replayable = isinstance(random_state, Integral)
        if random_state is not None and not replayable:
            settings["random_state"] = type(random_state).__name__  # the draws: below
        reasons = []
        try:
            parts["settings"] = digest_of(settings)
        except Unidentified as exc:
            reasons.append(f"a setting cannot be identified ({exc})")
        for key, spec in (("pretrain_loss", self.pretrain.adapter.loss_spec),
                          ("finetune_loss", self.finetune_adapter.loss_spec)):
            try:
                parts[key] = digest_of(spec)
            except Unidentified as exc:
                reasons.append(f"{key}={getattr(spec, '__qualname__', spec)!r} cannot be "
                               f"identified ({exc})")
        deterministic = ("exact", "cg", "identity")
        solvers = []
        for backend in (self.pretrain_backend, self.finetune_backend):
            name = getattr(backend, "name", None)
            if name in deterministic or (name == "lowrank" and replayable):
                continue
            # A draw that random_state cannot replay, or a backend not known to be
            # deterministic: the fitted arrays themselves.
            solver = getattr(backend, "solver", None)
            solvers.append({key: value for key, value in vars(solver or backend).items()
                            if key.endswith("_") and isinstance(
                                value, (torch.Tensor, np.ndarray, dict))})
        try:
            parts["solvers"] = digest_of(solvers)
        except Unidentified as exc:
            reasons.append(f"a fitted solver cannot be identified ({exc})")
        hasher = new_hasher()
        fingerprint_sources(hasher, data)
        parts[data.name] = hasher.hexdigest()
        if reasons:
            parts["unidentified"] = "; ".join(reasons)
            return None
        total = new_hasher()
        total.update(json.dumps(parts, sort_keys=True).encode())
        return total.hexdigest()


def _resolve_dtype(dtype, *models):
    """``dtype``, with ``"auto"`` resolved to the models' own precision."""
    if dtype != "auto":
        return dtype
    wide = any(parameter.dtype == torch.float64
               for model in models if isinstance(model, torch.nn.Module)
               for parameter in model.parameters())
    return "float64" if wide else "float32"


class StationarityWarning(UserWarning):
    """The given weights are far from a minimum of the objective the estimator assumes.

    Raised by :meth:`MultiStageInfluenceEstimator.fit` when a stage's objective gradient
    is large next to its terms; ``stationarity_`` keeps the figures.

    Examples
    --------
    >>> import warnings
    >>> from skmsif import StationarityWarning
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("error", StationarityWarning)
    ...     issubclass(StationarityWarning, UserWarning)
    True
    """


def _stationarity(state, s, pairs):
    """Gradient of each stage's objective at the given weights, relative to its terms.

    Pretrain: ``mean g + d_p / 2 ||(W, U)||^2``. Finetune, Case 1: ``mean f + d_f / 2
    ||Theta||^2`` over ``Theta``; Case 2: ``mean f + d_f / 2 ||(W, Theta)||^2 + alpha ||W -
    W_pretrained||^2`` over ``(W, Theta)``. The ratio is ``||gradient of the objective||``
    over the sum of the norms of its terms' gradients: 0 at a minimum, about 1 when the
    terms do not balance (training unfinished, or a weight decay other than the damping).
    One gradient pass over each stage's data.
    """
    report = {}
    stages = (("pretrain", state.pretrain, state.Z, float(s["pretrain_damping"]),
               "pretrain_damping"),
              ("finetune", state.finetune, state.X, float(s["finetune_damping"]),
               "finetune_damping"))
    for stage, objective, data, damping, damping_name in stages:
        loss_gradient = objective.mean_gradient(data, state.batch_size, state.device)
        terms = [loss_gradient, damping * objective.point.to(torch.float64)]
        if stage == "finetune":
            if state.embedding == "fixed":
                terms = [term[state.theta_index] for term in terms]
            else:
                anchor = torch.zeros_like(loss_gradient)
                anchor[state.shared_fin_index] = (
                    objective.point[state.shared_fin_index].to(torch.float64)
                    - state.pretrain.point[state.shared_pre_index].to(torch.float64))
                terms.append(2 * state.alpha * anchor)
        total = float(torch.stack(terms).sum(0).norm())
        scale = float(sum(term.norm() for term in terms))
        if not np.isfinite(total):
            raise ValueError(
                f"The {stage} objective's gradient at the given weights is not finite; "
                "check the model's outputs and the data of that stage."
            )
        ratio = total / scale if scale > 0 else 0.0
        report[stage] = {"gradient_norm": total, "relative": ratio}
        if ratio > STATIONARITY_TOL:
            warnings.warn(
                f"The {stage} weights are not at a minimum of the objective the estimator "
                f"assumes (mean loss + {damping_name}/2 ||params||^2"
                + (" + alpha ||W - W_pretrained||^2" if stage == "finetune"
                   and state.embedding == "updated" else "")
                + f"): its gradient is {ratio:.2g} of the size of its terms (0 at a "
                f"minimum, 1 when they do not balance). Influence describes a minimum: "
                f"set {damping_name} to the weight decay (L2 coefficient) used in "
                "training, or train that stage further. stationarity_ keeps the figures.",
                StationarityWarning, stacklevel=4)
    return report


def _solve_settings(s):
    return SolveSettings(tol=s["tol"], max_iter=s["max_iter"],
                         iterative_solver=s["iterative_solver"], rank=s["rank"],
                         random_state=s["random_state"],
                         exact_max_memory=s["exact_max_memory"], verbose=s["verbose"],
                         preconditioner=s["preconditioner"])


def _check_preconditioner(s, backends):
    """A preconditioner needs a stage solved by CG (before any expensive work)."""
    if s["preconditioner"] is None:
        return
    if s["iterative_solver"] != "cg":
        raise ValueError(
            f"preconditioner={s['preconditioner']!r} preconditions conjugate gradients; "
            f"got iterative_solver={s['iterative_solver']!r}. Pass iterative_solver='cg' "
            "(with curvature='gauss_newton' the damped curvature is positive definite), "
            "or preconditioner=None."
        )
    if "cg" not in backends.values():
        raise ValueError(
            f"preconditioner={s['preconditioner']!r} applies to the stages solved with "
            f"hessian='cg'; here they are {backends}. Pass hessian='cg' (or "
            "finetune_hessian='cg'), or preconditioner=None."
        )


def _resolve_curvature(curvature, backend):
    if curvature == "auto":
        return backend.default_curvature
    if curvature not in backend.curvatures:
        raise ValueError(
            f"hessian={backend.name!r} approximates only {list(backend.curvatures)}; got "
            f"curvature={curvature!r}. Pass curvature='auto' or one of those."
        )
    return curvature


def _directional_chunk(objective, vectors, data, batch_size, device):
    """One worker's share of the scoring pass (module level, so joblib can ship it)."""
    return objective.directional(vectors.to(device), data, batch_size, device).cpu().numpy()


def _write_json_atomically(path, content):
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    os.replace(temporary, path)


def _cached_head(model, state, shared, theta, loss, data, batch_size, device):
    """The Case 1 head objective on precomputed embedding outputs, or ``None``.

    Applies when ``model`` is an ``nn.Sequential`` whose leading steps hold exactly the
    shared parameters and whose remaining steps hold exactly ``theta``, and the data are
    plain tensors. The result is checked against the whole network on the first batch.
    """
    if not isinstance(model, torch.nn.Sequential):
        return None
    steps = list(model.named_children())
    shared, covered = set(shared), set()
    for count, (key, step) in enumerate(steps[:-1], start=1):
        covered |= {f"{key}.{name}" for name, _ in step.named_parameters()}
        if not covered <= shared:
            return None
        if covered == shared:
            break
    else:
        return None
    prefix, head = model[:count], model[count:]
    head_names = {name for name, _ in head.named_parameters(remove_duplicate=False)}
    if head_names != set(theta):
        return None
    first_inputs, _ = data.first_batch(batch_size, device)
    if isinstance(first_inputs, dict):
        return None
    prefix_keys = {name for name, _ in list(prefix.named_parameters())
                   + list(prefix.named_buffers())}
    prefix_state = {key: state[key] for key in prefix_keys}
    features, targets = [], []
    with torch.no_grad():
        for inputs, batch_targets in data.batches(batch_size, device):
            features.append(functional_call(prefix, prefix_state, (inputs,)))
            targets.append(batch_targets)
    features_data = TensorSource(torch.cat(features), torch.cat(targets), data.name,
                                 data._cast.dtype)
    head_adapter = ModelAdapter(head, loss, "finetune_model", "finetune_loss")
    objective = Objective(head_adapter, theta)
    whole = Objective(ModelAdapter(model, loss, "finetune_model", "finetune_loss"), theta)
    inputs, batch_targets = data.first_batch(batch_size, device)
    head_inputs = features_data.inputs[:len(batch_targets)]
    with torch.no_grad():
        expected = whole.losses(whole.point, inputs, batch_targets)
        got = objective.losses(objective.point, head_inputs, batch_targets)
    if not torch.allclose(got, expected, rtol=1e-10, atol=1e-12):
        return None
    return objective, features_data


def _loss_or_default(loss, model_loss):
    """The user's loss, or the model's own when the user left the default."""
    if model_loss is not None and isinstance(loss, str) and loss == "cross_entropy":
        return model_loss
    return loss


def _check_embedding_unchanged(pretrain_model, finetune_model, pairs):
    pre = dict(pretrain_model.named_parameters())
    fin = dict(finetune_model.named_parameters())
    for pre_name, fin_name in pairs:
        a, b = pre[pre_name].detach(), fin[fin_name].detach()
        if a is not b and not torch.equal(a.cpu(), b.cpu().to(a.dtype)):
            raise ValueError(
                f"embedding='fixed' but shared parameter {pre_name!r} differs between "
                f"pretrain_model and finetune_model (largest difference "
                f"{float((a.cpu() - b.cpu().to(a.dtype)).abs().max()):.3g}). If the "
                "embedding was trained during finetuning, use embedding='updated' with "
                "alpha > 0."
            )

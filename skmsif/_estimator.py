"""The multi-stage influence estimator (Chen et al., Sec. 3; notation in ``doc/guide/cases.md``)."""

import copy
import functools
import hashlib
import json
import os
from numbers import Integral, Real

import numpy as np
import torch
from joblib import Parallel, delayed, effective_n_jobs
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted
from torch.func import functional_call

from ._adapters import transform_data, unwrap_model
from ._checks import check_finite_parameters, check_module, probe_model, resolve_device
from ._curvature import Objective
from ._data import TensorData, as_data
from ._losses import LOSSES, resolve_loss
from ._params import find_shared
from ._progress import progress
from ._solvers import ExactSolver, IdentitySolver, IterativeSolver, LowRankSolver

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
    hessian : {"auto", "exact", "cg", "lowrank", "identity"}, default="auto"
        How ``(Hessian + damping * I) x = b`` is solved. ``"exact"``: a dense Hessian in
        float64 and its eigendecomposition, computed once in ``fit``; refused when
        ``3 p^2`` float64 numbers exceed ``exact_max_memory``. ``"cg"``: Krylov iterations
        with Hessian-vector products (``iterative_solver`` says which), no dense matrix.
        ``"identity"``: the paper's Fig. 4 baseline, both inverse Hessians replaced by the
        identity (dampings unused; the mixed block of Case 1 stays). ``"lowrank"``: the
        ``rank`` eigenpairs of largest magnitude of each damped Hessian, by Lanczos,
        computed once in ``fit`` and reused for every test point (an approximation that
        drops the rest of the spectrum; exact at full rank). ``"auto"``: ``"exact"`` when
        no Hessian to invert has more than 2,000 parameters, else ``"cg"``.
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
    dtype : {"float64", "float32"}, default="float64"
        Precision of all computations (the models are evaluated on copies in this dtype).
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
    hessian_ : str
        The backend used (``"auto"`` resolved).
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
    in eval mode, so dropout is off and batch norm uses its running statistics.

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
    'exact'
    >>> x_test = (X[0][:5], X[1][:5])
    >>> est.influence(x_test).shape
    (5, 30)
    >>> est.score(x_test).shape
    (30,)
    """

    _parameter_constraints = {
        "embedding": [StrOptions({"fixed", "updated"})],
        "alpha": [Interval(Real, 0, None, closed="left")],
        "hessian": [StrOptions({"auto", "exact", "cg", "identity", "lowrank"})],
        "pretrain_damping": [Interval(Real, 0, None, closed="left")],
        "finetune_damping": [Interval(Real, 0, None, closed="left")],
        "shared": [None, str, list, tuple],
        "pretrain_loss": [StrOptions(set(LOSSES)), callable],
        "finetune_loss": [StrOptions(set(LOSSES)), callable],
        "hessian_samples": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "iterative_solver": [StrOptions({"minres", "cg", "cg_normal"})],
        "dtype": [StrOptions({"float64", "float32"})],
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
        pretrain_damping=1e-2,
        finetune_damping=1e-8,
        shared=None,
        pretrain_loss="cross_entropy",
        finetune_loss="cross_entropy",
        hessian_samples=None,
        random_state=None,
        batch_size=256,
        max_iter=1000,
        tol=1e-10,
        iterative_solver="minres",
        dtype="float64",
        device="cpu",
        exact_max_memory=2**31,
        rank=100,
        n_jobs=None,
        verbose=0,
    ):
        self.embedding = embedding
        self.alpha = alpha
        self.hessian = hessian
        self.pretrain_damping = pretrain_damping
        self.finetune_damping = finetune_damping
        self.shared = shared
        self.pretrain_loss = pretrain_loss
        self.finetune_loss = finetune_loss
        self.hessian_samples = hessian_samples
        self.random_state = random_state
        self.batch_size = batch_size
        self.max_iter = max_iter
        self.tol = tol
        self.iterative_solver = iterative_solver
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
        Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The pretrain data the pretrain model was trained on (``m`` examples).
        X : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The finetune training data (``n`` examples).

        Returns
        -------
        self : MultiStageInfluenceEstimator
            Fitted. With ``hessian="exact"`` the dense Hessians are built and decomposed
            here; iterative solves happen in :meth:`influence` and :meth:`score`.
        """
        self._validate_params()
        pretrain_model, pretrain_transform, pretrain_default_loss = unwrap_model(
            pretrain_model, "pretrain_model")
        finetune_model, finetune_transform, finetune_default_loss = unwrap_model(
            finetune_model, "finetune_model")
        check_module(pretrain_model, "pretrain_model")
        check_module(finetune_model, "finetune_model")
        Z = transform_data(Z, pretrain_transform, "Z")
        X = transform_data(X, finetune_transform, "X")
        self._finetune_transform = finetune_transform
        if self.embedding == "updated" and self.alpha <= 0:
            raise ValueError(
                f"embedding='updated' needs alpha > 0 (the weight of the proximity term "
                f"alpha * ||W - W_pretrained||^2); got alpha={self.alpha!r}. Pass e.g. "
                "alpha=0.01, or embedding='fixed' if the embedding was frozen."
            )
        device = resolve_device(self.device)
        dtype = getattr(torch, self.dtype)

        pairs = find_shared(pretrain_model, finetune_model, self.shared)
        fin_names = [name for name, _ in finetune_model.named_parameters()]
        if len(pairs) == len(fin_names):
            raise ValueError(
                f"shared={self.shared!r} selects every parameter of finetune_model; the "
                "finetune model needs a head of its own (Theta) besides the embedding."
            )
        check_finite_parameters(pretrain_model, "pretrain_model")
        check_finite_parameters(finetune_model, "finetune_model")
        if self.embedding == "fixed":
            _check_embedding_unchanged(pretrain_model, finetune_model, pairs)

        # One deepcopy of both models keeps parameters they share shared in the copies.
        pretrain_copy, finetune_copy = copy.deepcopy((pretrain_model, finetune_model))
        for module in (pretrain_copy, finetune_copy):
            module.eval()
            for parameter in module.parameters():
                parameter.grad = None
                parameter.requires_grad_(False)

        self._device = device
        self._dtype = dtype
        self._Z = as_data(Z, "Z", dtype)
        self._X = as_data(X, "X", dtype)
        # A model that brings its own loss (a skorch net's criterion) sets the default.
        pretrain_loss = _loss_or_default(self.pretrain_loss, pretrain_default_loss)
        finetune_loss = _loss_or_default(self.finetune_loss, finetune_default_loss)
        self._finetune_loss_spec = finetune_loss
        self._pretrain_loss = resolve_loss(pretrain_loss)
        self._finetune_loss = resolve_loss(finetune_loss)

        pretrain_state = _state(pretrain_copy, dtype, device)
        finetune_state = _state(finetune_copy, dtype, device)
        self._probe(pretrain_copy, pretrain_state, self._Z, pretrain_loss,
                    "pretrain_loss", "pretrain_model")
        self._probe(finetune_copy, finetune_state, self._X, finetune_loss,
                    "finetune_loss", "finetune_model")

        pre_names = [name for name, _ in pretrain_copy.named_parameters()]
        shared_pre = [pre for pre, _ in pairs]
        shared_fin = [fin for _, fin in pairs]
        theta = [name for name in fin_names if name not in set(shared_fin)]
        self._pretrain = Objective(pretrain_copy, pretrain_state, pre_names,
                                   self._pretrain_loss, "pretrain_loss")
        self._finetune = Objective(finetune_copy, finetune_state, fin_names,
                                   self._finetune_loss, "finetune_loss")
        self._pretrain.check(self._Z, self.batch_size, device)
        self._finetune.check(self._X, self.batch_size, device)
        self._shared_pre_index = self._pretrain.offsets(shared_pre).to(device)
        self._shared_fin_index = self._finetune.offsets(shared_fin).to(device)
        self._theta_index = self._finetune.offsets(theta).to(device)

        self.shared_parameters_ = shared_pre
        self.n_pretrain_ = len(self._Z)
        self.n_finetune_ = len(self._X)
        self.n_params_ = {
            "W": int(self._shared_pre_index.numel()),
            "U": int(self._pretrain.n_params - self._shared_pre_index.numel()),
            "Theta": int(self._theta_index.numel()),
        }
        if self.hessian_samples is None or self.hessian_samples >= self.n_pretrain_:
            self.hessian_indices_ = None
        else:
            rng = check_random_state(self.random_state)
            self.hessian_indices_ = np.sort(
                rng.choice(self.n_pretrain_, self.hessian_samples, replace=False))

        self._solve_data = self._X
        self.features_cached_ = False
        if self.embedding == "fixed":
            # Case 1 inverts the Hessian over Theta alone; W is fixed, so that Hessian
            # needs only the embedding's outputs, which are computed once when possible.
            self._finetune_solve_space = Objective(finetune_copy, finetune_state, theta,
                                                   self._finetune_loss, "finetune_loss")
            cached = _cached_head(finetune_copy, finetune_state, shared_fin, theta,
                                  self._finetune_loss, self._X, self.batch_size, device)
            if cached is not None:
                self._finetune_solve_space, self._solve_data = cached
                self.features_cached_ = True
            finetune_shift = torch.full((len(self._theta_index),),
                                        float(self.finetune_damping), dtype=dtype,
                                        device=device)
        else:
            self._finetune_solve_space = self._finetune
            finetune_shift = torch.full((self._finetune.n_params,),
                                        float(self.finetune_damping), dtype=dtype,
                                        device=device)
            finetune_shift[self._shared_fin_index] += 2 * self.alpha
        pretrain_shift = torch.full((self._pretrain.n_params,),
                                    float(self.pretrain_damping), dtype=dtype, device=device)

        largest = max(self._pretrain.n_params, self._finetune_solve_space.n_params)
        if self.hessian == "auto":
            self.hessian_ = "exact" if largest <= AUTO_EXACT_MAX_PARAMS else "cg"
        else:
            self.hessian_ = self.hessian
        if self.hessian_ == "exact":
            needed = 3 * largest**2 * 8
            if needed > self.exact_max_memory:
                raise ValueError(
                    f"hessian='exact' needs dense {largest} x {largest} float64 matrices "
                    f"(about {needed / 2**30:.2f} GiB with the eigendecomposition), over "
                    f"exact_max_memory={self.exact_max_memory} bytes. Use hessian='cg' "
                    "(Hessian-vector products, no dense matrix) or raise exact_max_memory."
                )
        indices = (None if self.hessian_indices_ is None
                   else torch.as_tensor(self.hessian_indices_))
        self.pretrain_solver_ = self._make_solver(
            self._pretrain, self._Z, indices, pretrain_shift, "pretrain",
            "pretrain_damping")
        self.finetune_solver_ = self._make_solver(
            self._finetune_solve_space, self._solve_data, None, finetune_shift, "finetune",
            "finetune_damping")
        self._mixed_basis = None
        if self.embedding == "fixed" and self.hessian_ == "lowrank":
            # v1 lies in the span of the kept eigenvectors u_j, so H_WTheta v1 is a
            # combination of the H_WTheta u_j: computed once here, reused for every test.
            basis = self.finetune_solver_.eigenvectors_.to(dtype)
            padded = torch.zeros(len(basis), self._finetune.n_params, dtype=dtype,
                                 device=device)
            padded[:, self._theta_index] = basis
            self._mixed_basis = self._finetune.hvp(padded, self._X, self.batch_size,
                                                   device)[:, self._shared_fin_index]
        return self

    def _probe(self, module, state, data, loss, loss_name, model_name):
        probe_model(functools.partial(_call, module, state), data, loss, loss_name,
                    model_name, self.batch_size, self._device)

    def _make_solver(self, objective, data, indices, shift, name, damping_name):
        if self.hessian_ == "identity":
            return IdentitySolver()
        if self.hessian_ == "exact":
            hessian = objective.dense_hessian(data, self.batch_size, self._device, indices,
                                              self.verbose)
            return ExactSolver(hessian, shift, name, damping_name)

        hvp = functools.partial(objective.hvp, data=data, batch_size=self.batch_size,
                                device=self._device, indices=indices)
        if self.hessian_ == "lowrank":
            return LowRankSolver(hvp, shift, self.rank, self.random_state, name,
                                 self.verbose)
        return IterativeSolver(hvp, shift, self.iterative_solver, self.tol, self.max_iter,
                               name, self.verbose)

    # ------------------------------------------------------------- scoring

    def influence(self, x_test, out=None):
        """Influence of every pretrain example on every test point.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
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
        data = self._test_data(x_test)
        if out is None:
            return self._influence(data, summed=False)
        return self._influence_to_file(data, os.fspath(out))

    def score(self, x_test):
        """Influence of every pretrain example on the summed loss of the test points.

        Equals ``influence(x_test).sum(axis=0)`` (paper Eq. 9) at the cost of one set of
        solves.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points of the finetune task.

        Returns
        -------
        scores : ndarray of shape (n_pretrain,)
            Summed influence; positive means harmful to the test set as a whole.
        """
        return self._influence(self._test_data(x_test), summed=True)[0]

    def _test_data(self, x_test):
        check_is_fitted(self)
        x_test = transform_data(x_test, self._finetune_transform, "x_test")
        data = as_data(x_test, "x_test", self._dtype)
        self._probe(self._finetune.module, self._finetune.state, data,
                    self._finetune_loss_spec, "finetune_loss", "finetune_model")
        self._finetune.check(data, self.batch_size, self._device)
        return data

    def _influence(self, test_data, summed):
        """Steps 1-3 of the class Notes; returns ``(k, m)`` numpy scores."""
        gradients = self._finetune.gradient_rows(test_data, self.batch_size, self._device,
                                                 summed)
        shared_fin = self._shared_fin_index
        if self.embedding == "fixed" and self._mixed_basis is not None:
            solver = self.finetune_solver_
            coefficients = ((gradients[:, self._theta_index].to(torch.float64)
                             @ solver.eigenvectors_.T) / solver.eigenvalues_)
            mixed = coefficients.to(gradients.dtype) @ self._mixed_basis
            w = gradients[:, shared_fin] - mixed
        elif self.embedding == "fixed":
            v1 = self.finetune_solver_.solve(gradients[:, self._theta_index])
            padded = torch.zeros_like(gradients)
            padded[:, self._theta_index] = v1
            mixed = self._finetune.hvp(padded, self._X, self.batch_size, self._device)
            w = gradients[:, shared_fin] - mixed[:, shared_fin]
        else:
            v1 = self.finetune_solver_.solve(gradients)
            w = 2 * self.alpha * v1[:, shared_fin]
        rhs = torch.zeros(len(w), self._pretrain.n_params, dtype=w.dtype, device=w.device)
        rhs[:, self._shared_pre_index] = w
        v2 = self.pretrain_solver_.solve(rhs)
        return -self._directional(v2).astype(np.float64)

    def _directional(self, vectors):
        """``vectors @ grad g(z)`` for every pretrain example: ``(k, m)`` numpy."""
        workers = effective_n_jobs(self.n_jobs)
        if workers == 1:
            return self._pretrain.directional(vectors, self._Z, self.batch_size,
                                              self._device, self.verbose).cpu().numpy()
        m = self.n_pretrain_
        chunk = max(self.batch_size, -(-m // (4 * workers)))
        starts = range(0, m, chunk)
        vectors = vectors.cpu()
        tasks = (delayed(_directional_chunk)(self._pretrain, vectors,
                                             self._Z.subset(start, start + chunk),
                                             self.batch_size, self._device)
                 for start in starts)
        parts = Parallel(n_jobs=self.n_jobs, return_as="generator")(tasks)
        return np.concatenate(list(progress(parts, self.verbose, len(starts),
                                            "scoring pretrain chunks")), axis=1)

    def _influence_to_file(self, data, path):
        partial, record = path + ".partial", path + ".progress.json"
        shape = (len(data), self.n_pretrain_)
        fingerprint = self._fingerprint(data)
        done = set()
        if os.path.exists(partial) and os.path.exists(record):
            with open(record, encoding="utf-8") as handle:
                saved = json.load(handle)
            if saved.get("fingerprint") == fingerprint:
                done = set(saved["done"])
        if done:
            array = np.lib.format.open_memmap(partial, mode="r+")
        else:
            array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float64,
                                              shape=shape)
        starts = list(range(0, shape[0], self.batch_size))
        for chunk, start in enumerate(progress(starts, self.verbose, len(starts),
                                               "test chunks")):
            if chunk in done:
                continue
            stop = start + self.batch_size
            array[start:stop] = self._influence(data.subset(start, stop), summed=False)
            array.flush()
            done.add(chunk)
            _write_json_atomically(record, {"fingerprint": fingerprint,
                                            "done": sorted(done)})
        del array
        os.replace(partial, path)
        os.remove(record)
        return np.load(path, mmap_mode="r")

    def _fingerprint(self, data):
        """Identifies a computation: settings, fitted weights and test points."""
        digest = hashlib.sha256()
        params = {key: value if isinstance(value, (str, int, float, bool, type(None),
                                                   list, tuple))
                  else getattr(value, "__qualname__", type(value).__name__)
                  for key, value in self.get_params().items()}
        digest.update(json.dumps(params, sort_keys=True).encode())
        for tensor in (self._pretrain.point, self._finetune.point, data.inputs,
                       data.targets):
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        digest.update(str((self.n_pretrain_, self.batch_size)).encode())
        return digest.hexdigest()


def _call(module, state, inputs):
    return functional_call(module, state, (inputs,))


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
    shared parameters and whose remaining steps hold exactly ``theta``. The result is
    checked against the whole network on the first batch.
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
    prefix_keys = {name for name, _ in list(prefix.named_parameters())
                   + list(prefix.named_buffers())}
    head_keys = {name for name, _ in list(head.named_parameters())
                 + list(head.named_buffers())}
    prefix_state = {key: state[key] for key in prefix_keys}
    head_state = {key: state[key] for key in head_keys}
    with torch.no_grad():
        features = torch.cat([functional_call(prefix, prefix_state, (inputs,)).cpu()
                              for inputs, _ in data.batches(batch_size, device)])
    features_data = TensorData(features, data.targets, data.name)
    objective = Objective(head, head_state, theta, loss, "finetune_loss")
    whole = Objective(model, state, theta, loss, "finetune_loss")
    inputs, targets = next(data.batches(batch_size, device))
    head_inputs, _ = next(features_data.batches(batch_size, device))
    with torch.no_grad():
        expected = whole.losses(whole.point, inputs, targets)
        got = objective.losses(objective.point, head_inputs, targets)
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


def _state(module, dtype, device):
    state = {}
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.to(device)
    return state

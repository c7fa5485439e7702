"""Tune the estimator's hyper-parameters with scikit-learn's own search tools.

:class:`MultiStageInfluenceEstimator` keeps its ``fit(pretrain_model, finetune_model, Z,
X)`` shape, and its ``score(x_test)`` returns influence scores, not a number to maximise,
so it cannot be searched directly. :class:`AuditedInfluenceRegressor` is the thin adapter
that can: its samples are *audited pretrain examples* (their indices in ``Z``) and its
targets the *true* change of the summed test loss when each is removed and both stages are
retrained (:func:`skmsif.validation.leave_one_out`). It predicts that change from the
influence scores (``-I(z) / m``, ``doc/guide/influence.md``) and scores itself by the
Pearson or Spearman correlation of predicted and true changes, so that ``GridSearchCV``
ranks settings by faithfulness, cross-validated over the audited examples::

    search = GridSearchCV(
        AuditedInfluenceRegressor(MultiStageInfluenceEstimator(embedding="updated")),
        {"estimator__pretrain_damping": [1e-3, 1e-2], "estimator__alpha": [0.01, 0.1],
         "estimator__hessian": ["exact", "cg", "identity"]},
        cv=KFold(3, shuffle=True, random_state=0))
    search.fit(audited, true_change, pretrain_model=..., finetune_model=..., Z=Z,
               X_finetune=X, x_test=x_test)
    search.cv_results_   # the comparison table, identity baseline included

The models and data are fit parameters; the finetune training data is called
``X_finetune`` there because ``GridSearchCV.fit`` already has an argument ``X`` (the
audited indices).
"""

import os

import joblib
import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, RegressorMixin, clone
from sklearn.metrics import make_scorer
from sklearn.utils._param_validation import HasMethods, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._estimator import MultiStageInfluenceEstimator
from .validation import faithfulness

__all__ = ["AuditedInfluenceRegressor", "faithfulness_scorer", "pearson_score",
           "spearman_score"]

_FIT_PARAMETERS = ("pretrain_model", "finetune_model", "Z", "X_finetune", "x_test")


def pearson_score(change, predicted_change):
    """Pearson correlation of true and predicted loss changes (NaN if undefined).

    Parameters
    ----------
    change : array-like of shape (n,)
        True changes of the summed test loss (leave-one-out retraining).
    predicted_change : array-like of shape (n,)
        Predicted changes, e.g. ``AuditedInfluenceRegressor.predict``.

    Returns
    -------
    score : float
        In ``[-1, 1]``; NaN for fewer than two examples or a constant input.

    See Also
    --------
    spearman_score : The rank correlation.
    skmsif.validation.faithfulness : This and other metrics, also per group.

    Examples
    --------
    >>> import math
    >>> from skmsif.model_selection import pearson_score
    >>> change = [0.05, 0.1, -0.15, 0.2]
    >>> round(pearson_score(change, [0.1, 0.2, -0.3, 0.4]), 3)  # right up to a scale
    1.0
    >>> round(pearson_score(change, [0.1, 0.2, -0.3, 0.8]), 3)
    0.946
    >>> math.isnan(pearson_score(change, [0.1, 0.1, 0.1, 0.1]))
    True
    """
    return faithfulness(predicted_change, change)["all"]["pearson"]


def spearman_score(change, predicted_change):
    """Spearman rank correlation of true and predicted loss changes (NaN if undefined).

    Parameters
    ----------
    change : array-like of shape (n,)
        True changes of the summed test loss (leave-one-out retraining).
    predicted_change : array-like of shape (n,)
        Predicted changes, e.g. ``AuditedInfluenceRegressor.predict``.

    Returns
    -------
    score : float
        In ``[-1, 1]``; NaN for fewer than two examples or a constant input.

    See Also
    --------
    pearson_score : The linear correlation.
    skmsif.validation.faithfulness : This and other metrics, also per group.

    Examples
    --------
    Only the ordering counts: a prediction in the right order scores 1 even where its
    values are off.

    >>> from skmsif.model_selection import spearman_score
    >>> change = [0.05, 0.1, -0.15, 0.2]
    >>> round(spearman_score(change, [0.1, 0.2, -0.3, 0.8]), 3)
    1.0
    >>> round(spearman_score(change, [0.4, 0.3, -0.1, 0.2]), 3)
    0.2
    """
    return faithfulness(predicted_change, change)["all"]["spearman"]


_METRICS = {"pearson": pearson_score, "spearman": spearman_score}


def faithfulness_scorer(metric="spearman"):
    """A scorer for ``GridSearchCV(scoring=...)`` from a faithfulness metric.

    Parameters
    ----------
    metric : {"spearman", "pearson"}, default="spearman"
        Correlation of predicted and true loss changes.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, indices, change)``, as made by
        :func:`sklearn.metrics.make_scorer`. Pass a dict of them to score several
        metrics in one search, e.g. ``{m: faithfulness_scorer(m) for m in ("spearman",
        "pearson")}`` with ``refit="spearman"``.

    Raises
    ------
    ValueError
        When ``metric`` is neither ``"spearman"`` nor ``"pearson"``.

    See Also
    --------
    AuditedInfluenceRegressor : The estimator such a scorer scores.

    Examples
    --------
    Compare the exact backend with the identity baseline on six audited examples (their
    true changes made up here), scored by both correlations and refitted by Spearman's:

    >>> import numpy as np
    >>> import torch
    >>> from sklearn.model_selection import GridSearchCV
    >>> from torch import nn
    >>> from skmsif import MultiStageInfluenceEstimator
    >>> from skmsif.model_selection import (AuditedInfluenceRegressor,
    ...                                     faithfulness_scorer, pearson_score)
    >>> _ = torch.manual_seed(0)
    >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
    >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
    >>> Z = (torch.randn(30, 3), torch.randint(0, 2, (30,)))
    >>> X = (torch.randn(20, 3), torch.randint(0, 3, (20,)))
    >>> x_test = (X[0][:5], X[1][:5])
    >>> audited = np.arange(6)
    >>> change = np.array([0.3, -0.1, 0.0, 0.2, -0.2, 0.1])
    >>> search = GridSearchCV(
    ...     AuditedInfluenceRegressor(MultiStageInfluenceEstimator(finetune_damping=1e-3)),
    ...     {"estimator__hessian": ["exact", "identity"]},
    ...     scoring={m: faithfulness_scorer(m) for m in ("spearman", "pearson")},
    ...     refit="spearman", cv=2)
    >>> _ = search.fit(audited, change, pretrain_model=pretrain_model,
    ...                finetune_model=finetune_model, Z=Z, X_finetune=X, x_test=x_test)
    >>> search.cv_results_["mean_test_spearman"].shape, list(search.best_params_)
    ((2,), ['estimator__hessian'])

    A scorer is called as ``scorer(estimator, indices, change)``:

    >>> scorer = faithfulness_scorer("pearson")
    >>> best = search.best_estimator_
    >>> bool(np.isclose(scorer(best, audited, change),
    ...                 pearson_score(change, best.predict(audited))))
    True
    """
    if metric not in _METRICS:
        raise ValueError(f"metric must be 'spearman' or 'pearson'; got {metric!r}.")
    return make_scorer(_METRICS[metric])


def _check_indices(indices, name="indices"):
    array = np.asarray(indices)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{name} must hold one pretrain-example index per row, shape (n,) or (n, 1); "
            f"got shape {array.shape}."
        )
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or (
            np.issubdtype(array.dtype, np.floating) and np.all(np.mod(array, 1) == 0))):
        raise TypeError(
            f"{name} must hold integer positions in Z; got dtype {array.dtype}."
        )
    return array.astype(np.int64)


def _influence_scores(estimator, pretrain_model, finetune_model, Z, X, x_test):
    """Fit a clone of ``estimator`` and score ``Z`` against ``x_test``.

    Module level so that ``joblib.Memory`` can cache it.
    """
    fitted = clone(estimator).fit(pretrain_model, finetune_model, Z, X)
    return fitted.score(x_test), fitted.n_pretrain_, fitted.hessian_


class AuditedInfluenceRegressor(MetaEstimatorMixin, RegressorMixin, BaseEstimator):
    """Influence as a predictor of leave-one-out loss changes, for hyper-parameter search.

    The samples of this regressor are audited pretrain examples, given by their index in
    ``Z``; the target of each is the true change of the summed finetune test loss when
    that example is removed and both stages are retrained (from
    :func:`skmsif.validation.leave_one_out`). ``fit`` fits ``estimator`` on the models
    and data passed as fit parameters and scores every pretrain example against
    ``x_test``; ``predict`` returns the predicted change ``-I(z) / m``; ``score`` is the
    correlation (``metric``) of predicted and true changes. Inside ``GridSearchCV`` the
    estimator's parameters are searched as ``estimator__<name>``, and every setting is
    scored on the audited examples of the held-out folds.

    Parameters
    ----------
    estimator : MultiStageInfluenceEstimator, default=None
        The influence estimator whose settings are evaluated; cloned in ``fit``.
        ``None``: ``MultiStageInfluenceEstimator()``.
    metric : {"spearman", "pearson"}, default="spearman"
        What :meth:`score` returns: Spearman's rank correlation (is the ordering of the
        audited examples right?) or Pearson's (are the changes right up to a scale?).
    memory : str, os.PathLike, joblib.Memory or None, default=None
        Where the influence scores of a setting are cached. They depend on the
        estimator's parameters, the models and the data but not on the audited indices,
        so with a cache each setting is computed once instead of once per fold. The key
        is a hash of all of them (``joblib.Memory``); clear the cache after editing a
        model's code.

    Attributes
    ----------
    scores_ : ndarray of shape (n_pretrain,)
        ``estimator.score(x_test)``: influence of every pretrain example on the summed
        test loss (positive: harmful).
    n_pretrain_ : int
        Number of pretrain examples ``m``.
    hessian_ : str
        The backend the estimator used (``"auto"`` resolved).

    See Also
    --------
    skmsif.validation.leave_one_out : The true changes (``y``).
    skmsif.validation.audit_indices : Which examples to audit (``X``).
    faithfulness_scorer : Score with another metric, or several, in a search.

    Notes
    -----
    ``fit`` learns nothing from the true changes (they are only checked): influence has
    no trainable parameters. Cross-validation nevertheless matters for the search: the
    setting is *chosen* on the audited examples of the training folds (by the mean of
    the fold scores), and a nested split, or a final held-out set of audits scored with
    ``best_estimator_.score``, measures how well the chosen setting does on audits it
    was not chosen on.

    scikit-learn's cross-validation slices every fit parameter whose ``len`` equals the
    number of audited examples. Data passed as ``(inputs, targets)`` pairs is safe (at
    least 3 examples are needed); a ``torch.utils.data.Dataset`` or an
    ``nn.Sequential`` whose length equals the number of audits is not, and ``fit``
    refuses the lists that slicing produces.

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from torch import nn
    >>> from skmsif import MultiStageInfluenceEstimator
    >>> from skmsif.model_selection import AuditedInfluenceRegressor
    >>> gen = torch.Generator().manual_seed(0)
    >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
    >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
    >>> Z = (torch.randn(30, 3, generator=gen), torch.randint(0, 2, (30,), generator=gen))
    >>> X = (torch.randn(20, 3, generator=gen), torch.randint(0, 3, (20,), generator=gen))
    >>> x_test = (X[0][:5], X[1][:5])
    >>> reg = AuditedInfluenceRegressor(
    ...     MultiStageInfluenceEstimator(hessian="exact", finetune_damping=1e-3))
    >>> audited, change = np.array([0, 1, 2, 3]), np.array([0.1, -0.2, 0.0, 0.3])
    >>> reg.fit(audited, change, pretrain_model=pretrain_model,
    ...         finetune_model=finetune_model, Z=Z, X_finetune=X, x_test=x_test).n_pretrain_
    30
    >>> reg.predict(audited).shape
    (4,)
    >>> -1 <= reg.score(audited, change) <= 1
    True
    """

    _parameter_constraints = {
        "estimator": [None, HasMethods(["fit", "score"])],
        "metric": [StrOptions(set(_METRICS))],
        "memory": [None, str, os.PathLike, HasMethods(["cache"])],
    }

    def __init__(self, estimator=None, metric="spearman", memory=None):
        self.estimator = estimator
        self.metric = metric
        self.memory = memory

    def fit(self, indices, change, *, pretrain_model, finetune_model, Z, X_finetune,
            x_test):
        """Compute the influence scores of one setting of the estimator.

        Parameters
        ----------
        indices : array-like of int of shape (n_audited,) or (n_audited, 1)
            Positions in ``Z`` of audited pretrain examples.
        change : array-like of shape (n_audited,)
            Their true loss changes (``leave_one_out``); checked, not learnt from.
        pretrain_model, finetune_model : torch.nn.Module, skorch net or Pipeline
            As for :meth:`MultiStageInfluenceEstimator.fit`.
        Z : (inputs, targets) pair or torch.utils.data.Dataset
            The pretrain data.
        X_finetune : (inputs, targets) pair or torch.utils.data.Dataset
            The finetune training data (``X`` of the estimator's ``fit``).
        x_test : (inputs, targets) pair or torch.utils.data.Dataset
            The finetune test points whose summed loss the true changes were measured on.

        Returns
        -------
        self : AuditedInfluenceRegressor
            Fitted.
        """
        self._validate_params()
        indices = _check_indices(indices)
        change = np.asarray(change, dtype=np.float64)
        if change.shape != indices.shape:
            raise ValueError(
                f"change must hold one true loss change per audited index, shape "
                f"{indices.shape}; got shape {change.shape}."
            )
        if not np.isfinite(change).all():
            raise ValueError(
                "change contains NaN or infinite values; drop the audited examples whose "
                "retraining failed."
            )
        if len(indices) < 3:
            raise ValueError(
                f"{len(indices)} audited examples; at least 3 are needed to fit (and a "
                "correlation needs at least 2 per held-out fold)."
            )
        fit_parameters = dict(zip(_FIT_PARAMETERS, (pretrain_model, finetune_model, Z,
                                                    X_finetune, x_test)))
        for name, value in fit_parameters.items():
            if isinstance(value, list) and len(value) == len(indices) and len(value) != 2:
                raise TypeError(
                    f"{name} is a list of {len(value)} items, as many as the audited "
                    "examples: scikit-learn's cross-validation slices fit parameters of "
                    "that length (a torch Dataset or an nn.Sequential with as many items "
                    f"as audits). Pass {name} as "
                    + ("a module of another length." if name.endswith("model") else
                       "an (inputs, targets) pair of arrays or tensors.")
                )

        estimator = (MultiStageInfluenceEstimator() if self.estimator is None
                     else self.estimator)
        task = _influence_scores
        if self.memory is not None:
            memory = (self.memory if hasattr(self.memory, "cache")
                      else joblib.Memory(os.fspath(self.memory), verbose=0))
            task = memory.cache(_influence_scores)
        scores, n_pretrain, hessian = task(clone(estimator), pretrain_model,
                                           finetune_model, Z, X_finetune, x_test)
        if indices.min() < 0 or indices.max() >= n_pretrain:
            raise ValueError(
                f"indices must lie in [0, {n_pretrain - 1}] (Z has {n_pretrain} examples); "
                f"got values from {indices.min()} to {indices.max()}."
            )
        self.scores_ = np.asarray(scores, dtype=np.float64)
        self.n_pretrain_ = int(n_pretrain)
        self.hessian_ = hessian
        return self

    def predict(self, indices):
        """Predicted change of the summed test loss when each example is removed.

        Parameters
        ----------
        indices : array-like of int of shape (n,) or (n, 1)
            Positions in ``Z``.

        Returns
        -------
        predicted_change : ndarray of shape (n,)
            ``-scores_[indices] / n_pretrain_`` (removal is upweighting by
            ``epsilon = -1/m``).
        """
        check_is_fitted(self)
        indices = _check_indices(indices)
        if indices.size and (indices.min() < 0 or indices.max() >= self.n_pretrain_):
            raise ValueError(
                f"indices must lie in [0, {self.n_pretrain_ - 1}]; got values from "
                f"{indices.min()} to {indices.max()}."
            )
        return -self.scores_[indices] / self.n_pretrain_

    def score(self, indices, change, sample_weight=None):
        """Faithfulness: correlation of predicted and true loss changes.

        Parameters
        ----------
        indices : array-like of int of shape (n,) or (n, 1)
            Positions in ``Z`` of audited examples.
        change : array-like of shape (n,)
            Their true loss changes.
        sample_weight : None
            Not supported; present for scikit-learn's scorer signature.

        Returns
        -------
        score : float
            Spearman or Pearson correlation (``metric``); NaN for fewer than two
            examples or constant inputs.
        """
        if sample_weight is not None:
            raise ValueError("sample_weight is not supported by a correlation score.")
        return _METRICS[self.metric](change, self.predict(indices))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = True
        tags.input_tags.one_d_array = True
        return tags


"""Baseline scorers to compare multi-stage influence against (paper Fig. 4; the reviewers).

Each baseline has the estimator's interface: ``fit(pretrain_model, finetune_model, Z, X)``
returns ``self`` and ``score(x_test)`` returns one score per pretrain example, an array of
shape ``(m,)`` with the estimator's sign convention: positive means harmful (removing the
example is predicted to *lower* the finetune test loss). Compare them with
:func:`skmsif.validation.faithfulness` on ``-scores[indices] / m``, as the estimator.

* :class:`IdentityHessianBaseline`: multi-stage influence with both inverse Hessians
  replaced by the identity (paper Fig. 4; ``MultiStageInfluenceEstimator(hessian=
  "identity")``).
* :class:`PretrainLossBaseline`: the pretrain loss ``g(z)`` of each example at the
  pretrained weights, the reviewers' suggestion: badly fit (noisy, atypical) pretrain
  examples are the harmful ones. It ignores the finetune task and the test points.
* :class:`RandomBaseline`: independent standard normal scores; the chance level.
"""

import warnings
from numbers import Integral

import numpy as np
import torch
from sklearn.base import BaseEstimator
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._data import as_source
from ._estimator import MultiStageInfluenceEstimator, StationarityWarning
from ._losses import LOSSES, check_losses, resolve_loss
from ._model import call_model, private_copies

__all__ = ["IdentityHessianBaseline", "PretrainLossBaseline", "RandomBaseline"]


class IdentityHessianBaseline(BaseEstimator):
    """Multi-stage influence with identity matrices for both inverse Hessians.

    The paper's Fig. 4 baseline: ``v1 = grad_Theta f``, ``w = grad_W f - H_WTheta v1``
    (Case 1; ``2 alpha grad_W f`` in Case 2), ``I(z) = -w . grad_W g(z)``. It is
    :class:`~skmsif.MultiStageInfluenceEstimator` with ``hessian="identity"``; the
    parameters mean the same there.

    Parameters
    ----------
    embedding : {"fixed", "updated"}, default="fixed"
        ``"fixed"`` (paper Case 1): the shared parameters ``W`` were frozen during
        finetuning; ``"updated"`` (Case 2): ``W`` was trained too, pulled towards its
        pretrained value by ``alpha * ||W - W_pretrained||^2``.
    alpha : float, default=0.01
        Proximity weight of Case 2; must be > 0 when ``embedding="updated"``.
    shared : None, str or list of str, default=None
        Which parameters are ``W``: ``None`` for those that are the same
        ``torch.nn.Parameter`` objects in both models, or name prefixes (Case 2).
    pretrain_loss, finetune_loss : {"cross_entropy", "mse"} or callable, \
            default="cross_entropy"
        Per-example loss of each stage.
    batch_size : int, default=256
        Examples per batch in every pass over data.
    dtype : {"float64", "float32"}, default="float64"
        Precision of all computations.
    device : str or torch.device, default="cpu"
        Where computations run, for example ``"cuda"``.

    Attributes
    ----------
    estimator_ : MultiStageInfluenceEstimator
        The fitted estimator with ``hessian="identity"``.
    n_pretrain_ : int
        Number of pretrain examples.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.baselines import IdentityHessianBaseline
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> embedding = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    >>> pretrain_model = nn.Sequential(embedding, nn.Linear(4, 2))
    >>> finetune_model = nn.Sequential(embedding, nn.Linear(4, 3))
    >>> Z = (torch.randn(10, 3), torch.randint(0, 2, (10,)))
    >>> X = (torch.randn(8, 3), torch.randint(0, 3, (8,)))
    >>> IdentityHessianBaseline().fit(pretrain_model, finetune_model, Z, X).score(X).shape
    (10,)
    """

    def __init__(self, *, embedding="fixed", alpha=0.01, shared=None,
                 pretrain_loss="cross_entropy", finetune_loss="cross_entropy", batch_size=256,
                 dtype="float64", device="cpu"):
        self.embedding = embedding
        self.alpha = alpha
        self.shared = shared
        self.pretrain_loss = pretrain_loss
        self.finetune_loss = finetune_loss
        self.batch_size = batch_size
        self.dtype = dtype
        self.device = device

    def fit(self, pretrain_model, finetune_model, Z, X):
        """Fit the identity-Hessian estimator.

        Parameters
        ----------
        pretrain_model : torch.nn.Module
            The pretrained model, ``(W, U)`` at its trained values.
        finetune_model : torch.nn.Module
            The finetuned model, ``(W, Theta)`` at its trained values.
        Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The pretrain data the pretrain model was trained on (``m`` examples).
        X : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The finetune training data.

        Returns
        -------
        self : IdentityHessianBaseline
            Fitted.
        """
        self.estimator_ = MultiStageInfluenceEstimator(hessian="identity", **self.get_params())
        with warnings.catch_warnings():
            # The baseline has no dampings (the identity replaces both curvatures), so
            # the estimator's check against its default dampings would mislead.
            warnings.simplefilter("ignore", StationarityWarning)
            self.estimator_.fit(pretrain_model, finetune_model, Z, X)
        self.n_pretrain_ = self.estimator_.n_pretrain_
        return self

    def influence(self, x_test):
        """Identity-Hessian influence of every pretrain example on every test point.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points of the finetune task.

        Returns
        -------
        influence : ndarray of shape (n_test, m)
            The identity-Hessian influence; positive means harmful.
        """
        check_is_fitted(self)
        return self.estimator_.influence(x_test)

    def score(self, x_test):
        """Identity-Hessian influence of every pretrain example summed over ``x_test``.

        Parameters
        ----------
        x_test : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            Test points of the finetune task.

        Returns
        -------
        scores : ndarray of shape (m,)
            The identity-Hessian influence summed over ``x_test``; positive means
            harmful.
        """
        check_is_fitted(self)
        return self.estimator_.score(x_test)


class PretrainLossBaseline(BaseEstimator):
    """Score each pretrain example by its own loss at the pretrained weights.

    The reviewers' baseline: an example the pretrained model fits badly is presumed
    harmful, so the score is ``g(z; W, U)`` itself (positive, larger = more harmful). The
    score does not depend on the finetune model, ``X`` or ``x_test``.

    Parameters
    ----------
    pretrain_loss : {"cross_entropy", "mse"} or callable, default="cross_entropy"
        Per-example loss, as in the estimator.
    batch_size : int, default=256
        Examples per forward pass.
    dtype : {"float64", "float32"}, default="float64"
        Precision the losses are computed in (on a copy of the model).

    Attributes
    ----------
    losses_ : ndarray of shape (m,)
        The pretrain loss of every example.
    n_pretrain_ : int
        Number of pretrain examples ``m``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from skmsif.baselines import PretrainLossBaseline
    >>> model = nn.Linear(3, 2)
    >>> Z = (torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1]))
    >>> scores = PretrainLossBaseline().fit(model, None, Z).score()
    >>> scores.shape, bool((scores > 0).all())
    ((5,), True)
    """

    _parameter_constraints = {
        "pretrain_loss": [StrOptions(set(LOSSES)), callable],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions({"float64", "float32"})],
    }

    def __init__(self, *, pretrain_loss="cross_entropy", batch_size=256, dtype="float64"):
        self.pretrain_loss = pretrain_loss
        self.batch_size = batch_size
        self.dtype = dtype

    def fit(self, pretrain_model, finetune_model, Z, X=None):
        """Compute the pretrain losses; ``finetune_model`` and ``X`` are ignored.

        Parameters
        ----------
        pretrain_model : torch.nn.Module
            The pretrained model, evaluated on a copy in eval mode.
        finetune_model : object
            Ignored; present for the estimator's interface.
        Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The pretrain data (``m`` examples).
        X : object, default=None
            Ignored; present for the estimator's interface.

        Returns
        -------
        self : PretrainLossBaseline
            Fitted.

        Raises
        ------
        TypeError
            When ``pretrain_model`` is not a ``torch.nn.Module``.
        """
        self._validate_params()
        if not isinstance(pretrain_model, torch.nn.Module):
            raise TypeError(
                f"pretrain_model must be a torch.nn.Module; got {type(pretrain_model).__name__}.")
        dtype = getattr(torch, self.dtype)
        data = as_source(Z, "Z", dtype)
        (model,) = private_copies([pretrain_model], dtype, torch.device("cpu"))
        loss = resolve_loss(self.pretrain_loss)
        losses = []
        with torch.no_grad():
            for inputs, targets in data.batches(self.batch_size, torch.device("cpu")):
                values = loss(call_model(model, inputs, model_name="pretrain_model"),
                              targets)
                check_losses(values, len(targets), "pretrain_loss")
                losses.append(values.double())
        self.losses_ = torch.cat(losses).numpy()
        self.n_pretrain_ = len(self.losses_)
        return self

    def score(self, x_test=None):
        """Return the pretrain losses, shape ``(m,)`` (``x_test`` is ignored).

        Parameters
        ----------
        x_test : object, default=None
            Ignored; the score does not depend on the test points.

        Returns
        -------
        scores : ndarray of shape (m,)
            A copy of ``losses_``; larger means more harmful.
        """
        check_is_fitted(self)
        return self.losses_.copy()


class RandomBaseline(BaseEstimator):
    """Independent standard normal scores: what a score with no information achieves.

    Parameters
    ----------
    random_state : int, RandomState instance or None, default=None
        Draws the scores (in ``fit``, so ``score`` is the same for every ``x_test``).

    Attributes
    ----------
    scores_ : ndarray of shape (m,)
        The random scores, one per pretrain example.
    n_pretrain_ : int
        Number of pretrain examples ``m``.

    Examples
    --------
    >>> import numpy as np
    >>> from skmsif.baselines import RandomBaseline
    >>> scores = RandomBaseline(random_state=0).fit(None, None, (np.zeros((4, 2)), np.zeros(4)))
    >>> scores.score().round(3).tolist()
    [1.764, 0.4, 0.979, 2.241]
    """

    _parameter_constraints = {"random_state": ["random_state"]}

    def __init__(self, *, random_state=None):
        self.random_state = random_state

    def fit(self, pretrain_model, finetune_model, Z, X=None):
        """Draw one score per example of ``Z``; the models and ``X`` are ignored.

        Parameters
        ----------
        pretrain_model : object
            Ignored; present for the estimator's interface.
        finetune_model : object
            Ignored; present for the estimator's interface.
        Z : (inputs, targets) pair of arrays or tensors, or torch.utils.data.Dataset
            The pretrain data; only its length is used.
        X : object, default=None
            Ignored; present for the estimator's interface.

        Returns
        -------
        self : RandomBaseline
            Fitted.
        """
        self._validate_params()
        self.n_pretrain_ = len(as_source(Z, "Z", torch.float64))
        rng = check_random_state(self.random_state)
        self.scores_ = rng.standard_normal(self.n_pretrain_)
        return self

    def score(self, x_test=None):
        """Return the random scores, shape ``(m,)`` (``x_test`` is ignored).

        Parameters
        ----------
        x_test : object, default=None
            Ignored; the scores are drawn once, in ``fit``.

        Returns
        -------
        scores : ndarray of shape (m,)
            A copy of ``scores_``.
        """
        check_is_fitted(self)
        return np.array(self.scores_)

"""skmsif: multi-stage influence functions for pretrained-then-finetuned PyTorch models.

Which pretraining examples are responsible for what a finetuned model does on a test set?
:class:`MultiStageInfluenceEstimator` answers with the multi-stage influence function of
Chen et al., behind scikit-learn's estimator API. :mod:`skmsif.validation` checks any
estimate against leave-one-out retraining, :mod:`skmsif.model_selection` tunes dampings
and ``alpha`` with scikit-learn's own search tools, and :mod:`skmsif.turnover` offers the
Hessian-free turn-over dropout estimate for comparison.
"""

from ._estimator import MultiStageInfluenceEstimator, StationarityWarning
from .turnover import (
    TurnOverDropout,
    TurnOverDropoutEstimator,
    train_turnover,
    turnover_masks,
)

__version__ = "0.1.0"

__all__ = [
    "MultiStageInfluenceEstimator",
    "StationarityWarning",
    "TurnOverDropout",
    "TurnOverDropoutEstimator",
    "train_turnover",
    "turnover_masks",
    "__version__",
]

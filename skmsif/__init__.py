"""skmsif: multi-stage influence functions for pretrained-then-finetuned PyTorch models.

Which pretraining examples are responsible for what a finetuned model does on a test set?
:class:`MultiStageInfluenceEstimator` answers with the multi-stage influence function of
Chen et al., behind scikit-learn's estimator API.
"""

from ._estimator import MultiStageInfluenceEstimator

__version__ = "0.1.0"

__all__ = ["MultiStageInfluenceEstimator", "__version__"]

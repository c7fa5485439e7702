"""What the estimator accepts as a model, turned into a plain ``torch.nn.Module``.

``unwrap_model`` returns ``(module, transform, loss)``: the module to differentiate, a
callable applied to the inputs of every data set scored with that model (or ``None``), and
a per-example loss implied by the model (or ``None``: the estimator's own loss applies).

Accepted models:

* a ``torch.nn.Module``: itself, no transform, no loss of its own;
* a fitted skorch ``NeuralNet`` (``NeuralNetClassifier``, ``NeuralNetRegressor``,
  ``NeuralNetBinaryClassifier``, ...): its trained ``module_``, no transform, and a
  per-example version of its ``criterion_`` (:class:`CriterionLoss`; a plain
  ``nn.CrossEntropyLoss`` is the named ``"cross_entropy"``);
* a fitted scikit-learn ``Pipeline`` whose last step is such a net: the net's module and
  loss, and the steps before the net as the transform.

skorch is an optional dependency: it is never imported here. A skorch net can only exist
if the user imported skorch, so it is looked up in ``sys.modules``.
"""

import copy
import sys

import torch
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

# skorch's classification criteria take class indices, not targets shaped like outputs.
_INDEX_CRITERIA = (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss, torch.nn.MultiMarginLoss)


def _skorch_net_class():
    """``skorch.NeuralNet`` if skorch has been imported, else ``None``."""
    skorch = sys.modules.get("skorch")
    return getattr(skorch, "NeuralNet", None) if skorch is not None else None


def _is_skorch_net(model):
    net_class = _skorch_net_class()
    return net_class is not None and isinstance(model, net_class)


def _is_pipeline(model):
    pipeline = sys.modules.get("sklearn.pipeline")
    return pipeline is not None and isinstance(model, pipeline.Pipeline)


class CriterionLoss:
    """A skorch net's criterion as a per-example loss ``(outputs, targets) -> (batch,)``.

    Mirrors the net's ``get_loss``: the criterion (a copy, with ``reduction="none"``) is
    applied to the module's outputs; ``NeuralNetClassifier`` with ``NLLLoss`` (skorch's
    default, for modules that output probabilities) first takes ``log(p + eps)``. Losses
    with more than one value per example (one per output dimension) are averaged over
    them, so that their mean over a data set is the net's ``reduction="mean"`` loss.
    Floating targets with as many values as the outputs are reshaped to the outputs'
    shape (a regressor's ``(n,)`` targets for ``(n, 1)`` outputs).

    Parameters
    ----------
    criterion : torch.nn.Module
        The fitted ``criterion_`` of the net; copied, never changed.
    log_probabilities : bool
        Take ``log(outputs + eps)`` first (``NeuralNetClassifier`` with ``NLLLoss``).
    """

    def __init__(self, criterion, log_probabilities=False):
        self.criterion = copy.deepcopy(criterion)
        self.criterion.reduction = "none"
        self.log_probabilities = log_probabilities

    def __call__(self, outputs, targets):
        criterion = self.criterion
        tensors = list(criterion.parameters()) + list(criterion.buffers())
        if any(t.is_floating_point() and (t.dtype != outputs.dtype or t.device != outputs.device)
               for t in tensors):  # e.g. class weights of a float32 net, scored in float64
            criterion.to(dtype=outputs.dtype, device=outputs.device)
        if self.log_probabilities:
            outputs = torch.log(outputs + torch.finfo(outputs.dtype).eps)
        if (targets.is_floating_point() and targets.shape != outputs.shape
                and targets.numel() == outputs.numel()
                and not isinstance(criterion, _INDEX_CRITERIA)):
            targets = targets.reshape(outputs.shape)
        losses = criterion(outputs, targets)
        if losses.ndim == 0:
            raise TypeError(
                f"The skorch net's criterion {type(criterion).__name__} returned a single "
                "number with reduction='none'; it cannot give one loss per example. Pass "
                "pretrain_loss / finetune_loss as a callable (outputs, targets) -> (batch,)."
            )
        return losses.reshape(len(losses), -1).mean(dim=1)

    def __repr__(self):
        return f"CriterionLoss({self.criterion!r}, log_probabilities={self.log_probabilities})"


class _UnsupportedCriterion:
    """Stands in for a criterion without ``reduction``; raises only if it is used."""

    def __init__(self, criterion_name, name):
        self.criterion_name = criterion_name
        self.name = name

    def __call__(self, outputs, targets):
        loss_name = "pretrain_loss" if self.name == "pretrain_model" else "finetune_loss"
        raise TypeError(
            f"The criterion of the skorch net passed as {self.name} "
            f"({self.criterion_name}) has no 'reduction' attribute, so no per-example loss "
            f"can be derived from it. Pass {loss_name} as a callable "
            "(outputs, targets) -> tensor of shape (batch,)."
        )


def _net_loss(net, name):
    criterion = getattr(net, "criterion_", None)
    if criterion is None:
        return None
    if not hasattr(criterion, "reduction"):
        return _UnsupportedCriterion(type(criterion).__name__, name)
    skorch = sys.modules["skorch"]
    log_probabilities = (isinstance(net, skorch.NeuralNetClassifier)
                         and isinstance(criterion, torch.nn.NLLLoss))
    if _is_plain_cross_entropy(criterion):
        # The named loss (the same function): its closed forms (Gauss-Newton factor,
        # a linear head's dense curvature) then apply to the net too.
        return "cross_entropy"
    return CriterionLoss(criterion, log_probabilities)


def _is_plain_cross_entropy(criterion):
    """``nn.CrossEntropyLoss`` with its defaults: ``F.cross_entropy`` per example."""
    return (type(criterion) is torch.nn.CrossEntropyLoss and criterion.weight is None
            and criterion.ignore_index == -100 and criterion.label_smoothing == 0.0)


def _unwrap_net(net, name):
    try:
        net.check_is_fitted()
    except NotFittedError as exc:
        raise NotFittedError(
            f"The skorch net passed as {name} is not initialized (it has no module_); fit "
            "it (or call .initialize() after loading trained weights) before scoring."
        ) from exc
    module = net.module_
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"{name}: the skorch net's module_ is a {type(module).__name__}, not a "
            "torch.nn.Module."
        )
    return module, _net_loss(net, name)


def unwrap_model(model, name):
    """Return ``(module, transform, loss)`` for what the user passed as ``name``.

    Parameters
    ----------
    model : torch.nn.Module, fitted skorch NeuralNet, or fitted sklearn Pipeline ending \
            in a skorch NeuralNet
        What the user passed.
    name : str
        The argument name, for messages.

    Returns
    -------
    module : torch.nn.Module
        The module to differentiate (the user's object; the estimator copies it).
    transform : callable or None
        Applied to the inputs of every data set scored with this model.
    loss : callable or None
        Per-example loss ``(outputs, targets) -> (batch,)`` implied by the model.
    """
    if isinstance(model, torch.nn.Module):
        return model, None, None
    if _is_skorch_net(model):
        module, loss = _unwrap_net(model, name)
        return module, None, loss
    if _is_pipeline(model):
        if not model.steps or not _is_skorch_net(model.steps[-1][1]):
            last = type(model.steps[-1][1]).__name__ if model.steps else "nothing"
            raise TypeError(
                f"{name} is a Pipeline whose last step is {last}; only a Pipeline ending "
                "in a skorch NeuralNet can be scored (its module is differentiated)."
            )
        module, loss = _unwrap_net(model.steps[-1][1], name)
        preprocessing = model[:-1]
        for step_name, step in preprocessing.steps:
            if step is None or step == "passthrough":
                continue
            try:
                check_is_fitted(step)
            except NotFittedError as exc:
                raise NotFittedError(
                    f"{name}: Pipeline step {step_name!r} is not fitted; fit the Pipeline "
                    "before scoring."
                ) from exc
        transform = preprocessing.transform if preprocessing.steps else None
        return module, transform, loss
    raise TypeError(
        f"{name} must be a torch.nn.Module, a fitted skorch NeuralNet, or a fitted "
        f"sklearn Pipeline ending in a skorch NeuralNet; got {type(model).__name__}."
    )


def transform_data(data, transform, name):
    """Apply ``transform`` to the inputs of an ``(inputs, targets)`` pair."""
    if transform is None:
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(
            f"{name} must be an (inputs, targets) pair when the model is a Pipeline, so "
            "that the Pipeline's preprocessing can be applied to the inputs."
        )
    inputs = data[0]
    if isinstance(inputs, torch.Tensor):  # sklearn transformers work on numpy arrays
        inputs = inputs.detach().cpu().numpy()
    return transform(inputs), data[1]

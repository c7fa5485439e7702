"""Per-example losses, and the checks that a model's outputs fit them."""

import torch
import torch.nn.functional as F


def cross_entropy(outputs, targets):
    """Per-example cross-entropy of logits ``(n, C)`` and integer labels ``(n,)``."""
    return F.cross_entropy(outputs, targets, reduction="none")


def mse(outputs, targets):
    """Per-example squared error, averaged over the output dimensions."""
    diff = outputs - targets.reshape(outputs.shape)
    return (diff * diff).reshape(len(diff), -1).mean(dim=1)


LOSSES = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(loss):
    """Return the per-example loss callable for a name or a callable."""
    return LOSSES[loss] if isinstance(loss, str) else loss


def check_outputs(outputs, data, loss, loss_name, model_name, targets=None):
    """Check that ``outputs`` of a probe batch fit ``loss`` and ``data``'s targets.

    Parameters
    ----------
    outputs : torch.Tensor
        The model's outputs on the first batch of ``data``.
    data : skmsif._data.DataSource
        The data set (its name is used in messages).
    loss : str or callable
        The loss as the user gave it.
    loss_name, model_name : str
        Argument names for the messages.
    targets : torch.Tensor, default=None
        The targets checked (``None``: ``data.targets``, all of them).
    """
    name = data.name
    targets = data.targets if targets is None else targets
    batch = len(outputs) if outputs.ndim else 0
    if loss == "cross_entropy":
        if outputs.ndim != 2:
            raise ValueError(
                f"{loss_name}='cross_entropy' needs {model_name} to output logits of shape "
                f"(n_examples, n_classes) on {name}; it outputs shape "
                f"{tuple(outputs.shape)}. Pass a callable loss for other output shapes."
            )
        if targets.is_floating_point() or targets.dtype == torch.bool or targets.ndim != 1:
            raise TypeError(
                f"{name}: {loss_name}='cross_entropy' needs integer class labels of shape "
                f"(n_examples,); got dtype {targets.dtype} and shape "
                f"{tuple(targets.shape)}. Cast the labels, e.g. y.astype(int)."
            )
        n_classes = outputs.shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= n_classes:
            raise ValueError(
                f"{name}: labels range from {low} to {high}, but {model_name} outputs "
                f"{n_classes} classes, so labels must lie in [0, {n_classes - 1}]. "
                "Relabel the classes from 0 or give the model's head more outputs."
            )
    elif loss == "mse":
        if outputs.ndim and outputs[0].numel() != targets[0].numel():
            raise ValueError(
                f"{loss_name}='mse' needs {model_name}'s outputs to have the targets' "
                f"shape per example: outputs {tuple(outputs.shape[1:])}, targets of {name} "
                f"{tuple(targets.shape[1:])}."
            )
        if not targets.is_floating_point():
            raise TypeError(
                f"{name}: {loss_name}='mse' needs floating-point targets; got "
                f"{targets.dtype}."
            )
    if outputs.ndim == 0 or batch == 0:
        raise ValueError(
            f"{model_name} returned a scalar on a batch of {name}; it must return one "
            "output per example (first dimension = batch)."
        )


def check_losses(losses, batch_size, loss_name):
    """Check what a (user) loss callable returned for one batch."""
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (batch_size,):
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
        raise ValueError(
            f"{loss_name} must return one loss per example, a tensor of shape "
            f"({batch_size},) for a batch of {batch_size}; it returned {shape}. Use "
            "reduction='none' (and sum or average over output dimensions yourself)."
        )
    if not torch.isfinite(losses).all():
        raise ValueError(
            f"{loss_name} returned NaN or infinite losses; check the model's outputs and "
            "the targets."
        )

"""Checks of what the user passes, shared by every estimator and the validation tools."""

import torch

from ._losses import check_losses, check_outputs


def check_module(model, name):
    """``model`` must be a ``torch.nn.Module`` with parameters."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}.")
    if not any(True for _ in model.parameters()):
        raise ValueError(f"{name} has no parameters.")


def check_finite_parameters(model, name):
    """No parameter of ``model`` may hold NaN or infinity."""
    for parameter_name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise ValueError(
                f"{name} has NaN or infinite values in parameter {parameter_name!r}; "
                "the model diverged or was not initialised. Retrain it before scoring."
            )


def resolve_device(device):
    """``device`` as a ``torch.device`` that exists on this machine."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device={device!r} is not a torch device; pass 'cpu', 'cuda' or 'cuda:0'."
        ) from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but torch.cuda.is_available() is False; pass device='cpu'."
        )
    return resolved


def probe_model(forward, data, loss, loss_name, model_name, batch_size, device,
                loss_fn=None):
    """Evaluate the first batch of ``data`` once, so that a mismatch fails clearly here.

    Parameters
    ----------
    forward : callable
        ``forward(inputs) -> outputs`` of the model under check.
    data : TensorData
        The data set; its name is used in the messages.
    loss : str or callable
        The loss as the user gave it; a named loss has its output shape and labels
        checked.
    loss_name, model_name : str
        Argument names for the messages.
    batch_size : int
        Examples evaluated.
    device : torch.device
    loss_fn : callable, default=None
        When given, the per-example losses of the batch are checked too.
    """
    inputs, targets = next(data.batches(batch_size, device))
    try:
        with torch.no_grad():
            outputs = forward(inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(
            f"{model_name} could not be evaluated on {data.name} (inputs of shape "
            f"{tuple(inputs.shape[1:])} per example, dtype {inputs.dtype}): {exc}"
        ) from exc
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(
            f"{model_name} must return a tensor of outputs; it returned "
            f"{type(outputs).__name__}."
        )
    if isinstance(loss, str):
        check_outputs(outputs, data, loss, loss_name, model_name)
    if loss_fn is not None:
        with torch.no_grad():
            check_losses(loss_fn(outputs, targets), len(inputs), loss_name)

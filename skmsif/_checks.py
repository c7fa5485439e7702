"""Checks of what the user passes, shared by every estimator and the validation tools."""

import torch

from ._losses import check_losses, check_outputs
from ._model import call_model, extract_outputs


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
    forward : torch.nn.Module or callable
        The model under check (called as ``model(inputs)`` or ``model(**inputs)``), or a
        callable ``forward(inputs) -> outputs``.
    data : skmsif._data.DataSource
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

    Returns
    -------
    outputs : torch.Tensor
        The outputs on the first batch.
    """
    inputs, targets = data.first_batch(batch_size, device)
    if isinstance(inputs, dict):
        shapes = {key: tuple(value.shape[1:]) for key, value in inputs.items()}
        described = f"keyword inputs {shapes}"
    else:
        described = (f"inputs of shape {tuple(inputs.shape[1:])} per example, dtype "
                     f"{inputs.dtype}")
    try:
        with torch.no_grad():
            if isinstance(forward, torch.nn.Module):
                result = call_model(forward, inputs, model_name=model_name)
            else:
                result = extract_outputs(forward(inputs), model_name)
    except TypeError as exc:
        if "returned a" in str(exc):
            raise
        raise ValueError(
            f"{model_name} could not be evaluated on {data.name} ({described}): {exc}"
        ) from exc
    except (RuntimeError, ValueError, IndexError, KeyError, AttributeError) as exc:
        raise ValueError(
            f"{model_name} could not be evaluated on {data.name} ({described}): {exc}"
        ) from exc
    outputs = result
    all_targets = getattr(data, "targets", None)
    if isinstance(loss, str):
        check_outputs(outputs, data, loss, loss_name, model_name,
                      targets=all_targets if isinstance(all_targets, torch.Tensor)
                      else targets)
    if loss_fn is not None:
        with torch.no_grad():
            check_losses(loss_fn(outputs, targets), len(targets), loss_name)
    return outputs

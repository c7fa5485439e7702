"""What the estimator accepts as a model, turned into a plain ``torch.nn.Module``.

``unwrap_model`` returns ``(module, transform, loss)``: the module to differentiate, a
callable applied to the inputs of every data set scored with that model (or ``None``), and
a per-example loss implied by the model (or ``None``: the estimator's own loss applies).
"""

import torch


def unwrap_model(model, name):
    """Return ``(module, transform, loss)`` for what the user passed as ``name``."""
    if isinstance(model, torch.nn.Module):
        return model, None, None
    raise TypeError(f"{name} must be a torch.nn.Module; got {type(model).__name__}.")


def transform_data(data, transform, name):
    """Apply ``transform`` to the inputs of an ``(inputs, targets)`` pair."""
    if transform is None:
        return data
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(
            f"{name} must be an (inputs, targets) pair when the model is a Pipeline, so "
            "that the Pipeline's preprocessing can be applied to the inputs."
        )
    return transform(data[0]), data[1]

"""Turn what the user passes as data into checked tensors, and hand them out in batches."""

import numpy as np
import torch


class TensorData:
    """Inputs and targets of one data set, checked, on the CPU in the compute dtype.

    Parameters
    ----------
    inputs, targets : torch.Tensor
        First dimension indexes examples.
    name : str
        The argument name the data came in as; used in error messages.
    """

    def __init__(self, inputs, targets, name):
        self.inputs = inputs
        self.targets = targets
        self.name = name

    def __len__(self):
        return len(self.inputs)

    def subset(self, start, stop):
        """Examples ``start:stop`` as a new, independent :class:`TensorData`."""
        return TensorData(self.inputs[start:stop].clone(), self.targets[start:stop].clone(),
                          self.name)

    def batches(self, batch_size, device, indices=None):
        """Yield ``(inputs, targets)`` batches on ``device``, in order."""
        n = len(self) if indices is None else len(indices)
        for start in range(0, n, batch_size):
            if indices is None:
                sl = slice(start, start + batch_size)
                inputs, targets = self.inputs[sl], self.targets[sl]
            else:
                idx = indices[start:start + batch_size]
                inputs, targets = self.inputs[idx], self.targets[idx]
            yield inputs.to(device), targets.to(device)


def _to_tensor(array, what, name):
    if isinstance(array, torch.Tensor):
        return array.detach().cpu()
    try:
        array = np.asarray(array)
    except Exception as exc:  # ragged lists and the like
        raise TypeError(
            f"{name}: the {what} could not be turned into an array ({exc}); pass a numpy "
            "array or a torch tensor."
        ) from exc
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == bool
    ):
        raise TypeError(
            f"{name}: the {what} have dtype {array.dtype}; pass numeric numpy arrays or "
            "torch tensors."
        )
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # a read-only memmap: torch would alias it
        array = array.copy()
    return torch.from_numpy(array)


def _materialise_dataset(dataset, name):
    inputs, targets = [], []
    for item in dataset:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(
                f"{name}: a Dataset must yield (input, target) pairs; got an item of type "
                f"{type(item).__name__}."
            )
        inputs.append(torch.as_tensor(item[0]))
        targets.append(torch.as_tensor(item[1]))
    if not inputs:
        raise ValueError(f"{name} is empty: it needs at least one (input, target) example.")
    try:
        return torch.stack(inputs), torch.stack(targets)
    except RuntimeError as exc:
        raise ValueError(
            f"{name}: the Dataset's items do not all have the same shape ({exc})."
        ) from exc


def as_data(data, name, dtype):
    """Check ``data`` and return a :class:`TensorData` in ``dtype``.

    ``data`` is an ``(inputs, targets)`` pair of numpy arrays or torch tensors, or a
    ``torch.utils.data.Dataset`` yielding ``(input, target)`` pairs (read once, in order).
    Floating inputs and targets are cast to ``dtype``; integer ones keep their kind
    (targets become ``int64``, as class labels).
    """
    if isinstance(data, torch.utils.data.Dataset):
        inputs, targets = _materialise_dataset(data, name)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs = _to_tensor(data[0], "inputs", name)
        targets = _to_tensor(data[1], "targets", name)
    else:
        raise TypeError(
            f"{name} must be an (inputs, targets) pair of arrays or tensors, or a "
            f"torch.utils.data.Dataset yielding (input, target); got {type(data).__name__}."
        )
    if inputs.ndim == 0 or targets.ndim == 0:
        raise ValueError(
            f"{name}: inputs and targets need a first dimension that indexes examples."
        )
    if len(inputs) != len(targets):
        raise ValueError(
            f"{name}: inputs have {len(inputs)} examples but targets have {len(targets)}; "
            "they must have the same length."
        )
    if len(inputs) == 0:
        raise ValueError(f"{name} is empty: it needs at least one example.")
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
        if not torch.isfinite(inputs).all():
            raise ValueError(
                f"{name}: the inputs contain NaN or infinite values; remove or impute them."
            )
    if targets.is_floating_point():
        targets = targets.to(dtype)
        if not torch.isfinite(targets).all():
            raise ValueError(
                f"{name}: the targets contain NaN or infinite values; remove those examples."
            )
    elif targets.dtype != torch.bool:
        targets = targets.to(torch.int64)
    return TensorData(inputs, targets, name)

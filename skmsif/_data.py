"""Data as the package reads it: batch by batch, never materialised.

Every data argument (``Z``, ``X``, ``x_test``, and the data of the validation tools)
becomes a :class:`DataSource` through :func:`as_source`. A source knows its length and
hands out ``(inputs, targets)`` batches, where ``inputs`` is a tensor or a dict of tensors
(passed to the model as ``model(**inputs)``). Accepted forms:

* an ``(inputs, targets)`` pair of numpy arrays or torch tensors (``inputs`` may also be
  a dict of equal-length tensors);
* a ``Mapping`` of equal-length tensors or arrays, the target under ``label_key``
  (``"labels"``, the ``transformers`` convention): a tokenizer's output plus labels;
* a ``torch.utils.data.Dataset`` with ``__len__``, whose items are ``(input, target)``
  pairs or dicts (the target under ``label_key``); read by index, ``0 .. len - 1``, one
  batch at a time;
* a ``torch.utils.data.DataLoader``: its batches used as they come, in order.

Floating tensors are cast to the compute dtype, integer targets to ``int64``; every batch
is checked for NaN and infinity as it is read, and an error names the example.
"""

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

LABEL_KEY = "labels"


# ------------------------------------------------------------------------ conversion


def _to_tensor(array, what, name):
    if isinstance(array, torch.Tensor):
        return array.detach()
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


def _first_dim(tensor):
    return tensor.shape[0] if tensor.ndim else None


def _check_lengths(inputs, targets, name):
    """``inputs`` (tensor or dict) and ``targets`` share a first dimension; return it."""
    if isinstance(inputs, dict):
        if not inputs:
            raise ValueError(
                f"{name}: the inputs dict is empty; it needs the model's keyword inputs "
                "(for example input_ids and attention_mask)."
            )
        lengths = {key: _first_dim(value) for key, value in inputs.items()}
    else:
        lengths = {"inputs": _first_dim(inputs)}
    lengths["targets"] = _first_dim(targets)
    if any(length is None for length in lengths.values()):
        raise ValueError(
            f"{name}: inputs and targets need a first dimension that indexes examples; "
            f"got scalars for {[key for key, value in lengths.items() if value is None]}."
        )
    if len(set(lengths.values())) != 1 and set(lengths) == {"inputs", "targets"}:
        raise ValueError(
            f"{name}: inputs have {lengths['inputs']} examples but targets have "
            f"{lengths['targets']}; they must have the same length."
        )
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"{name}: inputs and targets have different numbers of examples "
            f"{lengths}; they must have the same length."
        )
    return lengths["targets"]


class _Caster:
    """Casts one batch to the compute dtype and checks it; names examples in errors."""

    def __init__(self, name, dtype):
        self.name = name
        self.dtype = dtype

    def _tensor(self, value, what, offset):
        if not isinstance(value, torch.Tensor):
            value = _to_tensor(value, what, self.name)
        if value.is_floating_point():
            value = value.to(self.dtype)
            finite = torch.isfinite(value.reshape(len(value), -1)).all(dim=1) \
                if value.ndim else torch.isfinite(value)
            if not bool(finite.all()):
                first = int((~finite).nonzero()[0]) + offset if value.ndim else offset
                raise ValueError(
                    f"{self.name}: the {what} of example {first} contain NaN or infinite "
                    "values; remove or impute that example."
                )
        return value

    def __call__(self, inputs, targets, offset):
        if isinstance(inputs, Mapping):
            inputs = {key: self._tensor(value, f"inputs[{key!r}]", offset)
                      for key, value in inputs.items()}
        else:
            inputs = self._tensor(inputs, "inputs", offset)
        targets = self._tensor(targets, "targets", offset)
        if not targets.is_floating_point() and targets.dtype != torch.bool:
            targets = targets.to(torch.int64)
        return inputs, targets


def _to_device(inputs, device):
    if isinstance(inputs, dict):
        return {key: value.to(device) for key, value in inputs.items()}
    return inputs.to(device)


def _index(inputs, rows):
    if isinstance(inputs, dict):
        return {key: value[rows] for key, value in inputs.items()}
    return inputs[rows]


def _split_item(item, label_key, name, what="item"):
    """An ``(input, target)`` pair or a dict with the target under ``label_key``."""
    if isinstance(item, Mapping):
        if label_key not in item:
            raise ValueError(
                f"{name}: a dict {what} has no target under {label_key!r} (its keys: "
                f"{sorted(item)}). Put the targets under {label_key!r} or pass "
                "label_key='<your key>'."
            )
        inputs = {key: value for key, value in item.items() if key != label_key}
        return inputs, item[label_key]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(
        f"{name}: each {what} must be an (input, target) pair or a dict with the target "
        f"under {label_key!r}; got {type(item).__name__}."
    )


def _stack(values, what, name):
    tensors = [value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
               for value in values]
    try:
        return torch.stack(tensors)
    except RuntimeError as exc:
        raise ValueError(
            f"{name}: the {what} of the items do not all have the same shape ({exc}); pad "
            "them to one length, or pass a DataLoader with a collate_fn."
        ) from exc


# ------------------------------------------------------------------------ sources


class DataSource:
    """One data set, read in batches. Subclasses define ``__len__`` and ``_raw``.

    Attributes
    ----------
    name : str
        The argument the data came in as, for messages.
    """

    name = "data"

    def _raw(self, batch_size, indices):
        """Yield raw ``(inputs, targets)`` batches (``indices``: positions, sorted)."""
        raise NotImplementedError

    def batches(self, batch_size, device, indices=None):
        """Yield checked ``(inputs, targets)`` batches on ``device``, in order.

        Parameters
        ----------
        batch_size : int
            Examples per batch (a DataLoader keeps its own batches).
        device : torch.device
        indices : torch.Tensor or None
            Only these positions (sorted), for a Hessian subsample.
        """
        offset = 0
        for inputs, targets in self._raw(batch_size, indices):
            inputs, targets = self._cast(inputs, targets, offset)
            offset += len(targets)
            yield _to_device(inputs, device), targets.to(device)

    def subset(self, start, stop):
        """Examples ``start:stop`` as a source of their own (a shard)."""
        return _SliceSource(self, start, min(stop, len(self)))

    def first_batch(self, batch_size, device):
        return next(self.batches(batch_size, device))

    def digest(self, hasher, batch_size=1024):
        """Feed every example's bytes to ``hasher`` (a streamed fingerprint)."""
        for inputs, targets in self.batches(batch_size, torch.device("cpu")):
            parts = ([inputs[key] for key in sorted(inputs)] if isinstance(inputs, dict)
                     else [inputs])
            for tensor in [*parts, targets]:
                hasher.update(str((tensor.dtype, tuple(tensor.shape[1:]))).encode())
                hasher.update(tensor.contiguous().numpy().tobytes())


class TensorSource(DataSource):
    """Tensors the user holds in memory: ``inputs`` (tensor or dict) and ``targets``."""

    def __init__(self, inputs, targets, name, dtype):
        self.inputs = inputs
        self.targets = targets
        self.name = name
        self._cast = _Caster(name, dtype)
        self.n = _check_lengths(inputs, targets, name)

    def __len__(self):
        return self.n

    def _raw(self, batch_size, indices):
        n = self.n if indices is None else len(indices)
        for start in range(0, n, batch_size):
            if indices is None:
                rows = slice(start, start + batch_size)
            else:
                rows = indices[start:start + batch_size]
            yield _index(self.inputs, rows), self.targets[rows]

    def subset(self, start, stop):
        rows = slice(start, stop)
        return TensorSource(_index(self.inputs, rows), self.targets[rows], self.name,
                            self._cast.dtype)


class DatasetSource(DataSource):
    """A map-style ``Dataset``, read by index ``0 .. len - 1``, one batch at a time."""

    def __init__(self, dataset, name, dtype, label_key=LABEL_KEY):
        try:
            self.n = len(dataset)
        except TypeError as exc:
            raise TypeError(
                f"{name} is a Dataset without a length; give it __len__, or wrap it in a "
                "DataLoader over a Dataset with one."
            ) from exc
        self.dataset = dataset
        self.name = name
        self.label_key = label_key
        self._cast = _Caster(name, dtype)

    def __len__(self):
        return self.n

    def _collate(self, items):
        pairs = [_split_item(item, self.label_key, self.name) for item in items]
        targets = _stack([target for _, target in pairs], "targets", self.name)
        first = pairs[0][0]
        if isinstance(first, Mapping):
            keys = set(first)
            if any(set(inputs) != keys for inputs, _ in pairs):
                raise ValueError(f"{self.name}: the dict items do not all have the same keys.")
            inputs = {key: _stack([inputs[key] for inputs, _ in pairs], f"inputs[{key!r}]",
                                  self.name) for key in sorted(keys)}
        else:
            inputs = _stack([inputs for inputs, _ in pairs], "inputs", self.name)
        return inputs, targets

    def _raw(self, batch_size, indices):
        positions = range(self.n) if indices is None else [int(i) for i in indices]
        for start in range(0, len(positions), batch_size):
            yield self._collate([self.dataset[i] for i in positions[start:start + batch_size]])


class LoaderSource(DataSource):
    """A ``DataLoader``: its batches as they come, in order; ``batch_size`` is its own."""

    def __init__(self, loader, name, dtype, label_key=LABEL_KEY):
        self.loader = loader
        self.name = name
        self.label_key = label_key
        self._cast = _Caster(name, dtype)
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.RandomSampler) or (
                getattr(loader, "batch_sampler", None) is not None
                and isinstance(getattr(loader.batch_sampler, "sampler", None),
                               torch.utils.data.RandomSampler)):
            raise ValueError(
                f"{name} is a DataLoader with shuffle=True: its examples would come in a "
                "different order in every pass, so scores could not be matched to "
                "examples. Pass a DataLoader with shuffle=False."
            )
        try:
            self.n = len(loader.dataset)
        except TypeError as exc:
            raise TypeError(
                f"{name} is a DataLoader over a Dataset without a length (an "
                "IterableDataset); the number of examples must be known. Give the dataset "
                "__len__."
            ) from exc
        if getattr(loader, "drop_last", False):
            raise ValueError(f"{name} is a DataLoader with drop_last=True; pass "
                             "drop_last=False so that every example is read.")

    def __len__(self):
        return self.n

    def _raw(self, batch_size, indices):
        wanted = None if indices is None else torch.as_tensor(indices)
        start = 0
        for batch in self.loader:
            inputs, targets = _split_item(batch, self.label_key, self.name, "batch")
            count = _check_lengths(
                inputs if not isinstance(inputs, Mapping) else dict(inputs),
                torch.as_tensor(targets) if not isinstance(targets, torch.Tensor) else targets,
                self.name)
            if wanted is None:
                yield inputs, targets
            else:
                local = wanted[(wanted >= start) & (wanted < start + count)] - start
                if len(local):
                    yield _index(dict(inputs) if isinstance(inputs, Mapping) else inputs,
                                 local), targets[local]
            start += count
        if start != self.n:
            raise ValueError(
                f"{self.name}: the DataLoader yielded {start} examples but its dataset has "
                f"len() {self.n}."
            )


class _SliceSource(DataSource):
    """Positions ``start:stop`` of another source (streamed: reads only what it needs)."""

    def __init__(self, parent, start, stop):
        self.parent = parent
        self.start = start
        self.stop = stop
        self.name = parent.name
        self._cast = parent._cast

    def __len__(self):
        return self.stop - self.start

    def _raw(self, batch_size, indices):
        positions = torch.arange(self.start, self.stop)
        if indices is not None:
            positions = positions[torch.as_tensor(indices)]
        yield from self.parent._raw(batch_size, positions)


def as_source(data, name, dtype, label_key=LABEL_KEY):
    """Check ``data`` and return a :class:`DataSource` that casts to ``dtype``.

    Parameters
    ----------
    data : pair, Mapping, Dataset, DataLoader or DataSource
        See the module docstring.
    name : str
        The argument name, for messages.
    dtype : torch.dtype
        Floating tensors are cast to it.
    label_key : str, default="labels"
        Where dicts keep the target.

    Returns
    -------
    source : DataSource
    """
    if isinstance(data, DataSource):
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        source = LoaderSource(data, name, dtype, label_key)
    elif isinstance(data, torch.utils.data.IterableDataset):
        raise TypeError(
            f"{name} is an IterableDataset: its length is unknown, so influence scores "
            "could not be matched to examples. Pass a map-style Dataset with __len__."
        )
    elif isinstance(data, torch.utils.data.Dataset):
        source = DatasetSource(data, name, dtype, label_key)
    elif isinstance(data, Mapping):
        if label_key not in data:
            raise ValueError(
                f"{name} is a Mapping without the targets under {label_key!r} (its keys: "
                f"{sorted(data)}). Add them (a tokenizer's output plus "
                f"{label_key!r}), or pass label_key='<your key>'."
            )
        inputs = {key: _to_tensor(value, f"inputs[{key!r}]", name)
                  for key, value in data.items() if key != label_key}
        source = TensorSource(inputs, _to_tensor(data[label_key], "targets", name), name,
                              dtype)
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        inputs, targets = data
        if isinstance(inputs, Mapping):
            inputs = {key: _to_tensor(value, f"inputs[{key!r}]", name)
                      for key, value in inputs.items()}
        else:
            inputs = _to_tensor(inputs, "inputs", name)
        source = TensorSource(inputs, _to_tensor(targets, "targets", name), name, dtype)
    elif hasattr(data, "__iter__") and not hasattr(data, "__len__"):
        raise TypeError(
            f"{name} is an iterable of unknown length ({type(data).__name__}); pass an "
            "(inputs, targets) pair, a Mapping, a Dataset with __len__ or a DataLoader."
        )
    else:
        raise TypeError(
            f"{name} must be an (inputs, targets) pair of arrays or tensors, a Mapping of "
            f"tensors with the targets under {label_key!r}, a torch Dataset or a "
            f"DataLoader; got {type(data).__name__}."
        )
    if len(source) == 0:
        raise ValueError(f"{name} is empty: it needs at least one example.")
    return source


def fingerprint_sources(hasher, *sources):
    """Feed the examples of each source to ``hasher``."""
    for source in sources:
        hasher.update(str(len(source)).encode())
        source.digest(hasher)


def new_hasher():
    return hashlib.sha256()


class TensorData(TensorSource):
    """A source held in memory (for training, which needs every example at each step)."""

    def __init__(self, inputs, targets, name, dtype=None):
        self.inputs = inputs
        self.targets = targets
        self.name = name
        self._cast = _Caster(name, dtype if dtype is not None else (
            targets.dtype if targets.is_floating_point() else torch.float64))
        self.n = _check_lengths(inputs, targets, name)

    def subset(self, start, stop):
        rows = slice(start, stop)
        return TensorData(_index(self.inputs, rows), self.targets[rows], self.name,
                          self._cast.dtype)


def as_data(data, name, dtype, label_key=LABEL_KEY):
    """``data`` read whole into a :class:`TensorData` (checked, cast to ``dtype``).

    For training, which visits every example at each step; influence computations use
    :func:`as_source` and stream instead.
    """
    source = as_source(data, name, dtype, label_key)
    if isinstance(source, TensorSource) and not isinstance(source, TensorData):
        inputs, targets = source._cast(source.inputs, source.targets, 0)
        return TensorData(inputs, targets, name, dtype)
    parts = list(source.batches(1024, torch.device("cpu")))
    targets = torch.cat([t for _, t in parts])
    if isinstance(parts[0][0], dict):
        inputs = {key: torch.cat([i[key] for i, _ in parts]) for key in parts[0][0]}
    else:
        inputs = torch.cat([i for i, _ in parts])
    return TensorData(inputs, targets, name, dtype)

"""Identity of values by content, for resume records and caches.

One definition, used by the estimator's resume fingerprint
(``_FittedState.fingerprint``) and by :func:`skmsif.validation.leave_one_out`'s cache
key: a callable is identified by its code, defaults, closure and the globals it reads
(recursively), not by its name (``<lambda>`` is not an identity); tensors and arrays by
their bytes; objects by their class and attributes. What has no identity by value raises
:class:`Unidentified`, and the caller then refuses to reuse a stored result.
"""

import builtins
import functools
import types

import numpy as np
import torch

from ._data import new_hasher


class Unidentified(Exception):
    """A value that has no identity by value (the reason is the message)."""


LIBRARY = ("torch", "numpy", "builtins", "functools", "math", "scipy", "sklearn")


def is_library(kind):
    """Whether a class comes from a library whose code is identified by its version."""
    return (getattr(kind, "__module__", None) or "").split(".")[0] in LIBRARY


def code_bytes(hasher, code):
    """Update ``hasher`` with a code object's bytecode, names and constants."""
    hasher.update(code.co_code)
    hasher.update(repr((code.co_names, code.co_argcount, code.co_kwonlyargcount,
                        code.co_flags)).encode())
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            code_bytes(hasher, constant)
        else:
            hasher.update(repr(constant).encode())


def global_names(code):
    """The global names a code object (and the code objects it holds) reads."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= global_names(constant)
    return names


def feed(hasher, value, seen=frozenset(), depth=0):
    """Update ``hasher`` with ``value``'s content (recursively)."""
    if depth > 20:
        raise Unidentified("it nests objects too deeply")
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        hasher.update(f"{type(value).__name__}:{value!r};".encode())
        return
    if isinstance(value, (torch.dtype, torch.device, np.dtype, np.generic)):
        hasher.update(f"{type(value).__name__}:{value!r};".encode())
        return
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        hasher.update(f"tensor:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            feed(hasher, value.tolist(), seen, depth + 1)
            return
        hasher.update(f"array:{value.dtype}:{value.shape};".encode())
        hasher.update(np.ascontiguousarray(value).tobytes())
        return
    if isinstance(value, (list, tuple)):
        hasher.update(f"{type(value).__name__}:{len(value)};".encode())
        for item in value:
            feed(hasher, item, seen, depth + 1)
        return
    if isinstance(value, (set, frozenset)):
        hasher.update(f"set:{sorted(repr(item) for item in value)!r};".encode())
        return
    if isinstance(value, dict):
        hasher.update(f"dict:{len(value)};".encode())
        for key in sorted(value, key=repr):
            feed(hasher, key, seen, depth + 1)
            feed(hasher, value[key], seen, depth + 1)
        return
    if isinstance(value, types.ModuleType):
        hasher.update(f"module:{value.__name__};".encode())
        return
    if id(value) in seen:
        hasher.update(b"seen;")
        return
    seen = seen | {id(value)}
    if isinstance(value, type):
        hasher.update(f"type:{value.__module__}.{value.__qualname__};".encode())
        if not is_library(value):
            for attribute in ("__call__", "forward"):
                method = value.__dict__.get(attribute)
                if isinstance(method, types.FunctionType):
                    feed(hasher, method, seen, depth + 1)
        return
    if isinstance(value, functools.partial):
        hasher.update(b"partial;")
        for item in (value.func, value.args, value.keywords):
            feed(hasher, item, seen, depth + 1)
        return
    if isinstance(value, types.MethodType):
        hasher.update(b"method;")
        feed(hasher, value.__func__, seen, depth + 1)
        feed(hasher, value.__self__, seen, depth + 1)
        return
    if isinstance(value, types.FunctionType):
        hasher.update(f"function:{value.__module__}.{value.__qualname__};".encode())
        code_bytes(hasher, value.__code__)
        feed(hasher, value.__defaults__, seen, depth + 1)
        feed(hasher, value.__kwdefaults__, seen, depth + 1)
        for cell in value.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:
                hasher.update(b"empty-cell;")
            else:
                feed(hasher, contents, seen, depth + 1)
        namespace = value.__globals__
        for name in sorted(global_names(value.__code__)):
            if name in namespace:
                hasher.update(f"global:{name};".encode())
                feed(hasher, namespace[name], seen, depth + 1)
            elif not hasattr(builtins, name):
                hasher.update(f"unbound:{name};".encode())
        return
    if callable(value) and not hasattr(value, "__dict__") and hasattr(
            value, "__qualname__"):
        # Built-in functions and methods (torch.log, math.exp, ...).
        owner = getattr(value, "__self__", None)
        hasher.update(f"builtin:{getattr(value, '__module__', '')}."
                      f"{value.__qualname__};".encode())
        if owner is not None and not isinstance(owner, types.ModuleType):
            feed(hasher, owner, seen, depth + 1)
        return
    if isinstance(value, np.ufunc):
        hasher.update(f"ufunc:{value.__name__};".encode())
        return
    if hasattr(value, "__dict__") and not hasattr(type(value), "__slots__"):
        # An object (a loss module, a callable instance): its class and attributes.
        feed(hasher, type(value), seen, depth + 1)
        feed(hasher, dict(vars(value)), seen, depth + 1)
        return
    raise Unidentified(f"it holds a {type(value).__module__}."
                       f"{type(value).__qualname__} object, which has no "
                       "identity by value")


def digest(*values):
    """Hex digest of ``values`` by content; :class:`Unidentified` when one has none."""
    hasher = new_hasher()
    for value in values:
        feed(hasher, value, frozenset())
    return hasher.hexdigest()


def module_code(hasher, module):
    """Update ``hasher`` with the structure of ``module`` and the ``forward`` code of its
    submodules whose classes are not a library's."""
    hasher.update(repr(module).encode())
    for submodule in module.modules():
        kind = type(submodule)
        forward = kind.__dict__.get("forward")
        if not is_library(kind) and isinstance(forward, types.FunctionType):
            code_bytes(hasher, forward.__code__)

"""The one model adapter: how every part of the package calls a model.

A :class:`ModelAdapter` holds a private copy of a user's model (in the compute dtype, on
the compute device, in eval mode, with no gradients kept), calls it on a batch, and keeps
the model's *outputs* apart from the per-example *loss* on them, as torch-influence's
``train_outputs`` / ``train_loss_on_outputs`` do: the Gauss-Newton matrix needs the loss's
Hessian with respect to the outputs.

Calling conventions (``skmsif._data`` makes the batches):

* a tensor batch is passed as ``model(inputs)``, a dict batch as ``model(**inputs)``
  (without the target);
* the outputs are the result's ``.logits`` when it has that attribute (a ``transformers``
  ``ModelOutput``), else the result itself when it is a tensor, else a ``TypeError`` that
  says how to adapt the model.

Attention kernels: PyTorch's CPU attention kernel (``scaled_dot_product_attention``, the
``transformers`` default) has neither forward-mode derivatives nor a double backward, which
Hessian-vector products and forward-mode scoring need. The private copy of a
``transformers`` model is therefore switched to its ``"eager"`` attention, which computes
the same function with ordinary operations; the user's model keeps its own setting.
Likewise PyTorch's fused layer norm has wrong second derivatives (measured against finite
differences), so every ``nn.LayerNorm`` of the private copy is computed with elementary
operations (:class:`DecomposedLayerNorm`).
"""

import copy

import torch
from torch.func import functional_call

from ._losses import resolve_loss


class DecomposedLayerNorm(torch.nn.LayerNorm):
    """``nn.LayerNorm`` computed with elementary operations (same parameters and result).

    PyTorch 2.13's fused layer-norm kernel has wrong second derivatives: the derivative of
    the weight's gradient with respect to the input (measured against finite differences,
    off by the size of the entries, in forward-over-reverse and reverse-over-reverse
    alike). Hessian-vector products through it are therefore wrong; through these
    elementary operations they are right.
    """

    def forward(self, inputs):
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = inputs.mean(dim=dims, keepdim=True)
        centred = inputs - mean
        variance = (centred * centred).mean(dim=dims, keepdim=True)
        outputs = centred * torch.rsqrt(variance + self.eps)
        if self.weight is not None:
            outputs = outputs * self.weight
        if self.bias is not None:
            outputs = outputs + self.bias
        return outputs


def _decompose_layer_norms(module):
    """Give every ``nn.LayerNorm`` inside ``module`` correct second derivatives."""
    names = []
    for name, sub in module.named_modules():
        if type(sub) is torch.nn.LayerNorm:
            sub.__class__ = DecomposedLayerNorm
            names.append(name)
    return names


def _switch_to_eager_attention(module):
    """Switch every ``transformers`` model inside ``module`` to eager attention.

    Returns the names of the submodules switched (``""`` for ``module`` itself).
    """
    switched = []
    for name, sub in module.named_modules():
        config = getattr(sub, "config", None)
        setter = getattr(sub, "set_attn_implementation", None)
        current = getattr(config, "_attn_implementation", None)
        if setter is None or current in (None, "eager"):
            continue
        setter("eager")
        switched.append(name)
    return switched


def private_copies(models, dtype, device):
    """Copies of ``models`` made ready for differentiation; the originals are untouched.

    One ``deepcopy`` of all of them keeps parameters they share shared in the copies.
    Floating parameters and buffers are cast to ``dtype`` and moved to ``device``; the
    copies are in eval mode (dropout off, batch norm on its running statistics), hold no
    ``.grad`` and do not require gradients (``torch.func`` differentiates the state dicts
    passed to :meth:`ModelAdapter.outputs`, not the modules' own parameters).
    """
    copies = copy.deepcopy(tuple(models))
    for module in copies:
        module.eval()
        for parameter in module.parameters():
            parameter.grad = None
            parameter.requires_grad_(False)
        module.to(device=device, dtype=dtype)  # floating tensors only change dtype
    return copies


def model_state(module):
    """Every parameter and buffer of ``module``, detached, by name."""
    state = {name: tensor.detach() for name, tensor in module.named_parameters()}
    state.update({name: tensor.detach() for name, tensor in module.named_buffers()})
    return state


def extract_outputs(result, model_name="model"):
    """The outputs tensor of a model's return value (see the module docstring)."""
    logits = getattr(result, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(result, torch.Tensor):
        return result
    raise TypeError(
        f"{model_name} returned a {type(result).__name__}, not a tensor nor an object with "
        "a .logits tensor. Wrap the model in a torch.nn.Module whose forward returns the "
        "outputs the loss is computed on (for example `return self.model(x)[0]`)."
    )


def call_model(module, inputs, state=None, model_name="model"):
    """``module(inputs)`` or ``module(**inputs)``, at ``state`` when given; outputs tensor."""
    if state is None:
        result = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    else:
        from ._solvers import FORWARD_MODE_LOCK

        # functional_call swaps the module's tensors for the call's duration: threads
        # sharing one module take turns (the lock is re-entrant, so sections that
        # already hold it for their torch.func transforms pass straight through).
        with FORWARD_MODE_LOCK:
            if isinstance(inputs, dict):
                result = functional_call(module, state, (), inputs)
            else:
                result = functional_call(module, state, (inputs,))
    return extract_outputs(result, model_name)


class ModelAdapter:
    """One model as the package differentiates it: a private copy, its outputs and loss.

    Parameters
    ----------
    module : torch.nn.Module
        A private copy made by :func:`private_copies` (the adapter may switch its attention
        kernel).
    loss : str or callable
        ``"cross_entropy"``, ``"mse"``, or ``loss(outputs, targets) -> (batch,)``.
    model_name, loss_name : str
        Argument names, for messages.

    Attributes
    ----------
    state : dict of str to torch.Tensor
        Every parameter and buffer of the copy.
    attention_switched : list of str
        Submodules whose attention kernel was switched to ``"eager"``.
    layer_norms_decomposed : list of str
        ``nn.LayerNorm`` submodules computed with elementary operations
        (:class:`DecomposedLayerNorm`), whose second derivatives are right.
    """

    def __init__(self, module, loss, model_name, loss_name):
        self.module = module
        self.loss_spec = loss
        self.loss = resolve_loss(loss)
        self.model_name = model_name
        self.loss_name = loss_name
        self.attention_switched = _switch_to_eager_attention(module)
        self.layer_norms_decomposed = _decompose_layer_norms(module)
        self.state = model_state(module)

    def outputs(self, state, inputs):
        """The model's outputs on a batch at the parameters in ``state``."""
        return call_model(self.module, inputs, state, self.model_name)

    def outputs_at_state(self, inputs):
        """The outputs at the copy's own values (``state``)."""
        return self.outputs(self.state, inputs)

    def losses(self, state, inputs, targets):
        """Per-example losses ``(batch,)`` of a batch at ``state``."""
        return self.loss(self.outputs(state, inputs), targets)

    def loss_on_outputs(self, outputs, targets):
        return self.loss(outputs, targets)

    def output_hessian_product(self, outputs, targets, vectors):
        """``H_out u`` per example: the loss's Hessian w.r.t. the outputs times ``vectors``.

        ``vectors`` has the outputs' shape. Closed forms for the named losses, autograd
        (forward over reverse) for a callable.
        """
        if self.loss_spec == "cross_entropy":
            probabilities = torch.softmax(outputs, dim=-1)
            inner = (probabilities * vectors).sum(dim=-1, keepdim=True)
            return probabilities * vectors - probabilities * inner
        if self.loss_spec == "mse":
            per_example = outputs[0].numel() if outputs.ndim > 1 else 1
            return (2.0 / per_example) * vectors

        def summed(out):
            return self.loss(out, targets).sum()

        return torch.func.jvp(torch.func.grad(summed), (outputs,), (vectors,))[1]

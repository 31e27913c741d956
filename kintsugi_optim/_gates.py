r"""The gate machinery behind :class:`~kintsugi_optim.VWPR` (docs/maths.md §3.3).

Which layers are gated and how many pathways each has (:func:`select_layers`), the ϕ buffers
(:class:`GildingWeights`), the forward hook (:class:`Gate`) and the autograd function that scales
the gradient leaving each pathway by ϕ and writes its fracture into ϕ.grad (:class:`GateFn`).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from kintsugi_optim._compat import _has_compatible_shallow_copy_type
from kintsugi_optim._validation import require
from kintsugi_optim.pathways import phi_dtype

__all__ = ["GATED_TYPES", "Gate", "GateFn", "GildingWeights", "select_layers"]


GATED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The torch layer types :class:`VWPR` gates when ``layers`` is None (Hugging Face's ``Conv1D``,
GPT-2's projections, is gated as well when transformers is loaded)."""


def _default_types() -> tuple[type[nn.Module], ...]:
    # Hugging Face's Conv1D (GPT-2's attention and MLP) is a Linear with its weight transposed.
    # Looked up only if transformers is already imported: VWPR never imports it.
    hf = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(hf, "Conv1D", None)
    return GATED_TYPES + ((conv1d,) if isinstance(conv1d, type) else ())


def _pathways(module: nn.Module) -> int | None:
    """Number of output pathways: ``out_channels`` (channel dim), else ``out_features`` or
    Hugging Face ``Conv1D``'s ``nf`` (last dim); None when the module has none of them."""
    for attribute in ("out_channels", "out_features", "nf"):
        value = getattr(module, attribute, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class GateFn(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ϕ along ``dim`` and returns the
    fracture mean |grad| over every other dim as ϕ's gradient."""

    @staticmethod
    def forward(ctx, output: Tensor, phi: Tensor, dim: int) -> Tensor:
        ctx.save_for_backward(phi)
        ctx.dim = dim
        # An alias, neither a view nor a copy: a view made inside a custom Function must not be
        # modified in place (an nn.ReLU(inplace=True) after the layer would raise), and a clone
        # costs a pass over the activation. detach() shares storage and version counter with the
        # layer's raw output, which nothing else uses, so in-place ops behave as in the bare model.
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        (phi,) = ctx.saved_tensors
        dim = ctx.dim
        fracture = scaled = spare = None
        if ctx.needs_input_grad[1]:  # False when the user froze ϕ with requires_grad_(False)
            others = [d for d in range(grad.dim()) if d != dim]
            magnitude = grad.abs()
            # mean(dim=[]) would reduce over everything, so the 1-d case is spelled out.
            fracture = magnitude.mean(others, dtype=phi.dtype) if others else magnitude.to(phi.dtype)
            # |grad| is spent: write the scaled gradient into it, as a fresh activation-sized
            # buffer costs more on CPU (page faults) than the multiplication itself. Not when
            # it is the fracture (1-d), nor when recording a graph (create_graph=True).
            reusable = others and magnitude.dtype == grad.dtype and not torch.is_grad_enabled()
            spare = magnitude if reusable else None
        if ctx.needs_input_grad[0]:
            shape = (-1,) + (1,) * (grad.dim() - dim - 1)  # ϕ broadcast over its pathway
            scaled = torch.mul(grad, phi.to(grad.dtype).view(shape), out=spare)
        return scaled, fracture, None


class Gate:
    """Forward hook that routes a gated layer's output through :class:`GateFn` with its ϕ.

    A plain class rather than a closure so that a wrapped model can be pickled and deep-copied.
    It looks ϕ up at every call, so loading or moving the ϕ buffers never leaves it stale.
    """

    def __init__(self, bank: GildingWeights, layer: str, module: nn.Module) -> None:
        self.bank = bank
        self.layer = layer
        # Linear-like layers keep their pathways in the last dim; Conv-like ones in dim 1 of a
        # batched [N, C, *space] output and dim 0 of an unbatched [C, *space] one.
        self.features_last = not hasattr(module, "out_channels")
        kernel_size = getattr(module, "kernel_size", None)
        self.spatial_dims = len(kernel_size) if isinstance(kernel_size, tuple) else None

    def pathway_dim(self, output: Tensor) -> int:
        if self.features_last:
            return output.dim() - 1
        if self.spatial_dims is not None:
            return output.dim() - self.spatial_dims - 1
        return min(1, output.dim() - 1)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Tensor | None:
        if not (module.training and torch.is_grad_enabled()):
            return None  # eval(), no_grad(), inference_mode(): the bare layer, no side effects
        if not isinstance(output, Tensor):
            raise TypeError(f"VWPR can only gate tensor outputs; layer {self.layer!r} returned "
                            f"{type(output).__name__}")
        phi = self.bank.phi(self.layer)
        dim = self.pathway_dim(output)
        if output.dim() == 0 or output.shape[dim] != phi.shape[0]:
            raise ValueError(
                f"layer {self.layer!r} returned shape {tuple(output.shape)}, whose pathway dim "
                f"{dim} does not match its {phi.shape[0]} gilding weights")
        if output.device != phi.device:
            raise RuntimeError(
                f"the gilding weights of layer {self.layer!r} are on {phi.device} but its output is "
                f"on {output.device}: move the wrapper (vwpr.to(...)), not only the model")
        return GateFn.apply(output, phi, dim)


class GildingWeights(nn.Module):
    """The ϕ buffers, one per gated layer, each a leaf that requires grad so that autograd
    accumulates the fracture into ``.grad``. Buffer keys are layer names with "." → "/"
    ("." is not allowed in a buffer name)."""

    @staticmethod
    def key(layer: str) -> str:
        return layer.replace(".", "/") or "(model)"

    def add(self, layer: str, phi: Tensor) -> None:
        self.register_buffer(self.key(layer), phi.requires_grad_())

    def phi(self, layer: str) -> Tensor:
        return self._buffers[self.key(layer)]

    def __init__(self, phi_init: float = 1.0) -> None:
        super().__init__()
        self.phi_init = phi_init

    def _apply(self, fn, recurse: bool = True):
        # nn.Module replaces each buffer with fn(buffer), outside no_grad: a ϕ would become a
        # non-leaf that never receives .grad, and optimizers holding the old tensor would be
        # orphaned. Convert in place instead, as nn.Module does for parameters; ϕ stays float32
        # under .half()/.bfloat16() (a 16-bit ϕ near 1 cannot register a small gilding step).
        with torch.no_grad():
            for key, phi in list(self._buffers.items()):
                converted = fn(phi)
                converted = converted.to(phi_dtype(converted))
                if _has_compatible_shallow_copy_type(phi, converted):
                    phi.data = converted
                    if phi.grad is not None:
                        phi.grad = fn(phi.grad).to(phi.dtype)
                else:
                    # meta → a real device (to_empty): no in-place swap exists between the two
                    # kinds of tensor, so ϕ becomes a new leaf, as nn.Module does for parameters.
                    self._buffers[key] = converted.detach().requires_grad_(phi.requires_grad)
        return self

    def reset_parameters(self) -> None:
        """Set every ϕ to ``phi_init`` and drop its gradient (after ``to_empty()``, say)."""
        with torch.no_grad():
            for phi in self._buffers.values():
                phi.fill_(getattr(self, "phi_init", 1.0))
                phi.grad = None


def select_layers(
    model: nn.Module, layers: Iterable[str | type[nn.Module]] | str | type[nn.Module] | None
) -> tuple[list[tuple[str, nn.Module, int]], dict[str, str]]:
    """(name, module, number of pathways) of each module to gate, in model order, all checked;
    and ``{name: reason}`` for the weight-bearing modules the default choice leaves out."""
    modules = dict(model.named_modules())
    skipped: dict[str, str] = {}
    if layers is None:
        types = _default_types()
        chosen = {name for name, m in modules.items() if isinstance(m, types)}
        require(bool(chosen), "model", type(model).__name__,
                "has no nn.Linear, nn.Conv1d/2d/3d or Hugging Face Conv1D to gate; name the "
                "modules in `layers`")
        for name, m in modules.items():
            weight = m._parameters.get("weight")
            if name in chosen or not isinstance(weight, Tensor) or weight.dim() < 2:
                continue
            skipped[name] = (
                f"{type(m).__name__} is not a default type; name it in `layers` to gate it"
                if _pathways(m) is not None else
                f"{type(m).__name__} has no out_features, out_channels or nf")
    else:
        if isinstance(layers, (str, type)):
            layers = [layers]
        chosen = set()
        for entry in layers:
            if isinstance(entry, str):
                require(entry in modules, "layers", entry, "is not the name of a submodule")
                chosen.add(entry)
            elif isinstance(entry, type) and issubclass(entry, nn.Module):
                chosen |= {name for name, m in modules.items() if isinstance(m, entry)}
            else:
                require(False, "layers", entry, "entries must be module names or nn.Module types")
        require(bool(chosen), "layers", layers, "matched no module of the model")
    selected, keys = [], {}
    for name, module in modules.items():
        if name not in chosen:
            continue
        pathways = _pathways(module)
        require(pathways is not None and pathways > 0, "layers", name,
                f"a gated module needs out_features, out_channels or nf (Hugging Face Conv1D); "
                f"{type(module).__name__} has none")
        require(not any(isinstance(hook, Gate) for hook in module._forward_hooks.values()),
                "layers", name, "is already gated by another VWPR; call .remove() on it first")
        key = GildingWeights.key(name)
        require(key not in keys, "layers", name,
                f"its buffer name {key!r} collides with that of layer {keys.get(key)!r}")
        keys[key] = name
        selected.append((name, module, pathways))
    return selected, skipped

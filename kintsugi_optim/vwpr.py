r"""VWPR: Kintsugi at the activation level (docs/maths.md §3.3).

:class:`VWPR` (alias ``EnhancedVWPRWrapper``) gives every output feature or channel of a model's
``nn.Linear`` / ``nn.Conv1d/2d/3d`` layers (its *pathways*) a gilding weight ϕ. The forward pass
is untouched. In the backward pass the gradient leaving pathway i is multiplied by ϕ_i, so the
layer's own weights and everything upstream learn ϕ_i times as hard, and the pathway's fracture
signal l_i = mean |∂L/∂a_i| (over batch and space, before the scaling) arrives in ``ϕ_i.grad``
through autograd itself, ready for a :class:`~kintsugi_optim.GilderOptimizer`.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from kintsugi_optim._validation import (
    as_number,
    require,
    require_positive_representable,
    require_valid_phi,
)
from kintsugi_optim.functional import phi_dtype
from kintsugi_optim.history import PhiHistory

__all__ = ["VWPR", "EnhancedVWPRWrapper", "GATED_TYPES"]

GATED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""The torch layer types :class:`VWPR` gates when ``layers`` is None (Hugging Face's ``Conv1D``,
GPT-2's projections, is gated as well when transformers is loaded)."""

_log = logging.getLogger(__name__)


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


class _GateFn(torch.autograd.Function):
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


class _Gate:
    """Forward hook that routes a gated layer's output through :class:`_GateFn` with its ϕ.

    A plain class rather than a closure so that a wrapped model can be pickled and deep-copied.
    It looks ϕ up at every call, so loading or moving the ϕ buffers never leaves it stale.
    """

    def __init__(self, bank: _GildingWeights, layer: str, module: nn.Module) -> None:
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
        return _GateFn.apply(output, phi, dim)


class _GildingWeights(nn.Module):
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
                if torch._has_compatible_shallow_copy_type(phi, converted):
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


class VWPR(nn.Module):
    r"""Value-Weighted Pathway Reinforcement: a gilding weight ϕ per output feature/channel.

    Wraps ``model`` with a forward hook on each gated layer. ``vwpr(*args, **kw)`` is
    ``model(*args, **kw)`` with identical output. In backward, for a gated layer with output a
    (pathway dim: last for Linear, channel dim for Conv):

        ∂L/∂a_i  →  ϕ_i · ∂L/∂a_i          (into the layer's weights and on upstream)
        ϕ_i.grad += mean |∂L/∂a_i|          (the fracture, over batch and space, before scaling)

    ``ϕ.grad`` accumulates across backward calls exactly like a parameter's ``.grad`` (one term
    per call of the layer), so gradient accumulation, ``zero_grad`` and
    ``torch.amp.GradScaler.unscale_`` work unchanged; ``torch.autograd.grad`` leaves it alone.
    The gate is active only while the layer is in training mode and grad is enabled: under
    ``eval()`` or ``no_grad()`` the model is the bare model, backward included.

    Args:
        model: the network. It becomes the submodule ``vwpr.model``.
        layers: which modules to gate: names (as in ``model.named_modules()``) and/or module
            types, or None (default) for every ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging
            Face ``Conv1D``. A gated module needs ``out_features`` or ``nf`` (pathways on the last
            dim) or ``out_channels``. :meth:`skipped_layers` says which weight-bearing modules
            the default left out, and why.
        phi_init (float): initial ϕ, > 0 (default: 1.0, the bare model's gradients).
        history (bool or PhiHistory): keep bounded ϕ summaries in ``vwpr.history``
            (default: True; False for none; or a configured :class:`PhiHistory`).

    ϕ are persistent buffers of the child ``vwpr.gilding_weights`` (``vwpr.state_dict()`` saves
    them), float32 for 16-bit layers, shape ``[out_features or out_channels]``. Optimize with a
    ``GilderOptimizer(vwpr.phi_parameters(), fracture="relative")``, θ with any optimizer over
    ``vwpr.theta_parameters()``.

    Adam and ϕ: Adam divides each weight's step by its gradient's running RMS, so a steady ϕ_i
    mostly cancels in the layer's own Adam step; it survives upstream (where pathways mix) and
    while ϕ changes. With SGD or the Sculptor it acts in full.

    Example::

        vwpr = VWPR(model)
        opt_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.1)
        opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.01, fracture="relative")
        loss = criterion(vwpr(x), y)
        l_map, phi_vals = vwpr.apply_vwpr_step(loss, opt_theta, opt_phi)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[str | type[nn.Module]] | str | type[nn.Module] | None = None,
        *,
        phi_init: float = 1.0,
        history: bool | PhiHistory = True,
    ) -> None:
        super().__init__()
        require(isinstance(model, nn.Module), "model", type(model).__name__, "must be an nn.Module")
        # numpy and Fraction numbers too, as for every hyperparameter
        require(as_number("phi_init", phi_init) > 0, "phi_init", phi_init,
                "must be a finite number > 0")
        require(isinstance(history, (bool, PhiHistory)), "history", history,
                "must be True, False or a PhiHistory")
        selected, skipped = _select_layers(model, layers)  # every check before the first hook
        phi_dtypes = set()  # phi_init must not round to 0 (or overflow) in any ϕ
        for _, module, _ in selected:
            weight = getattr(module, "weight", None)
            ready = isinstance(weight, Tensor) and not isinstance(weight, UninitializedParameter)
            phi_dtypes.add(phi_dtype(weight) if ready else torch.get_default_dtype())
        require_positive_representable("phi_init", float(phi_init), phi_dtypes)
        self.model = model
        self.gilding_weights = _GildingWeights(float(phi_init))
        self._gated_names = [name for name, _, _ in selected]
        self._skipped = skipped
        self._handles: dict[str, torch.utils.hooks.RemovableHandle] = {}
        for name, module, pathways in selected:
            weight = getattr(module, "weight", None)
            if isinstance(weight, Tensor) and not isinstance(weight, UninitializedParameter):
                dtype, device = phi_dtype(weight), weight.device
            else:
                dtype, device = torch.get_default_dtype(), None
            phi = torch.full((pathways,), float(phi_init), dtype=dtype, device=device)
            self.gilding_weights.add(name, phi)
            self._handles[name] = module.register_forward_hook(
                _Gate(self.gilding_weights, name, module))
        self.register_load_state_dict_pre_hook(_check_loaded_phi)
        # Not `history or None`: an empty PhiHistory has len 0 and is falsy.
        self.history = PhiHistory() if history is True else None if history is False else history
        if skipped:
            _log.info("VWPR gates %d layers of %s and skips %d weight-bearing modules: %s",
                      len(selected), type(model).__name__, len(skipped),
                      "; ".join(f"{name} ({why})" for name, why in skipped.items()))
        base = getattr(type(self), "_vwpr_base", type(self))
        self.__class__ = _signature_class(base, type(model))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)``. Each wrapper's class carries the wrapped model's forward
        signature, so ``inspect.signature(vwpr.forward)`` is the model's."""
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Public attributes the wrapper lacks come from the model, as frameworks look for
            # them on whatever they are handed (config, generation_config, can_generate,
            # gradient_checkpointing_enable, ...). Private and dunder names do not: hooks such as
            # accelerate's _hf_hook must not appear to sit on the wrapper too. The exception is
            # the Hugging Face key lists the Trainer reads after loading a checkpoint.
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or (name.startswith("_") and not name.startswith("_keys_to_ignore")):
                raise
            return getattr(model, name)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The signature class is made at run time, so pickle cannot find it by name: rebuild it
        # from the base class and the model's class, both importable.
        reduced = super().__reduce_ex__(protocol)
        cls = type(self)
        if "_vwpr_model_class" not in cls.__dict__:
            return reduced
        return (_new_vwpr, (cls._vwpr_base, cls._vwpr_model_class)) + tuple(reduced[2:])

    def _get_name(self) -> str:
        return getattr(type(self), "_vwpr_base", type(self)).__name__

    # -- the two streams' tensors ------------------------------------------------------------

    def theta_parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """The sculptor weights θ: the model's parameters (not ϕ)."""
        return self.model.parameters(recurse)

    def phi_parameters(self) -> Iterator[Tensor]:
        """The gilding weights ϕ, one tensor per gated layer, for a ``GilderOptimizer``."""
        return iter(self.phi().values())

    def phi(self) -> dict[str, Tensor]:
        """``{layer name: ϕ}``, the live buffers (shape ``[pathways]``), in model order."""
        return {name: self.gilding_weights.phi(name) for name in self._gated_names}

    def gilding(self) -> dict[str, Tensor]:
        """Every ϕ, as every ϕ-holding object of the package answers: same as :meth:`phi`."""
        return self.phi()

    @property
    def layers(self) -> list[str]:
        """Names of the gated layers (still listed after :meth:`remove`)."""
        return list(self._gated_names)

    def gated_layers(self) -> dict[str, int]:
        """``{layer name: number of pathways}`` of every gated layer, in model order."""
        return {name: phi.shape[0] for name, phi in self.phi().items()}

    def skipped_layers(self) -> dict[str, str]:
        """``{module name: why}`` for the modules with a weight matrix that the default choice
        (``layers=None``) did not gate, such as embeddings; empty when ``layers`` was given.
        The same list is logged at INFO level by the ``kintsugi_optim.vwpr`` logger."""
        return dict(getattr(self, "_skipped", {}))

    def reset_parameters(self) -> None:
        """Set every ϕ back to ``phi_init`` and drop ϕ.grad. With a model built on the meta
        device: ``vwpr.to_empty(device=...)``, then each module's ``reset_parameters()``
        (this one included) initialises θ and ϕ."""
        self.gilding_weights.reset_parameters()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of θ and of ϕ (``nn.Module.zero_grad`` skips buffers)."""
        super().zero_grad(set_to_none)
        for phi in self.phi_parameters():
            if phi.grad is not None:
                phi.grad = None if set_to_none else phi.grad.detach().zero_()

    # -- hooks -------------------------------------------------------------------------------

    def remove(self) -> nn.Module:
        """Remove every hook; the model is the bare model again. ϕ and the history stay readable.
        Returns the model."""
        for handle in self._handles.values():
            handle.remove()
        self._handles = {}
        return self.model

    @property
    def gated(self) -> bool:
        """True until :meth:`remove` is called."""
        return bool(self._handles)

    # -- training ----------------------------------------------------------------------------

    def record(self, step: int | None = None) -> None:
        """Append ϕ's summaries to ``self.history`` (no-op without a history)."""
        if self.history is not None:
            self.history.record(self.phi(), step=step)

    def apply_vwpr_step(
        self,
        base_loss: Tensor,
        optimizer_theta: torch.optim.Optimizer,
        optimizer_phi: torch.optim.Optimizer,
        *,
        scaler: torch.amp.GradScaler | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """One step of both streams: zero both, backward, step θ, then step ϕ, record history.

        With ``scaler`` the backward is ``scaler.scale(base_loss).backward()``, both steps go
        through ``scaler.step`` (which unscales ϕ.grad like any ``.grad``), then
        ``scaler.update()``. A convenience only: your own loop with ``loss.backward()``,
        clipping or accumulation, ``opt_theta.step()``, ``opt_phi.step()``, ``vwpr.record()``
        does the same. Recording copies ϕ to the host once (on a GPU, one sync) and
        summarizes it there, about 0.1 ms for a handful of layers; as the history thins it
        records ever more rarely.

        Returns:
            ``(l_map, phi_vals)``: ``{layer: fracture}`` (unscaled copies of ϕ.grad; layers the
            loss did not reach are left out) and ``{layer: copy of ϕ after the step}``.
        """
        held = {id(p) for group in optimizer_phi.param_groups for p in group["params"]}
        require(any(id(phi) in held for phi in self.phi_parameters()), "optimizer_phi",
                type(optimizer_phi).__name__,
                "holds none of this wrapper's gilding weights; build it over vwpr.phi_parameters()")
        optimizer_theta.zero_grad()
        optimizer_phi.zero_grad()
        if scaler is None:
            base_loss.backward()
            optimizer_theta.step()
            optimizer_phi.step()
        else:
            scaler.scale(base_loss).backward()
            scaler.step(optimizer_theta)
            scaler.step(optimizer_phi)
            scaler.update()
        phis = self.phi()
        l_map = {name: phi.grad.detach().clone() for name, phi in phis.items()
                 if phi.grad is not None}
        phi_vals = {name: phi.detach().clone() for name, phi in phis.items()}
        self.record()
        return l_map, phi_vals

    # -- saving ------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """Save the wrapped Hugging Face model as ``model.save_pretrained`` does (config and
        weights, readable by ``from_pretrained``), plus ϕ as ``gilding_weights.pt`` beside it.

        ``kwargs`` go to the model's ``save_pretrained``; a ``state_dict`` of the wrapper (keys
        ``model.*``) is narrowed to the model's own keys. Restore ϕ with
        ``vwpr.gilding_weights.load_state_dict(torch.load(path / "gilding_weights.pt"))``.
        """
        save = getattr(self.model, "save_pretrained", None)
        require(callable(save), "model", type(self.model).__name__,
                "has no save_pretrained; save vwpr.state_dict() with torch.save instead")
        state_dict = kwargs.pop("state_dict", None)
        if state_dict is not None:
            prefix = "model."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
            kwargs["state_dict"] = state_dict
        save(save_directory, **kwargs)
        if kwargs.get("is_main_process", True):
            phis = {k: v.detach().cpu() for k, v in self.gilding_weights.state_dict().items()}
            torch.save(phis, os.path.join(os.fspath(save_directory), "gilding_weights.pt"))

    # -- sigils --------------------------------------------------------------------------------

    def visualize_phi_distribution(
        self, epoch: int | None = None, path: str | os.PathLike | None = None
    ):
        """One ϕ histogram ("sigil") per gated layer in a matplotlib Figure, saved as PNG when
        ``path`` is given. Needs the ``viz`` extra; see
        :func:`kintsugi_optim.sigils.plot_phi_distribution`."""
        from kintsugi_optim.sigils import plot_phi_distribution

        return plot_phi_distribution(self, epoch=epoch, path=path)

    def extra_repr(self) -> str:
        state = "" if self.gated else ", removed"
        return f"gated {len(self._gated_names)} layers{state}"


def _check_loaded_phi(module: VWPR, state_dict, prefix: str, *args) -> None:
    # Checked on the wrapper, before the model's own weights are loaded: a NaN or ≤ 0 ϕ in a
    # checkpoint raises with nothing changed, instead of scaling every gradient by it.
    start = prefix + "gilding_weights."
    for key, value in state_dict.items():
        if key.startswith(start):
            require_valid_phi(f"{key} in the loaded state_dict", value)


def _select_layers(
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
        require(not any(isinstance(hook, _Gate) for hook in module._forward_hooks.values()),
                "layers", name, "is already gated by another VWPR; call .remove() on it first")
        key = _GildingWeights.key(name)
        require(key not in keys, "layers", name,
                f"its buffer name {key!r} collides with that of layer {keys.get(key)!r}")
        keys[key] = name
        selected.append((name, module, pathways))
    return selected, skipped


_SIGNATURE_CLASSES: dict[tuple[type, type], type] = {}


def _signature_class(base: type, model_class: type) -> type:
    """``base`` with a ``forward`` whose signature is ``model_class.forward``'s, made once per
    pair. Frameworks read the signature from the *class* (the Hugging Face Trainer keeps only
    the batch columns that ``forward`` names and finds label names with
    ``inspect.signature(type(model).forward)``), so an instance attribute would not do."""
    key = (base, model_class)
    if key not in _SIGNATURE_CLASSES:
        @functools.wraps(model_class.forward)
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self.model(*args, **kwargs)

        # The wrapped model's class name stays in the name: the Trainer looks for
        # "QuestionAnswering" there to know its label names.
        _SIGNATURE_CLASSES[key] = type(f"{base.__name__}[{model_class.__name__}]", (base,), {
            "forward": forward, "__module__": base.__module__, "_vwpr_base": base,
            "_vwpr_model_class": model_class})
    return _SIGNATURE_CLASSES[key]


def _new_vwpr(base: type, model_class: type) -> VWPR:
    """Unpickling: a bare instance of the signature class, before ``__setstate__``."""
    return object.__new__(_signature_class(base, model_class))


EnhancedVWPRWrapper = VWPR

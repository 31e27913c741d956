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
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import UninitializedParameter

from kintsugi_optim._gates import GATED_TYPES, Gate, GateFn, GildingWeights, select_layers
from kintsugi_optim._validation import (
    as_number,
    require,
    require_positive_representable,
    require_valid_phi,
)
from kintsugi_optim.pathways import phi_dtype
from kintsugi_optim.history import PhiHistory

__all__ = ["VWPR", "EnhancedVWPRWrapper", "GATED_TYPES"]  # GATED_TYPES lives in _gates.py

_log = logging.getLogger(__name__)


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
        selected, skipped = select_layers(model, layers)  # every check before the first hook
        phi_dtypes = set()  # phi_init must not round to 0 (or overflow) in any ϕ
        for _, module, _ in selected:
            weight = getattr(module, "weight", None)
            ready = isinstance(weight, Tensor) and not isinstance(weight, UninitializedParameter)
            phi_dtypes.add(phi_dtype(weight) if ready else torch.get_default_dtype())
        require_positive_representable("phi_init", float(phi_init), phi_dtypes)
        self.model = model
        self.gilding_weights = GildingWeights(float(phi_init))
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
                Gate(self.gilding_weights, name, module))
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
# Wrappers pickled whole before the gate machinery moved to _gates.py name its classes here.
_Gate, _GateFn, _GildingWeights = Gate, GateFn, GildingWeights

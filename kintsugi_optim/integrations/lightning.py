"""Kintsugi in Lightning (``lightning.pytorch``).

The Sculptor is an ordinary optimizer: return it from ``configure_optimizers``. A Gilder (ϕ of
a VWPR or a GildedLoss) is best kept *out* of ``configure_optimizers``: Lightning counts every
configured optimizer's step in ``trainer.global_step``, so two optimizers halve the steps
``max_steps`` allows. :class:`GilderCallback` steps it once per θ step instead and saves it (and
its ϕ) in Lightning's checkpoints. Needs ``lightning``. Recipes and pitfalls: docs/frameworks.md.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from kintsugi_optim._validation import require
from kintsugi_optim.integrations import checked_gilders

__all__ = ["GilderCallback"]


class GilderCallback(Callback):
    """Step one or more Gilders once per optimizer step of the ``Trainer``; clear their ϕ.grad.

    Args:
        *gilders (torch.optim.Optimizer): the ``GilderOptimizer``s over the ϕ to ascend,
            stepped in this order. One callback for all of them: Lightning keys a callback's
            checkpoint state by its class.

    The Gilders step once per θ step, in automatic and in manual optimization: in
    ``on_before_optimizer_step`` (after the backward of the last accumulated batch and after
    Lightning unscaled θ's gradients, just before θ's step: the two streams are simultaneous, so
    the order does not change the result). They are not configured optimizers, so
    ``global_step`` counts θ's steps only. Under ``precision="16-mixed"`` ϕ.grad is scaled like
    θ's: it is unscaled there with Lightning's gradient scaler (``scaler.unscale_``, so an inf in
    ϕ.grad also lowers the scale), and the Gilders step after θ's step (``on_train_batch_end``),
    only if the scale did not drop (no inf in θ's gradient nor in ϕ's): a step skipped for θ is
    skipped for ϕ. Their state and their ϕ
    tensors are saved with the checkpoint (``state_dict``) and restored on resume, which matters
    for a GildedLoss, whose ϕ is not in the model.
    """

    def __init__(self, *gilders: torch.optim.Optimizer) -> None:
        self.gilders = checked_gilders(gilders)
        self._scale_before_step: float | None = None  # set while a scaled ϕ step is pending

    def _phis(self) -> list[torch.Tensor]:
        return [p for gilder in self.gilders for group in gilder.param_groups
                for p in group["params"]]

    def _step(self) -> None:
        for gilder in self.gilders:
            gilder.step()
            gilder.zero_grad()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._scale_before_step = None
        for gilder in self.gilders:
            gilder.zero_grad()

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not scaler.is_enabled():
            self._step()
        elif self._scale_before_step is None and any(p.grad is not None for p in self._phis()):
            # Once per batch (manual optimization may step several θ optimizers), and only
            # after a backward: an unscale_ that no scaler.update() follows would make the
            # next one raise.
            self._scale_before_step = scaler.get_scale()
            for gilder in self.gilders:
                scaler.unscale_(gilder)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._scale_before_step is None:
            return
        scaler = trainer.precision_plugin.scaler
        # scaler.update() lowers the scale exactly when it found an inf, in θ's gradient or ϕ's.
        taken = scaler.get_scale() >= self._scale_before_step
        self._scale_before_step = None
        if taken:
            self._step()
        else:
            for gilder in self.gilders:
                gilder.zero_grad()

    def state_dict(self) -> dict[str, Any]:
        return {"gilders": [gilder.state_dict() for gilder in self.gilders],
                "phi": [phi.detach().clone() for phi in self._phis()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        phis = self._phis()
        saved = state_dict["phi"]
        require(len(saved) == len(phis) and all(s.shape == p.shape for s, p in zip(saved, phis)),
                "state_dict", [tuple(s.shape) for s in saved],
                f"does not fit these Gilders' ϕ shapes {[tuple(p.shape) for p in phis]}")
        for gilder, gilder_state in zip(self.gilders, state_dict["gilders"], strict=True):
            gilder.load_state_dict(gilder_state)
        with torch.no_grad():
            for phi, value in zip(phis, saved):
                phi.copy_(value)

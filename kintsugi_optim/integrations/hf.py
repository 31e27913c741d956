"""Kintsugi in the Hugging Face ``Trainer``.

The Trainer steps one optimizer. Give it the Sculptor (or any θ optimizer) as usual, through
``optimizers=(optimizer, scheduler)`` or ``optimizer_cls_and_kwargs``; a Gilder (ϕ of a VWPR or a
GildedLoss) is stepped by :class:`GilderCallback` right after each θ step, so gradient
accumulation, clipping and ``max_steps`` behave as with the θ optimizer alone. Needs
``transformers``. Recipes and pitfalls: docs/frameworks.md.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback

from kintsugi_optim._validation import require

__all__ = ["GilderCallback"]


class GilderCallback(TrainerCallback):
    """Step one or more Gilders once per optimizer step of the ``Trainer``; clear their ϕ.grad.

    Args:
        *gilders (torch.optim.Optimizer): the ``GilderOptimizer``s over the ϕ to ascend (a
            VWPR's ``phi_parameters()``, a GildedLoss's ``[phi]``), stepped in this order. One
            callback for all of them: the Trainer warns about two callbacks of one class.

    The fracture in ϕ.grad accumulates over the micro-batches of one optimizer step (like θ's
    gradient), and the Gilder steps after the Trainer's θ step (``on_optimizer_step``). The Trainer
    clears ϕ.grad only for a VWPR that is the model itself (``model.zero_grad()``); this
    callback clears every ϕ.grad of its Gilder after the step, and at the start of training.
    With fp16 and a gradient scaler (CUDA), the Trainer unscales only θ's gradients: use
    ``fracture="relative"`` on the Gilder (scale-free) or keep to bf16.
    """

    def __init__(self, *gilders: torch.optim.Optimizer) -> None:
        require(bool(gilders), "gilders", gilders, "give at least one GilderOptimizer")
        for gilder in gilders:
            require(isinstance(gilder, torch.optim.Optimizer), "gilder", type(gilder).__name__,
                    "must be a torch.optim.Optimizer (a GilderOptimizer)")
        self.gilders = list(gilders)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for gilder in self.gilders:
            gilder.zero_grad()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for gilder in self.gilders:
            gilder.step()
            gilder.zero_grad()

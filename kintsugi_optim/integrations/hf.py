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
    """Step a Gilder once per optimizer step of the ``Trainer``, and clear its ϕ.grad.

    Args:
        gilder (torch.optim.Optimizer): the ``GilderOptimizer`` over the ϕ to ascend (a VWPR's
            ``phi_parameters()``, a GildedLoss's ``[phi]``).

    The fracture in ϕ.grad accumulates over the micro-batches of one optimizer step (like θ's
    gradient), and the Gilder steps after the Trainer's θ step (``on_optimizer_step``). The Trainer
    clears ϕ.grad only for a VWPR that is the model itself (``model.zero_grad()``); this
    callback clears every ϕ.grad of its Gilder after the step, and at the start of training.
    With fp16 and a gradient scaler (CUDA), the Trainer unscales only θ's gradients: use
    ``fracture="relative"`` on the Gilder (scale-free) or keep to bf16.
    """

    def __init__(self, gilder: torch.optim.Optimizer) -> None:
        require(isinstance(gilder, torch.optim.Optimizer), "gilder", type(gilder).__name__,
                "must be a torch.optim.Optimizer (a GilderOptimizer)")
        self.gilder = gilder

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.gilder.zero_grad()

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.gilder.step()
        self.gilder.zero_grad()

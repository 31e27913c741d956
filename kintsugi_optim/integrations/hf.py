"""Kintsugi in the Hugging Face ``Trainer``.

The Trainer steps one optimizer. Give it the Sculptor (or any θ optimizer) as usual, through
``optimizers=(optimizer, scheduler)`` or ``optimizer_cls_and_kwargs``; a Gilder (ϕ of a VWPR or a
GildedLoss) is stepped by :class:`GilderCallback` right after each θ step, so gradient
accumulation, clipping and ``max_steps`` behave as with the θ optimizer alone.
:class:`VWPRTrainer` is the Trainer with saving and loading made right for a VWPR model. Needs
``transformers``. Recipes and pitfalls: docs/frameworks.md.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from kintsugi_optim._validation import require
from kintsugi_optim.integrations import checked_gilders
from kintsugi_optim.vwpr import VWPR

__all__ = ["GilderCallback", "VWPRTrainer", "VWPRTrainerMixin"]

GILDING_WEIGHTS_NAME = "gilding_weights.pt"


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

    Under fp16 with a gradient scaler (accelerate's, on the ``AcceleratedOptimizer``), ϕ.grad is
    scaled like θ's gradient. It is unscaled with that scaler before θ's step
    (``scaler.unscale_``, so an inf in ϕ.grad also lowers the scale), and the Gilder does not
    step when the scale dropped (an inf in θ's gradient or ϕ's): a step skipped for θ is skipped
    for ϕ, and ϕ follows the unscaled run.

    When the Trainer's first checkpoint of a VWPR model holds a bare state dict (the plain
    ``Trainer``, not :class:`VWPRTrainer`), it warns once that ``from_pretrained`` cannot read it.
    """

    def __init__(self, *gilders: torch.optim.Optimizer) -> None:
        self.gilders = checked_gilders(gilders)
        self._warned_bare_save = False
        self._scale_before_step: float | None = None  # set while a scaled ϕ step is pending

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for gilder in self.gilders:
            gilder.zero_grad()

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                              **kwargs: Any) -> None:
        # Before θ's step, as the scale may change in the scaler.update() that follows it.
        scaler = getattr(optimizer, "scaler", None)
        self._scale_before_step = None
        if scaler is not None and scaler.is_enabled():
            self._scale_before_step = scaler.get_scale()
            for gilder in self.gilders:
                scaler.unscale_(gilder)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, optimizer: Any = None,
                          **kwargs: Any) -> None:
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # inf in θ's gradient
        if self._scale_before_step is not None:
            # scaler.update() lowers the scale on an inf in θ's gradient or in ϕ's.
            skipped = skipped or optimizer.scaler.get_scale() < self._scale_before_step
            self._scale_before_step = None
        for gilder in self.gilders:
            if not skipped:
                gilder.step()
            gilder.zero_grad()

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None,
                **kwargs: Any) -> None:
        # The plain Trainer saves a VWPR as a bare state dict that from_pretrained cannot read,
        # and no hook of its save_model() can change that; a checkpoint is the first chance to
        # say so, judged by what was written rather than by the Trainer's class.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if (self._warned_bare_save or not args.should_save or not isinstance(model, VWPR)
                or not callable(getattr(model.model, "save_pretrained", None))
                or not os.path.isdir(folder)
                or os.path.isfile(os.path.join(folder, GILDING_WEIGHTS_NAME))):
            return
        self._warned_bare_save = True
        warnings.warn(
            f"{folder} holds the VWPR as a bare state dict (keys model.*, gilding_weights.*), as "
            "the plain Trainer saves any model that is not a PreTrainedModel: this Trainer's "
            "resume_from_checkpoint restores θ and ϕ from it, but from_pretrained cannot read it "
            "(it builds an untrained model and reports every weight MISSING), and neither can "
            "from_pretrained read trainer.save_model()'s folder. Use "
            "kintsugi_optim.integrations.hf.VWPRTrainer (or VWPRTrainerMixin), or "
            "vwpr.save_pretrained(path) (docs/frameworks.md).", UserWarning, stacklevel=2)


class VWPRTrainerMixin:
    """Saving and loading a VWPR model the way the ``Trainer`` does a ``PreTrainedModel``.

    The plain Trainer saves any model that is not a ``PreTrainedModel`` as a bare state dict
    with no config: ``from_pretrained`` on that folder builds a default-config model and loads
    none of the weights. With this mixin, ``save_model`` and every checkpoint hold the wrapped
    model as ``save_pretrained`` writes it (config and weights) and ϕ in ``gilding_weights.pt``;
    ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` restore both (a
    checkpoint without ``gilding_weights.pt`` is an error, not a silent ϕ = 1). Other models
    are saved and loaded exactly as by the Trainer. Mix it in before the Trainer class:
    ``class MyTrainer(VWPRTrainerMixin, SFTTrainer)``. Not for DeepSpeed, FSDP or SageMaker
    model parallelism, which have their own save paths.
    """

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        vwpr = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not (isinstance(vwpr, VWPR) and callable(getattr(vwpr.model, "save_pretrained", None))):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        vwpr.save_pretrained(output_dir, state_dict=state_dict, is_main_process=self.args.should_save)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        target = self.model if model is None else model
        if not isinstance(target, VWPR):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, GILDING_WEIGHTS_NAME)
        require(os.path.isfile(path), "resume_from_checkpoint", resume_from_checkpoint,
                f"has no {GILDING_WEIGHTS_NAME}: it was not saved by a VWPRTrainer, so ϕ cannot "
                "be restored")  # checked before anything is loaded
        phis = torch.load(path, map_location="cpu", weights_only=True)
        super()._load_from_checkpoint(resume_from_checkpoint, model=target.model)
        target.gilding_weights.load_state_dict(phis)

    def _load_best_model(self) -> None:
        if isinstance(self.model, VWPR):
            self._load_from_checkpoint(self.state.best_model_checkpoint)
            return
        super()._load_best_model()


class VWPRTrainer(VWPRTrainerMixin, Trainer):
    """``transformers.Trainer`` that saves a VWPR model as ``from_pretrained`` reads it, with ϕ
    beside it, and restores both on resume (see :class:`VWPRTrainerMixin`)."""

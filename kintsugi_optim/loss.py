r"""GildedLoss: Kintsugi at the loss level, and Group DRO as one of its settings
(docs/maths.md §2.5).

Each group of samples (a class, a subpopulation, or a single sample) is a pathway with a
gilding weight ϕ_g. The loss weighs each group's mean loss l̄_g by ϕ_g; its gradient with respect
to ϕ_g is that group's fracture signal, so a :class:`~kintsugi_optim.GilderOptimizer` raises the
weight of the groups the model currently fails.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kintsugi_optim._validation import (
    as_number,
    require,
    require_choice,
    require_nonnegative,
    require_positive_representable,
    require_valid_phi,
)
from kintsugi_optim.pathways import phi_dtype
from kintsugi_optim.gilder import GilderOptimizer

__all__ = ["GildedLoss", "group_dro"]

REDUCTIONS = ("mean", "sum", "sample")


class GildedLoss(nn.Module):
    r"""Per-group gilded loss: one gilding weight ϕ_g per group of samples.

    ``forward(losses, groups)`` takes per-sample losses ``[B]`` (e.g. from
    ``reduction="none"``) and integer group ids ``[B]`` in ``[0, num_groups)``. With
    l̄_g the mean loss of group g's samples (0 when g is absent from the batch) and G groups:

        "mean":    Σ_g ϕ_g·l̄_g / G             group-balanced: ϕ ≡ 1 weighs every group equally
        "sum":     Σ_g ϕ_g·l̄_g
        "sample":  (1/B)·Σ_i ϕ_{g_i}·loss_i     ϕ ≡ 1 gives the ordinary mean loss

    After backward, ``phi.grad`` is the true gradient (l̄_g/G, l̄_g or (n_g/B)·l̄_g), the
    fracture for a ``GilderOptimizer(fracture="abs")``.

    ``adjustment`` (a_g, shape ``[G]``, in loss units) shifts each group's loss by a_g in
    ``phi.grad`` only, as Group DRO's generalization adjustment C/√n_g does for its group weights;
    the returned value and θ's gradient are unchanged (a constant has no θ-gradient). It goes
    through the loss rather than a hook on ``phi.grad``, so ``torch.amp.GradScaler`` scales it
    with the rest.

    Args:
        num_groups (int): G ≥ 1.
        reduction (str): "mean" (default), "sum" or "sample".
        phi_init (float): initial ϕ, > 0 (default: 1.0).
        adjustment (Tensor or sequence, optional): a_g, finite, shape ``[G]`` (default: None).
            Stored as a buffer, so it is saved in ``state_dict()``.

    See :func:`group_dro` for the Group DRO setting.
    """

    def __init__(
        self,
        num_groups: int,
        reduction: str = "mean",
        phi_init: float = 1.0,
        adjustment: Tensor | list[float] | None = None,
    ) -> None:
        super().__init__()
        require(isinstance(num_groups, int) and not isinstance(num_groups, bool)
                and num_groups >= 1, "num_groups", num_groups, "must be an int >= 1")
        require_choice("reduction", reduction, REDUCTIONS)
        # numpy and Fraction numbers too, as for every hyperparameter
        require(as_number("phi_init", phi_init) > 0, "phi_init", phi_init,
                "must be a finite number > 0")
        require_positive_representable("phi_init", float(phi_init), [torch.get_default_dtype()])
        self.num_groups = num_groups
        self.reduction = reduction
        # A buffer that requires grad, not an nn.Parameter: a model holding this criterion hands
        # its .parameters() to θ's optimizer, which would descend ϕ (below 0). As a buffer ϕ is
        # still saved by state_dict() and moved by .to(); autograd fills phi.grad for the Gilder.
        self.register_buffer("phi", torch.full((num_groups,), float(phi_init)).requires_grad_())
        if adjustment is not None:
            try:
                adjustment = torch.as_tensor(adjustment, dtype=self.phi.dtype).detach().clone()
            except (TypeError, ValueError, RuntimeError):
                require(False, "adjustment", adjustment,
                        f"must be a tensor or sequence of {num_groups} finite numbers")
            require(adjustment.shape == (num_groups,) and bool(adjustment.isfinite().all()),
                    "adjustment", adjustment.tolist() if adjustment.numel() <= 8 else
                    f"tensor of shape {tuple(adjustment.shape)}",
                    f"must be finite with shape [num_groups] = [{num_groups}]")
        self.register_buffer("adjustment", adjustment)
        self.register_load_state_dict_pre_hook(_check_loaded_phi)

    def forward(self, losses: Tensor, groups: Tensor) -> Tensor:
        """Gilded loss of a batch: ``losses`` [B] floating, ``groups`` [B] integer ids."""
        self._check(losses, groups)
        phi, G = self.phi, self.num_groups
        losses = losses.to(torch.promote_types(losses.dtype, phi.dtype))  # 16-bit: sum in fp32
        if self.reduction == "sample":
            loss = (phi[groups] * losses).mean()
        else:
            counts = torch.bincount(groups, minlength=G).clamp_(min=1).to(losses.dtype)
            means = losses.new_zeros(G).index_add_(0, groups, losses) / counts  # l̄_g
            loss = (phi * means).sum()
            if self.reduction == "mean":
                loss = loss / G
        if self.adjustment is not None:
            loss = loss + self._adjustment_term(groups)
        return loss

    def _adjustment_term(self, groups: Tensor) -> Tensor:
        """A term worth 0 whose gradient is w_g·a_g for ϕ and 0 for θ, with w_g the weight the
        reduction gives group g's mean loss (1/G, 1 or n_g/B): it shifts each group's loss by
        a_g in ϕ.grad only."""
        if self.reduction == "sample":
            counts = torch.bincount(groups, minlength=self.num_groups).to(self.phi.dtype)
            weights = counts / groups.numel()
        else:
            weights = 1.0 / self.num_groups if self.reduction == "mean" else 1.0
        bonus = (self.phi * weights * self.adjustment).sum()
        return bonus - bonus.detach()

    def _check(self, losses: Tensor, groups: Tensor) -> None:
        if not (isinstance(losses, Tensor) and losses.dim() == 1 and losses.is_floating_point()):
            _invalid("losses", losses, "expected per-sample losses, a 1-d floating tensor [B]: "
                     "compute the base loss with reduction='none'")
        if not (isinstance(groups, Tensor) and groups.dtype in (torch.int32, torch.int64)):
            _invalid("groups", groups, "expected an int64 or int32 tensor of group ids "
                     "(a uint8 or bool tensor would index as a mask)")
        if groups.shape != losses.shape:
            _invalid("groups", groups, f"must have the shape of losses, {tuple(losses.shape)}")
        out_of_range = (groups < 0) | (groups >= self.num_groups)
        if out_of_range.any():  # one host sync per batch: the price of a clear error
            bad = groups[out_of_range].unique()[:8].tolist()
            require(False, "groups", bad, f"group ids must lie in [0, {self.num_groups})")

    def gilding(self) -> dict[str, Tensor]:
        """``{"groups": ϕ}``, the live tensor of shape ``[num_groups]``."""
        return {"groups": self.phi}

    def _apply(self, fn, recurse: bool = True):
        # nn.Module replaces a buffer with fn(buffer) outside no_grad, which would make ϕ a
        # non-leaf that never receives .grad and orphan a Gilder holding the old tensor. Convert
        # ϕ in place instead, as nn.Module does for parameters; under .half()/.bfloat16() ϕ stays
        # float32 (a 16-bit ϕ near 1 cannot register a small gilding step).
        phi, self._buffers["phi"] = self._buffers["phi"], None  # None: skipped, order kept
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["phi"] = phi
        with torch.no_grad():
            converted = fn(phi)
            phi.data = converted.to(phi_dtype(converted))
            if phi.grad is not None:
                phi.grad = fn(phi.grad).to(phi.dtype)
        return self

    def extra_repr(self) -> str:
        adjusted = ", adjusted" if self.adjustment is not None else ""
        return f"num_groups={self.num_groups}, reduction={self.reduction!r}{adjusted}"


def group_dro(
    num_groups: int, step_size: float = 0.01, *, adjustment: Tensor | list[float] | None = None
) -> tuple[GildedLoss, GilderOptimizer]:
    r"""Group DRO (Sagawa et al., 2020) as a Kintsugi setting.

    Returns ``(loss, gilder)``: ``GildedLoss(G, "mean")`` and
    ``GilderOptimizer([loss.phi], beta=step_size·G, ascent="multiplicative", phi_norm="mean")``.
    Then ϕ/G is Group DRO's adversarial group distribution q: each ``gilder.step()`` does
    q ← q·exp(η·l̄), q ← q/Σq with η = ``step_size``. One difference is deliberate: the two
    streams are simultaneous, so a batch's loss Σ_g q_g·l̄_g uses q from *before* that batch's
    update, where Group DRO's code updates q first. ``adjustment`` is Group DRO's C/√n_g
    (see :class:`GildedLoss`). The Gilder's floor ``phi_min=1e-3`` keeps each q_g ≥ ~1e-3/G.

    Example::

        criterion, gilder = group_dro(num_groups=4, step_size=0.01)
        loss = criterion(F.cross_entropy(model(x), y, reduction="none"), g)
        opt.zero_grad(); gilder.zero_grad(); loss.backward(); opt.step(); gilder.step()
    """
    step_size = require_nonnegative("step_size", step_size)
    require(math.isfinite(step_size * num_groups) if isinstance(num_groups, int) else True,
            "step_size", step_size, "step_size·num_groups (the Gilder's beta) must be finite")
    loss = GildedLoss(num_groups, "mean", adjustment=adjustment)
    gilder = GilderOptimizer([loss.phi], beta=step_size * num_groups, ascent="multiplicative",
                             phi_norm="mean")
    return loss, gilder


def _check_loaded_phi(module, state_dict, prefix, *args) -> None:
    # A NaN or ≤ 0 ϕ in a checkpoint would silently poison every later loss and step.
    if prefix + "phi" in state_dict:
        require_valid_phi(f"{prefix}phi in the loaded state_dict", state_dict[prefix + "phi"])


def _invalid(name: str, value: object, rule: str) -> None:
    what = (f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor) else type(value).__name__)
    raise ValueError(f"Invalid {name}: {what} ({rule})")

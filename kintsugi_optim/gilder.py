"""The Gilder: :class:`GilderOptimizer`, a ``torch.optim.Optimizer`` that ascends explicit gilding
weights ϕ (activation pathways of :class:`~kintsugi_optim.VWPR`, groups of
:class:`~kintsugi_optim.GildedLoss`) with the shared gilding kernel (docs/maths.md §2.4, §3.2).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from kintsugi_optim._compat import _flatten_dense_tensors, _unflatten_dense_tensors
from kintsugi_optim._validation import (
    plain_number,
    require,
    require_choice,
    require_nonnegative,
    validate_gilding,
)
from kintsugi_optim.gilding import gilder_step, softplus_inverse
from kintsugi_optim.options import FRACTURES

__all__ = ["GilderOptimizer", "Gilder"]

# The Gilder's defaults, written once (the signature reads them): true gradient ascent on an
# explicit ϕ (fracture="abs", no bounds but positivity, no normalisation), unlike the
# parameter level's drop-in table (kintsugi_optim.options.PARAMETER_GILDING_DEFAULTS).
_DEFAULTS: dict[str, Any] = dict(
    lr=1.0,
    beta=0.01,
    gamma=0.0,
    l1=0.0,
    phi_min=1e-3,
    phi_max=None,
    phi_norm=None,
    fracture="abs",
    ascent="additive",
    positivity="clamp",
    foreach=None,
)

_MISSING = object()


def _validate_group(group: dict[str, Any], phi_dtypes=()) -> None:
    require_nonnegative("lr", group["lr"])
    require_choice("fracture", group["fracture"], FRACTURES)
    require(group["foreach"] is None or isinstance(group["foreach"], bool), "foreach",
            group["foreach"], "must be True, False or None")
    validate_gilding(group, phi_dtypes)


class GilderOptimizer(Optimizer):
    r"""The Gilder: gradient *ascent* on gilding weights ϕ, through the shared gilding kernel.

    Each parameter is a ϕ tensor (positive, floating, any shape) whose ``.grad`` is its fracture
    signal l (None: skipped). Per step, ϕ ← gild(ϕ, l) with the effective rate β·lr:

        u = l·max(0, 1 − γϕ) − λ;  ϕ ← ϕ + β·lr·u  (or ϕ·exp(β·lr·u));  clamp;  optional mean-1

    ``lr`` (default 1.0) only multiplies β, so any ``torch.optim.lr_scheduler`` anneals the gilding
    rate. ``fracture="abs"`` (default) is true gradient ascent on the loss; ``"relative"`` divides
    l by its mean |l| over the ϕ tensor, which makes β scale-free (VWPR's raw fracture is tiny).
    The scope of ``phi_norm="mean"`` is each ϕ tensor.

    Args:
        params: ϕ tensors or param-group dicts.
        beta (float): gilding rate β ≥ 0 (default: 0.01).
        gamma, l1, phi_min, phi_max, phi_norm, ascent, positivity: as in
            :class:`~kintsugi_optim.KintsugiOptimizer` (defaults 0, 0, 1e-3, None, None,
            "additive", "clamp").
        fracture (str): "abs" (default) or "relative".
        lr (float): multiplier of β for schedulers (default: 1.0).
        foreach (bool, optional): foreach implementation; None picks like torch (CUDA: yes).
        process_group (ProcessGroup, optional): average every ϕ.grad over these ranks (in place,
            before gilding, as DDP averages parameter gradients), so each rank gilds with the same
            fracture and ϕ stays identical across ranks (``torch.distributed.group.WORLD`` for all
            ranks). Every rank must step the same ϕ with a grad. None (default): no averaging.

    Under ``torch.amp.GradScaler``, ``scaler.step(gilder)`` hands the step the scale and the
    inf/nan flag (``_step_supports_amp_scaling``): ϕ.grad is unscaled in place, and a step with
    inf/nan gradients leaves every ϕ exactly as it was, decided on the device without a host sync.
    A step in which no ϕ has a grad is simply a no-op, never GradScaler's "No inf checks were
    recorded" error (torch raises it for optimizers that leave the inf check to the scaler).
    """

    # torch.amp.GradScaler.step sets `grad_scale` and `found_inf` on the optimizer and calls
    # step() unconditionally, instead of unscaling and checking itself (see step()).
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: ParamsT,
        beta: float = _DEFAULTS["beta"],
        *,
        gamma: float = _DEFAULTS["gamma"],
        l1: float = _DEFAULTS["l1"],
        phi_min: float = _DEFAULTS["phi_min"],
        phi_max: float | None = _DEFAULTS["phi_max"],
        phi_norm: str | None = _DEFAULTS["phi_norm"],
        fracture: str = _DEFAULTS["fracture"],
        ascent: str = _DEFAULTS["ascent"],
        positivity: str = _DEFAULTS["positivity"],
        lr: float = _DEFAULTS["lr"],
        foreach: bool | None = _DEFAULTS["foreach"],
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, beta=beta, gamma=gamma, l1=l1, phi_min=phi_min, phi_max=phi_max,
            phi_norm=phi_norm, fracture=fracture, ascent=ascent, positivity=positivity,
            foreach=foreach,
        )
        # An attribute, not a group option: a ProcessGroup cannot go into a state_dict.
        process_group_type = getattr(dist, "ProcessGroup", ())  # () where distributed is absent
        require(process_group is None or isinstance(process_group, process_group_type),
                "process_group", process_group,
                "must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD) "
                "or None")
        self.process_group = process_group
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        candidate = {**self.defaults, **param_group}
        _validate_group(candidate)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for phi in group["params"]:
            problem = (
                f"dtype {phi.dtype}: gilding weights must be floating point"
                if not phi.is_floating_point()
                else "entries <= 0: gilding weights must be positive"
                if not bool((phi.detach() > 0).all())
                else None
            )
            if problem:
                self.param_groups.pop()  # leave the optimizer as it was
                raise ValueError(f"Invalid phi: tensor of shape {tuple(phi.shape)} has {problem}")
        try:
            self._check_group(group)  # phi_min against the ϕ dtypes
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate ``group`` again when one of its values changed since it was last checked
        (an edit of ``param_groups``, a scheduler, a loaded checkpoint): values are compared by
        identity, so an unchanged group costs one pass over its keys."""
        checked = self.__dict__.setdefault("_checked_groups", {})
        seen = checked.get(id(group))
        if (seen is not None and seen[0] is group and len(seen[1]) == len(group)
                and all(seen[1].get(k, _MISSING) is v for k, v in group.items())
                and seen[2] == len(group["params"])):
            return
        for key, value in group.items():
            if key != "params":
                group[key] = plain_number(value)
        _validate_group(group, {phi.dtype for phi in group["params"] if phi.is_floating_point()})
        live = {id(g) for g in self.param_groups}
        for key in [k for k in checked if k not in live]:
            del checked[key]
        checked[id(group)] = (group, dict(group), len(group["params"]))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)
        for group in self.param_groups:
            for key, default in _DEFAULTS.items():
                group.setdefault(key, default)

    @torch.no_grad()
    def step(self, closure=None):
        """Gild every ϕ that has a ``.grad``.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step: the scale still in the gradients (None once scaler.unscale_
        # has run) and the inf/nan flag (a plain 0 when no ϕ had a grad to check).
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if not isinstance(found_inf, Tensor):
            found_inf = None
        for group in self.param_groups:  # every check before any ϕ changes
            self._check_group(group)
        groups = [self._init_group(group) for group in self.param_groups]
        grads = [g for _, group_grads, _ in groups for g in group_grads]
        if grad_scale is not None and grads:
            # As GradScaler.unscale_ computes it, so ϕ.grad reads the same after either path.
            inv_scale = grad_scale.double().reciprocal().float()
            for g in grads:
                g.mul_(inv_scale)
        if self.process_group is not None and grads:
            found_inf = _average_across_ranks_(grads, found_inf, self.process_group)
        for group, (phis, group_grads, rhos) in zip(self.param_groups, groups):
            gilder_step(
                phis, group_grads, rhos if group["positivity"] == "softplus" else None,
                lr=group["lr"], beta=group["beta"], fracture=group["fracture"],
                foreach=group["foreach"], found_inf=found_inf, gamma=group["gamma"],
                l1=group["l1"], phi_min=group["phi_min"], phi_max=group["phi_max"],
                phi_norm=group["phi_norm"], ascent=group["ascent"],
                positivity=group["positivity"],
            )
        return loss

    def _init_group(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """The group's ϕ that have a grad, their grads and (softplus) their resilience scores ρ,
        created lazily from ϕ."""
        phis, grads, rhos = [], [], []
        for phi in group["params"]:
            if phi.grad is None:
                continue
            if phi.grad.is_sparse:
                raise RuntimeError("GilderOptimizer does not support sparse gradients")
            phis.append(phi)
            grads.append(phi.grad)
            if group["positivity"] == "softplus":
                state = self.state[phi]
                # ρ is a function of ϕ (docs/maths.md §2.2): derived afresh, so a ϕ changed from outside
                # (a loaded module, an edit) is never overwritten from a stale ρ.
                state["rho"] = softplus_inverse(phi.detach())
                rhos.append(state["rho"])
        return phis, grads, rhos

    def gilding(self) -> dict[Any, dict[Any, Tensor]]:
        """Every ϕ: ``{group key: {param key: phi}}`` (group ``name`` or index; param name or
        index), like :meth:`KintsugiOptimizer.gilding`."""
        out: dict[Any, dict[Any, Tensor]] = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or range(len(group["params"]))
            out[group.get("name", g)] = dict(zip(names, group["params"]))
        return out


def _average_across_ranks_(
    grads: list[Tensor], found_inf: Tensor | None, group: dist.ProcessGroup
) -> Tensor | None:
    """Average ``grads`` in place over the ranks of ``group``, one all-reduce per dtype and
    device (gloo has no AVG: sum, then divide). Returns ``found_inf`` summed over the ranks as
    well, so a step that one rank must skip is skipped by all and ϕ stays identical."""
    world = dist.get_world_size(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for g in grads:
        buckets.setdefault((g.device, g.dtype), []).append(g)
    for bucket in buckets.values():
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, averaged in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            g.copy_(averaged)
    if found_inf is not None:
        found_inf = found_inf.clone()  # the scaler's own tensor keeps this rank's verdict
        dist.all_reduce(found_inf, group=group)
    return found_inf


Gilder = GilderOptimizer

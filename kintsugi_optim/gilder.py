"""The Gilder: :class:`GilderOptimizer`, a ``torch.optim.Optimizer`` that ascends explicit gilding
weights ϕ (activation pathways of :class:`~kintsugi_optim.VWPR`, groups of
:class:`~kintsugi_optim.GildedLoss`) with the shared gilding kernel (SPEC §2.4, §3.2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT

from kintsugi_optim._validation import require, require_choice, require_nonnegative, validate_gilding
from kintsugi_optim.functional import FRACTURES, gilder_step, softplus_inverse

__all__ = ["GilderOptimizer", "Gilder"]

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
    """

    def __init__(
        self,
        params: ParamsT,
        beta: float = 0.01,
        *,
        gamma: float = 0.0,
        l1: float = 0.0,
        phi_min: float = 1e-3,
        phi_max: float | None = None,
        phi_norm: str | None = None,
        fracture: str = "abs",
        ascent: str = "additive",
        positivity: str = "clamp",
        lr: float = 1.0,
        foreach: bool | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, beta=beta, gamma=gamma, l1=l1, phi_min=phi_min, phi_max=phi_max,
            phi_norm=phi_norm, fracture=fracture, ascent=ascent, positivity=positivity,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        candidate = {**self.defaults, **param_group}
        require_nonnegative("lr", candidate["lr"])
        require_choice("fracture", candidate["fracture"], FRACTURES)
        validate_gilding(candidate)
        super().add_param_group(param_group)
        for phi in self.param_groups[-1]["params"]:
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
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
        for group in self.param_groups:
            phis, grads, rhos = [], [], []
            softplus = group["positivity"] == "softplus"
            for phi in group["params"]:
                if phi.grad is None:
                    continue
                if phi.grad.is_sparse:
                    raise RuntimeError("GilderOptimizer does not support sparse gradients")
                phis.append(phi)
                grads.append(phi.grad)
                if softplus:
                    state = self.state[phi]
                    if "rho" not in state:
                        state["rho"] = softplus_inverse(phi.detach().clone())
                    rhos.append(state["rho"])
            gilder_step(
                phis, grads, rhos if softplus else None, lr=group["lr"], beta=group["beta"],
                fracture=group["fracture"], foreach=group["foreach"], gamma=group["gamma"],
                l1=group["l1"], phi_min=group["phi_min"], phi_max=group["phi_max"],
                phi_norm=group["phi_norm"], ascent=group["ascent"],
                positivity=group["positivity"],
            )
        return loss

    def gilding(self) -> dict[Any, dict[Any, Tensor]]:
        """Every ϕ: ``{group key: {param key: phi}}`` (group ``name`` or index; param name or
        index), like :meth:`KintsugiOptimizer.gilding`."""
        out: dict[Any, dict[Any, Tensor]] = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or range(len(group["params"]))
            out[group.get("name", g)] = dict(zip(names, group["params"]))
        return out


Gilder = GilderOptimizer

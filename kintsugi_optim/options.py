"""The options of one gilding step, as frozen objects built once per param group.

Two small records travel through every path instead of three dozen keyword arguments:

* :class:`GildingOptions` — how ϕ rises (docs/maths.md §2.1–2.2): shared by the Sculptor, the
  Gilder and ``Gilded``.
* :class:`SculptOptions` — one Sculptor step (docs/maths.md §2.3): the base rule and its options,
  plus a :class:`GildingOptions`.

``PARAMETER_GILDING_DEFAULTS`` is the one table of the parameter level's gilding defaults (the
Sculptor's and ``Gilded``'s); the base rules' defaults are their rows in
:mod:`kintsugi_optim.rules`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = [
    "ASCENTS", "FRACTURES", "GildingOptions", "PARAMETER_GILDING_DEFAULTS", "PATHWAYS",
    "PHI_NORMS", "POSITIVITIES", "SculptOptions",
]

PATHWAYS = ("element", "row", "tensor")
FRACTURES = ("relative", "abs")
PHI_NORMS = ("mean", None)
ASCENTS = ("additive", "multiplicative")
POSITIVITIES = ("clamp", "softplus")

# Drop-in defaults, chosen with benchmarks/dropin.py (README.md, "Performance"): one ϕ per
# neuron/output channel, damped to stop rising near 1/γ = 1.25 and kept in [0.8, 1.25] before
# the mean normalisation, so that every step lies between 0.64 and 1.25 times the base rule's.
PARAMETER_GILDING_DEFAULTS: dict[str, Any] = dict(
    beta=0.01,
    gamma=0.8,
    l1=0.0,
    phi_init=1.0,
    phi_min=0.8,
    phi_max=1.25,
    pathway="row",
    fracture="relative",
    phi_norm="mean",
    ascent="additive",
    positivity="clamp",
)


@dataclass(frozen=True, slots=True)
class GildingOptions:
    """How ϕ is gilded from its fracture signal (docs/maths.md §2.1–2.2).

    ``pathway`` decides the scope: element and row ϕ are normalised per tensor, tensor ϕ across
    the param group (the Gilder gilds each ϕ tensor as one element-pathway scope).
    ``beta`` may be a 0-d tensor (the Gilder's β·lr with a tensor lr). No field has a default:
    each level's defaults are its own table (``PARAMETER_GILDING_DEFAULTS``, the Gilder's).
    """

    beta: float | Tensor
    gamma: float
    l1: float
    phi_min: float
    phi_max: float | None
    phi_norm: str | None
    ascent: str
    positivity: str
    fracture: str
    pathway: str

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> GildingOptions:
        """The gilding options of a param group (any dict with these keys)."""
        return cls(
            beta=group["beta"], gamma=group["gamma"], l1=group["l1"], phi_min=group["phi_min"],
            phi_max=group["phi_max"], phi_norm=group["phi_norm"], ascent=group["ascent"],
            positivity=group["positivity"], fracture=group["fracture"],
            pathway=group.get("pathway", "element"),
        )

    def rule_keywords(self) -> dict[str, Any]:
        """The keywords :func:`kintsugi_optim.gilding.gild` takes (all but fracture, pathway)."""
        return dict(beta=self.beta, gamma=self.gamma, l1=self.l1, phi_min=self.phi_min,
                    phi_max=self.phi_max, phi_norm=self.phi_norm, ascent=self.ascent,
                    positivity=self.positivity)

    @property
    def softplus(self) -> bool:
        return self.positivity == "softplus"


@dataclass(frozen=True, slots=True)
class SculptOptions:
    """One Sculptor step over a param group (docs/maths.md §2.3).

    ``base`` names a row of :data:`kintsugi_optim.rules.RULES`; a rule reads the options it
    declares and ignores the others (SGD: momentum, dampening, nesterov; Adam/AdamW: beta1,
    beta2, eps, amsgrad). ``lr`` may be a 0-d tensor.
    """

    base: str
    lr: float | Tensor
    gilding: GildingOptions
    weight_decay: float = 0.0
    beta1: float | Tensor = 0.9
    beta2: float | Tensor = 0.999
    eps: float = 1e-8
    amsgrad: bool = False
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    capturable: bool = False
    differentiable: bool = False

    @classmethod
    def create(
        cls, *, base: str, lr: float | Tensor, weight_decay: float = 0.0,
        beta1: float | Tensor = 0.9, beta2: float | Tensor = 0.999, eps: float = 1e-8,
        amsgrad: bool = False, momentum: float = 0.0, dampening: float = 0.0,
        nesterov: bool = False, maximize: bool = False, capturable: bool = False,
        differentiable: bool = False, pathway: str = "element", fracture: str = "relative",
        beta: float = 0.0, gamma: float = 0.0, l1: float = 0.0, phi_min: float = 1e-3,
        phi_max: float | None = None, phi_norm: str | None = None, ascent: str = "additive",
        positivity: str = "clamp",
    ) -> SculptOptions:
        """From flat keywords (the functional API, ``kintsugi_optim.functional.sculpt``). Given
        only ``base`` and ``lr``: the rule's plain step with torch's functional defaults and no
        gilding (β = 0); the optimizers pass every option from their own defaults tables."""
        gilding = GildingOptions(beta=beta, gamma=gamma, l1=l1, phi_min=phi_min, phi_max=phi_max,
                                 phi_norm=phi_norm, ascent=ascent, positivity=positivity,
                                 fracture=fracture, pathway=pathway)
        return cls(base=base, lr=lr, gilding=gilding, weight_decay=weight_decay, beta1=beta1,
                   beta2=beta2, eps=eps, amsgrad=amsgrad, momentum=momentum,
                   dampening=dampening, nesterov=nesterov, maximize=maximize,
                   capturable=capturable, differentiable=differentiable)

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> SculptOptions:
        """The options of a complete, validated Sculptor param group."""
        beta1, beta2 = group["betas"]
        return cls(
            base=group["base"], lr=group["lr"], gilding=GildingOptions.from_group(group),
            weight_decay=group["weight_decay"], beta1=beta1, beta2=beta2, eps=group["eps"],
            amsgrad=group["amsgrad"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"],
            capturable=group["capturable"], differentiable=group["differentiable"],
        )

    def replace(self, **changes: Any) -> SculptOptions:
        return dataclasses.replace(self, **changes)

    @property
    def pathway(self) -> str:
        return self.gilding.pathway

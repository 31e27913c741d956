"""One place that turns a bad hyperparameter into a ValueError naming the argument and value."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("Invalid <name>: <value> (<rule>)")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({rule})")


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    require(value in choices, name, value, f"must be one of {choices}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        require(value.numel() == 1, name, value, "a tensor must have one element")
        return float(value.detach().cpu())  # construction time, not step(): no sync concern
    return value


def require_nonnegative(name: str, value: Any) -> None:
    """``value`` is a finite number ≥ 0 (a one-element tensor is accepted)."""
    number = _number(name, value)
    require(
        isinstance(number, (int, float)) and not isinstance(number, bool)
        and math.isfinite(number) and number >= 0,
        name, value, "must be a finite number >= 0",
    )


def validate_gilding(group: dict[str, Any]) -> None:
    """Checks shared by the Sculptor and the Gilder: β, γ, λ, bounds and the choices of §2.2."""
    from kintsugi_optim.functional import ASCENTS, PHI_NORMS, POSITIVITIES

    for name in ("beta", "gamma", "l1"):
        require_nonnegative(name, group[name])
    phi_min, phi_max = group["phi_min"], group["phi_max"]
    require_nonnegative("phi_min", phi_min)
    require(phi_min > 0, "phi_min", phi_min, "must be > 0")
    if phi_max is not None:
        require_nonnegative("phi_max", phi_max)
        require(phi_max >= phi_min, "phi_max", phi_max, f"must be >= phi_min={phi_min!r}")
    require_choice("phi_norm", group["phi_norm"], PHI_NORMS)
    require_choice("ascent", group["ascent"], ASCENTS)
    require_choice("positivity", group["positivity"], POSITIVITIES)
    require(
        not (group["ascent"] == "multiplicative" and group["positivity"] == "softplus"),
        "positivity", group["positivity"],
        "softplus cannot be combined with ascent='multiplicative', which keeps ϕ > 0 already",
    )

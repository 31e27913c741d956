"""One place that turns a bad hyperparameter into a ValueError naming the argument and value."""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch


def require(ok: bool, name: str, value: Any, rule: str) -> None:
    """Raise ``ValueError("Invalid <name>: <value> (<rule>)")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} ({rule})")


def require_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    # A hashable check first: `value in choices` with a tensor value would compare elementwise.
    ok = not isinstance(value, torch.Tensor) and any(
        value is c or (type(value) is type(c) and value == c) for c in choices)
    require(ok, name, value, f"must be one of {choices}")


def as_number(name: str, value: Any) -> float:
    """``value`` as a finite Python float, or a ValueError naming ``name``.

    Accepted as torch accepts them: Python and numpy numbers, ``fractions.Fraction``,
    ``decimal``-free ``numbers.Real`` in general, and one-element real tensors. Rejected: bools
    (a flag passed in the wrong place), strings, None, sequences, complex numbers, values that
    overflow a float (``10**400``) and NaN/inf.
    """
    if type(value) is float:  # the common cases first, without the ABC checks below
        require(math.isfinite(value), name, value, "must be a finite number")
        return value
    if type(value) is int and -(2**1000) < value < 2**1000:
        return float(value)
    if isinstance(value, torch.Tensor):
        require(value.numel() == 1, name, value, "a tensor must have one element")
        require(not (value.dtype == torch.bool or value.is_complex()), name, value,
                "a tensor must hold a real number")
        number = value.detach().cpu().item()  # only when a group changed: no per-step sync
    else:
        require(isinstance(value, numbers.Real) and not isinstance(value, bool)
                and type(value).__name__ != "bool_", name, value, "must be a finite number")
        number = value
    try:
        number = float(number)
    except (OverflowError, TypeError, ValueError):
        shown = f"an int of {len(str(value))} digits" if isinstance(value, int) else repr(value)
        raise ValueError(f"Invalid {name}: {shown} (must be a finite number)") from None
    require(math.isfinite(number), name, value, "must be a finite number")
    return number


def plain_number(value: Any) -> Any:
    """A numpy or ``Fraction`` scalar as a Python float (kernels and ``_foreach_`` ops take
    Python numbers and tensors only); anything else unchanged."""
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        return float(value)
    return value


def require_nonnegative(name: str, value: Any) -> float:
    """``value`` is a finite number ≥ 0 (a one-element tensor is accepted); returns it as a
    float."""
    number = as_number(name, value)
    require(number >= 0, name, value, "must be a finite number >= 0")
    return number


@functools.cache
def _finfo(dtype: torch.dtype) -> torch.finfo:
    return torch.finfo(dtype)  # a few µs a call, and a group check makes several


def require_positive_representable(name: str, value: float, dtypes: Iterable[torch.dtype]) -> None:
    """``value`` (> 0) neither rounds to 0 or a subnormal nor overflows in any ϕ dtype."""
    for dtype in dtypes:
        finfo = _finfo(dtype)
        require(value >= finfo.tiny, name, value,
                f"must be >= {finfo.tiny:.4g}, the smallest normal {str(dtype)[6:]} "
                "(the dtype ϕ is kept in)")
        require(value <= finfo.max, name, value,
                f"must be <= {finfo.max:.4g}, the largest {str(dtype)[6:]} "
                "(the dtype ϕ is kept in)")


def validate_gilding(group: dict[str, Any], phi_dtypes: Iterable[torch.dtype] = ()) -> None:
    """Checks shared by the Sculptor and the Gilder: β, γ, λ, bounds and the choices of §2.2
    (docs/maths.md §2.2). ``phi_dtypes``: the dtypes of the group's ϕ, so that ``phi_min`` is
    checked against what they can hold."""
    from kintsugi_optim.options import ASCENTS, PHI_NORMS, POSITIVITIES

    for name in ("beta", "gamma", "l1"):
        require_nonnegative(name, group[name])
    phi_min, phi_max = group["phi_min"], group["phi_max"]
    require(require_nonnegative("phi_min", phi_min) > 0, "phi_min", phi_min, "must be > 0")
    require_positive_representable("phi_min", float(phi_min), phi_dtypes)
    if phi_max is not None:
        require(require_nonnegative("phi_max", phi_max) >= float(phi_min), "phi_max", phi_max,
                f"must be >= phi_min={phi_min!r}")
    require_choice("phi_norm", group["phi_norm"], PHI_NORMS)
    require_choice("ascent", group["ascent"], ASCENTS)
    require_choice("positivity", group["positivity"], POSITIVITIES)
    require(
        not (group["ascent"] == "multiplicative" and group["positivity"] == "softplus"),
        "positivity", group["positivity"],
        "softplus cannot be combined with ascent='multiplicative', which keeps ϕ > 0 already",
    )


def validate_parameter_gilding(group: dict[str, Any],
                               phi_dtypes: Iterable[torch.dtype] = ()) -> None:
    """The gilding options of a parameter-level group (the Sculptor's, ``Gilded``'s):
    :func:`validate_gilding`, ``phi_init`` within the bounds and ϕ's dtypes, the pathway and the
    fracture (docs/maths.md §2.1, §3.1)."""
    from kintsugi_optim.options import FRACTURES, PATHWAYS

    phi_dtypes = tuple(phi_dtypes)
    validate_gilding(group, phi_dtypes)
    phi_init, phi_min, phi_max = group["phi_init"], group["phi_min"], group["phi_max"]
    require(require_nonnegative("phi_init", phi_init) >= float(phi_min), "phi_init", phi_init,
            f"must be >= phi_min={phi_min!r}")
    require_positive_representable("phi_init", float(phi_init), phi_dtypes)
    if phi_max is not None:
        require(float(phi_max) >= float(phi_init), "phi_max", phi_max,
                f"must be >= phi_init={phi_init!r}")
    require_choice("pathway", group["pathway"], PATHWAYS)
    require_choice("fracture", group["fracture"], FRACTURES)


def require_valid_phi(name: str, phi: Any) -> None:
    """A loaded or given ϕ: a floating tensor whose entries are all finite and > 0."""
    require(isinstance(phi, torch.Tensor) and phi.is_floating_point(), name,
            type(phi).__name__ if not isinstance(phi, torch.Tensor) else f"dtype {phi.dtype}",
            "gilding weights must be a floating tensor")
    bad = ~(torch.isfinite(phi) & (phi > 0))
    if bool(bad.any()):  # once per load: the price of never stepping with a corrupt ϕ
        values = phi.detach()[bad].flatten()[:4].tolist()
        raise ValueError(f"Invalid {name}: tensor of shape {tuple(phi.shape)} with entries "
                         f"{values} (gilding weights must be finite and > 0)")

"""Kintsugi in timm's optimizer factory (``timm.optim.create_optimizer_v2``, ``train.py --opt``).

timm reads an optimizer name as ``[lookahead_]<name>``: everything before the last ``_`` is a
modifier, so a registered name must not contain ``_`` ("kintsugi_adamw" would build timm's own
AdamW). :func:`register_timm` adds:

=================  ==========================================================================
``kintsugi``       the Sculptor over AdamW (``base="adamw"``), timm's usual recipe
``kintsugiadamw``  the same, by its full name
``kintsugiadam``   over Adam
``kintsugisgd``    over SGD with Nesterov momentum (timm's ``sgd``; momentum 0.9 by default)
``kintsugimomentum`` over SGD with classical momentum (timm's ``momentum``)
=================  ==========================================================================

Every Sculptor option passes through as a keyword (``beta=0.02, pathway="row"``), and timm's
own (``lr``, ``weight_decay``, ``momentum``, ``eps``, ``betas``, ``layer_decay``, ``foreach``,
``lookahead_`` prefix) behave as for its built-in optimizers. Needs ``timm`` (which imports
torchvision: see docs/frameworks.md).
"""

from __future__ import annotations

from typing import Any

from kintsugi_optim.sculptor import KintsugiOptimizer

__all__ = ["TIMM_NAMES", "register_timm"]

# name -> (Sculptor defaults, has_momentum, has_betas)
_ROWS: dict[str, tuple[dict[str, Any], bool, bool]] = {
    "kintsugi": ({"base": "adamw"}, False, True),
    "kintsugiadamw": ({"base": "adamw"}, False, True),
    "kintsugiadam": ({"base": "adam"}, False, True),
    "kintsugisgd": ({"base": "sgd", "nesterov": True}, True, False),
    "kintsugimomentum": ({"base": "sgd", "nesterov": False}, True, False),
}
TIMM_NAMES: tuple[str, ...] = tuple(_ROWS)
"""The names :func:`register_timm` registers."""


def register_timm(registry: Any = None) -> tuple[str, ...]:
    """Register the Kintsugi optimizers (:data:`TIMM_NAMES`) in timm's optimizer registry.

    Args:
        registry: a ``timm.optim.OptimizerRegistry`` (default: timm's default registry, the one
            ``create_optimizer_v2`` and timm's ``train.py`` use).

    Returns:
        the registered names. Calling it again re-registers them (timm logs an overwrite).

    Example::

        register_timm()
        optimizer = timm.optim.create_optimizer_v2(model, "kintsugi", lr=1e-3, weight_decay=0.05,
                                                   beta=0.02)
    """
    from timm.optim import OptimInfo
    from timm.optim import _optim_factory

    registry = _optim_factory.default_registry if registry is None else registry
    for name, (defaults, has_momentum, has_betas) in _ROWS.items():
        base = defaults["base"]
        registry.register(OptimInfo(
            name=name,
            opt_class=KintsugiOptimizer,
            description=f"Kintsugi Sculptor over {base}{' (Nesterov)' if defaults.get('nesterov') else ''}: "
                        "each pathway's step scaled by its gilding weight ϕ",
            has_eps=base != "sgd",
            has_momentum=has_momentum,
            has_betas=has_betas,
            defaults=dict(defaults),
        ))
    return TIMM_NAMES

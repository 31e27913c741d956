"""Kintsugi inside the frameworks people train with.

* :func:`gilding` — every ϕ of anything that holds some, as ``{readable name: ϕ}``: a Sculptor,
  a Gilder, a ``Gilded`` optimizer, a VWPR, a GildedLoss, a model containing VWPRs or
  GildedLosses, or a framework's wrapper around an optimizer (accelerate's
  ``AcceleratedOptimizer``, Lightning's ``LightningOptimizer``, the Hugging Face ``Trainer``).
* :mod:`~kintsugi_optim.integrations.tensorboard` — ϕ to TensorBoard (histograms, mean/min/max,
  sigils); needs the ``tensorboard`` extra.
* :mod:`~kintsugi_optim.integrations.hf` and :mod:`~kintsugi_optim.integrations.lightning` —
  callbacks that step a Gilder once per optimizer step of the Trainer.
* :mod:`~kintsugi_optim.integrations.timm` — Kintsugi in timm's optimizer factory.

Each submodule imports its framework; this package imports none. Pitfalls and recipes are in
docs/frameworks.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from kintsugi_optim._validation import require

__all__ = ["gilding"]


def gilding(source: Any, model: nn.Module | None = None) -> dict[str, Tensor]:
    """Every gilding weight ϕ of ``source`` as ``{name: ϕ}`` (the live tensors, no copies).

    Args:
        source: anything with a ``gilding()`` method (KintsugiOptimizer, GilderOptimizer,
            ``Gilded``, VWPR, GildedLoss), a mapping of tensors (nested one level, as
            optimizers answer ``{group: {param: ϕ}}``), a wrapper with the optimizer as
            ``.optimizer`` (unwrapped, as often as needed), an ``nn.Module`` (the ϕ of every
            submodule that has ``gilding()``, keyed ``"<module path>/<name>"``), or a list or
            tuple of these (keyed ``"<index>/<name>"`` when there are several).
        model (nn.Module, optional): names an optimizer's ϕ by the model's parameter (or buffer)
            names, for an optimizer built from ``model.parameters()`` rather than
            ``named_parameters()``.

    Returns:
        ``{name: ϕ}``. An optimizer's ϕ is keyed by parameter name (given as ``(name, tensor)``
        pairs, or found in ``model``), else by index; ``"<group>/"`` (the group's ``name`` or
        index) is prepended when there are several groups and no name covers them.
        Parameters a Sculptor has not stepped yet have no ϕ and are left out.
    """
    require(model is None or isinstance(model, nn.Module), "model", type(model).__name__,
            "must be an nn.Module or None")
    if isinstance(source, (list, tuple)):
        parts = [gilding(item, model) for item in source]
        if len(parts) == 1:
            return parts[0]
        return {f"{i}/{name}": phi for i, part in enumerate(parts) for name, phi in part.items()}
    seen = set()
    while not callable(getattr(source, "gilding", None)) and not isinstance(source, Mapping):
        inner = getattr(source, "optimizer", None)
        if inner is None or id(inner) in seen:
            break
        seen.add(id(source))
        source = inner
    if callable(getattr(source, "gilding", None)):
        nested = source.gilding()
        if model is not None and hasattr(source, "param_groups"):
            return _named_by_model(source, nested, model)
    elif isinstance(source, Mapping):
        nested = source
    elif isinstance(source, nn.Module):
        return _from_submodules(source)
    else:
        nested = None
    require(isinstance(nested, Mapping), "source", type(source).__name__,
            "expected a VWPR, KintsugiOptimizer, GilderOptimizer, Gilded, GildedLoss, a model, "
            "a wrapped optimizer (.optimizer) or a dict of tensors")
    return _flatten(nested)


def _flatten(nested: Mapping) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    single = len(nested) == 1
    for key, value in nested.items():
        if isinstance(value, Mapping):
            for inner, phi in value.items():
                out[str(inner) if single else f"{key}/{inner}"] = phi
        else:
            out[str(key)] = value
    for name, phi in out.items():
        require(isinstance(phi, Tensor), "source", name, f"holds a {type(phi).__name__}, not a tensor")
    return out


def _named_by_model(optimizer: Any, nested: Mapping, model: nn.Module) -> dict[str, Tensor]:
    """An optimizer's ``{group: {param key: ϕ}}`` renamed with the model's names."""
    names = {id(t): n for n, t in model.named_buffers(remove_duplicate=False)}
    names.update({id(t): n for n, t in model.named_parameters(remove_duplicate=False)})
    out: dict[str, Tensor] = {}
    for g, (group, (group_key, phis)) in enumerate(zip(optimizer.param_groups, nested.items())):
        keys = group.get("param_names") or range(len(group["params"]))
        for key, p in zip(keys, group["params"]):
            if key in phis:
                name = names.get(id(p))
                out[name if name is not None else f"{group_key}/{key}"] = phis[key]
    return out


def _from_submodules(module: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    holders: list[str] = []
    for path, sub in module.named_modules():
        if any(path.startswith(h + ".") for h in holders) or not callable(getattr(sub, "gilding", None)):
            continue
        holders.append(path)
        for name, phi in gilding(sub).items():
            out[f"{path}/{name}" if path else name] = phi
    require(bool(holders), "source", type(module).__name__,
            "is a module with no VWPR or GildedLoss inside; pass the optimizer for the Sculptor's ϕ")
    return out


def checked_gilders(gilders: tuple[Any, ...]) -> list[Any]:
    """The Gilders a framework callback steps, as a list, each checked to be an optimizer."""
    from torch.optim import Optimizer

    require(bool(gilders), "gilders", gilders, "give at least one GilderOptimizer")
    for gilder in gilders:
        require(isinstance(gilder, Optimizer), "gilder", type(gilder).__name__,
                "must be a torch.optim.Optimizer (a GilderOptimizer)")
    return list(gilders)

"""The Sculptor's param groups: every option's default, validation, and what a step keeps of a
validated group (its :class:`SculptOptions`, and the lists it can reuse while nothing changed).
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import is_
from typing import Any

import torch
from torch import Tensor

from kintsugi_optim._validation import (
    plain_number,
    require,
    require_choice,
    require_nonnegative,
    validate_parameter_gilding,
)
from kintsugi_optim.options import PARAMETER_GILDING_DEFAULTS, SculptOptions
from kintsugi_optim.pathways import phi_dtype
from kintsugi_optim.rules import RULES, require_scalar_tensor_fits

_MISSING = object()
_PLAIN_TYPES = (float, int, bool, str, type(None), list, Tensor)  # not numpy, Fraction

def _defaults() -> dict[str, Any]:
    """Every option's default, from the one table of each kind: the rules' rows
    (kintsugi_optim.rules) and the parameter level's gilding (kintsugi_optim.options)."""
    rule_options: dict[str, Any] = {}
    for rule in RULES.values():
        rule_options.update(rule.options)
    return dict(
        lr=1e-3,
        base="adam",
        **rule_options,
        weight_decay=None,  # the rule's own default: 0 for sgd/adam, 1e-2 for adamw, as torch
        **PARAMETER_GILDING_DEFAULTS,
        maximize=False,
        foreach=None,
        fused=None,
        capturable=False,
        differentiable=False,
    )


_DEFAULTS: dict[str, Any] = _defaults()

# Options that only one base rule reads (its row's `options`). torch's schedulers learn the
# rule from `defaults` (OneCycleLR and CyclicLR cycle `betas` when `defaults` has them, else
# `momentum`), so `defaults` holds only the constructor's rule; the others are back-filled into
# each group, which keeps every group complete when it switches `base`.
def _rule_options(base: str) -> tuple[str, ...]:
    rule = RULES.get(base)
    return tuple(rule.options) if rule is not None else ()


def _validate_group(group: dict[str, Any], phi_dtypes: Iterable[torch.dtype] = ()) -> None:
    """Every hyperparameter of ``group`` (complete: every key of ``_DEFAULTS``), raising a
    ValueError that names the argument and value. ``phi_dtypes``: the dtypes of the group's ϕ,
    which ``phi_min`` and ``phi_init`` must fit."""
    require_choice("base", group["base"], tuple(RULES))
    require_nonnegative("weight_decay", group["weight_decay"])
    for name in ("maximize", "capturable", "differentiable"):
        require(isinstance(group[name], bool), name, group[name], "must be True or False")
    for name in ("foreach", "fused"):
        require(group[name] is None or isinstance(group[name], bool), name, group[name],
                "must be True, False or None")
    _check_lr(group)
    for rule in RULES.values():  # every group holds every rule's options
        rule.validate(group)
    validate_parameter_gilding(group, phi_dtypes)
    if group["fused"]:
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")


def _check_lr(group: dict[str, Any]) -> None:
    require_nonnegative("lr", group["lr"])
    require_scalar_tensor_fits(group, "lr", group["lr"])


def _scheduled_checks() -> dict[str, Any]:
    """The options schedulers change every step (LRScheduler: lr; OneCycleLR and CyclicLR:
    betas or momentum): a change of these alone re-checks only them."""
    checks = {"lr": _check_lr}
    for rule in RULES.values():
        checks.update({key: rule.checks[key] for key in rule.scheduled})
    return checks


_SCHEDULED = _scheduled_checks()


def _phi_dtypes(group: dict[str, Any]) -> set[torch.dtype]:
    return {phi_dtype(p) for p in group["params"] if p.is_floating_point() or p.is_complex()}


def _plain_number_(group: dict[str, Any], key: str) -> None:
    """``group[key]`` as a Python number (each of ``betas``) where it is a numpy or Fraction
    one. Values are replaced only where they change, so the identity check of
    :meth:`KintsugiOptimizer._check_group` sees an unchanged group as unchanged."""
    value = group[key]
    if key == "betas" and isinstance(value, (tuple, list)):
        plain = tuple(plain_number(b) for b in value)
        if any(a is not b for a, b in zip(plain, value)):
            group[key] = plain
    elif type(value) not in _PLAIN_TYPES:
        group[key] = plain_number(value)


def _plain_numbers_(group: dict[str, Any]) -> None:
    """numpy and Fraction hyperparameters become Python floats in place (the kernels and
    ``_foreach_`` ops take Python numbers and tensors only); None weight_decay or beta is the
    rule's default, as in the constructor."""
    for key in group:
        if key != "params":
            _plain_number_(group, key)
    if group.get("weight_decay") is None:
        group["weight_decay"] = _resolved_weight_decay(group)
    if "beta" in group and group["beta"] is None:
        group["beta"] = _default_beta(group)


class _CheckedGroup:
    """What the Sculptor knows of a validated param group: the values it was validated with
    (``snapshot``, compared by identity each step) and the step's options built from them."""

    __slots__ = ("group", "snapshot", "values", "n_params", "options", "foreach", "fused",
                 "ready", "fast")

    def __init__(self, group: dict[str, Any]) -> None:
        self.group = group
        self.snapshot = dict(group)
        self.values = tuple(group.values())
        self.n_params = len(group["params"])
        self.ready: _ReadyGroup | None = None
        self.fast = False  # whether this step's lists came from `ready`
        self.build()

    def unchanged(self, group: dict[str, Any]) -> bool:
        """Whether every value of ``group`` is the object it was validated with."""
        return (len(group) == len(self.values) and all(map(is_, group.values(), self.values))
                and group.keys() == self.snapshot.keys()
                and len(group["params"]) == self.n_params)

    def build(self) -> None:
        group = self.group
        options = SculptOptions.from_group(group)
        foreach, fused = group["foreach"], group["fused"]
        if isinstance(options.beta1, Tensor) or isinstance(options.beta2, Tensor):
            if fused:  # the fused kernels take the betas as numbers
                options = options.replace(beta1=float(options.beta1), beta2=float(options.beta2))
            elif foreach is None and not group["capturable"]:
                foreach = False  # torch's foreach Adam takes tensor betas only capturable
        self.options, self.foreach, self.fused = options, foreach, fused
        self.values = tuple(group.values())
        if self.ready is not None:
            self.ready.impl = None  # a tensor lr changes the default implementation


class _ReadyGroup:
    """A group's step lists as ``_init_group`` last built them, reused while nothing they
    depend on changed: the optimizer's state (same mapping, size, per-parameter dicts and their
    values, by identity) and the parameters, every one with a dense gradient. The per-step work
    of a steady training loop is then reading the gradients."""

    __slots__ = ("state", "state_dicts", "params", "states", "state_values", "lists",
                 "has_complex", "impl", "idle")

    def __init__(self, optimizer_state: dict, params: list[Tensor], states: list[dict],
                 lists: list[list], has_complex: bool) -> None:
        self.state = optimizer_state
        self.state_dicts = tuple(optimizer_state.values())
        self.params = params
        self.states = states
        self.state_values = [tuple(state.values()) for state in states]
        self.lists = lists
        self.has_complex = has_complex
        self.impl: tuple[bool | None, bool | None] | None = None
        self.idle: tuple[list[int] | None, bool] | None = None  # ϕ versions, all ϕ ≡ 1

    def grads(self, optimizer_state: dict, params: list[Tensor]) -> list[Tensor] | None:
        """The parameters' gradients when the lists still hold, else None."""
        # Every parameter's state dict, by identity: `opt.state[p] = {}` resets p's state.
        if (optimizer_state is not self.state or len(optimizer_state) != len(self.state_dicts)
                or not all(map(is_, optimizer_state.values(), self.state_dicts))
                or not all(map(is_, params, self.params))):
            return None
        grads = [p.grad for p in params]
        for g in grads:
            if g is None or g.is_sparse:
                return None
        for state, values in zip(self.states, self.state_values):
            if len(state) != len(values) or not all(map(is_, state.values(), values)):
                return None
        return grads


def _default_beta(group: dict[str, Any]) -> float:
    """β for a group that sets none, under a constructor given none: its rule's
    (``Rule.gilding_rate``, 0 for plain SGD), else the parameter level's default."""
    rule = RULES.get(group["base"])
    if rule is not None and rule.gilding_rate is not None:
        return rule.gilding_rate(group)
    return PARAMETER_GILDING_DEFAULTS["beta"]


def _resolved_weight_decay(group: dict[str, Any]) -> float:
    if group.get("weight_decay") is None:
        rule = RULES.get(group.get("base"))
        return rule.weight_decay if rule is not None else 0.0
    return group["weight_decay"]

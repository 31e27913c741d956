"""The base rules of the Sculptor as registered rows (docs/architecture.md, "Adding a rule").

A :class:`Rule` declares everything the rest of the package needs to know about a descent rule:
its options and their defaults, their validation, its torch state keys and how that state is
created lazily, its single-tensor and foreach directions, and torch's own functional step (the
β = 0 shortcut). Gilding is a layer around any row: the Sculptor scales the row's step by ϕ and
gilds ϕ with the same gradient's fracture, whatever the rule.

The fused kernels (C++ and Triton) implement a fixed set of rules and say so
(:func:`kintsugi_optim._kernels.fused_cpu.unsupported`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.sgd import sgd as _torch_sgd

from kintsugi_optim._compat import _get_scalar_dtype
from kintsugi_optim._kernels import StepLists
from kintsugi_optim._kernels import foreach as _foreach
from kintsugi_optim._kernels import single_tensor as _single
from kintsugi_optim._validation import require, require_nonnegative
from kintsugi_optim.options import PARAMETER_GILDING_DEFAULTS, SculptOptions

__all__ = ["BASES", "RULES", "Rule", "register_rule"]

Group = dict[str, Any]


@dataclass(frozen=True)
class Rule:
    """One base rule (a row of :data:`RULES`).

    Attributes:
        name: the ``base`` value that selects it.
        options: the rule's own param-group options and their defaults (written once here;
            ``KintsugiOptimizer``'s defaults and signature read them).
        checks: option → check(group), raising a ValueError naming the option and value.
        state_keys: the keys it keeps in ``optimizer.state[p]`` (torch's names).
        gather: gather(state, param, group, lists, fused): create the parameter's state lazily
            and append it to the :class:`StepLists`.
        single_tensor: the single-tensor direction (see ``_kernels.single_tensor``).
        foreach: the foreach direction (see ``_kernels.foreach``) and ``foreach_state``, the
            names of the StepLists fields it steps; ``foreach_check`` its refusals.
        torch_step: torch's own step over the lists (the Sculptor's step at β = 0 with ϕ ≡ 1),
            or None to step through the Sculptor's paths.
        store: store(state_of, lists, options): write state created during the step back into
            ``optimizer.state`` (SGD's momentum buffers are born in the step).
        weight_decay: the default weight decay (AdamW: 1e-2).
        scheduled: options schedulers change every step (OneCycleLR, CyclicLR: ``momentum`` or
            ``betas``); a change of these alone re-checks only them.
        sparse_grads: whether it steps sparse gradients (torch's SGD does, for
            ``nn.Embedding(sparse=True)``).
        foreach_tensor_lr: whether its foreach step takes a tensor lr without ``capturable``.
        gilding_rate: gilding_rate(group) → the β a group of this rule gets when neither it nor
            the constructor sets one; None: the parameter level's default
            (``options.PARAMETER_GILDING_DEFAULTS``).
    """

    name: str
    options: Mapping[str, Any]
    checks: Mapping[str, Callable[[Group], None]]
    state_keys: tuple[str, ...]
    gather: Callable[[dict, Tensor, Group, StepLists, bool], None]
    single_tensor: Callable[..., None]
    foreach: Callable[..., list[Tensor]]
    foreach_state: tuple[str, ...]
    foreach_check: Callable[[StepLists, SculptOptions], None] | None = None
    torch_step: Callable[..., None] | None = None
    store: Callable[[Callable[[Tensor], dict], StepLists, SculptOptions], None] | None = None
    weight_decay: float = 0.0
    scheduled: tuple[str, ...] = field(default=())
    sparse_grads: bool = False
    foreach_tensor_lr: bool = False
    gilding_rate: Callable[[Group], float] | None = None

    def validate(self, group: Group) -> None:
        for check in self.checks.values():
            check(group)


RULES: dict[str, Rule] = {}


def register_rule(rule: Rule) -> Rule:
    """Add ``rule`` to :data:`RULES` (and so to ``base``'s choices). An option another rule
    already declares must keep its default: a param group holds one value per name."""
    for other in RULES.values():
        for name, default in rule.options.items():
            if other.name != rule.name and other.options.get(name, default) != default:
                raise ValueError(
                    f"Invalid rule {rule.name!r}: option {name!r} defaults to {default!r}, but "
                    f"rule {other.name!r} declares it with {other.options[name]!r}")
    RULES[rule.name] = rule
    return rule


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def require_scalar_tensor_fits(group: Group, name: str, value: Any) -> None:
    """torch's rule: the foreach Adam step takes lr and betas as Python numbers unless
    capturable (SGD's foreach step takes a tensor lr as it is); raised here, not mid-step."""
    if isinstance(value, Tensor) and group["foreach"] and not group["capturable"]:
        rule = RULES.get(group["base"])
        if name == "lr" and rule is not None and rule.foreach_tensor_lr:
            return
        raise ValueError(
            f"Invalid {name}: {value!r} (a Tensor is not supported for capturable=False and "
            "foreach=True)")


def _check_betas(group: Group) -> None:
    betas = group["betas"]
    require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas,
            "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        require(require_nonnegative(f"betas[{i}]", b) < 1, f"betas[{i}]", b, "must be in [0, 1)")
        require_scalar_tensor_fits(group, f"betas[{i}]", b)


def _check_momentum(group: Group) -> None:
    require_nonnegative("momentum", group["momentum"])
    if group["nesterov"]:
        require(
            group["momentum"] > 0 and group["dampening"] == 0, "nesterov", True,
            f"needs momentum > 0 and dampening = 0, got momentum={group['momentum']!r}, "
            f"dampening={group['dampening']!r}",
        )


def _check_flag(name: str) -> Callable[[Group], None]:
    def check(group: Group) -> None:
        require(isinstance(group[name], bool), name, group[name], "must be True or False")
    return check


def _check_nonnegative(name: str) -> Callable[[Group], None]:
    def check(group: Group) -> None:
        require_nonnegative(name, group[name])
    return check


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


def _gather_sgd(state: dict, p: Tensor, group: Group, lists: StepLists, fused: bool) -> None:
    # torch's SGD: no momentum, no buffer (the functional step is given Nones).
    lists.momentum_buffers.append(state.get("momentum_buffer") if group["momentum"] else None)


def _store_sgd(state_of: Callable[[Tensor], dict], lists: StepLists, o: SculptOptions) -> None:
    if o.momentum != 0:
        for p, buf in zip(lists.params, lists.momentum_buffers):
            state_of(p)["momentum_buffer"] = buf


def _gather_adam(state: dict, p: Tensor, group: Group, lists: StepLists, fused: bool) -> None:
    if "step" not in state:
        # torch keeps `step` on the CPU unless capturable/fused (kernel launches are costly).
        state["step"] = (
            torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
            if group["capturable"] or fused
            else torch.tensor(0.0, dtype=_get_scalar_dtype())
        )
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    amsgrad = group["amsgrad"]
    if amsgrad and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group["differentiable"] and state["step"].requires_grad:
        raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
    lists.exp_avgs.append(state["exp_avg"])
    lists.exp_avg_sqs.append(state["exp_avg_sq"])
    if amsgrad:
        lists.max_exp_avg_sqs.append(state["max_exp_avg_sq"])
    lists.state_steps.append(state["step"])


# ---------------------------------------------------------------------------------------------
# torch's own steps (β = 0, ϕ ≡ 1)
# ---------------------------------------------------------------------------------------------


def _torch_sgd_step(lists: StepLists, o: SculptOptions, **impl: Any) -> None:
    impl.pop("has_complex")
    _torch_sgd(
        lists.params, lists.grads, lists.momentum_buffers,
        has_sparse_grad=any(g.is_sparse for g in lists.grads), weight_decay=o.weight_decay,
        momentum=o.momentum, lr=o.lr, dampening=o.dampening, nesterov=o.nesterov,
        maximize=o.maximize, **impl,
    )


def _torch_adam_step(lists: StepLists, o: SculptOptions, *, decoupled: bool = False,
                     **impl: Any) -> None:
    rule = _torch_adamw if decoupled else _torch_adam
    rule(
        lists.params, lists.grads, lists.exp_avgs, lists.exp_avg_sqs, lists.max_exp_avg_sqs,
        lists.state_steps, capturable=o.capturable, differentiable=o.differentiable,
        amsgrad=o.amsgrad, beta1=o.beta1, beta2=o.beta2, lr=o.lr, weight_decay=o.weight_decay,
        eps=o.eps, maximize=o.maximize, **impl,
    )


# ---------------------------------------------------------------------------------------------
# The rows
# ---------------------------------------------------------------------------------------------


def _sgd_gilding_rate(group: Group) -> float:
    # Plain SGD's step is its gradient, so a ϕ that rises with a row's relative |g| only makes
    # the rows that already step furthest step further: measured, 1% worse on every seed of a
    # task and no gain beyond noise on any (README.md, "Performance"). Under momentum the step
    # is averaged (under Adam normalised), and ϕ adds what the step lacks.
    return 0.0 if group["momentum"] == 0 else PARAMETER_GILDING_DEFAULTS["beta"]


SGD = register_rule(Rule(
    name="sgd",
    options=dict(momentum=0.0, dampening=0.0, nesterov=False),
    checks=dict(momentum=_check_momentum, dampening=_check_nonnegative("dampening"),
                nesterov=_check_flag("nesterov")),
    state_keys=("momentum_buffer",),
    gather=_gather_sgd,
    single_tensor=_single.sgd_direction,
    foreach=_foreach.sgd_direction,
    foreach_state=("momentum_buffers",),
    torch_step=_torch_sgd_step,
    store=_store_sgd,
    scheduled=("momentum",),
    sparse_grads=True,
    foreach_tensor_lr=True,
    gilding_rate=_sgd_gilding_rate,
))

ADAM = register_rule(Rule(
    name="adam",
    options=dict(betas=(0.9, 0.999), eps=1e-8, amsgrad=False),
    checks=dict(betas=_check_betas, eps=_check_nonnegative("eps"),
                amsgrad=_check_flag("amsgrad")),
    state_keys=("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    gather=_gather_adam,
    single_tensor=_single.adam_direction,
    foreach=_foreach.adam_direction,
    foreach_state=("exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
    foreach_check=_foreach.adam_check,
    torch_step=_torch_adam_step,
    scheduled=("betas",),
))

# AdamW is Adam with decoupled weight decay (θ ← θ·(1 − lr·wd), not scaled by ϕ).
ADAMW = register_rule(replace(
    ADAM,
    name="adamw",
    single_tensor=functools.partial(_single.adam_direction, decoupled=True),
    foreach=functools.partial(_foreach.adam_direction, decoupled=True),
    torch_step=functools.partial(_torch_adam_step, decoupled=True),
    weight_decay=1e-2,
))

BASES = tuple(RULES)  # the rules registered at import; RULES itself is the live registry

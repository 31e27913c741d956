"""The Sculptor: :class:`KintsugiOptimizer`, a ``torch.optim.Optimizer`` whose SGD/Adam/AdamW step
is scaled per pathway by a gilding weight ϕ that rises with that pathway's error (docs/maths.md §2.3, §3.1).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT
from torch.utils.weak import WeakIdKeyDictionary

from kintsugi_optim._compat import (
    _device_dtype_check_for_fused,
    _disable_dynamo,
    _get_scalar_dtype,
    _graph_capture_health_check,
    _use_grad_for_differentiable,
)
from kintsugi_optim._validation import (
    plain_number,
    require,
    require_choice,
    require_nonnegative,
    require_valid_phi,
    validate_parameter_gilding,
)
from kintsugi_optim.functional import (
    BASES,
    new_phi,
    phi_dtype,
    phi_shape,
    sculpt,
    softplus_inverse,
    torch_step,
)

__all__ = ["KintsugiOptimizer", "Sculptor"]

_MISSING = object()
_PLAIN_TYPES = (float, int, bool, str, type(None), list, Tensor)  # not numpy, Fraction

_DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    base="adam",
    betas=(0.9, 0.999),
    eps=1e-8,
    amsgrad=False,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    weight_decay=None,  # 0 for sgd/adam, 1e-2 for adamw, like torch's defaults
    # Drop-in defaults, chosen with benchmarks/dropin.py (README.md, "Performance"): one ϕ per
    # neuron/output channel, damped to stop rising near 1/γ = 1.25 and kept in [0.8, 1.25]
    # before the mean normalisation, so that every step lies between 0.64 and 1.25 times the
    # base rule's.
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
    maximize=False,
    foreach=None,
    fused=None,
    capturable=False,
    differentiable=False,
)


def _default_beta(base: str, momentum: float) -> float:
    """β when none is given: 0 for plain SGD (``base="sgd"``, momentum 0), ``_DEFAULTS["beta"]``
    otherwise. Plain SGD's step is its gradient, so a ϕ that rises with the row's |g| only makes
    rows that already step furthest step further (measured: 1% worse on every seed of a task,
    and no gain beyond noise on any, README.md "Performance"); under momentum or Adam the step
    is averaged or normalised, and ϕ adds what the step lacks."""
    return 0.0 if base == "sgd" and momentum == 0 else _DEFAULTS["beta"]


# With β = 0 and ϕ ≡ 1 a step is torch's own (KintsugiOptimizer._gilding_is_idle). Tests of
# the gilding maths at β = 0 turn this off, to step through the Sculptor's own paths.
_BETA_ZERO_SHORTCUT = True

# Options that only one base rule reads. torch's schedulers learn the rule from `defaults`
# (OneCycleLR and CyclicLR cycle `betas` when `defaults` has them, else `momentum`), so
# `defaults` holds only the constructor's rule; the others are back-filled into each group,
# which keeps every group complete when it switches `base`.
_RULE_OPTIONS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum", "dampening", "nesterov"),
    "adam": ("betas", "eps", "amsgrad"),
    "adamw": ("betas", "eps", "amsgrad"),
}


def _validate_group(group: dict[str, Any], phi_dtypes: Iterable[torch.dtype] = ()) -> None:
    """Every hyperparameter of ``group`` (complete: every key of ``_DEFAULTS``), raising a
    ValueError that names the argument and value. ``phi_dtypes``: the dtypes of the group's ϕ,
    which ``phi_min`` and ``phi_init`` must fit."""
    require_choice("base", group["base"], BASES)
    for name in ("eps", "dampening", "weight_decay"):
        require_nonnegative(name, group[name])
    for name in ("amsgrad", "nesterov", "maximize", "capturable", "differentiable"):
        require(isinstance(group[name], bool), name, group[name], "must be True or False")
    for name in ("foreach", "fused"):
        require(group[name] is None or isinstance(group[name], bool), name, group[name],
                "must be True, False or None")
    for check in _SCHEDULED.values():
        check(group)
    validate_parameter_gilding(group, phi_dtypes)
    if group["fused"]:
        if group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")


def _check_lr(group: dict[str, Any]) -> None:
    require_nonnegative("lr", group["lr"])
    _require_scalar_tensor_fits(group, "lr", group["lr"], group["base"])


def _check_betas(group: dict[str, Any]) -> None:
    betas = group["betas"]
    require(isinstance(betas, (tuple, list)) and len(betas) == 2, "betas", betas,
            "must be a pair (beta1, beta2)")
    for i, b in enumerate(betas):
        require(require_nonnegative(f"betas[{i}]", b) < 1, f"betas[{i}]", b, "must be in [0, 1)")
        _require_scalar_tensor_fits(group, f"betas[{i}]", b, group["base"])


def _check_momentum(group: dict[str, Any]) -> None:
    require_nonnegative("momentum", group["momentum"])
    if group["nesterov"]:
        require(
            group["momentum"] > 0 and group["dampening"] == 0, "nesterov", True,
            f"needs momentum > 0 and dampening = 0, got momentum={group['momentum']!r}, "
            f"dampening={group['dampening']!r}",
        )


# The options schedulers change every step (LRScheduler: lr; OneCycleLR and CyclicLR: betas
# or momentum): a change of these alone re-checks only them.
_SCHEDULED = {"lr": _check_lr, "betas": _check_betas, "momentum": _check_momentum}


def _require_scalar_tensor_fits(group: dict[str, Any], name: str, value: Any, base: str) -> None:
    # torch's rule: the foreach Adam step takes lr and betas as Python numbers unless capturable
    # (SGD's foreach step takes a tensor lr as it is); raised here rather than mid-step.
    if isinstance(value, Tensor) and group["foreach"] and not group["capturable"]:
        if name == "lr" and base == "sgd":
            return
        raise ValueError(
            f"Invalid {name}: {value!r} (a Tensor is not supported for capturable=False and "
            "foreach=True)")


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
    ``_foreach_`` ops take Python numbers and tensors only); None weight_decay is the rule's
    default, as in the constructor."""
    for key in group:
        if key != "params":
            _plain_number_(group, key)
    if group.get("weight_decay") is None:
        group["weight_decay"] = _resolved_weight_decay(group)


class KintsugiOptimizer(Optimizer):
    r"""The Sculptor: SGD, Adam or AdamW with every pathway's step scaled by its gilding weight ϕ.

    Each step, per parameter θ with gradient g (negated first when ``maximize``):

    1. fracture signal l = |g| reduced to the pathway (element / row / tensor), divided by its
       mean over the scope when ``fracture="relative"`` (docs/maths.md §2.1);
    2. d = the base rule's direction exactly as ``torch.optim`` computes it;
    3. θ ← θ − lr · ϕ · d, with ϕ from *before* this step (the two streams are simultaneous);
    4. ϕ ← gild(ϕ, l): ϕ += β·l·max(0, 1 − γϕ) − β·λ, kept in [phi_min, phi_max], normalised to
       mean 1 over the scope when ``phi_norm="mean"`` (docs/maths.md §2.2).

    With ``beta=0`` it is ``torch.optim.SGD``/``Adam``/``AdamW`` (bitwise on the single-tensor
    path). Every argument may be overridden per param group.

    Args:
        params: tensors, dicts defining param groups, or ``(name, tensor)`` pairs.
        lr (float or 0-d Tensor): learning rate α (default: 1e-3).
        base (str): "sgd", "adam" or "adamw" (default: "adam").
        betas, eps, amsgrad: as ``torch.optim.Adam`` (defaults (0.9, 0.999), 1e-8, False).
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (defaults 0, 0, False).
        weight_decay (float): coupled (L2 in g) for sgd/adam, decoupled for adamw
            (default: 0, or 1e-2 for adamw). AdamW's ``θ *= 1 − lr·wd`` is not scaled by ϕ.
        beta (float): gilding rate β ≥ 0 (default: 0.01; 0 for plain SGD, ``base="sgd"``
            with ``momentum=0``, which gilding did not help). gamma (float): damping γ ≥ 0 (0.8:
            ϕ stops rising near 1.25). l1 (float): tempering λ ≥ 0 (0).
        phi_init, phi_min, phi_max: ϕ's start and bounds (1.0, 0.8, 1.25; ``phi_max=None``: no
            cap); 0 < phi_min ≤ phi_init ≤ phi_max. With l1 = 0 gilding never lowers a ϕ before
            the normalisation, so mean ϕ' ≥ 1 there, and phi_min / phi_max ≤ ϕ ≤ phi_max at
            every step: each step lies between 0.64 and 1.25 times the base rule's.
        pathway (str): "row" (one ϕ per ``θ[i]``: a neuron or output channel; the default),
            "element" (ϕ shaped like θ) or "tensor" (one ϕ per tensor, normalised across the
            group).
        fracture (str): "relative" (scale-free, default) or "abs" (the source's literal rule).
        phi_norm (str or None): "mean" (default) keeps the mean ϕ of each scope at 1.
        ascent (str): "additive" (default) or "multiplicative" (exponentiated gradient).
        positivity (str): "clamp" (default) or "softplus" (ϕ = softplus(ρ), ρ the resilience
            score, stored in the state as ``rho``).
        maximize, foreach, fused, capturable, differentiable: as in ``torch.optim.Adam``.
            ``fused=True`` (CPU and CUDA kernels of their own) holds mean ϕ to 1 within four
            rounding errors rather than one: it stores ϕ normalised by a foreseen factor.
            Given neither ``foreach`` nor ``fused``, a CPU step of plain float tensors runs the
            fused kernel (built on first use; if it cannot be, a warning and the foreach
            step), other steps torch's choice. A step with ``beta=0`` while every ϕ is 1 is
            torch's own functional step, bitwise.

    State per parameter: torch's keys for the base rule plus ``phi`` (and ``rho``), float32 for
    bf16/fp16 parameters. :meth:`gilding` returns every ϕ.

    ``defaults`` holds the options of the constructor's base rule only, as torch's SGD and Adam
    do, so schedulers that look there (OneCycleLR and CyclicLR with ``cycle_momentum``) cycle
    ``momentum`` for sgd and ``betas`` for adam/adamw; every param group still holds every option.
    Under FSDP2 ϕ is a DTensor sharded like its parameter (see ``new_phi``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        *,
        base: str = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        amsgrad: bool = False,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        beta: float | None = None,
        gamma: float = 0.8,
        l1: float = 0.0,
        phi_init: float = 1.0,
        phi_min: float = 0.8,
        phi_max: float | None = 1.25,
        pathway: str = "row",
        fracture: str = "relative",
        phi_norm: str | None = "mean",
        ascent: str = "additive",
        positivity: str = "clamp",
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
    ) -> None:
        # betas=0.9 must fail by name here, not as tuple()'s TypeError below (the tensor rules
        # are checked with the group in add_param_group)
        _check_betas({"betas": betas, "foreach": False, "capturable": False, "base": base})
        # No β given: each param group's rule decides (add_param_group), the constructor's here.
        self._beta_by_rule = beta is None
        if beta is None:
            beta = _default_beta(base, momentum)
        defaults = dict(
            lr=lr, base=base, betas=tuple(betas), eps=eps, amsgrad=amsgrad, momentum=momentum,
            dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, beta=beta,
            gamma=gamma, l1=l1, phi_init=phi_init, phi_min=phi_min, phi_max=phi_max,
            pathway=pathway, fracture=fracture, phi_norm=phi_norm, ascent=ascent,
            positivity=positivity, maximize=maximize, foreach=foreach, fused=fused,
            capturable=capturable, differentiable=differentiable,
        )
        # (An unknown base keeps every option here; add_param_group reports it.)
        own = _RULE_OPTIONS.get(base, tuple(defaults))
        others = {k for rule in _RULE_OPTIONS.values() for k in rule if k not in own}
        self._other_rule_options = {k: defaults.pop(k) for k in sorted(others)}
        super().__init__(params, defaults)
        if fused:
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be, before the optimizer holds it: a bad value never
        # leaves a half-added group behind.
        other_rule_options = getattr(self, "_other_rule_options", {})
        candidate = {**other_rule_options, **self.defaults, **param_group}
        _plain_numbers_(candidate)
        by_rule = getattr(self, "_beta_by_rule", False) and "beta" not in param_group
        if by_rule:
            candidate["beta"] = _default_beta(candidate["base"], candidate["momentum"])
        _validate_group(candidate)
        if by_rule:
            param_group["beta"] = candidate["beta"]
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key, value in other_rule_options.items():
            group.setdefault(key, value)
        try:
            self._check_group(group)  # now with ϕ's dtypes, known from the params
        except ValueError:
            self.param_groups.pop()
            raise

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in _DEFAULTS.items():
                group.setdefault(key, default)
            group["weight_decay"] = _resolved_weight_decay(group)
            for p in group["params"]:
                # torch.optim.Adam's back-fill: a `step` saved as a plain number (older torch, a
                # hand-made checkpoint) becomes the tensor every path counts in.
                p_state = self.state.get(p, {})
                if "step" in p_state and not torch.is_tensor(p_state["step"]):
                    fused_like = group["capturable"] or group["fused"]
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]), dtype=_get_scalar_dtype(is_fused=group["fused"]),
                        device=p.device if fused_like else None)

    def _check_group(self, group: dict[str, Any]) -> None:
        """Validate ``group`` if any of its values changed since it was last validated (an edit
        of ``param_groups``, a scheduler, a loaded checkpoint), so a bad value raises a
        ValueError before any state changes instead of silently running something else.

        Values are compared by identity: a step with nothing changed costs one pass over the
        group's keys; a scheduler's new ``lr`` re-checks only ``lr``.
        """
        checked = self.__dict__.setdefault("_checked_groups", {})
        seen = checked.get(id(group))
        if seen is not None and seen[0] is group:
            snapshot, params = seen[1], seen[2]
            changed = [k for k, v in group.items() if snapshot.get(k, _MISSING) is not v]
            if not changed and len(snapshot) == len(group) and len(group["params"]) == params:
                return
            if (all(k in _SCHEDULED for k in changed) and len(snapshot) == len(group)
                    and len(group["params"]) == params):
                for key in changed:
                    _plain_number_(group, key)
                    _SCHEDULED[key](group)
                    snapshot[key] = group[key]
                return
        for key, default in {**_DEFAULTS, **getattr(self, "_other_rule_options", {})}.items():
            if key not in group:
                group[key] = default if key != "base" else self.defaults.get("base", default)
        _plain_numbers_(group)
        _validate_group(group, _phi_dtypes(group))
        live = {id(g) for g in self.param_groups}
        for key in [k for k in checked if k not in live]:
            del checked[key]  # groups replaced by load_state_dict
        checked[id(group)] = (group, dict(group), len(group["params"]))

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        phis: list[Tensor],
        rhos: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        momentum_buffers: list[Tensor | None],
        state_steps: list[Tensor],
    ) -> bool:
        """Fill the lists with the group's parameters that have a gradient and their state,
        creating state lazily; return whether any parameter is complex.

        The signature is torch's convention (group, then the lists to fill), which
        ``torch.compile`` relies on: dynamo runs ``_init_group`` eagerly instead of tracing it,
        so ``step`` compiles to one graph.
        """
        self._check_group(group)
        has_complex = False
        base, fused, pathway = group["base"], group["fused"], group["pathway"]
        softplus = group["positivity"] == "softplus"
        amsgrad = base != "sgd" and group["amsgrad"]
        # Every check of the group before any of its state is created (step() runs this for
        # every group before it steps any).
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse and (base != "sgd" or fused or p.is_complex()):
                # torch's SGD takes sparse gradients (nn.Embedding(sparse=True)); Adam does not.
                raise RuntimeError(
                    "KintsugiOptimizer supports sparse gradients with base='sgd' only, on a real "
                    f"parameter and without fused (got base={base!r}, fused={fused!r})")
            if p.grad.is_sparse and group["weight_decay"] != 0:
                raise RuntimeError("sparse gradients do not take weight_decay (torch's SGD cannot "
                                   f"add a dense decay to them either); got {group['weight_decay']!r}")
            phi = self.state[p].get("phi") if p in self.state else None
            if phi is None:
                if fused:
                    _device_dtype_check_for_fused(p)
            elif phi.shape != phi_shape(p, pathway):
                raise ValueError(
                    f"Invalid pathway: {pathway!r} for a parameter of shape {tuple(p.shape)} "
                    f"whose ϕ has shape {tuple(phi.shape)} from an earlier pathway; ϕ cannot "
                    "change pathway mid-training")
        for p in group["params"]:
            if p.grad is None:
                continue
            has_complex |= p.is_complex()
            state = self.state[p]
            phi = state.get("phi")
            if phi is None:  # lazy state initialization, as torch's optimizers do
                phi = state["phi"] = new_phi(p, pathway, group["phi_init"])
            if softplus:
                # ρ is a function of ϕ (docs/maths.md §2.2): derived afresh, so a ϕ changed from outside
                # (a switch of positivity, an edit) is never overwritten from a stale ρ.
                state["rho"] = softplus_inverse(phi)
                rhos.append(state["rho"])
            params.append(p)
            grads.append(p.grad)
            phis.append(phi)
            if base == "sgd":
                # torch's SGD: no momentum, no buffer (the functional step is given Nones).
                momentum_buffers.append(state.get("momentum_buffer") if group["momentum"] else None)
                continue
            if "step" not in state:
                # torch keeps `step` on the CPU unless capturable/fused (kernel launches are costly).
                state["step"] = (
                    torch.zeros((), dtype=_get_scalar_dtype(is_fused=fused), device=p.device)
                    if group["capturable"] or fused
                    else torch.tensor(0.0, dtype=_get_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if amsgrad and "max_exp_avg_sq" not in state:
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if amsgrad:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        return has_complex

    def _gilding_is_idle(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                         phis: list[Tensor]) -> bool:
        """Whether this step of ``group`` is the base rule's alone: β = 0 and every ϕ still 1.

        Then gilding leaves ϕ ≡ 1 as it is and ϕ·d = d, so :meth:`step` hands the step to
        torch's own functional optimizer, at torch's cost. Whether a ϕ is all ones is checked
        once and remembered with its version counter, which every in-place change of ϕ bumps;
        a ϕ replaced (``load_state_dict``, by hand) is a new tensor, checked afresh.
        """
        beta = group["beta"]
        if (not _BETA_ZERO_SHORTCUT or isinstance(beta, Tensor) or beta != 0 or not phis
                or torch.compiler.is_compiling()):
            return False
        if group["fused"] and not all(_dense(t) for t in params + grads):
            return False  # torch's fused kernels step a strided or expanded tensor wrongly
        known = self.__dict__.setdefault("_phi_is_one", WeakIdKeyDictionary())
        for phi in phis:
            if type(phi) is not Tensor:  # a DTensor's check would be a collective
                return False
            seen = known.get(phi)
            if seen is None or seen[0] != phi._version:
                seen = known[phi] = (phi._version, bool((phi == 1).all()))
            if not seen[1]:
                return False
        return True

    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one Sculptor step (θ descent and ϕ gilding together).

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        _graph_capture_health_check(self)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        # Every group's checks and lazy state first, then every group's step: an error in a
        # later group (a bad value, a ϕ that cannot change pathway) leaves the earlier ones
        # unstepped, so a retry after fixing it steps each group once.
        prepared = []
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            phis: list[Tensor] = []
            rhos: list[Tensor] = []
            exp_avgs: list[Tensor] = []
            exp_avg_sqs: list[Tensor] = []
            max_exp_avg_sqs: list[Tensor] = []
            momentum_buffers: list[Tensor | None] = []
            state_steps: list[Tensor] = []
            has_complex = self._init_group(
                group, params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                momentum_buffers, state_steps,
            )
            prepared.append((group, has_complex, params, grads, phis, rhos, exp_avgs,
                             exp_avg_sqs, max_exp_avg_sqs, momentum_buffers, state_steps))
        for (group, has_complex, params, grads, phis, rhos, exp_avgs, exp_avg_sqs,
             max_exp_avg_sqs, momentum_buffers, state_steps) in prepared:
            beta1, beta2 = group["betas"]
            foreach, fused = group["foreach"], group["fused"]
            if isinstance(beta1, Tensor) or isinstance(beta2, Tensor):
                if fused:  # the fused kernels take the betas as numbers
                    beta1, beta2 = float(beta1), float(beta2)
                elif foreach is None and not group["capturable"]:
                    foreach = False  # torch's foreach Adam takes tensor betas only capturable
            if any(g.is_sparse for g in grads):
                foreach = False  # the foreach ops take no sparse tensors; torch's SGD neither
            if self._gilding_is_idle(group, params, grads, phis):
                torch_step(
                    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers,
                    state_steps, base=group["base"], foreach=foreach,
                    fused=fused, grad_scale=getattr(self, "grad_scale", None),
                    found_inf=getattr(self, "found_inf", None), has_complex=has_complex,
                    lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                    amsgrad=group["amsgrad"], momentum=group["momentum"],
                    dampening=group["dampening"], nesterov=group["nesterov"],
                    weight_decay=group["weight_decay"], maximize=group["maximize"],
                    capturable=group["capturable"], differentiable=group["differentiable"],
                )
                if group["base"] == "sgd" and group["momentum"] != 0:
                    for p, buf in zip(params, momentum_buffers):
                        self.state[p]["momentum_buffer"] = buf
                continue
            sculpt(
                params,
                grads,
                phis,
                rhos if group["positivity"] == "softplus" else None,
                exp_avgs,
                exp_avg_sqs,
                max_exp_avg_sqs,
                momentum_buffers,
                state_steps,
                foreach=foreach,
                fused=fused,
                grad_scale=getattr(self, "grad_scale", None),
                found_inf=getattr(self, "found_inf", None),
                base=group["base"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                amsgrad=group["amsgrad"],
                momentum=group["momentum"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                capturable=group["capturable"],
                differentiable=group["differentiable"],
                pathway=group["pathway"],
                fracture=group["fracture"],
                beta=group["beta"],
                gamma=group["gamma"],
                l1=group["l1"],
                phi_min=group["phi_min"],
                phi_max=group["phi_max"],
                phi_norm=group["phi_norm"],
                ascent=group["ascent"],
                positivity=group["positivity"],
            )
            if group["base"] == "sgd" and group["momentum"] != 0:
                for p, buf in zip(params, momentum_buffers):
                    self.state[p]["momentum_buffer"] = buf
        return loss

    def gilding(self) -> dict[Any, dict[Any, Tensor]]:
        """Every ϕ: ``{group key: {param key: phi}}``.

        The group key is the group's ``name`` entry when it has one, else its index; the param
        key is the parameter's name when params were given as ``(name, tensor)`` pairs, else its
        index in the group. Parameters that have not stepped yet have no ϕ and are left out.
        The tensors are the live state (no copies).
        """
        out: dict[Any, dict[Any, Tensor]] = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or range(len(group["params"]))
            out[group.get("name", g)] = {
                name: self.state[p]["phi"]
                for name, p in zip(names, group["params"])
                if "phi" in self.state.get(p, {})
            }
        return out

    @_disable_dynamo
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, plus, all checked before anything
        changes:

        * a group key the checkpoint lacks keeps this optimizer's value, so a checkpoint of
          ``torch.optim.Adam``/``AdamW``/``SGD`` resumes with the constructor's base rule and
          gilding options (torch's keys, ``lr``, ``betas``, ``weight_decay``…, are loaded);
        * every loaded group is validated like a constructor argument (ValueError);
        * a ϕ whose shape does not fit its group's pathway, or with an entry that is NaN, inf or
          ≤ 0, raises a ValueError naming the parameter;
        * ϕ (and ρ) keep their dtype (float32 for bf16/fp16 parameters, where torch would cast
          them to the parameter's dtype), and a ``step`` saved as a plain number becomes a tensor.
        """
        kept: dict[Tensor, dict[str, Tensor]] = {}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):
            state_dict = dict(state_dict)
            state_dict["param_groups"] = saved_groups = [
                {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, **saved}
                for saved, group in zip(saved_groups, self.param_groups)
            ]
            for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                candidate = dict(saved)
                _plain_numbers_(candidate)
                _validate_group(candidate, _phi_dtypes(group))
                pathway = saved["pathway"]
                names = group.get("param_names") or [
                    f"param_groups[{g}]['params'][{i}]" for i in range(len(group["params"]))
                ]
                for pid, p, name in zip(saved["params"], group["params"], names):
                    saved_state = state_dict["state"].get(pid, {})
                    phi = saved_state.get("phi")
                    if phi is None:
                        continue
                    expected = phi_shape(p, pathway)
                    if tuple(phi.shape) != tuple(expected):
                        raise ValueError(
                            f"Invalid phi for parameter {name!r}: shape {tuple(phi.shape)} does not "
                            f"fit pathway={pathway!r}, which needs {tuple(expected)}"
                        )
                    require_valid_phi(f"phi for parameter {name!r}", phi)
                    kept[p] = {k: saved_state[k] for k in ("phi", "rho") if k in saved_state}
        super().load_state_dict(state_dict)
        for p, tensors in kept.items():
            for key, value in tensors.items():
                self.state[p][key] = value.to(device=p.device, dtype=phi_dtype(p), copy=True)


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory once in some order (contiguous in a permuted layout)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _resolved_weight_decay(group: dict[str, Any]) -> float:
    if group.get("weight_decay") is None:
        return 1e-2 if group.get("base") == "adamw" else 0.0
    return group["weight_decay"]


Sculptor = KintsugiOptimizer

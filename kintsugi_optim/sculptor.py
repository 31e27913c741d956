"""The Sculptor: :class:`KintsugiOptimizer`, a ``torch.optim.Optimizer`` whose SGD/Adam/AdamW step
is scaled per pathway by a gilding weight ϕ that rises with that pathway's error (docs/maths.md §2.3, §3.1).
"""

from __future__ import annotations

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
from kintsugi_optim._groups import (  # noqa: F401 - _DEFAULTS: its older import path
    _DEFAULTS,
    _MISSING,
    _SCHEDULED,
    _CheckedGroup,
    _phi_dtypes,
    _plain_number_,
    _plain_numbers_,
    _ReadyGroup,
    _resolved_weight_decay,
    _rule_options,
    _default_beta,
    _validate_group,
)
from kintsugi_optim._kernels import StepLists
from kintsugi_optim._validation import require_valid_phi
from kintsugi_optim.functional import resolve_impl, sculpt_group, torch_step
from kintsugi_optim.gilding import softplus_inverse
from kintsugi_optim.pathways import new_phi, phi_dtype, phi_shape
from kintsugi_optim.rules import RULES

__all__ = ["KintsugiOptimizer", "Sculptor"]

# With β = 0 and ϕ ≡ 1 a step is torch's own (KintsugiOptimizer._gilding_is_idle). Tests of
# the gilding maths at β = 0 turn this off, to step through the Sculptor's own paths.
_BETA_ZERO_SHORTCUT = True


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
        lr (float or 0-d Tensor): learning rate α (default: <<lr>>).
        base (str): a rule of ``kintsugi_optim.rules.RULES``: "sgd", "adam" or "adamw"
            (default: <<base>>).
        betas, eps, amsgrad: as ``torch.optim.Adam`` (defaults <<betas>>, <<eps>>, <<amsgrad>>).
        momentum, dampening, nesterov: as ``torch.optim.SGD`` (defaults <<momentum>>,
            <<dampening>>, <<nesterov>>).
        weight_decay (float): coupled (L2 in g) for sgd/adam, decoupled for adamw
            (default: the rule's, 0 or 1e-2 for adamw). AdamW's ``θ *= 1 − lr·wd`` is not
            scaled by ϕ.
        beta (float): gilding rate β ≥ 0 (default: the rule's, ``Rule.gilding_rate``: 0 for
            plain SGD, ``base="sgd"`` with ``momentum=0``, <<beta>> otherwise; each param group
            without a ``beta`` of its own gets its rule's). gamma (float): damping γ ≥ 0
            (<<gamma>>: ϕ stops rising near 1/γ). l1 (float): tempering λ ≥ 0 (<<l1>>).
        phi_init, phi_min, phi_max: ϕ's start and bounds (<<phi_init>>, <<phi_min>>,
            <<phi_max>>; ``phi_max=None``: no cap); 0 < phi_min ≤ phi_init ≤ phi_max. With
            l1 = 0 gilding never lowers a ϕ before the normalisation, so mean ϕ' ≥ 1 there, and
            phi_min / phi_max ≤ ϕ ≤ phi_max at every step: each step lies between phi_min /
            phi_max and phi_max times the base rule's.
        pathway (str): "row" (one ϕ per ``θ[i]``: a neuron or output channel), "element" (ϕ
            shaped like θ) or "tensor" (one ϕ per tensor, normalised across the group)
            (default: <<pathway>>).
        fracture (str): "relative" (scale-free) or "abs" (the source's literal rule)
            (default: <<fracture>>).
        phi_norm (str or None): "mean" keeps the mean ϕ of each scope at 1 (default:
            <<phi_norm>>).
        ascent (str): "additive" or "multiplicative" (exponentiated gradient) (default:
            <<ascent>>).
        positivity (str): "clamp" or "softplus" (ϕ = softplus(ρ), ρ the resilience score,
            stored in the state as ``rho``) (default: <<positivity>>).
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
        lr: float | Tensor = _DEFAULTS["lr"],
        *,
        base: str = _DEFAULTS["base"],
        betas: tuple[float, float] = _DEFAULTS["betas"],
        eps: float = _DEFAULTS["eps"],
        amsgrad: bool = _DEFAULTS["amsgrad"],
        momentum: float = _DEFAULTS["momentum"],
        dampening: float = _DEFAULTS["dampening"],
        nesterov: bool = _DEFAULTS["nesterov"],
        weight_decay: float | None = _DEFAULTS["weight_decay"],
        beta: float | None = None,
        gamma: float = _DEFAULTS["gamma"],
        l1: float = _DEFAULTS["l1"],
        phi_init: float = _DEFAULTS["phi_init"],
        phi_min: float = _DEFAULTS["phi_min"],
        phi_max: float | None = _DEFAULTS["phi_max"],
        pathway: str = _DEFAULTS["pathway"],
        fracture: str = _DEFAULTS["fracture"],
        phi_norm: str | None = _DEFAULTS["phi_norm"],
        ascent: str = _DEFAULTS["ascent"],
        positivity: str = _DEFAULTS["positivity"],
        maximize: bool = _DEFAULTS["maximize"],
        foreach: bool | None = _DEFAULTS["foreach"],
        fused: bool | None = _DEFAULTS["fused"],
        capturable: bool = _DEFAULTS["capturable"],
        differentiable: bool = _DEFAULTS["differentiable"],
    ) -> None:
        # betas=0.9 must fail by name here, not as tuple()'s TypeError below (the tensor rules
        # are checked with the group in add_param_group)
        RULES["adam"].checks["betas"]({"betas": betas, "foreach": False, "capturable": False,
                                       "base": base})
        # No β given: each param group's rule decides (add_param_group), the constructor's here.
        self._beta_by_rule = beta is None
        if beta is None:
            beta = _default_beta({"base": base, "momentum": momentum})
        defaults = dict(
            lr=lr, base=base, betas=tuple(betas), eps=eps, amsgrad=amsgrad, momentum=momentum,
            dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, beta=beta,
            gamma=gamma, l1=l1, phi_init=phi_init, phi_min=phi_min, phi_max=phi_max,
            pathway=pathway, fracture=fracture, phi_norm=phi_norm, ascent=ascent,
            positivity=positivity, maximize=maximize, foreach=foreach, fused=fused,
            capturable=capturable, differentiable=differentiable,
        )
        # (An unknown base keeps every option here; add_param_group reports it.)
        own = _rule_options(base) if base in RULES else tuple(defaults)
        others = {k for rule in RULES.values() for k in rule.options if k not in own}
        self._other_rule_options = {k: defaults.pop(k) for k in sorted(others)}
        super().__init__(params, defaults)
        if fused:
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # Validate the group as it will be, before the optimizer holds it: a bad value never
        # leaves a half-added group behind.
        other_rule_options = getattr(self, "_other_rule_options", {})
        candidate = {**other_rule_options, **self.defaults, **param_group}
        # A constructor given no β leaves it to each group's rule (None: the rule's default).
        by_rule = getattr(self, "_beta_by_rule", False) and "beta" not in param_group
        if by_rule:
            candidate["beta"] = None
        _plain_numbers_(candidate)
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

    def _check_group(self, group: dict[str, Any]) -> _CheckedGroup:
        """Validate ``group`` if any of its values changed since it was last validated (an edit
        of ``param_groups``, a scheduler, a loaded checkpoint), so a bad value raises a
        ValueError before any state changes instead of silently running something else; and
        return its record, with the step's :class:`SculptOptions` built once for those values.

        Values are compared by identity: a step with nothing changed costs one pass over the
        group's keys; a scheduler's new ``lr`` re-checks only ``lr``.
        """
        checked = self.__dict__.setdefault("_checked_groups", {})
        seen = checked.get(id(group))
        if seen is not None and seen.group is group:
            if seen.unchanged(group):
                return seen
            snapshot = seen.snapshot
            if len(snapshot) == len(group) and len(group["params"]) == seen.n_params:
                changed = [k for k, v in group.items() if snapshot.get(k, _MISSING) is not v]
                if all(k in _SCHEDULED for k in changed):
                    for key in changed:
                        _plain_number_(group, key)
                        _SCHEDULED[key](group)
                        snapshot[key] = group[key]
                    seen.build()
                    return seen
        for key, default in {**_DEFAULTS, **getattr(self, "_other_rule_options", {})}.items():
            if key not in group:
                group[key] = default if key != "base" else self.defaults.get("base", default)
        _plain_numbers_(group)
        _validate_group(group, _phi_dtypes(group))
        live = {id(g) for g in self.param_groups}
        for key in [k for k in checked if k not in live]:
            del checked[key]  # groups replaced by load_state_dict
        record = checked[id(group)] = _CheckedGroup(group)
        return record

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
        creating state lazily (the rule's row says how); return whether any parameter is
        complex.

        The signature is torch's convention (group, then the lists to fill), which
        ``torch.compile`` relies on: dynamo runs ``_init_group`` eagerly instead of tracing it,
        so ``step`` compiles to one graph.
        """
        record = self._check_group(group)
        ready = record.ready
        if ready is not None:
            ready_grads = ready.grads(self.state, group["params"])
            if ready_grads is not None:
                record.fast = True
                params.extend(ready.params)
                grads.extend(ready_grads)
                for collected, cached in zip(
                        (phis, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers,
                         state_steps), ready.lists):
                    collected.extend(cached)
                return ready.has_complex
        record.fast = False
        has_complex = False
        base, fused, pathway = group["base"], group["fused"], group["pathway"]
        rule = RULES[base]
        softplus = group["positivity"] == "softplus"
        # Every check of the group before any of its state is created (step() runs this for
        # every group before it steps any).
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse and (not rule.sparse_grads or fused or p.is_complex()):
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
        lists = StepLists(params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                          momentum_buffers, state_steps)
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
            rule.gather(state, p, group, lists, bool(fused))
        # Reusable next step when every parameter stepped with a dense gradient; ρ is derived
        # afresh each step (softplus), so those groups always take the path above.
        record.ready = None
        if (len(params) == len(group["params"]) and not softplus
                and not any(g.is_sparse for g in grads)):
            record.ready = _ReadyGroup(
                self.state, list(params), [self.state[p] for p in params],
                [list(t) for t in (phis, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                   momentum_buffers, state_steps)], has_complex)
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
        # The lists of a group that reused last step's (the same ϕ tensors): one comparison
        # of their version counters answers for all of them.
        record = self._checked_groups[id(group)]
        ready = record.ready if record.fast else None
        versions = [phi._version for phi in phis] if ready is not None else None
        if ready is not None and ready.idle is not None and ready.idle[0] == versions:
            return ready.idle[1]
        idle = self._phis_are_one(phis)
        if ready is not None:
            ready.idle = (versions, idle)
        return idle

    def _phis_are_one(self, phis: list[Tensor]) -> bool:
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
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for (group, has_complex, params, grads, phis, rhos, exp_avgs, exp_avg_sqs,
             max_exp_avg_sqs, momentum_buffers, state_steps) in prepared:
            record = self._checked_groups[id(group)]
            options, foreach, fused = record.options, record.foreach, record.fused
            if any(g.is_sparse for g in grads):
                foreach = False  # the foreach ops take no sparse tensors; torch's SGD neither
            lists = StepLists(params, grads, phis, rhos if options.gilding.softplus else None,
                              exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers,
                              state_steps)
            if self._gilding_is_idle(group, params, grads, phis):
                torch_step(lists, options, foreach=foreach, fused=fused, grad_scale=grad_scale,
                           found_inf=found_inf, has_complex=has_complex)
            else:
                if foreach is None and fused is None:
                    # The default implementation, chosen once while the group's lists hold.
                    ready = record.ready if record.fast else None
                    if ready is not None and ready.impl is not None:
                        foreach, fused = ready.impl
                    else:
                        foreach, fused = resolve_impl(params, options, foreach, fused)
                        if ready is not None:
                            ready.impl = (foreach, fused)
                sculpt_group(lists, options, foreach=foreach, fused=fused,
                             grad_scale=grad_scale, found_inf=found_inf)
            store = RULES[options.base].store
            if store is not None:
                store(self.state.__getitem__, lists, options)
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




def _document_defaults(doc: str) -> str:
    """The class docstring with each ``<<option>>`` replaced by its default."""
    for key, value in _DEFAULTS.items():
        doc = doc.replace(f"<<{key}>>", repr(value))
    return doc


KintsugiOptimizer.__doc__ = _document_defaults(KintsugiOptimizer.__doc__ or "")

Sculptor = KintsugiOptimizer

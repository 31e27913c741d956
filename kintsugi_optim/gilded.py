"""Gilding over any optimizer: :class:`Gilded` scales another ``torch.optim.Optimizer``'s step by
the parameter-level gilding weight ϕ (docs/maths.md §2.7).

:class:`~kintsugi_optim.KintsugiOptimizer` stays the fast path for SGD/Adam/AdamW (one fused
pass, no copy of θ); ``Gilded`` reaches every other rule (Adagrad, RMSprop, RAdam, NAdam, Adamax,
Adadelta, ASGD, Rprop, Adafactor, third-party ones) at the cost of one copy of θ per step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from kintsugi_optim._compat import _default_to_fused_or_foreach
from kintsugi_optim._kernels import host
from kintsugi_optim._validation import require, validate_parameter_gilding
from kintsugi_optim.fracture import fracture
from kintsugi_optim.gilding import gild_pathways, softplus_inverse
from kintsugi_optim.options import PARAMETER_GILDING_DEFAULTS as _DEFAULTS
from kintsugi_optim.options import GildingOptions
from kintsugi_optim.pathways import _broadcast, new_phi, phi_dtype, phi_shape

__all__ = ["Gilded"]



def _validate_group(group: dict[str, Any]) -> None:
    validate_parameter_gilding(group)
    # The rescale and the gilding run outside autograd: a differentiable step would be cut.
    require(not group.get("differentiable", False), "differentiable", True,
            "Gilded does not support a differentiable base optimizer")


class Gilded(Optimizer):
    r"""Gilding over any optimizer: the base's own step, scaled per pathway by ϕ.

    Each step, per parameter θ with a gradient g, in a group with ``beta > 0``:

    1. fracture signal l = |g| reduced to the pathway, relative to its scope's mean when
       ``fracture="relative"`` (docs/maths.md §2.1), taken before the base step;
    2. the base optimizer steps: θ₀ → θ_base;
    3. θ ← θ₀ + ϕ·(θ_base − θ₀) = ``torch.lerp(θ₀, θ_base, ϕ)``, with ϕ from before this
       step; ϕ = 1 gives θ_base exactly;
    4. ϕ ← gild(ϕ, l) (docs/maths.md §2.2); the tensor pathway's scope is the param group.

    ``Gilded`` shares the base's ``param_groups`` and ``state`` (``gilded.param_groups is
    base.param_groups``), so LR schedulers, gradient clipping, ``zero_grad``, ``GradScaler`` and
    hooks work on it as on the base. ϕ is ``state[p]["phi"]`` (and ``"rho"`` with softplus),
    added after the base's first step of that parameter, so the base's lazy state
    initialisation is untouched; ``state_dict``/``load_state_dict`` round-trip it, and a resumed
    run continues bitwise.

    A group with ``beta=0`` whose parameters have no ϕ yet is the base optimizer, bitwise: no
    copy, no rescale. A ϕ that exists keeps scaling the step when β is set to 0 later (it is
    then frozen, as in the Sculptor).

    Args:
        base_optimizer: any ``torch.optim.Optimizer`` whose step evaluates the closure at most
            once (not LBFGS). Its defaults must not already use a gilding option's name.
        beta, gamma, l1, phi_init, phi_min, phi_max, pathway, fracture, phi_norm, ascent,
            positivity: the gilding options, with the Sculptor's meanings and defaults (one ϕ
            per row, β = 0.01, γ = 0.8, ϕ in [0.8, 1.25] before the mean normalisation, so
            every step lies within 0.64–1.25× the base's; see :class:`KintsugiOptimizer`).

    Every gilding option may be set per param group, in the dicts given to the base optimizer
    or to :meth:`add_param_group`. The gilding uses the ``torch._foreach_*`` implementation
    where the base's group asks for ``foreach`` or ``fused`` (or leaves it unset on a device
    where torch defaults to foreach), else the single-tensor one (the same values to rounding);
    the rescale gives the same bits either way. Memory: a copy of θ and the fracture live
    during the step, beside the base's own state.

    Example:
        >>> opt = Gilded(torch.optim.Adagrad(model.parameters(), lr=0.01), beta=0.01)
        >>> loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(
        self,
        base_optimizer: Optimizer,
        *,
        beta: float = _DEFAULTS["beta"],
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
    ) -> None:
        base_name = type(base_optimizer).__name__
        require(isinstance(base_optimizer, Optimizer), "base_optimizer", base_name,
                "must be a torch.optim.Optimizer")
        require(not isinstance(base_optimizer, torch.optim.LBFGS), "base_optimizer", base_name,
                "LBFGS evaluates the closure many times within one step")
        gilding = dict(
            beta=beta, gamma=gamma, l1=l1, phi_init=phi_init, phi_min=phi_min, phi_max=phi_max,
            pathway=pathway, fracture=fracture, phi_norm=phi_norm, ascent=ascent,
            positivity=positivity,
        )
        clash = sorted(set(gilding) & set(base_optimizer.defaults))
        require(not clash, "base_optimizer", base_name,
                f"its options {clash} have the names of gilding options")
        for group in base_optimizer.param_groups:  # every check before anything changes
            _validate_group({**gilding, **group})
        # torch's own back-fill of a bare optimizer (hook dicts, the step's profiling wrapper):
        # the state and groups are the base's, so Optimizer.__init__ would build the wrong ones.
        super().__setstate__({
            "base_optimizer": base_optimizer,
            "defaults": {**base_optimizer.defaults, **gilding},
            "_gilding_defaults": gilding,
        })
        self._fill_gilding_defaults()

    # The base's groups and state, read through so that whatever replaces them (the base's
    # load_state_dict builds new ones) is seen here too.
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base_optimizer.state = value

    def _fill_gilding_defaults(self) -> None:
        for group in self.param_groups:
            for key, value in self._gilding_defaults.items():
                group.setdefault(key, value)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "base_optimizer": self.base_optimizer,
            "defaults": self.defaults,
            "_gilding_defaults": self._gilding_defaults,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fill_gilding_defaults()

    def __repr__(self) -> str:
        base = type(self.base_optimizer).__name__
        return super().__repr__().replace("Gilded (", f"Gilded({base}) (", 1)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer, with the gilding defaults for the keys it lacks."""
        _validate_group({**self._gilding_defaults, **param_group})
        self.base_optimizer.add_param_group(param_group)
        self._fill_gilding_defaults()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The base's step, scaled per pathway by ϕ, then ϕ gilded.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss. It is
                called once, before the base steps (the base is stepped without it).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Everything that can fail is checked before the base steps: a refused step changes nothing.
        plans = [self._prepare(group) for group in self.param_groups]
        self.base_optimizer.step()
        for group, entries in plans:
            if entries:
                self._finish(group, entries)
        return loss

    def _finish(self, group: dict[str, Any], entries: list[tuple]) -> None:
        """Rescale and gild, a cache-sized run of parameters at a time on the CPU (as the
        Sculptor steps, see ``_kernels.host._runs``): each pass after a run's first finds its
        tensors in cache, and the temporaries stay small. The tensor pathway gilds its group at the end."""
        foreach = self._foreach(group, [p for p, _, _ in entries])
        gilding = group["beta"] != 0
        whole_group = group["pathway"] == "tensor"
        scope: tuple[list, list, list] = ([], [], [])
        for run in host._runs([p for p, _, _ in entries]):
            self._rescale(group, entries[run], foreach)
            if not gilding:
                continue
            phis, fractures, rhos = self._gilding_lists(group, entries[run])
            if whole_group:
                for collected, tensors in zip(scope, (phis, fractures, rhos)):
                    collected.extend(tensors)
            else:
                self._gild(group, phis, fractures, rhos, foreach)
        if gilding and whole_group:
            self._gild(group, *scope, foreach)

    def _prepare(self, group: dict[str, Any]) -> tuple[dict[str, Any], list[tuple]]:
        """(param, θ₀ copy or None, fracture or None) for each parameter the step gilds."""
        gilding = group["beta"] != 0
        pathway, phi_init = group["pathway"], group["phi_init"]
        entries = []
        for p in group["params"]:
            if p.grad is None:
                continue
            phi = self.state.get(p, {}).get("phi")  # .get: the base's defaultdict stays as it is
            if phi is None and not gilding:
                continue  # β = 0 and no ϕ: the base, bitwise
            if p.grad.is_sparse:
                raise RuntimeError("Gilded does not support sparse gradients with beta > 0")
            if phi is not None and phi.shape != phi_shape(p, pathway):
                raise ValueError(
                    f"Invalid pathway: {pathway!r} for a parameter of shape {tuple(p.shape)} "
                    f"whose ϕ has shape {tuple(phi.shape)} from an earlier pathway")
            # A first step at phi_init = 1 is the base's step itself: no copy needed.
            theta0 = None if phi is None and phi_init == 1 else p.detach().clone()
            l = fracture(p.grad, pathway, phi_dtype(p)) if gilding else None
            entries.append((p, theta0, l))
        return group, entries

    def _rescale(self, group: dict[str, Any], entries: list[tuple], foreach: bool) -> None:
        """θ ← θ₀ + ϕ·(θ_base − θ₀), using each θ₀ copy as scratch."""
        params, theta0s, scales = [], [], []
        for p, theta0, _ in entries:
            if theta0 is None:
                continue
            real = torch.view_as_real(p) if p.is_complex() else p
            theta0 = torch.view_as_real(theta0) if theta0.is_complex() else theta0
            phi = self.state[p].get("phi")
            if phi is None:  # the first step of a parameter: ϕ = phi_init everywhere
                real.add_(theta0.sub_(real), alpha=1 - group["phi_init"])
                continue
            params.append(real)
            theta0s.append(theta0)
            scales.append(_broadcast(phi, real))
        if not params:
            return
        # lerp(θ₀, θ_base, ϕ) is θ₀ + ϕ·(θ_base − θ₀) in one pass, and torch computes it as
        # θ_base − (θ_base − θ₀)·(1 − ϕ) for ϕ ≥ 0.5: ϕ = 1 gives θ_base's bits.
        if foreach and not host._cpu_eager(params):  # one launch per op; on the CPU a loop anyway
            torch._foreach_lerp_(theta0s, params, scales)
            torch._foreach_copy_(params, theta0s)
            return
        for p, theta0, scale in zip(params, theta0s, scales):
            if scale.dtype == p.dtype:
                torch.lerp(theta0, p, scale, out=p)
            else:  # a float32 ϕ of a bf16/fp16 θ: the product in ϕ's precision, rounded once
                p.addcmul_(theta0.sub_(p), scale - 1, value=-1)

    def _gilding_lists(self, group: dict[str, Any], entries: list[tuple]) -> tuple[list, ...]:
        """ϕ (created here, after the base's step: its lazy initialisation is done), fractures
        and, with softplus, ρ derived afresh from ϕ (never stale after an edit of ϕ)."""
        softplus = group["positivity"] == "softplus"
        phis, fractures, rhos = [], [], []
        for p, _, l in entries:
            state = self.state[p]
            if "phi" not in state:
                state["phi"] = new_phi(p, group["pathway"], group["phi_init"])
            if softplus:
                state["rho"] = softplus_inverse(state["phi"])
                rhos.append(state["rho"])
            phis.append(state["phi"])
            fractures.append(l)
        return phis, fractures, rhos

    def _gild(self, group: dict[str, Any], phis: list, fractures: list, rhos: list,
              foreach: bool) -> None:
        gild_pathways(phis, fractures, rhos if group["positivity"] == "softplus" else None,
                      GildingOptions.from_group(group), foreach=foreach)

    @staticmethod
    def _foreach(group: dict[str, Any], params: list[Tensor]) -> bool:
        if group.get("fused") or group.get("foreach"):
            return True
        if group.get("foreach") is None:
            return _default_to_fused_or_foreach(params, False, use_fused=False)[1]
        return False

    def gilding(self) -> dict[Any, dict[Any, Tensor]]:
        """Every ϕ: ``{group key: {param key: phi}}``, keyed like the Sculptor's.

        The group key is the group's ``name`` entry when it has one, else its index; the param
        key is the parameter's name when params were given as ``(name, tensor)`` pairs, else its
        index. Every parameter is listed: its live ϕ once it has one, else a fresh tensor of the
        ϕ its next step will use (``phi_init``, or 1 where ``beta=0``: the base's own step).
        """
        out: dict[Any, dict[Any, Tensor]] = {}
        for g, group in enumerate(self.param_groups):
            names = group.get("param_names") or range(len(group["params"]))
            unset = group["phi_init"] if group["beta"] != 0 else 1.0
            phis = {}
            for name, p in zip(names, group["params"]):
                phi = self.state.get(p, {}).get("phi")
                phis[name] = phi if phi is not None else new_phi(p, group["pathway"], unset)
            out[group.get("name", g)] = phis
        return out

    def state_dict(self) -> dict[str, Any]:
        """The base's ``state_dict()`` (ϕ and ρ are in its per-parameter state and the gilding
        options in its groups), with this optimizer's state-dict hooks run around it."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base_optimizer.state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The base's ``load_state_dict``, plus: ϕ and ρ keep their dtype (float32 for bf16/fp16
        parameters, which torch would cast to the parameter's dtype), and invalid gilding
        options or a ϕ that does not fit its group's pathway raise ValueError before anything
        changes. A state saved from the bare base optimizer loads too (ϕ then starts afresh)."""
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        kept: dict[Tensor, dict[str, Tensor]] = {}
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) == len(self.param_groups):  # else the base refuses it
            for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
                options = {**self._gilding_defaults, **saved}
                _validate_group(options)
                names = group.get("param_names") or [
                    f"param_groups[{g}]['params'][{i}]" for i in range(len(group["params"]))]
                for pid, p, name in zip(saved["params"], group["params"], names):
                    saved_state = state_dict["state"].get(pid, {})
                    phi = saved_state.get("phi")
                    if phi is None:
                        continue
                    expected = phi_shape(p, options["pathway"])
                    if tuple(phi.shape) != tuple(expected):
                        raise ValueError(
                            f"Invalid phi for parameter {name!r}: shape {tuple(phi.shape)} does "
                            f"not fit pathway={options['pathway']!r}, which needs "
                            f"{tuple(expected)}")
                    kept[p] = {k: saved_state[k] for k in ("phi", "rho") if k in saved_state}
        self.base_optimizer.load_state_dict(state_dict)
        self._fill_gilding_defaults()
        for p, tensors in kept.items():
            for key, value in tensors.items():
                self.state[p][key] = value.to(device=p.device, dtype=phi_dtype(p), copy=True)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

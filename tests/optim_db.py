"""The test registry: base rules × gilding configurations × implementations, as data.

Modelled on torch's ``torch/testing/_internal/common_optimizers.py`` (one ``OptimizerInfo``
record drives one shared suite), for :class:`~kintsugi_optim.KintsugiOptimizer`:

* :data:`RULES` — each base rule: the torch optimizer that computes the same step (the β = 0
  reference), the option axes torch takes for it (:meth:`Rule.option_product` crosses them),
  and named configurations (:attr:`Rule.configs`) that exercise it;
* :data:`GILDINGS` — named gilding configurations (β = 0, and β > 0 over each pathway, both
  ascents and positivities, damping, tempering, bounds); :func:`gilding_product` crosses the
  gilding options themselves (docs/maths.md §2.1–2.2);
* :data:`GILDED_BASES` — the torch optimizers (and a third-party-style :class:`Lion`) that
  tests/test_gilded.py wraps in :class:`~kintsugi_optim.Gilded`, each built with options that
  exercise its state;
* :data:`IMPLS` — single-tensor, foreach, fused (the C++ CPU kernel), fused through the CUDA
  path's Triton kernels in Triton's interpreter, and the CUDA rows (skipped without a GPU), each
  with the tolerance it promises against torch at β = 0 (docs/maths.md §2.3) and what it does
  not support.

:func:`cases` crosses them into :class:`Case` records; a test asks for the cases it applies to
with ``@pytest.mark.parametrize("case", cases(...))`` and may filter them (``impls=FUSED``).
What a case does not support is data (:attr:`Impl.unsupported`, :data:`SKIPS`): a test that
needs a feature names it, and cases without it are kept as skips that say why. Adding a rule,
a gilding or a backend is one row here. Shared helpers (parameters, gradients, runs,
comparisons) live in tests/helpers.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch
from torch.optim.optimizer import Optimizer

from kintsugi_optim import KintsugiOptimizer
from helpers import requires_cuda
from triton_interpreter import requires_triton


def _product(axes: dict[str, Iterable[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


def _valid_sgd(options: dict[str, Any]) -> bool:
    """torch.optim.SGD refuses nesterov without momentum or with dampening."""
    return not (options.get("nesterov") and (options.get("momentum", 0) == 0
                                             or options.get("dampening", 0) != 0))


@dataclasses.dataclass(frozen=True)
class Rule:
    """A base rule: the Sculptor's ``base``, the torch optimizer that computes the same step
    with the same options, the registry's options for it (``kwargs``), the axes of options
    torch takes for it, and named configurations other tests pick from."""

    base: str
    torch_cls: type[torch.optim.Optimizer]
    kwargs: dict[str, Any]
    option_axes: dict[str, list[Any]]
    configs: dict[str, dict[str, Any]]
    valid: Callable[[dict[str, Any]], bool] = lambda options: True

    def option_product(self) -> list[dict[str, Any]]:
        """Every combination of :attr:`option_axes` that torch accepts."""
        return [o for o in _product(self.option_axes) if self.valid(o)]


_ADAM_AXES = dict(betas=[(0.9, 0.999), (0.8, 0.95)], eps=[1e-8, 1e-3], amsgrad=[False, True],
                  weight_decay=[0.0, 0.1], maximize=[False, True])

RULES: dict[str, Rule] = {
    "sgd": Rule(
        "sgd", torch.optim.SGD,
        kwargs=dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        option_axes=dict(momentum=[0.0, 0.9], dampening=[0.0, 0.3], nesterov=[False, True],
                         weight_decay=[0.0, 0.1], maximize=[False, True]),
        configs={
            "plain": {},
            "momentum": dict(momentum=0.9),
            "nesterov": dict(momentum=0.9, nesterov=True),
            "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=0.01),
            "dampening-maximize": dict(momentum=0.8, dampening=0.3, maximize=True),
        },
        valid=_valid_sgd),
    "adam": Rule(
        "adam", torch.optim.Adam,
        kwargs=dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True, weight_decay=0.01),
        option_axes=_ADAM_AXES,
        configs={
            "plain": {},
            "amsgrad": dict(amsgrad=True),
            "amsgrad-wd-maximize": dict(amsgrad=True, weight_decay=0.1, maximize=True),
        }),
    "adamw": Rule(
        "adamw", torch.optim.AdamW,
        kwargs=dict(lr=0.01),
        option_axes=_ADAM_AXES,
        configs={"plain": {}, "wd": dict(weight_decay=0.1)}),
}


def rule_configs(*names: str) -> list[Any]:
    """``pytest.param(Sculptor kwargs)`` for the named rule configurations ("sgd-momentum",
    "adamw-plain", ...; all of them, rule by rule, when none are named), with those ids."""
    every = {f"{rule.base}-{name}": dict(base=rule.base, **options)
             for rule in RULES.values() for name, options in rule.configs.items()}
    return [pytest.param(every[name], id=name) for name in (names or every)]


# -- gilding ---------------------------------------------------------------------------------

PATHWAYS = ("element", "row", "tensor")
GILDING_AXES: dict[str, tuple[Any, ...]] = dict(
    pathway=PATHWAYS, fracture=("relative", "abs"), phi_norm=("mean", None),
    ascent=("additive", "multiplicative"), positivity=("clamp", "softplus"),
)


def gilding_product(**more_axes: Iterable[Any]) -> list[dict[str, Any]]:
    """Every valid combination of :data:`GILDING_AXES` (and ``more_axes``, e.g. ``gamma=(0.0,
    0.5)``), in that order; multiplicative ascent with softplus positivity is refused
    (docs/maths.md §2.2)."""
    return [c for c in _product({**GILDING_AXES, **more_axes})
            if not (c["ascent"] == "multiplicative" and c["positivity"] == "softplus")]


def config_id(config: dict[str, Any]) -> str:
    return "-".join(map(str, config.values())) or "defaults"


# Gradient entries that break naive arithmetic: zero, huge, infinite, NaN.
SPECIAL_VALUES = [0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]


@dataclasses.dataclass(frozen=True)
class Gilding:
    """Gilding options; ``beta == 0`` makes the Sculptor its base rule exactly. ``crossed``:
    part of :func:`cases`' default product (the others are asked for by name)."""

    name: str
    kwargs: dict[str, Any]
    crossed: bool = True

    @property
    def is_base_rule(self) -> bool:
        return self.kwargs.get("beta", 0.01) == 0


def _gildings(*rows: Gilding) -> dict[str, Gilding]:
    return {row.name: row for row in rows}


GILDINGS: dict[str, Gilding] = _gildings(
    Gilding("beta0", dict(beta=0.0)),
    Gilding("element", dict(beta=0.05)),
    Gilding("row", dict(beta=0.05, pathway="row", gamma=0.1, l1=0.01)),
    Gilding("tensor", dict(beta=0.05, pathway="tensor", fracture="abs")),
    Gilding("multiplicative", dict(beta=0.05, ascent="multiplicative", phi_norm=None,
                                   phi_max=4.0)),
    Gilding("softplus", dict(beta=0.05, positivity="softplus", pathway="row")),
    # The fused kernels' branches, each named for the part it exercises (tests/test_fused.py).
    Gilding("row-abs", dict(pathway="row", fracture="abs"), crossed=False),
    Gilding("tensor-relative", dict(pathway="tensor"), crossed=False),
    Gilding("tensor-abs-unnormalised", dict(pathway="tensor", fracture="abs", phi_norm=None),
            crossed=False),
    Gilding("abs-unnormalised", dict(fracture="abs", phi_norm=None), crossed=False),
    Gilding("damping-l1", dict(gamma=2.0, l1=0.3), crossed=False),
    Gilding("softplus-element", dict(positivity="softplus"), crossed=False),
    Gilding("softplus-row-unnormalised", dict(positivity="softplus", pathway="row",
                                              phi_norm=None), crossed=False),
    Gilding("softplus-tensor-capped", dict(positivity="softplus", pathway="tensor",
                                           phi_max=1.3), crossed=False),
    Gilding("bounds", dict(phi_min=0.95, phi_max=1.05, beta=1.0), crossed=False),
    Gilding("phi-init", dict(phi_init=2.0), crossed=False),  # mean ϕ 2: the kernels' foresight misses
    Gilding("l1", dict(l1=0.3), crossed=False),  # λ in the foreseen Σϕ'
    Gilding("capped-l1", dict(phi_max=1.05, l1=0.05), crossed=False),
)


# -- Gilded's base optimizers ----------------------------------------------------------------


class Lion(Optimizer):
    """A third-party-style optimizer (Chen et al. 2023): state created when ``len(state) == 0``,
    the lazy initialisation Gilded must not disturb; ``foreach`` is read by Gilded only."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0, foreach=None):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      foreach=foreach))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(exp_avg.lerp(p.grad, 1 - beta1).sign_(), alpha=-group["lr"])
                exp_avg.lerp_(p.grad, 1 - beta2)
        return loss


# name → factory(params, **more options, e.g. foreach): every torch.optim rule whose step is
# one gradient step (LBFGS re-evaluates the closure; SparseAdam takes sparse gradients only),
# with options that exercise its state, and Lion. Adding a base is one row.
GILDED_BASES: dict[str, Callable[..., Optimizer]] = {
    "Adagrad": lambda ps, **kw: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.01, **kw),
    "RMSprop": lambda ps, **kw: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True, **kw),
    "RAdam": lambda ps, **kw: torch.optim.RAdam(ps, lr=0.01, weight_decay=0.01, **kw),
    "NAdam": lambda ps, **kw: torch.optim.NAdam(ps, lr=0.01, **kw),
    "Adamax": lambda ps, **kw: torch.optim.Adamax(ps, lr=0.01, **kw),
    "Adadelta": lambda ps, **kw: torch.optim.Adadelta(ps, lr=1.0, **kw),
    "ASGD": lambda ps, **kw: torch.optim.ASGD(ps, lr=0.01, t0=2, **kw),
    "Rprop": lambda ps, **kw: torch.optim.Rprop(ps, lr=0.01, **kw),
    "SGD": lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, **kw),
    "Adam": lambda ps, **kw: torch.optim.Adam(ps, lr=0.01, amsgrad=True, **kw),
    "AdamW": lambda ps, **kw: torch.optim.AdamW(ps, lr=0.01, **kw),
    "Adafactor": lambda ps, **kw: torch.optim.Adafactor(ps, lr=0.01, **kw),
    "Lion": lambda ps, **kw: Lion(ps, lr=0.01, weight_decay=0.1, **kw),
}


# -- implementations -------------------------------------------------------------------------


def _interpreted_triton(monkeypatch) -> None:
    from triton_interpreter import use_interpreted_cuda_kernels

    use_interpreted_cuda_kernels(monkeypatch)


@dataclasses.dataclass(frozen=True)
class Impl:
    """An implementation: its flags, the device its tensors live on, how closely it follows
    torch at β = 0, the features it does not support (feature name → reason), the marks that
    skip it where it cannot run, and ``setup(monkeypatch)`` run before each test of it.

    ``crossed``: part of :func:`cases`' default product; rows that are slow (an emulated GPU
    kernel) or need parameters on another device are asked for by name."""

    name: str
    kwargs: dict[str, Any]
    rtol: float
    atol: float
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)
    device: str = "cpu"
    marks: tuple[Any, ...] = ()
    setup: Callable[[Any], None] | None = None
    crossed: bool = True


_FUSED_UNSUPPORTED = {
    "complex": "fused=True refuses complex parameters, as torch's fused optimizers do",
    "differentiable": "`fused` does not support `differentiable`",
}
# On CPU tensors the dispatcher reads found_inf and a tensor lr on the host, so the interpreted
# CUDA kernels never see them through the optimizer (test_fused calls them directly instead).
_HOST_READS = "on CPU tensors found_inf and a tensor lr are read on the host, before the kernels"

IMPLS: dict[str, Impl] = {
    "single": Impl("single", dict(foreach=False), rtol=0, atol=0),
    "foreach": Impl("foreach", dict(foreach=True), rtol=1e-6, atol=1e-7, unsupported={
        "tensor_lr_adam": "torch's foreach Adam takes a tensor lr only with capturable=True",
        "differentiable": "_foreach ops do not support autograd",
    }),
    "fused": Impl("fused", dict(fused=True), rtol=1e-6, atol=1e-7,
                  unsupported=_FUSED_UNSUPPORTED),
    "fused-triton-interpreter": Impl(
        "fused-triton-interpreter", dict(fused=True), rtol=1e-6, atol=1e-7,
        unsupported={**_FUSED_UNSUPPORTED, "found_inf": _HOST_READS, "tensor_lr": _HOST_READS},
        marks=(requires_triton,), setup=_interpreted_triton, crossed=False),
    "fused-cuda": Impl("fused-cuda", dict(fused=True), rtol=1e-6, atol=1e-7,
                       unsupported=_FUSED_UNSUPPORTED, device="cuda",
                       marks=(requires_cuda, pytest.mark.cuda), crossed=False),
    # Nothing asked for: the fused kernel on the CPU where it applies, torch's choice elsewhere.
    "default": Impl("default", {}, rtol=1e-6, atol=1e-7, crossed=False),
}
FUSED = tuple(name for name, impl in IMPLS.items() if impl.kwargs.get("fused"))



def impls(*names: str) -> list[Any]:
    """``pytest.param(Impl)`` for the named implementations, with their marks, for a test that
    takes ``impl`` (tests/conftest.py runs its setup) rather than a whole :class:`Case`."""
    return [pytest.param(IMPLS[name], id=name, marks=IMPLS[name].marks) for name in names]


# (rule, impl) → (rtol, atol) where a rule keeps closer to torch than its impl promises.
TOLERANCES: dict[tuple[str, str], tuple[float, float]] = {
    # ϕ·d = d exactly, then torch's own foreach update: its bits
    ("sgd", "foreach"): (0.0, 0.0),
}

# (rule, gilding, impl, feature) → reason; None matches any. For gaps that are not the impl's.
SKIPS: dict[tuple[str | None, str | None, str | None, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the Sculptor: a rule (with ``options`` in place of the rule's own
    when given), a gilding and an implementation."""

    rule: Rule
    gilding: Gilding
    impl: Impl
    options: dict[str, Any] | None = None

    @property
    def id(self) -> str:
        options = "" if self.options is None else "-" + "-".join(
            f"{k}={v}" for k, v in self.options.items())
        return f"{self.rule.base}{options}-{self.gilding.name}-{self.impl.name}"

    @property
    def rule_kwargs(self) -> dict[str, Any]:
        """The rule's options as torch's optimizer takes them."""
        if self.options is None:
            return dict(self.rule.kwargs)
        return {"lr": self.rule.kwargs["lr"], **self.options}

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"base": self.rule.base, **self.rule_kwargs, **self.gilding.kwargs,
                **self.impl.kwargs}

    @property
    def device(self) -> str:
        return self.impl.device

    @property
    def tolerance(self) -> dict[str, float]:
        rtol, atol = TOLERANCES.get((self.rule.base, self.impl.name),
                                    (self.impl.rtol, self.impl.atol))
        return dict(rtol=rtol, atol=atol)

    def make(self, params, **overrides) -> KintsugiOptimizer:
        """The Sculptor of this case over ``params``, with ``overrides`` on top."""
        return KintsugiOptimizer(params, **{**self.kwargs, **overrides})

    def make_torch(self, params, **overrides) -> torch.optim.Optimizer:
        """torch's optimizer for this rule and implementation (the β = 0 reference)."""
        return self.rule.torch_cls(params, **{**self.rule_kwargs, **self.impl.kwargs,
                                              **overrides})

    def assert_close(self, actual, expected) -> None:
        """Equal within what this implementation promises against torch at β = 0."""
        torch.testing.assert_close(actual, expected, **self.tolerance)

    def unsupported(self, feature: str) -> str | None:
        """Why this case does not support ``feature`` (None: it does)."""
        if feature in self.impl.unsupported:
            if feature != "tensor_lr_adam" or self.rule.base != "sgd":
                return self.impl.unsupported[feature]
        for (rule, gilding, impl, skipped), reason in SKIPS.items():
            if skipped == feature and all(
                    want is None or want == have for want, have in
                    ((rule, self.rule.base), (gilding, self.gilding.name), (impl, self.impl.name))):
                return reason
        return None


def _crossed(table: dict[str, Any]) -> tuple[str, ...]:
    return tuple(name for name, row in table.items() if row.crossed)


def cases(
    *,
    rules: Iterable[str] = tuple(RULES),
    gildings: Iterable[str] = _crossed(GILDINGS),
    impls: Iterable[str] = _crossed(IMPLS),
    options: str = "registry",
    cover: str = "product",
    needs: Iterable[str] = (),
    where: Callable[[Case], bool] | None = None,
) -> list[Any]:
    """``pytest.param(Case)`` for each combination, with ids like ``adam-row-fused``.

    ``cover``: "product" crosses rules × gildings × implementations; "each" takes as few cases
    as make each of them appear at least once (the i-th case takes the i-th of each, cycling),
    for tests whose cost forbids the product.
    ``options``: "registry" takes each rule's :attr:`Rule.kwargs`; "product" takes every
    combination of its option axes (:meth:`Rule.option_product`) as separate cases.
    ``needs``: features the test uses; a case that lacks one is kept as a skip that says why,
    so the report shows what is not covered. ``where``: any further filter. Each case carries
    its implementation's marks; tests/conftest.py runs its ``setup`` before the test.
    """
    rules, gildings, impls = tuple(rules), tuple(gildings), tuple(impls)
    if cover == "each":
        n = max(len(rules), len(gildings), len(impls))
        combos = [(rules[i % len(rules)], None, gildings[i % len(gildings)],
                   impls[i % len(impls)]) for i in range(n)]
    else:
        combos = [(rule, rule_options, gilding, impl) for rule in rules
                  for rule_options in ([None] if options == "registry"
                                       else RULES[rule].option_product())
                  for gilding in gildings for impl in impls]
    out = []
    for rule, rule_options, gilding, impl in combos:
        case = Case(RULES[rule], GILDINGS[gilding], IMPLS[impl], rule_options)
        if where is not None and not where(case):
            continue
        reasons = [r for r in map(case.unsupported, needs) if r]
        marks = [*case.impl.marks]
        if reasons:
            marks.append(pytest.mark.skip(reason=reasons[0]))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# Hyperparameters the Sculptor refuses with a ValueError that names the argument and shows the
# value (a pair's bad component), at construction and in add_param_group.
INVALID_VALUES: list[tuple[str, Any]] = [
    ("lr", -1e-3), ("lr", float("nan")), ("beta", -0.1), ("beta", float("inf")), ("gamma", -1.0),
    ("l1", -0.5), ("eps", -1e-8), ("weight_decay", -0.1), ("momentum", -0.9),
    ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("betas", (0.9, 1.5)),
    ("phi_min", 0.0), ("phi_min", -1.0), ("phi_init", 1e-4), ("phi_init", 5.0),
    ("phi_max", 0.5), ("base", "adagrad"), ("pathway", "neuron"), ("fracture", "squared"),
    ("phi_norm", "sum"), ("ascent", "geometric"), ("positivity", "relu"),
]
_ALONGSIDE = {"phi_init": {"phi_max": 2.0}}  # phi_init=5 is out of bounds only below a cap


def _names_value(name: str, value: Any) -> str:
    if name == "betas":
        index = 0 if not 0 <= value[0] < 1 else 1
        name, value = f"betas[{index}]", value[index]
    return rf"Invalid .*{re.escape(name)}.*{re.escape(repr(value))}"


# Error inputs, as torch's optim_error_inputs: (constructor kwargs, error type, message regex).
ERROR_INPUTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    *((dict({name: value}, **_ALONGSIDE.get(name, {})), ValueError, _names_value(name, value))
      for name, value in INVALID_VALUES),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Invalid lr.*one element"),
    (dict(beta=torch.tensor([1.0, 2.0])), ValueError, r"Invalid beta: tensor\(\[1\., 2\.\]\)"),
    (dict(betas=(0.9,)), ValueError, "Invalid betas.*pair"),
    (dict(betas=0.9), ValueError, r"Invalid betas: 0\.9 \(must be a pair"),
    (dict(lr=10**400), ValueError, r"Invalid lr: an int of 401 digits"),
    (dict(lr=torch.tensor(True)), ValueError, r"Invalid lr: tensor\(True\)"),
    (dict(lr="0.1"), ValueError, r"Invalid lr: '0\.1'"),
    (dict(amsgrad="no"), ValueError, r"Invalid amsgrad: 'no'"),
    (dict(base="sgd", nesterov=True), ValueError, "Invalid nesterov: True.*momentum=0"),
    (dict(base="sgd", nesterov=True, momentum=0.9, dampening=0.5), ValueError,
     "Invalid nesterov: True.*dampening=0.5"),
    (dict(ascent="multiplicative", positivity="softplus"), ValueError,
     "Invalid positivity: 'softplus'.*multiplicative"),
    (dict(foreach=True, fused=True), RuntimeError, "`fused` and `foreach` cannot be `True` together"),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support"),
]


def error_id(kwargs: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in kwargs.items())

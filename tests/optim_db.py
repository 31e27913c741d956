"""The test registry: base rules × gilding configurations × implementations, as data.

Modelled on torch's ``torch/testing/_internal/common_optimizers.py`` (one ``OptimizerInfo``
record drives one shared suite), for :class:`~kintsugi_optim.KintsugiOptimizer`:

* :data:`RULES` — each base rule with the options that exercise it and the torch optimizer that
  computes the same step (the β = 0 reference);
* :data:`GILDINGS` — gilding configurations (β = 0, and β > 0 over each pathway, both ascents
  and positivities, damping and tempering);
* :data:`IMPLS` — single-tensor, foreach and fused, each with the tolerance it promises against
  torch (bitwise for single-tensor, ``rtol=1e-6`` for the others) and what it does not support.

:func:`cases` crosses them into :class:`Case` records, and a test asks for the cases it applies
to with ``@pytest.mark.parametrize("case", cases(...))``. What a case does not support is data
(:attr:`Impl.unsupported`, :data:`SKIPS`): a test that needs a feature names it, and cases without
it are left out with the reason, rather than each test writing its own ``if``. New tests should
take their configurations from here instead of adding another table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import torch

from kintsugi_optim import KintsugiOptimizer


@dataclasses.dataclass(frozen=True)
class Rule:
    """A base rule: the Sculptor's ``base`` with options that exercise it, and the torch
    optimizer class that computes the same step with them (``torch_kwargs``)."""

    base: str
    kwargs: dict[str, Any]
    torch_cls: type[torch.optim.Optimizer]
    torch_kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Gilding:
    """Gilding options; ``beta == 0`` makes the Sculptor its base rule exactly."""

    name: str
    kwargs: dict[str, Any]

    @property
    def is_base_rule(self) -> bool:
        return self.kwargs.get("beta", 0.01) == 0


@dataclasses.dataclass(frozen=True)
class Impl:
    """An implementation flag set, how closely it follows torch at β = 0, and the features it
    does not support (feature name → reason)."""

    name: str
    kwargs: dict[str, Any]
    rtol: float
    atol: float
    unsupported: dict[str, str] = dataclasses.field(default_factory=dict)


RULES: dict[str, Rule] = {
    "sgd": Rule("sgd", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
                torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": Rule("adam", dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True, weight_decay=0.01),
                 torch.optim.Adam, dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True,
                                        weight_decay=0.01)),
    "adamw": Rule("adamw", dict(lr=0.01), torch.optim.AdamW, dict(lr=0.01)),
}

GILDINGS: dict[str, Gilding] = {
    "beta0": Gilding("beta0", dict(beta=0.0)),
    "element": Gilding("element", dict(beta=0.05)),
    "row": Gilding("row", dict(beta=0.05, pathway="row", gamma=0.1, l1=0.01)),
    "tensor": Gilding("tensor", dict(beta=0.05, pathway="tensor", fracture="abs")),
    "multiplicative": Gilding("multiplicative", dict(beta=0.05, ascent="multiplicative",
                                                     phi_norm=None, phi_max=4.0)),
    "softplus": Gilding("softplus", dict(beta=0.05, positivity="softplus", pathway="row")),
}

IMPLS: dict[str, Impl] = {
    "single": Impl("single", dict(foreach=False), rtol=0, atol=0),
    "foreach": Impl("foreach", dict(foreach=True), rtol=1e-6, atol=1e-7, unsupported={
        "tensor_lr_adam": "torch's foreach Adam takes a tensor lr only with capturable=True",
        "differentiable": "_foreach ops do not support autograd",
    }),
    "fused": Impl("fused", dict(fused=True), rtol=1e-6, atol=1e-7, unsupported={
        "complex": "fused=True refuses complex parameters, as torch's fused optimizers do",
        "differentiable": "`fused` does not support `differentiable`",
    }),
}

# (rule, gilding, impl, feature) → reason; None matches any. For gaps that are not the impl's.
SKIPS: dict[tuple[str | None, str | None, str | None, str], str] = {}


@dataclasses.dataclass(frozen=True)
class Case:
    """One configuration of the Sculptor: a rule, a gilding and an implementation."""

    rule: Rule
    gilding: Gilding
    impl: Impl

    @property
    def id(self) -> str:
        return f"{self.rule.base}-{self.gilding.name}-{self.impl.name}"

    @property
    def kwargs(self) -> dict[str, Any]:
        return {"base": self.rule.base, **self.rule.kwargs, **self.gilding.kwargs,
                **self.impl.kwargs}

    def make(self, params, **overrides) -> KintsugiOptimizer:
        """The Sculptor of this case over ``params``, with ``overrides`` on top."""
        return KintsugiOptimizer(params, **{**self.kwargs, **overrides})

    def make_torch(self, params, **overrides) -> torch.optim.Optimizer:
        """torch's optimizer for this rule and implementation (the β = 0 reference)."""
        return self.rule.torch_cls(params, **{**self.rule.torch_kwargs, **self.impl.kwargs,
                                              **overrides})

    def assert_close(self, actual, expected) -> None:
        """Equal within what this implementation promises against torch at β = 0."""
        torch.testing.assert_close(actual, expected, rtol=self.impl.rtol, atol=self.impl.atol)

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


def cases(
    *,
    rules: Iterable[str] = tuple(RULES),
    gildings: Iterable[str] = tuple(GILDINGS),
    impls: Iterable[str] = tuple(IMPLS),
    needs: Iterable[str] = (),
    where: Callable[[Case], bool] | None = None,
) -> list[Any]:
    """``pytest.param(Case)`` for each combination, with ids like ``adam-row-fused``.

    ``needs``: features the test uses; a case that lacks one is kept as a skip that says why,
    so the report shows what is not covered. ``where``: any further filter.
    """
    out = []
    for rule in rules:
        for gilding in gildings:
            for impl in impls:
                case = Case(RULES[rule], GILDINGS[gilding], IMPLS[impl])
                if where is not None and not where(case):
                    continue
                reasons = [r for r in map(case.unsupported, needs) if r]
                marks = [pytest.mark.skip(reason=reasons[0])] if reasons else []
                out.append(pytest.param(case, id=case.id, marks=marks))
    return out


# Error inputs, as torch's optim_error_inputs: (constructor kwargs, error type, message regex).
ERROR_INPUTS: list[tuple[dict[str, Any], type[Exception], str]] = [
    (dict(lr=-1e-2), ValueError, r"Invalid lr: -0\.01"),
    (dict(lr=float("nan")), ValueError, "Invalid lr: nan"),
    (dict(lr=torch.tensor([0.1, 0.2])), ValueError, "Invalid lr.*one element"),
    (dict(betas=(1.0, 0.999)), ValueError, r"Invalid betas\[0\]: 1\.0"),
    (dict(betas=(0.9,)), ValueError, "Invalid betas.*pair"),
    (dict(eps=-1.0), ValueError, "Invalid eps: -1.0"),
    (dict(weight_decay=-1.0), ValueError, "Invalid weight_decay: -1.0"),
    (dict(momentum=-0.5), ValueError, "Invalid momentum: -0.5"),
    (dict(base="sgd", nesterov=True), ValueError, "Invalid nesterov"),
    (dict(base="rmsprop"), ValueError, "Invalid base: 'rmsprop'"),
    (dict(beta=-0.1), ValueError, r"Invalid beta: -0\.1"),
    (dict(phi_min=0.0), ValueError, "Invalid phi_min: 0.0"),
    (dict(pathway="neuron"), ValueError, "Invalid pathway: 'neuron'"),
    (dict(foreach=True, fused=True), RuntimeError, "cannot be `True` together"),
    (dict(fused=True, differentiable=True), RuntimeError, "`fused` does not support"),
]

r"""The functional API of Kintsugi optimization (docs/maths.md §2), as ``torch.optim._functional``
is torch's: plain functions over lists of tensors.

* :func:`sculpt` — one step of the *Sculptor* over a param group: the base rule's descent step
  (a row of :mod:`kintsugi_optim.rules`: SGD, Adam or AdamW exactly as ``torch.optim`` computes
  it) scaled per pathway by ϕ, then ϕ gilded with the fracture of the same gradient (§2.3). It
  picks the single-tensor, foreach or fused backend (:mod:`kintsugi_optim._kernels`) as torch
  picks its implementations.
* :func:`fracture`, :func:`gild`, :func:`gild_pathways`, :func:`gilder_step` — the fracture
  signal (§2.1) and the one gilding kernel (§2.2, §2.4), from :mod:`kintsugi_optim.fracture` and
  :mod:`kintsugi_optim.gilding`.
* :func:`phi_shape`, :func:`phi_dtype`, :func:`new_phi` — ϕ and its pathways
  (:mod:`kintsugi_optim.pathways`).

The code lives in those modules; this one keeps every public name importable from one place.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import Tensor

from kintsugi_optim._compat import _default_to_fused_or_foreach, _disable_dynamo
from kintsugi_optim._kernels import StepLists
from kintsugi_optim._kernels.foreach import multi_tensor_sculpt
from kintsugi_optim._kernels.single_tensor import single_tensor_sculpt
from kintsugi_optim.fracture import fracture, relative_fracture_
from kintsugi_optim.gilding import gild, gild_pathways, gilder_step, softplus_inverse
from kintsugi_optim.options import (
    ASCENTS,
    FRACTURES,
    PATHWAYS,
    PHI_NORMS,
    POSITIVITIES,
    GildingOptions,
    SculptOptions,
)
from kintsugi_optim.pathways import new_phi, phi_dtype, phi_shape
from kintsugi_optim.rules import BASES, RULES

__all__ = [
    "ASCENTS", "BASES", "FRACTURES", "PATHWAYS", "PHI_NORMS", "POSITIVITIES",
    "GildingOptions", "SculptOptions", "StepLists", "fracture", "gild", "gild_pathways",
    "gilder_step", "new_phi", "phi_dtype", "phi_shape", "relative_fracture_", "resolve_impl",
    "sculpt", "sculpt_group", "softplus_inverse", "torch_step",
]


def torch_step(
    lists: StepLists,
    options: SculptOptions,
    *,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
) -> None:
    """The base rule's step alone, by torch's own functional ``sgd``/``adam``/``adamw`` (same
    state lists, same implementation choice): the Sculptor's step when β = 0 and every ϕ is 1,
    at torch's cost and with torch's bits on every path."""
    RULES[options.base].torch_step(lists, options, foreach=foreach, fused=fused,
                                   grad_scale=grad_scale, found_inf=found_inf,
                                   has_complex=has_complex)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _default_impl(params: list[Tensor], differentiable: bool) -> str | None:
    """The implementation of a step given neither ``foreach`` nor ``fused``: "fused", "foreach",
    or None for torch's own choice.

    On the CPU the fused kernel wherever it applies (eager, plain float tensors): it costs
    0.4-1.3× torch's default step, where the single-tensor and foreach steps cost 1.4-4× on
    small models (benchmarks/README.md). It is built on first use; should the build fail, the
    step warns once and takes the foreach path, the faster of the other two. torch.compile,
    DTensors and complex parameters keep torch's choice, and so does CUDA: the Triton kernels
    have not run on a GPU yet.
    """
    if differentiable or not params or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return None
    from kintsugi_optim._kernels import fused_cpu

    dtypes = fused_cpu._FUSED_DTYPES
    for p in params:  # a plain loop: this runs every step, and small models' steps are short
        if not p.is_cpu or p.dtype not in dtypes or type(p) not in _PLAIN_TENSORS:
            return None
    return "fused" if fused_cpu.cpu_kernel_available() else "foreach"


def resolve_impl(params: list[Tensor], options: SculptOptions, foreach: bool | None,
                 fused: bool | None) -> tuple[bool | None, bool | None]:
    """(foreach, fused) for a step given them as the user did: both None chooses by
    :func:`_default_impl`, else they stand."""
    if fused is not None or foreach is not None:
        return foreach, fused
    impl = _default_impl(params, options.differentiable)
    if impl == "fused":
        from kintsugi_optim._kernels.fused_cpu import unsupported

        if unsupported(options) is not None:  # a rule the kernels do not implement
            impl = "foreach"
    fused = impl == "fused"
    if impl == "foreach":
        foreach = True
    elif impl is None:
        _, foreach = _default_to_fused_or_foreach(params, options.differentiable, use_fused=False)
    if foreach and isinstance(options.lr, Tensor) and not options.capturable:
        foreach = False
    return foreach, fused


def _unless_compiling_cuda_steps(func: Callable[..., None]) -> Callable[..., None]:
    """torch's ``_disable_dynamo_if_unsupported`` for a step that takes an options object:
    under torch.compile, Adam's CUDA step counts without ``capturable`` run eagerly."""
    disabled = _disable_dynamo(func)

    @functools.wraps(func)
    def maybe_fallback(lists: StepLists, options: SculptOptions, **impl: Any) -> None:
        steps = lists.state_steps
        if (torch.compiler.is_compiling() and not options.capturable and steps
                and steps[0].device.type in {"cuda", "xpu"}):
            return disabled(lists, options, **impl)
        return func(lists, options, **impl)

    return maybe_fallback


@_unless_compiling_cuda_steps
def sculpt_group(
    lists: StepLists,
    options: SculptOptions,
    *,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """:func:`sculpt` with its tensors in a :class:`StepLists` and its options in a
    :class:`SculptOptions` (what ``KintsugiOptimizer.step`` calls, with the options it built
    once per param group)."""
    if fused is None and foreach is None:
        foreach, fused = resolve_impl(lists.params, options, foreach, fused)
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if fused and not torch.jit.is_scripting():
        from kintsugi_optim._kernels.fused_cpu import fused_sculpt

        fused_sculpt(lists, options, grad_scale, found_inf)
        return
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Expected grad_scale and found_inf to be None")
    foreach = bool(foreach) and not torch.jit.is_scripting()
    rule, gilding = RULES[options.base], options.gilding
    rhos = lists.rhos if gilding.softplus else None
    rho_of = {id(p): r for p, r in zip(lists.phis, rhos)} if rhos is not None else None

    def gild_run(run_phis: list[Tensor], fractures: list[Tensor]) -> None:
        run_rhos = [rho_of[id(p)] for p in run_phis] if rho_of is not None else None
        gild_pathways(run_phis, fractures, run_rhos, gilding, foreach=foreach)

    scope_phis: list[Tensor] = []
    scope_fractures: list[Tensor] = []

    def collect(run_phis: list[Tensor], fractures: list[Tensor]) -> None:
        scope_phis.extend(run_phis)
        scope_fractures.extend(fractures)

    # Each tensor is its own scope but for the tensor pathway, whose scope is the whole group:
    # gild once, after every θ step.
    whole_group = gilding.pathway == "tensor"
    after_run = collect if whole_group else gild_run
    if foreach:
        multi_tensor_sculpt(lists, options, rule.foreach, rule.foreach_state, after_run,
                            rule.foreach_check)
    else:
        single_tensor_sculpt(lists, options, rule.single_tensor, after_run)
    if whole_group:
        gild_run(scope_phis, scope_fractures)


def sculpt(
    params: list[Tensor],
    grads: list[Tensor],
    phis: list[Tensor],
    rhos: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    options: SculptOptions | None = None,
    **hyperparameters: Any,
) -> None:
    """Functional Sculptor step over one param group (see :class:`KintsugiOptimizer`).

    Per parameter, with ϕ from *before* this step's gilding (the two streams are simultaneous):
    fracture l from the gradient, θ ← θ − lr·ϕ·d with d the base rule's direction exactly as
    torch computes it, then ϕ ← gild(ϕ, l) over the pathway's scope (docs/maths.md §2.3).

    Args:
        params, grads, phis: the parameters that step, their gradients and ϕ
            (:func:`new_phi`), aligned by index.
        rhos: the resilience scores ρ (``positivity="softplus"`` only; else None).
        exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers, state_steps: the base rule's
            state lists, as ``torch.optim.adam.adam``/``sgd`` take them (empty where the rule
            has no such state); ``momentum_buffers`` entries that are None are created.
        foreach, fused: the implementation, as torch's (both None: the fused kernel on the CPU
            where it applies, else torch's choice). grad_scale, found_inf: GradScaler's
            tensors (fused only).
        options: a :class:`SculptOptions`; or instead, as keywords, those of
            :meth:`SculptOptions.create`: ``base`` and ``lr`` (required), ``weight_decay``,
            ``beta1``, ``beta2``, ``eps``, ``amsgrad``, ``momentum``, ``dampening``,
            ``nesterov``, ``maximize``, ``capturable``, ``differentiable`` and the gilding
            options ``pathway``, ``fracture``, ``beta``, ``gamma``, ``l1``, ``phi_min``,
            ``phi_max``, ``phi_norm``, ``ascent``, ``positivity``. An unknown keyword is a
            TypeError.
    """
    if options is None:
        options = SculptOptions.create(**hyperparameters)
    elif hyperparameters:
        raise TypeError(
            f"sculpt: pass options or keywords, not both (got {sorted(hyperparameters)})")
    lists = StepLists(params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                      momentum_buffers, state_steps)
    sculpt_group(lists, options, foreach=foreach, fused=fused, grad_scale=grad_scale,
                 found_inf=found_inf)


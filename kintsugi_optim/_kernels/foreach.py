"""The foreach Sculptor step: ``torch._foreach_*`` ops over each device/dtype group, on the CPU a
cache-sized run of tensors at a time (:mod:`kintsugi_optim._kernels.host`).

:func:`multi_tensor_sculpt` is rule-agnostic; each base rule's foreach direction is a function
here (:func:`sgd_direction`, :func:`adam_direction`) named by its row in
:mod:`kintsugi_optim.rules`, with the names of the state lists it steps.
"""

from __future__ import annotations

from typing import Callable, cast

import torch
from torch import Tensor

from kintsugi_optim._compat import (
    _get_capturable_supported_devices,
    _get_value,
    _group_tensors_by_device_and_dtype,
    _stack_if_compiling,
    _to_scalar,
)
from kintsugi_optim._kernels import StepLists, host
from kintsugi_optim.fracture import foreach_fracture
from kintsugi_optim.options import SculptOptions
from kintsugi_optim.pathways import _broadcast, _like_param

__all__ = ["adam_check", "adam_direction", "multi_tensor_sculpt", "sgd_direction"]

# direction(params, grads, phis_b, run_state, indices, lists, options, lr) -> scratch: θ ← θ −
# lr·ϕ·d over one run (real views), returning a dead parameter-shaped temporary.
ForeachDirection = Callable[..., list[Tensor]]


def multi_tensor_sculpt(
    lists: StepLists,
    options: SculptOptions,
    direction: ForeachDirection,
    state_names: tuple[str, ...],
    gild_run: Callable[[list[Tensor], list[Tensor]], None],
    check: Callable[[StepLists, SculptOptions], None] | None = None,
) -> None:
    """The foreach Sculptor step, over each device/dtype group in runs of tensors.

    ``state_names``: the fields of ``lists`` the rule's ``direction`` steps, grouped and run
    with the parameters. After a run's θ step, ``gild_run(phis, fractures)`` receives its ϕ and
    raw fractures (while they are in cache; the fractures are scratch the callee may overwrite).
    ``check(lists, options)``: the rule's refusals, raised before anything is stepped.
    """
    params = lists.params
    if len(params) == 0:  # a group none of whose parameters has a gradient this step
        return
    if options.differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if check is not None:
        check(lists, options)
    lr = _to_scalar(options.lr)
    maximize, pathway = options.maximize, options.gilding.pathway
    grouped = [params, lists.grads, lists.phis] + [getattr(lists, n) for n in state_names]
    for device_lists, device_indices in _group_tensors_by_device_and_dtype(
        grouped, with_indices=True
    ).values():
        for run in host._runs(cast(list[Tensor], device_lists[0])):
            run_lists = [tensors[run] for tensors in device_lists]
            indices = device_indices[run]
            run_params = cast(list[Tensor], run_lists[0])
            run_grads = cast(list[Tensor], run_lists[1])
            run_phis = cast(list[Tensor], run_lists[2])
            if any(p.is_complex() for p in run_params):
                run_params = [torch.view_as_real(p) if p.is_complex() else p for p in run_params]
                run_grads = [torch.view_as_real(g) if g.is_complex() else g for g in run_grads]
                for k in range(3, len(run_lists)):
                    run_lists[k] = [
                        torch.view_as_real(t) if t is not None and t.is_complex() else t
                        for t in run_lists[k]
                    ]
            phis_b = [_broadcast(phi, p) for phi, p in zip(run_phis, run_params)]
            raw_grads = run_grads  # never written below: the fracture is taken from them
            if maximize:
                run_grads = torch._foreach_neg(run_grads)
            scratch = direction(run_params, run_grads, phis_b, run_lists[3:], indices, lists,
                                options, lr)
            del run_grads, phis_b
            gild_run(run_phis, foreach_fracture(raw_grads, run_phis, pathway, scratch))


def sgd_direction(params: list[Tensor], grads: list[Tensor], phis_b: list[Tensor],
                  run_state: list[list], indices: list[int], lists: StepLists,
                  o: SculptOptions, lr: float | Tensor) -> list[Tensor]:
    """θ ← θ − lr·ϕ·d for SGD over one run; returns a dead parameter-shaped temporary (ϕ·d).
    ``run_state``: the run's momentum buffers (None where not yet created)."""
    (bufs,) = run_state
    weight_decay, momentum, dampening = o.weight_decay, o.momentum, o.dampening
    maximize, nesterov = o.maximize, o.nesterov
    if weight_decay != 0:
        # Reuse the intermediate memory (grads) already allocated for maximize
        if maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if all(b is not None for b in bufs):
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        else:
            for k, b in enumerate(bufs):
                if b is None:
                    bufs[k] = grads[k].detach().clone()
                    lists.momentum_buffers[indices[k]] = _like_param(bufs[k], lists.params[indices[k]])
                else:
                    b.mul_(momentum).add_(grads[k], alpha=1 - dampening)
        if nesterov:
            grads = torch._foreach_add(grads, bufs, alpha=momentum)
        else:
            grads = bufs
    # ϕ·d first, then torch's own update θ += (−lr)·(ϕ·d): with ϕ = 1 it rounds as torch's
    # foreach SGD does (an addcmul would round θ + (−lr·d)·ϕ differently by an ulp).
    scaled = torch._foreach_mul(grads, phis_b)
    if scaled[0].dtype != params[0].dtype:  # float32 ϕ, bf16/fp16 θ: as single-tensor
        scaled = [s.to(p.dtype) for s, p in zip(scaled, params)]
    if isinstance(lr, Tensor):
        torch._foreach_mul_(scaled, -lr)
        torch._foreach_add_(params, scaled)
    else:
        torch._foreach_add_(params, scaled, alpha=-lr)
    return scaled


def adam_check(lists: StepLists, o: SculptOptions) -> None:
    """torch's foreach Adam's refusals, raised before anything is stepped."""
    if isinstance(o.lr, Tensor) and not o.capturable:
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if not torch.compiler.is_compiling() and o.capturable:
        supported = _get_capturable_supported_devices(supports_xla=False)
        if not all(
            p.device.type == s.device.type and p.device.type in supported
            for p, s in zip(lists.params, lists.state_steps)
        ):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )


def adam_direction(params: list[Tensor], grads: list[Tensor], phis_b: list[Tensor],
                   run_state: list[list], indices: list[int], lists: StepLists,
                   o: SculptOptions, lr: float | Tensor, *, decoupled: bool = False) -> list[Tensor]:
    """θ ← θ − lr·ϕ·d for Adam (``decoupled``: AdamW) over one run; returns the dead
    denominators (scratch for the caller). ``run_state``: the run's exp_avgs, exp_avg_sqs,
    max_exp_avg_sqs (empty without amsgrad) and state_steps.

    Mirrors torch.optim.adam._multi_tensor_adam, with ϕ folded into the denominator.
    """
    exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = run_state
    beta1, beta2, eps, amsgrad = o.beta1, o.beta2, o.eps, o.amsgrad
    weight_decay, maximize, capturable = o.weight_decay, o.maximize, o.capturable
    if not torch.compiler.is_compiling() and state_steps[0].is_cpu:
        torch._foreach_add_(state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(state_steps, 1)
    if weight_decay != 0:
        if decoupled:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    fast = host._fast_scalars(params)
    torch._foreach_mul_(exp_avg_sqs, torch.tensor(beta2, dtype=params[0].dtype) if fast else beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads

    if capturable:
        bias_correction1 = torch._foreach_pow(beta1, state_steps)
        bias_correction2 = torch._foreach_pow(beta2, state_steps)
        torch._foreach_sub_(bias_correction1, 1)
        torch._foreach_sub_(bias_correction2, 1)
        torch._foreach_neg_(bias_correction2)
        torch._foreach_div_(bias_correction1, lr)
        torch._foreach_reciprocal_(bias_correction1)
        torch._foreach_sqrt_(bias_correction2)
        step_size, bias_correction2_sqrt = bias_correction1, bias_correction2
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_exp_avg_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, step_size)
        torch._foreach_div_(denom, phis_b)
        torch._foreach_addcdiv_(params, exp_avgs, denom)
    else:
        if host._cpu_eager(state_steps):  # one read of all counts instead of an .item() each
            steps = torch.stack(state_steps).tolist()
        else:
            steps = [_get_value(s) for s in state_steps]
        bias_correction1 = [1 - beta1**s for s in steps]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_exp_avg_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        if fast:
            # lr/bc1 · m / (√v/√bc2 + ε) = (lr·√bc2/bc1) · m / (√v + ε·√bc2): torch's step
            # with its division by √bc2 folded into two scalars, so that the division by ϕ
            # costs no pass more than torch's own.
            step_size = [-lr * bc2 / bc1 for bc1, bc2 in zip(bias_correction1, bias_correction2_sqrt)]
            eps_scaled = [eps * bc2 for bc2 in bias_correction2_sqrt]
            torch._foreach_add_(denom, host._cpu_scalars(eps_scaled, denom[0].dtype))
        else:
            step_size = [(lr / bc) * -1 for bc in bias_correction1]
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, phis_b)
        torch._foreach_addcdiv_(params, exp_avgs, denom, _stack_if_compiling(step_size))
    return denom

"""The single-tensor Sculptor step: a loop over parameters, the readable reference of every
other path (docs/maths.md §2.3). Bitwise ``torch.optim``'s single-tensor step when ϕ = 1.

:func:`single_tensor_sculpt` is rule-agnostic; each base rule's direction is a function here
(:func:`sgd_direction`, :func:`adam_direction`) named by its row in :mod:`kintsugi_optim.rules`.
A direction moves one parameter: θ ← θ − lr·ϕ·d.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from kintsugi_optim._compat import _get_capturable_supported_devices, _get_value, _to_scalar
from kintsugi_optim._kernels import StepLists
from kintsugi_optim.fracture import fracture
from kintsugi_optim.options import SculptOptions
from kintsugi_optim.pathways import _broadcast, _like_param, _scale_sparse

__all__ = ["adam_direction", "sgd_direction", "single_tensor_sculpt"]

# direction(i, param, grad, phi, phi_b, lists, options, lr): θ ← θ − lr·ϕ·d for parameter i,
# given as its real view (and its gradient's, negated under maximize).
Direction = Callable[[int, Tensor, Tensor, Tensor, Tensor, StepLists, SculptOptions, object], None]


def single_tensor_sculpt(
    lists: StepLists,
    options: SculptOptions,
    direction: Direction,
    gild_run: Callable[[list[Tensor], list[Tensor]], None],
) -> None:
    """θ ← θ − lr·ϕ·d per parameter, d from ``direction``.

    After each parameter's θ step, ``gild_run([phi], [fracture])`` receives its ϕ and raw
    fracture, as the foreach step hands over a run's.
    """
    lr = options.lr
    if not torch.jit.is_scripting():
        lr = _to_scalar(lr)
    pathway, maximize = options.gilding.pathway, options.maximize
    for i, param in enumerate(lists.params):
        grad = lists.grads[i] if not maximize else -lists.grads[i]
        phi = lists.phis[i]
        raw_fracture = fracture(grad, pathway, phi.dtype)
        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            param = torch.view_as_real(param)
        direction(i, param, grad, phi, _broadcast(phi, param), lists, options, lr)
        gild_run([phi], [raw_fracture])


def sgd_direction(i: int, param: Tensor, grad: Tensor, phi: Tensor, phi_b: Tensor,
                  lists: StepLists, o: SculptOptions, lr) -> None:
    """torch's SGD (coupled weight decay, momentum, dampening, nesterov), scaled by ϕ."""
    if o.weight_decay != 0:
        grad = grad.add(param, alpha=o.weight_decay)
    if o.momentum != 0:
        buf = lists.momentum_buffers[i]
        if buf is None:
            buf = grad.detach().clone()
            lists.momentum_buffers[i] = _like_param(buf, lists.params[i])
        else:
            buf = torch.view_as_real(buf) if buf.is_complex() else buf
            buf.mul_(o.momentum).add_(grad, alpha=1 - o.dampening)
        grad = grad.add(buf, alpha=o.momentum) if o.nesterov else buf
    # ϕ·d is formed in ϕ's precision and rounded once to θ's dtype, so a bf16/fp16 θ takes
    # the step in its own arithmetic, exactly torch's SGD when ϕ = 1.
    if grad.is_sparse:  # nn.Embedding(sparse=True): only the rows it looked up
        scaled = _scale_sparse(grad, phi, param.dtype)
    else:
        scaled = (grad * phi_b).to(param.dtype)
    if o.capturable and isinstance(lr, Tensor):
        # alpha=-lr would read a tensor lr back to the host: not inside a CUDA graph
        param.addcmul_(scaled, lr, value=-1)
    else:
        param.add_(scaled, alpha=-lr)


def adam_direction(i: int, param: Tensor, grad: Tensor, phi: Tensor, phi_b: Tensor,
                   lists: StepLists, o: SculptOptions, lr, *, decoupled: bool = False) -> None:
    """torch's Adam (coupled decay) and AdamW (``decoupled``: decoupled, unscaled decay),
    with ϕ folded into the denominator: exact when ϕ = 1."""
    beta1, beta2, eps, amsgrad = o.beta1, o.beta2, o.eps, o.amsgrad
    max_exp_avg_sqs = lists.max_exp_avg_sqs
    exp_avg, exp_avg_sq, step_t = lists.exp_avgs[i], lists.exp_avg_sqs[i], lists.state_steps[i]
    if torch.is_complex(exp_avg):
        exp_avg = torch.view_as_real(exp_avg)
        exp_avg_sq = torch.view_as_real(exp_avg_sq)
        if amsgrad:
            max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
    if not torch.compiler.is_compiling() and o.capturable:
        supported = _get_capturable_supported_devices()
        if not (param.device.type == step_t.device.type and param.device.type in supported):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )
    step_t += 1
    if o.weight_decay != 0:
        if decoupled:
            param.mul_(1 - lr * o.weight_decay)
        else:
            grad = grad.add(param, alpha=o.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

    if o.capturable or o.differentiable:
        step = step_t
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size_neg = (lr / bias_correction1).neg()
        bias_correction2_sqrt = bias_correction2.sqrt()
        if amsgrad:
            max_sq = max_exp_avg_sqs[i].clone() if o.differentiable else max_exp_avg_sqs[i]
            max_exp_avg_sqs[i].copy_(torch.maximum(max_sq, exp_avg_sq))
            second = max_exp_avg_sqs[i]
        else:
            second = exp_avg_sq
        denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
            eps / step_size_neg
        )
        # θ moves by ϕ·d: dividing the denominator by ϕ is exact when ϕ = 1.
        denom = denom / phi_b if o.differentiable else denom.div_(phi_b)
        param.addcdiv_(exp_avg.clone() if o.differentiable else exp_avg, denom)
    else:
        step = _get_value(step_t)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if amsgrad:
            torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
            denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        denom.div_(phi_b)
        param.addcdiv_(exp_avg, denom, value=-step_size)
    if amsgrad and torch.is_complex(lists.params[i]):
        max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])

"""The backends of the Sculptor's step (docs/architecture.md).

Each takes one param group's tensors (:class:`StepLists`) and a frozen
:class:`~kintsugi_optim.options.SculptOptions`, moves θ by the base rule's direction scaled by ϕ,
and hands each ϕ with its raw fracture to the gilding layer:

* :mod:`.single_tensor` — a loop over parameters: the readable reference, bitwise torch at β = 0;
* :mod:`.foreach` — ``torch._foreach_*`` ops over device/dtype groups, in cache-sized runs on
  the CPU (:mod:`.host`);
* :mod:`.fused_cpu` — one C++ kernel per group (``csrc/``), the CPU default;
* ``kintsugi_optim._fused_cuda`` — the Triton kernels for CUDA (kept at its old path: the Triton
  interpreter tests load that file).

The single-tensor and foreach loops are rule-agnostic: the base rule's direction comes from its
row in :mod:`kintsugi_optim.rules`. The fused kernels carry their own switch over the rules they
support and declare it (``fused_cpu.unsupported``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["StepLists"]


@dataclass(slots=True)
class StepLists:
    """One param group's tensors for one step, aligned by index (torch's functional
    convention): the parameters that have a gradient, their gradients and ϕ, the resilience
    scores ρ (``positivity="softplus"`` only, else None) and the base rule's state, each list
    empty where the rule keeps no such state. ``momentum_buffers`` entries that are None are
    created by the step."""

    params: list[Tensor]
    grads: list[Tensor]
    phis: list[Tensor]
    rhos: list[Tensor] | None
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    momentum_buffers: list[Tensor | None]
    state_steps: list[Tensor]

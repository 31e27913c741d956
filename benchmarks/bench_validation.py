"""What checking param groups at every step costs: KintsugiOptimizer.step on a small model with
the per-step group check as shipped, against the same step with the check replaced by a no-op.

Three cases per implementation: nothing changed since the last step (the usual case: one
identity comparison per group key), a scheduler-like new ``lr`` every step (only ``lr`` is
re-checked), and a full re-validation every step (any other key changed). The check is timed on
its own (best of the repeats, so other jobs on the machine inflate it least) against the step
without it.

    python benchmarks/bench_validation.py [--repeats 15] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from kintsugi_optim import KintsugiOptimizer


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def timed_steps(opt: KintsugiOptimizer, steps: int, touch) -> float:
    start = time.perf_counter()
    for i in range(steps):
        touch(opt, i)
        opt.step()
    return (time.perf_counter() - start) / steps


def check_cost(opt: KintsugiOptimizer, touch, repeats: int, calls: int) -> float:
    """Seconds per _check_group call over every group, after ``touch`` (best of repeats)."""
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            touch(opt, r * calls + i)
            for group in opt.param_groups:
                opt._check_group(group)
        best = min(best, time.perf_counter() - start)
    touch_only = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            touch(opt, r * calls + i)
        touch_only = min(touch_only, time.perf_counter() - start)
    return (best - touch_only) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)

    touches = {
        "unchanged": lambda opt, i: None,
        "new lr each step": lambda opt, i: opt.param_groups[0].__setitem__("lr", 1e-3 + 1e-9 * i),
        "new beta each step": lambda opt, i: opt.param_groups[0].__setitem__(
            "beta", 0.01 + 1e-9 * i),
    }
    check = KintsugiOptimizer._check_group
    print(f"{args.steps} steps x {args.repeats} repeats, best µs per step (1 thread); the check "
          "timed alone, and the step with it replaced by a no-op")
    for impl in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        model = small_model()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt = KintsugiOptimizer(model.parameters(), **impl)
        opt.step()  # lazy state, kernel build
        KintsugiOptimizer._check_group = lambda self, group: None
        step = min(timed_steps(opt, args.steps, touches["unchanged"])
                   for _ in range(args.repeats))
        KintsugiOptimizer._check_group = check
        for name, touch in touches.items():
            cost = check_cost(opt, touch, args.repeats, args.steps)
            print(f"{str(impl):18} {name:20} step {step * 1e6:7.1f}  check {cost * 1e6:6.2f} µs "
                  f"({cost / step:.2%} of the step)")


if __name__ == "__main__":
    main()

"""What checking param groups at every step costs: KintsugiOptimizer.step on a small model with
the per-step group check as shipped, against the same step with the check replaced by a no-op.

Three cases per implementation: nothing changed since the last step (the usual case: one
identity comparison per group key), a scheduler-like new ``lr`` every step (only ``lr`` is
re-checked), and a full re-validation every step (any other key changed). Interleaved
repetitions, medians, one thread.

    python benchmarks/bench_validation.py [--repeats 15] [--steps 200]
"""

from __future__ import annotations

import argparse
import statistics
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
    print(f"{args.steps} steps x {args.repeats} repeats, median µs per step (1 thread)")
    for impl in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        for name, touch in touches.items():
            times = {"checked": [], "unchecked": []}
            model = small_model()
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            opt = KintsugiOptimizer(model.parameters(), **impl)
            opt.step()  # lazy state, kernel build
            for _ in range(args.repeats):
                for variant in ("checked", "unchecked"):
                    KintsugiOptimizer._check_group = (
                        check if variant == "checked" else lambda self, group: None)
                    times[variant].append(timed_steps(opt, args.steps, touch))
            KintsugiOptimizer._check_group = check
            checked = statistics.median(times["checked"]) * 1e6
            unchecked = statistics.median(times["unchecked"]) * 1e6
            print(f"{str(impl):18} {name:20} checked {checked:7.1f}  unchecked {unchecked:7.1f}  "
                  f"cost {checked - unchecked:+6.1f} µs ({checked / unchecked - 1:+.1%})")


if __name__ == "__main__":
    main()

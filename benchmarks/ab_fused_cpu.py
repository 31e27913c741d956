"""A/B of CPU fused-kernel variants in one process, each against torch's fused optimizer.

Differences of a few percent between kernel builds drown in the drift between processes on a
shared machine (benchmarks/README.md). Here every variant of ``csrc/fused_sculpt.cpp`` is built
under an op namespace of its own (``kab_<name>``), so all load into one process, and one step of
each, and of torch's fused optimizer, runs per round in a shuffled order. Pass the same file
twice to see the spread that counts as noise.

Usage::

    python benchmarks/ab_fused_cpu.py head=kintsugi_optim/csrc/fused_sculpt.cpp \\
        again=kintsugi_optim/csrc/fused_sculpt.cpp mine=/tmp/variant.cpp --base sgd
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_step import LR, SGD_MOMENTUM, TORCH_CLASSES, make_params, steady_malloc  # noqa: E402

import kintsugi_optim._kernels.fused_cpu as fused  # noqa: E402
from kintsugi_optim import KintsugiOptimizer  # noqa: E402


def build(name: str, source: Path, build_dir: Path):
    """The variant's ``fused_sculpt_`` op, registered as ``torch.ops.kab_<name>``."""
    library = f"kab_{name}"
    text = source.read_text()
    for macro in ("TORCH_LIBRARY", "TORCH_LIBRARY_IMPL"):
        text = text.replace(f"{macro}(kintsugi,", f"{macro}({library},")
    copy = build_dir / f"{library}.cpp"
    copy.write_text(text)
    fused._build(library, copy)  # as the package builds its own kernel
    return getattr(torch.ops, library).fused_sculpt_


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", metavar="NAME=SOURCE.cpp")
    parser.add_argument("--base", choices=sorted(TORCH_CLASSES), default="sgd")
    parser.add_argument("--pathway", default="element")
    parser.add_argument("--params", type=int, default=10**7)
    parser.add_argument("--tensors", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=41)
    args = parser.parse_args()
    steady_malloc()

    ops = {}
    with tempfile.TemporaryDirectory() as build_dir:
        for variant in args.variants:
            name, _, source = variant.partition("=")
            ops[name] = build(name, Path(source), Path(build_dir))

    extra = {"momentum": SGD_MOMENTUM} if args.base == "sgd" else {}
    lr = LR[args.base]
    optimizers = {"torch": TORCH_CLASSES[args.base](
        make_params(args.params, args.tensors, "cpu"), lr=lr, fused=True, **extra)}
    for name in ops:
        optimizers[name] = KintsugiOptimizer(
            make_params(args.params, args.tensors, "cpu"), lr=lr, base=args.base,
            pathway=args.pathway, fused=True, **extra)

    times = {name: [] for name in optimizers}
    order = list(optimizers)
    shuffle = random.Random(0).shuffle
    for round_ in range(args.rounds + 3):
        shuffle(order)
        for name in order:
            if name != "torch":
                fused._cpu_kernel = lambda op=ops[name]: op  # what fused_sculpt calls
            start = time.perf_counter()
            optimizers[name].step()
            if round_ >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)

    torch_ms = statistics.median(times["torch"]) * 1e3
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        print(f"{name:>12} {ms:8.3f} ms  {ms / torch_ms:6.3f}× torch")


if __name__ == "__main__":
    main()

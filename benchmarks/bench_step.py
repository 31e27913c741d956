"""Step time, effective bandwidth and memory of KintsugiOptimizer against torch's optimizers.

For every case (device × parameter count × tensor count) the parameters are fp32 tensors of
shape [n / 100, 100] (n elements each) with fixed random gradients, shared by all optimizers of
the case. Optimizers are compared in sets of one base rule and one implementation — torch's
SGD (momentum 0.9) / Adam / AdamW and Kintsugi's three pathways with that base, all
single-tensor, foreach or fused — whose steps are interleaved round by round in this process;
medians are reported, and the Kintsugi ÷ torch ratio is a ratio of medians of one set.

* **step time**: CPU, wall time of one step; CUDA, wall time of ``--cuda-steps`` consecutive
  steps between two synchronisations, divided by their number (host overhead included, as a
  training loop sees it).
* **effective bandwidth**: the bytes a step must move (each buffer read once, each updated one
  written once: 4 B per fp32 read or write; ϕ per row or tensor counted as nothing) ÷ time.
  The device's copy bandwidth (``dst.copy_(src)``, read + write) is measured in the same run.
* **persistent state**: bytes of the distinct tensors in ``optimizer.state`` after a step.
* **peak transient**: memory allocated during a step above what was allocated before it. CUDA:
  ``torch.cuda.max_memory_allocated``. CPU: the running total of torch's CPU allocator events
  recorded by ``torch.profiler`` (``profile_memory=True``) over one step, at its peak.

* **allocator**: by default (``--malloc steady``) glibc is told to keep memory it has been given
  (no trimming, mmap only above 32 MiB), so that a step's temporaries are not page-faulted in
  afresh at every step. With glibc's default settings a foreach step that frees tens of MB of
  temporaries at once hands them back to the OS and faults them in again at the next step:
  that costs torch's foreach Adam 2-5× its time at 10M parameters, depending on what else lies
  on the heap, and swamps the comparison. ``--malloc default`` measures it as it comes.

Results go to ``benchmarks/results/step-<device>-<date>.{json,md}``; the markdown ends with
the issue's targets, checked where the run measured them.

Usage::

    python benchmarks/bench_step.py                    # everything on every device present
    python benchmarks/bench_step.py --preset targets   # the cases of the issue's targets
    python benchmarks/bench_step.py --preset quick     # 10M params as 100 tensors
    python benchmarks/bench_step.py --sizes 10M --tensors 100,1000 --devices cpu \\
        --bases adam --impls foreach,fused --rounds 21
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kintsugi_optim  # noqa: E402
from kintsugi_optim import KintsugiOptimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TORCH_CLASSES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
PATHWAYS = ("element", "row", "tensor")
IMPLS = ("single", "foreach", "fused")
LR = {"sgd": 1e-2, "adam": 1e-3, "adamw": 1e-3}
SGD_MOMENTUM = 0.9
# The ratio targets: label, limit, case (params, tensors, base, impl, Kintsugi pathway),
# each against torch's optimizer of the same base and implementation.
RATIO_TARGETS = [
    ("adam/element/foreach ÷ torch Adam foreach, 10M as 100", 1.5,
     (10**7, 100, "adam", "foreach", "element")),
    ("adam/row/foreach ÷ torch Adam foreach, 10M as 100", 1.2,
     (10**7, 100, "adam", "foreach", "row")),
    ("adam/element/fused ÷ torch Adam fused, 10M as 100", 1.4,
     (10**7, 100, "adam", "fused", "element")),
    ("sgd-momentum/element/fused ÷ torch SGD fused, 10M as 100", 1.5,
     (10**7, 100, "sgd", "fused", "element")),
    ("adam/element/foreach ÷ torch Adam foreach, 1000 × 1000", 1.5,
     (10**6, 1000, "adam", "foreach", "element")),
]


@dataclass
class Entry:
    """One optimizer of a comparison set."""

    device: str
    params: int
    tensors: int
    base: str
    impl: str
    optimizer: str  # "torch" or the Kintsugi pathway
    bytes_per_param: int
    times_ms: list[float] = field(default_factory=list)
    state_bytes: int = 0
    peak_bytes: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def gbps(self) -> float:
        return self.bytes_per_param * self.params / (self.median_ms * 1e-3) / 1e9


def parse_count(text: str) -> int:
    units = {"K": 10**3, "M": 10**6, "G": 10**9}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def bytes_per_param(base: str, optimizer: str) -> int:
    """fp32 bytes a step must move per parameter: θ r/w, g r, state r/w, element ϕ r/w."""
    state = 8 if base == "sgd" else 16  # momentum buffer, or exp_avg and exp_avg_sq
    phi = 8 if optimizer == "element" else 0
    return 12 + state + phi


def make_params(n_params: int, n_tensors: int, device: str) -> list[torch.nn.Parameter]:
    numel = n_params // n_tensors
    shape = (numel // 100, 100) if numel % 100 == 0 else (numel,)
    generator = torch.Generator(device=device).manual_seed(0)
    params = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(shape, device=device, generator=generator))
        p.grad = torch.randn(shape, device=device, generator=generator)
        params.append(p)
    return params


def make_optimizer(params, base: str, impl: str, optimizer: str):
    flags = {"foreach": impl == "foreach", "fused": impl == "fused" or None}
    extra = {"momentum": SGD_MOMENTUM} if base == "sgd" else {}
    if optimizer == "torch":
        return TORCH_CLASSES[base](params, lr=LR[base], **flags, **extra)
    return KintsugiOptimizer(params, lr=LR[base], base=base, pathway=optimizer, **flags, **extra)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_step(opt, device: str, cuda_steps: int) -> float:
    steps = cuda_steps if device == "cuda" else 1
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        opt.step()
    synchronize(device)
    return (time.perf_counter() - start) / steps * 1e3


def state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


def peak_step_bytes(opt, device: str) -> int:
    """Peak memory allocated during one step above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        opt.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    events = sorted(  # allocations (+) and frees (−) of torch's CPU allocator, in time order
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def steady_malloc() -> bool:
    """Keep glibc from returning freed memory to the OS (see the module docstring)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    return bool(libc.mallopt(m_trim_threshold, 2**30) and libc.mallopt(m_mmap_threshold, 2**25))


def copy_bandwidth(device: str, n_bytes: int, rounds: int) -> float:
    """GB/s of dst.copy_(src), counting bytes read and written."""
    n = max(n_bytes // 4, 1 << 20)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def run_set(params, device, n_params, n_tensors, base, impl, optimizers, args) -> list[Entry]:
    """Interleaved rounds over one comparison set; returns its entries."""
    entries, opts = [], []
    for name in optimizers:
        opt = make_optimizer(params, base, impl, name)
        for _ in range(args.warmup):  # state creation, kernel builds and caches
            opt.step()
        entries.append(Entry(device, n_params, n_tensors, base, impl, name,
                             bytes_per_param(base, name)))
        opts.append(opt)
    for r in range(args.rounds):
        for k in range(len(opts)):  # rotate the order so no one always follows the same step
            i = (k + r) % len(opts)
            entries[i].times_ms.append(time_step(opts[i], device, args.cuda_steps))
    if args.memory:
        for entry, opt in zip(entries, opts):
            entry.state_bytes = state_bytes(opt)
            entry.peak_bytes = peak_step_bytes(opt, device)
    return entries


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(meta: dict, entries: list[Entry]) -> str:
    lines = [
        f"# Step benchmark: {meta['device_name']}",
        "",
        f"{meta['date']} · {meta['host']} · torch {meta['torch']} · kintsugi_optim "
        f"{meta['kintsugi_optim']} ({meta['commit']}) · {meta['rounds']} rounds, medians · "
        f"copy bandwidth {meta['copy_gbps']:.0f} GB/s (read + write) · allocator: "
        f"{meta.get('malloc', 'default')}",
        "",
        "ratio = Kintsugi ÷ torch, same base rule and implementation; GB/s = bytes the step "
        "must move ÷ time; state = persistent optimizer state; peak = transient memory of a "
        "step (see bench_step.py).",
    ]
    cases = sorted({(e.params, e.tensors) for e in entries})
    for n_params, n_tensors in cases:
        lines += ["", f"## {n_params / 1e6:g}M parameters as {n_tensors} tensors", "",
                  "| base | impl | optimizer | ms | GB/s | % copy | ratio | state MB | peak MB |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        case = [e for e in entries if (e.params, e.tensors) == (n_params, n_tensors)]
        for e in case:
            torch_entry = next(t for t in case if (t.base, t.impl, t.optimizer) ==
                               (e.base, e.impl, "torch"))
            ratio = e.median_ms / torch_entry.median_ms
            lines.append(
                f"| {e.base} | {e.impl} | {e.optimizer} | {e.median_ms:.3f} | {e.gbps:.1f} | "
                f"{100 * e.gbps / meta['copy_gbps']:.0f} | {ratio:.2f} | "
                f"{e.state_bytes / 2**20:.1f} | {e.peak_bytes / 2**20:.1f} |"
            )
    lines += ["", "## Targets", ""] + targets(meta, entries)
    return "\n".join(lines) + "\n"


def targets(meta: dict, entries: list[Entry]) -> list[str]:
    def find(n_params, n_tensors, base, impl, optimizer):
        return next((e for e in entries if (e.params, e.tensors, e.base, e.impl, e.optimizer) ==
                     (n_params, n_tensors, base, impl, optimizer)), None)

    out = []

    for label, limit, (n_params, n_tensors, base, impl, pathway) in RATIO_TARGETS:
        k, t = find(n_params, n_tensors, base, impl, pathway), find(n_params, n_tensors, base, impl, "torch")
        if k and t:
            r = k.median_ms / t.median_ms
            out.append(f"- {label}: {r:.2f}× (target ≤ {limit}×) {'met' if r <= limit else 'MISSED'}")
    fused = find(10**7, 100, "adam", "fused", "element")
    if fused and meta["device"] == "cuda":
        share = fused.gbps / meta["copy_gbps"]
        out.append(f"- adam/element/fused bandwidth, 10M as 100: {100 * share:.0f}% of copy "
                   f"(target ≥ 75%) {'met' if share >= 0.75 else 'MISSED'}")
    for impl in IMPLS:
        growth = [e for e in entries if (e.tensors, e.base, e.impl, e.optimizer) ==
                  (100, "adam", impl, "element")]
        if len(growth) > 1:
            per_param = ", ".join(f"{e.params / 1e6:g}M: {e.median_ms * 1e6 / e.params:.2f}"
                                  for e in sorted(growth, key=lambda e: e.params))
            out.append(f"- growth, adam/element/{impl} as 100 tensors, ns per parameter: {per_param}")
    for impl in ("foreach", "fused"):
        k, t = find(10**7, 100, "adam", impl, "element"), find(10**7, 100, "adam", "foreach", "torch")
        if k and t and t.state_bytes:
            out.append(
                f"- adam/element/{impl}, 10M as 100: state {k.state_bytes / 2**20:.0f} MB vs torch "
                f"Adam {t.state_bytes / 2**20:.0f} MB (+ϕ {(k.state_bytes - t.state_bytes) / 2**20:.0f} "
                f"MB); peak {k.peak_bytes / 2**20:.0f} MB vs torch Adam foreach "
                f"{t.peak_bytes / 2**20:.0f} MB {'met' if k.peak_bytes <= t.peak_bytes else 'MISSED'}"
            )
    return out or ["- (no case of the targets in this run)"]


@dataclass
class Case:
    """Parameters of one size, and the comparison sets run on them."""

    params: int
    tensors: int
    bases: list[str]
    impls: list[str]
    pathways: list[str]


def targets_preset() -> list[Case]:
    """The cases the issue's targets need, in a run of minutes rather than hours: every
    configuration at 10M as 100 tensors, Adam for per-tensor overhead (1M as 1000), for growth
    (1M → 100M as 100) and for one large tensor (10M as 1)."""
    every = Case(10**7, 100, list(TORCH_CLASSES), list(IMPLS), list(PATHWAYS))
    adam = dict(bases=["adam"], pathways=["element", "row"])
    return [
        Case(10**6, 100, impls=["foreach", "fused"], **adam),
        every,
        Case(10**8, 100, impls=["foreach", "fused"], **adam),
        Case(10**6, 1000, impls=list(IMPLS), **adam),
        Case(10**7, 1, impls=["foreach", "fused"], **adam),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=["all", "targets", "quick"], default="all",
                        help="all: the product of the lists below; targets: the cases of the "
                             "issue's targets; quick: 10M params as 100 tensors")
    parser.add_argument("--sizes", default="1M,10M,100M", help="total parameter counts")
    parser.add_argument("--tensors", default="1,100,1000", help="tensor counts")
    parser.add_argument("--devices", default="cpu,cuda", help="devices (absent ones are skipped)")
    parser.add_argument("--bases", default="sgd,adam,adamw")
    parser.add_argument("--pathways", default=",".join(PATHWAYS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--rounds", type=int, default=11, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--cuda-steps", type=int, default=10, help="steps per CUDA timing")
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="steady: glibc keeps freed memory, so steps do not page-fault "
                             "their temporaries in again; default: glibc as it comes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    malloc = "steady" if args.malloc == "steady" and steady_malloc() else "default"
    if args.threads:
        torch.set_num_threads(args.threads)

    lists = dict(bases=args.bases.split(","), impls=args.impls.split(","),
                 pathways=args.pathways.split(","))
    if args.preset == "targets":
        cases = targets_preset()
    elif args.preset == "quick":
        cases = [Case(10**7, 100, **lists)]
    else:
        cases = [Case(parse_count(n), int(t), **lists)
                 for n in args.sizes.split(",") for t in args.tensors.split(",")]
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    args.out.mkdir(parents=True, exist_ok=True)

    for device in devices:
        now = datetime.datetime.now()
        meta = dict(
            date=now.isoformat(timespec="seconds"), host=platform.node(), device=device,
            device_name=machine(device), torch=torch.__version__,
            kintsugi_optim=kintsugi_optim.__version__, commit=git_commit(), rounds=args.rounds,
            copy_gbps=copy_bandwidth(device, 4 * max(c.params for c in cases), args.rounds),
            malloc=malloc if device == "cpu" else "cuda caching allocator", argv=sys.argv[1:],
        )
        print(f"# {meta['device_name']}: copy {meta['copy_gbps']:.0f} GB/s", flush=True)
        entries: list[Entry] = []
        for case in cases:
            params = make_params(case.params, case.tensors, device)
            for base in case.bases:
                for impl in case.impls:
                    started = time.perf_counter()
                    done = run_set(params, device, case.params, case.tensors, base, impl,
                                   ["torch", *case.pathways], args)
                    entries += done
                    summary = "  ".join(f"{e.optimizer} {e.median_ms:.2f}" for e in done)
                    print(f"{case.params / 1e6:g}M/{case.tensors} {base} {impl}: {summary} ms "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
            del params
        slug = "cuda-" + meta["device_name"].split()[-1].lower() if device == "cuda" else "cpu"
        stem = args.out / f"step-{slug}-{now:%Y%m%d-%H%M%S}"
        stem.with_suffix(".json").write_text(json.dumps(
            dict(meta=meta, results=[{**asdict(e), "median_ms": e.median_ms, "gbps": e.gbps}
                                     for e in entries]), indent=1))
        report = markdown(meta, entries)
        stem.with_suffix(".md").write_text(report)
        print(report, flush=True)


if __name__ == "__main__":
    main()

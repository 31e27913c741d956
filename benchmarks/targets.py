"""The issue's ratio targets over several runs of bench_step.py, side by side.

A shared machine's speed drifts between processes (other tenants, where the buffers landed):
the same step can measure 10-25 % apart in two runs minutes apart. One run decides nothing,
so read a target over several, each a separate process::

    for i in 1 2 3 4 5; do python benchmarks/bench_step.py --preset targets; done
    python benchmarks/targets.py benchmarks/results/step-cpu-2026*.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import RATIO_TARGETS  # noqa: E402


def ratios(path: Path) -> tuple[dict, list[float | None]]:
    run = json.loads(path.read_text())
    medians = {(e["params"], e["tensors"], e["base"], e["impl"], e["optimizer"]): e["median_ms"]
               for e in run["results"]}
    out = []
    for _, _, (n_params, n_tensors, base, impl, pathway) in RATIO_TARGETS:
        ours = medians.get((n_params, n_tensors, base, impl, pathway))
        torch_ms = medians.get((n_params, n_tensors, base, impl, "torch"))
        out.append(ours / torch_ms if ours and torch_ms else None)
    return run["meta"], out


def main() -> None:
    runs = [ratios(Path(p)) for p in sys.argv[1:]]
    if not runs:
        sys.exit(__doc__)
    def column(meta: dict) -> str:
        malloc = meta.get("malloc", "default")
        return meta["date"][5:19].replace("T", " ") + ("" if malloc == "steady" else f" ({malloc})")

    print("| target | limit | " + " | ".join(column(m) for m, _ in runs) + " | median | met |")
    print("|---|---:|" + "---:|" * (len(runs) + 2))
    for k, (label, limit, _) in enumerate(RATIO_TARGETS):
        values = [r[k] for _, r in runs if r[k] is not None]
        if not values:
            continue
        median = statistics.median(values)
        cells = [f"{r[k]:.2f}" if r[k] is not None else "—" for _, r in runs]
        met = sum(v <= limit for v in values)
        print(f"| {label} | {limit} | " + " | ".join(cells)
              + f" | **{median:.2f}** | {met} of {len(values)} |")


if __name__ == "__main__":
    main()

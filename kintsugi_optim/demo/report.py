"""The demo's report: the results tables (terminal and markdown), results.json and the
sigils (ϕ histograms, with the ``viz`` extra)."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import kintsugi_optim
from kintsugi_optim.demo.study import METRIC_COLUMNS, TRAINING_THREADS
from kintsugi_optim.demo.tasks import make_task

__all__ = ["format_table", "report", "write_outputs", "environment"]

COLUMN_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
                 "minority_recall": "minority recall", "worst_group_accuracy": "worst-group acc.",
                 "wall_time_s": "wall time (s)"}


def format_table(summary: dict, task_name: str, *, markdown: bool = False,
                 columns: list[str] | None = None) -> str:
    """The results table of one task: one row per method, cells "mean ± std"."""
    columns = columns or METRIC_COLUMNS[task_name]
    header = ["method"] + [COLUMN_TITLES.get(c, c) for c in columns]
    rows = [[name] + ["—" if np.isnan(m[c][0]) else f"{m[c][0]:.3f} ± {m[c][1]:.3f}"
                      for c in columns]
            for name, m in summary[task_name].items()]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def report(results: dict, tasks: list[str], *, seeds: int, steps: int, device: torch.device,
           command: str) -> tuple[str, str]:
    """(terminal text, markdown text) of the study's results; the metrics tables are
    deterministic, wall times are shown apart because they are not."""
    titles = {name: make_task(name, 0, n_train=8, n_test=8).title for name in tasks}
    terminal, markdown = [], [f"# Kintsugi demo results\n\nCommand: `{command}`  \n"
                              f"{seeds} seeds × {steps} steps per run, device {device.type}, "
                              f"torch {torch.__version__}, kintsugi_optim "
                              f"{kintsugi_optim.__version__}.\n"]
    for name in tasks:
        table = format_table(results["summary"], name)
        terminal.append(f"\n{titles[name]} — test metrics, mean ± std over {seeds} seeds\n{table}")
        markdown.append(f"\n## {titles[name]}\n\n" + format_table(results["summary"], name,
                                                                  markdown=True))
    methods = list(dict.fromkeys(m for task in tasks for m in results["summary"][task]))
    missing = (float("nan"), float("nan"))  # a method not run on that task
    times = {"time": {method: {task: results["summary"][task].get(method, {}).get(
        "wall_time_s", missing) for task in tasks} for method in methods}}
    timing = format_table(times, "time", columns=tasks)
    terminal.append(f"\nWall time per run in seconds (varies between runs and machines)\n{timing}")
    markdown.append("\n## Wall time per run (s)\n\nVaries between runs and machines.\n\n"
                    + format_table(times, "time", markdown=True, columns=tasks))
    return "\n".join(terminal), "\n".join(markdown)


def write_outputs(results: dict, tasks: list[str], out: Path, markdown: str, meta: dict) -> list[Path]:
    """results.json, results.md and the sigil PNGs in ``out``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md", out / "results.json"]
    written[0].write_text(markdown + "\n")
    payload = {k: v for k, v in results.items() if k != "trainers"}
    written[1].write_text(json.dumps({**meta, **payload}, indent=2, default=float) + "\n")
    written += _write_sigils(results["trainers"], tasks, out)
    return written


SIGIL_METHODS = {"Sculptor (row)": "sculptor", "VWPR + SGD + Gilder": "vwpr",
                 "GildedLoss (Group DRO) [uses labels]": "group_dro",
                 "Kintsugi samples": "samples"}


def _write_sigils(trainers: dict, tasks: list[str], out: Path) -> list[Path]:
    """Per task, for the seed-0 run of each method in :data:`SIGIL_METHODS`: the ϕ histograms
    at the end of training and ϕ's evolution over it (nothing without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:  # the viz extra: tables only
        return []
    from kintsugi_optim import sigils

    written = []
    for task in tasks:
        for method, slug in SIGIL_METHODS.items():
            trainer = trainers.get((task, method))
            if trainer is None:  # not run on this task
                continue
            path = out / f"sigils_{task}_{slug}.png"
            sigils.plot_phi_distribution(
                trainer.gilded, title=f"{method}: ϕ at the end of training, {task} task", path=path)
            written.append(path)
            if trainer.history is None:
                continue
            path = out / f"phi_evolution_{task}_{slug}.png"
            sigils.plot_phi_evolution(
                trainer.history, title=f"{method}: ϕ over training, {task} task", path=path)
            written.append(path)
    return written


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
            "torch": torch.__version__, "kintsugi_optim": kintsugi_optim.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "torch_threads": TRAINING_THREADS}

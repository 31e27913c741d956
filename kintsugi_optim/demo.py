"""The main job: a small, reproducible study of what Kintsugi optimization does to learning.

Two tasks made in-process (no downloads), each a setting where plain empirical risk minimisation
neglects part of the data:

* ``rare`` — rare-event classification: a minority class of 2% carried by a weak but informative
  feature among distractors. Plain Adam learns to predict the majority class.
* ``spurious`` — spurious correlation (Waterbirds-like): a noisy core feature and a clean spurious
  one agree on 95% of training samples and are independent at test; the groups are
  (label, spurious attribute). Plain Adam leans on the spurious feature and fails the minority
  groups.

Each task is learnt by the same small MLP with each method of :data:`METHODS`, over several
seeds; the metrics (accuracy, balanced accuracy, minority recall, worst-group accuracy) and wall
times are reported as mean ± std. Pathways for the reweighting methods are the classes (``rare``)
or the groups (``spurious``), which the training loop knows, as Group DRO assumes.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import kintsugi_optim
from kintsugi_optim import (GildedLoss, GilderOptimizer, KintsugiOptimizer, PhiHistory, VWPR,
                            group_dro)

__all__ = ["Task", "METHODS", "TASKS", "make_task", "run_study", "format_table"]


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------


@dataclass
class Task:
    """A classification task with pathway labels.

    x: [N, D] float32 features; y: [N] class labels; groups: [N] pathway ids used by the
    reweighting methods and by worst-group accuracy (classes for ``rare``, (label, attribute)
    for ``spurious``). ``num_groups`` counts the pathways, ``num_classes`` the labels.
    """

    name: str
    title: str
    train: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    num_classes: int
    num_groups: int
    group_names: list[str]
    minority_class: int | None = None


def _rare_event(generator: torch.Generator, n_train: int, n_test: int) -> Task:
    dim, prevalence = 16, 0.02

    def sample(n):
        y = (torch.rand(n, generator=generator) < prevalence).long()
        x = torch.randn(n, dim, generator=generator)
        x[:, 0] += 2.5 * y  # the weak but informative feature
        x[:, 1] += 1.0 * y * torch.sign(x[:, 2])  # and a weaker interaction with a distractor
        return x, y, y.clone()

    return Task("rare", "Rare event (2% minority class)", sample(n_train), sample(n_test),
                num_classes=2, num_groups=2, group_names=["majority", "minority"],
                minority_class=1)


def _spurious(generator: torch.Generator, n_train: int, n_test: int) -> Task:
    dim, agreement = 12, 0.95

    def sample(n, agree):
        y = torch.randint(0, 2, (n,), generator=generator)
        same = torch.rand(n, generator=generator) < agree
        attribute = torch.where(same, y, 1 - y)
        x = torch.randn(n, dim, generator=generator)
        x[:, 0] = (2 * y - 1) * 1.0 + 1.0 * torch.randn(n, generator=generator)  # core: noisy
        x[:, 1] = (2 * attribute - 1) * 1.0 + 0.1 * torch.randn(n, generator=generator)  # spurious
        return x, y, 2 * y + attribute

    return Task("spurious", "Spurious correlation (groups: label × attribute)",
                sample(n_train, agreement), sample(n_test, 0.5), num_classes=2, num_groups=4,
                group_names=["y0·a0", "y0·a1", "y1·a0", "y1·a1"])


TASKS: dict[str, Callable[..., Task]] = {"rare": _rare_event, "spurious": _spurious}


def make_task(name: str, seed: int, *, n_train: int = 8000, n_test: int = 20000) -> Task:
    """Generate task ``name`` ("rare" or "spurious") deterministically from ``seed``."""
    return TASKS[name](torch.Generator().manual_seed(10_000 + seed), n_train, n_test)


# ---------------------------------------------------------------------------------------------
# Methods: each builds a trainer (one training step on a batch) for a fresh model
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """step(x, y, groups) trains on one batch.

    ``gilded`` is the object carrying ϕ (a KintsugiOptimizer, VWPR or GildedLoss) and
    ``history`` its :class:`PhiHistory`, recorded every step, for the sigils; ``forward``
    replaces the model at evaluation when the trainer wraps it.
    """

    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    gilded: object | None = None
    history: PhiHistory | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None


LR = {"adam": 3e-3, "sgd": 0.05}
RECORD_EVERY = 4  # steps between PhiHistory records (VWPR records every step itself)


def _plain(base):
    def build(model, task):
        opt = (torch.optim.Adam(model.parameters(), lr=LR["adam"]) if base == "adam" else
               torch.optim.SGD(model.parameters(), lr=LR["sgd"], momentum=0.9))

        def step(x, y, g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return Trainer(step)

    return build


def _reweighted(model, task):
    # Inverse-frequency weights per pathway (class or group): the usual fix for imbalance.
    counts = torch.bincount(task.train[2], minlength=task.num_groups).float()
    weights = counts.sum() / (task.num_groups * counts.clamp_min(1))
    weights = weights.to(next(model.parameters()).device)
    opt = torch.optim.Adam(model.parameters(), lr=LR["adam"])

    def step(x, y, g):
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        (weights[g] * losses).sum().div(weights[g].sum()).backward()
        opt.step()

    return Trainer(step)


def _sculptor(pathway):
    def build(model, task):
        opt = KintsugiOptimizer(model.named_parameters(), lr=LR["adam"], pathway=pathway,
                                beta=0.05)
        history, steps = PhiHistory(), itertools.count()

        def step(x, y, g):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if (step_index := next(steps)) % RECORD_EVERY == 0:
                history.record(opt, step=step_index)

        return Trainer(step, opt, history)

    return build


def _vwpr(base):
    def build(model, task):
        vwpr = VWPR(model)
        opt_theta = (torch.optim.Adam(vwpr.theta_parameters(), lr=LR["adam"]) if base == "adam"
                     else torch.optim.SGD(vwpr.theta_parameters(), lr=LR["sgd"], momentum=0.9))
        opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.05, fracture="relative",
                                  phi_norm="mean")

        def step(x, y, g):  # the source's ritual
            vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt_theta, opt_phi)

        return Trainer(step, vwpr, vwpr.history, forward=vwpr)

    return build


def _gilded_loss(model, task):
    gilded = GildedLoss(task.num_groups, reduction="mean").to(next(model.parameters()).device)
    opt_phi = GilderOptimizer([gilded.phi], beta=0.05, phi_norm="mean")
    return _loss_level_trainer(model, gilded, opt_phi)


def _group_dro(model, task):
    gilded, opt_phi = group_dro(task.num_groups, step_size=0.05)
    return _loss_level_trainer(model, gilded.to(next(model.parameters()).device), opt_phi)


def _loss_level_trainer(model, gilded, opt_phi):
    opt_theta = torch.optim.Adam(model.parameters(), lr=LR["adam"])
    history, steps = PhiHistory(), itertools.count()

    def step(x, y, g):
        opt_theta.zero_grad()
        opt_phi.zero_grad()
        gilded(F.cross_entropy(model(x), y, reduction="none"), g).backward()
        opt_theta.step()
        opt_phi.step()
        if (step_index := next(steps)) % RECORD_EVERY == 0:
            history.record(gilded, step=step_index)

    return Trainer(step, gilded, history)


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, Task], Trainer]
    note: str


METHODS: list[Method] = [
    Method("Adam", _plain("adam"), "plain empirical risk minimisation"),
    Method("Adam + reweighted CE", _reweighted,
           "inverse-frequency weights per class/group: what users pick today"),
    Method("Sculptor (element)", _sculptor("element"), "KintsugiOptimizer, base adam, ϕ per weight"),
    Method("Sculptor (row)", _sculptor("row"), "KintsugiOptimizer, base adam, ϕ per neuron"),
    Method("VWPR + Adam + Gilder", _vwpr("adam"),
           "ϕ per activation channel; Adam's normalisation mostly cancels a steady ϕ"),
    Method("SGD", _plain("sgd"), "SGD with momentum 0.9"),
    Method("VWPR + SGD + Gilder", _vwpr("sgd"), "ϕ per activation channel, acting in full"),
    Method("GildedLoss (additive)", _gilded_loss, "ϕ per class/group, additive gilding"),
    Method("GildedLoss (Group DRO)", _group_dro,
           "ϕ per class/group, multiplicative and normalised: Group DRO"),
]


# ---------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------


def make_model(in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, num_classes))


def evaluate(logits: torch.Tensor, task: Task) -> dict[str, float]:
    """Accuracy, balanced accuracy (mean per-class recall), minority recall, worst-group accuracy."""
    _, y, groups = task.test
    correct = (logits.argmax(1) == y).float()
    recalls = [correct[y == c].mean().item() for c in range(task.num_classes)]
    metrics = {"accuracy": correct.mean().item(), "balanced_accuracy": float(np.mean(recalls))}
    if task.minority_class is not None:
        metrics["minority_recall"] = recalls[task.minority_class]
    group_acc = [correct[groups == k].mean().item() for k in range(task.num_groups)
                 if bool((groups == k).any())]
    metrics["worst_group_accuracy"] = min(group_acc)
    return metrics


def train_one(task: Task, method: Method, seed: int, steps: int, device: torch.device,
              batch_size: int = 256) -> tuple[dict[str, float], Trainer]:
    """Train a fresh model on ``task`` with ``method``; return test metrics and the trainer."""
    torch.manual_seed(seed)
    model = make_model(task.train[0].shape[1], task.num_classes).to(device)
    trainer = method.build(model, task)
    x, y, g = (t.to(device) for t in task.train)
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch_size,), generator=order).to(device)
        trainer.step(x[idx], y[idx], g[idx])
    with torch.no_grad():
        logits = (trainer.forward or model)(task.test[0].to(device)).cpu()
    metrics = evaluate(logits, task)
    metrics["wall_time_s"] = time.perf_counter() - start
    return metrics, trainer


# ---------------------------------------------------------------------------------------------
# The study and its report
# ---------------------------------------------------------------------------------------------

METRIC_COLUMNS = {
    "rare": ["accuracy", "balanced_accuracy", "minority_recall"],
    "spurious": ["accuracy", "balanced_accuracy", "worst_group_accuracy"],
}
COLUMN_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
                 "minority_recall": "minority recall", "worst_group_accuracy": "worst-group acc.",
                 "wall_time_s": "wall time (s)"}


def run_study(tasks: Iterable[str], seeds: int, steps: int, device: torch.device,
              progress: Callable[[int, int, str], None] | None = None,
              n_train: int = 8000, n_test: int = 20000) -> dict:
    """Train every method on every task for ``seeds`` seeds; return per-run and summary results.

    Also returns, under "trainers", the seed-0 trainer of each (task, method) for the sigils.
    """
    tasks = list(tasks)
    total, done = len(tasks) * len(METHODS) * seeds, 0
    results: dict = {"runs": [], "summary": {}, "trainers": {}}
    for task_name in tasks:
        for seed in range(seeds):
            task = make_task(task_name, seed, n_train=n_train, n_test=n_test)
            for method in METHODS:
                if progress:
                    progress(done, total, f"{task_name} · {method.name} · seed {seed}")
                metrics, trainer = train_one(task, method, seed, steps, device)
                results["runs"].append({"task": task_name, "method": method.name, "seed": seed,
                                        **metrics})
                if seed == 0:
                    results["trainers"][(task_name, method.name)] = trainer
                done += 1
    if progress:
        progress(done, total, "done")
    for task_name in tasks:
        for method in METHODS:
            runs = [r for r in results["runs"] if r["task"] == task_name and r["method"] == method.name]
            results["summary"].setdefault(task_name, {})[method.name] = {
                key: (float(np.mean([r[key] for r in runs])), float(np.std([r[key] for r in runs])))
                for key in METRIC_COLUMNS[task_name] + ["wall_time_s"]
            }
    return results


def format_table(summary: dict, task_name: str, *, markdown: bool = False,
                 columns: list[str] | None = None) -> str:
    """The results table of one task: one row per method, cells "mean ± std"."""
    columns = columns or METRIC_COLUMNS[task_name]
    header = ["method"] + [COLUMN_TITLES.get(c, c) for c in columns]
    rows = [[name] + [f"{m[c][0]:.3f} ± {m[c][1]:.3f}" for c in columns]
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
    times = {"time": {method: {task: results["summary"][task][method]["wall_time_s"]
                               for task in tasks} for method in results["summary"][tasks[0]]}}
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
                 "GildedLoss (Group DRO)": "group_dro"}


def _write_sigils(trainers: dict, tasks: list[str], out: Path) -> list[Path]:
    """Per task, for the seed-0 run of each method in :data:`SIGIL_METHODS`: the ϕ histograms
    at the end of training and ϕ's evolution over it (nothing without matplotlib)."""
    if importlib.util.find_spec("matplotlib") is None:  # the viz extra: tables only
        return []
    from kintsugi_optim import sigils

    written = []
    for task in tasks:
        for method, slug in SIGIL_METHODS.items():
            trainer = trainers[(task, method)]
            path = out / f"sigils_{task}_{slug}.png"
            sigils.plot_phi_distribution(
                trainer.gilded, title=f"{method}: ϕ at the end of training, {task} task", path=path)
            written.append(path)
            path = out / f"phi_evolution_{task}_{slug}.png"
            sigils.plot_phi_evolution(
                trainer.history, title=f"{method}: ϕ over training, {task} task", path=path)
            written.append(path)
    return written


def environment() -> dict:
    return {"date": time.strftime("%Y-%m-%d"), "python": sys.version.split()[0],
            "torch": torch.__version__, "kintsugi_optim": kintsugi_optim.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cpus",
            "torch_threads": torch.get_num_threads()}


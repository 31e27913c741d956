"""The main job: a small, reproducible study of what Kintsugi optimization does to learning.

Three tasks made in-process (no downloads), each a setting where plain empirical risk
minimisation neglects part of the data:

* ``rare`` — rare-event classification: a minority class of 2% carried by a weak but informative
  feature among distractors. Plain Adam learns to predict the majority class.
* ``spurious`` — spurious correlation (Waterbirds-like): a noisy core feature and a clean spurious
  one agree on 95% of training samples and are independent at test; the groups are
  (label, spurious attribute). Plain Adam leans on the spurious feature and fails the minority
  groups.
* ``hidden`` — the same kind of shortcut with the groups unknown to the learner: three balanced
  classes, a weak feature against a strong spurious one that agrees with the label on 90% of
  training samples. The label-using methods see only the classes, which are balanced, so only
  label-free methods can find the atypical examples.

Each task is learnt by the same small MLP with each method of :data:`METHODS`, over several
seeds; the metrics (accuracy, balanced accuracy, minority recall, worst-group accuracy) and wall
times are reported as mean ± std. Pathways for the reweighting methods marked "[uses labels]"
are the classes (``rare``, ``hidden``) or the groups (``spurious``), which the training loop
knows, as Group DRO assumes. Focal loss, JTT and Kintsugi's sample-level gilding use no labels
beyond the targets (docs/sample-gilding.md).
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
                            group_dro, sample_gilding)

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
    hidden_groups: bool = False

    @property
    def num_pathways(self) -> int:
        """Pathways known to the learner: the groups, or only the classes when the groups
        are hidden (then ``train[2]`` holds the class labels)."""
        return self.num_classes if self.hidden_groups else self.num_groups


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


def _hidden(generator: torch.Generator, n_train: int, n_test: int) -> Task:
    dim, classes, typical = 16, 3, 0.9

    def sample(n, agree):
        y = torch.randint(0, classes, (n,), generator=generator)
        same = torch.rand(n, generator=generator) < agree
        other = (y + torch.randint(1, classes, (n,), generator=generator)) % classes
        attribute = torch.where(same, y, other)
        x = torch.randn(n, dim, generator=generator)
        x[:, :classes] += 1.5 * F.one_hot(y, classes)  # weak: a shift of 1.5 under unit noise
        x[:, classes:2 * classes] = (2.0 * F.one_hot(attribute, classes)  # the clean shortcut
                                     + 0.1 * torch.randn(n, classes, generator=generator))
        return x, y, 2 * y + (attribute != y).long()

    train, test = sample(n_train, typical), sample(n_test, 1 / classes)
    train = (train[0], train[1], train[1].clone())  # the learner knows the classes, not the groups
    return Task("hidden", "Hidden groups (3 classes, a weak feature against a strong spurious one)",
                train, test, num_classes=classes, num_groups=2 * classes,
                group_names=[f"y{c}·{kind}" for c in range(classes)
                             for kind in ("typical", "atypical")],
                hidden_groups=True)


TASKS: dict[str, Callable[..., Task]] = {"rare": _rare_event, "spurious": _spurious,
                                         "hidden": _hidden}


def make_task(name: str, seed: int, *, n_train: int = 8000, n_test: int = 20000) -> Task:
    """Generate task ``name`` ("rare" or "spurious") deterministically from ``seed``."""
    return TASKS[name](torch.Generator().manual_seed(10_000 + seed), n_train, n_test)


# ---------------------------------------------------------------------------------------------
# Methods: each builds a trainer (one training step on a batch) for a fresh model
# ---------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """step(x, y, groups, indices) trains on one batch (``indices``: the examples' positions in
    the training set, for sample-level methods).

    ``gilded`` is the object carrying ϕ (a KintsugiOptimizer, VWPR, GildedLoss or sample
    criterion) and ``history`` its :class:`PhiHistory`, recorded every step, for the sigils;
    ``forward`` replaces the model at evaluation when the trainer wraps it. Two-pass methods
    (JTT, Kintsugi re-fire) train ``firing_fraction`` of the steps first, then
    ``second_pass(model)`` gives the trainer of a fresh model; ``weights`` (JTT) makes batches
    sample the training set in proportion to them.
    """

    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    gilded: object | None = None
    history: PhiHistory | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    firing_fraction: float | None = None
    second_pass: Callable[[nn.Module], "Trainer"] | None = None
    weights: torch.Tensor | None = None


LR = {"adam": 3e-3, "sgd": 0.05}
RECORD_EVERY = 4  # steps between PhiHistory records (VWPR records every step itself)


def _plain(base):
    def build(model, task):
        opt = (torch.optim.Adam(model.parameters(), lr=LR["adam"]) if base == "adam" else
               torch.optim.SGD(model.parameters(), lr=LR["sgd"], momentum=0.9))

        def step(x, y, g, idx):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()

        return Trainer(step)

    return build


def _reweighted(model, task):
    # Inverse-frequency weights per pathway (class or group): the usual fix for imbalance.
    counts = torch.bincount(task.train[2], minlength=task.num_pathways).float()
    weights = counts.sum() / (task.num_pathways * counts.clamp_min(1))
    weights = weights.to(next(model.parameters()).device)
    opt = torch.optim.Adam(model.parameters(), lr=LR["adam"])

    def step(x, y, g, idx):
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

        def step(x, y, g, idx):
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

        def step(x, y, g, idx):  # the source's ritual
            vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt_theta, opt_phi)

        return Trainer(step, vwpr, vwpr.history, forward=vwpr)

    return build


def _gilded_loss(model, task):
    gilded = GildedLoss(task.num_pathways, reduction="mean").to(next(model.parameters()).device)
    opt_phi = GilderOptimizer([gilded.phi], beta=0.05, phi_norm="mean")
    return _loss_level_trainer(model, gilded, opt_phi)


def _group_dro(model, task):
    gilded, opt_phi = group_dro(task.num_pathways, step_size=0.05)
    return _loss_level_trainer(model, gilded.to(next(model.parameters()).device), opt_phi)


def _loss_level_trainer(model, gilded, opt_phi):
    opt_theta = torch.optim.Adam(model.parameters(), lr=LR["adam"])
    history, steps = PhiHistory(), itertools.count()

    def step(x, y, g, idx):
        opt_theta.zero_grad()
        opt_phi.zero_grad()
        gilded(F.cross_entropy(model(x), y, reduction="none"), g).backward()
        opt_theta.step()
        opt_phi.step()
        if (step_index := next(steps)) % RECORD_EVERY == 0:
            history.record(gilded, step=step_index)

    return Trainer(step, gilded, history)


def _focal(model, task, gamma: float = 2.0):
    # Focal loss (Lin et al., 2017): (1 − p_y)^γ·CE, γ = 2 as in the paper; no labels needed.
    opt = torch.optim.Adam(model.parameters(), lr=LR["adam"])

    def step(x, y, g, idx):
        opt.zero_grad()
        losses = F.cross_entropy(model(x), y, reduction="none")
        ((1 - torch.exp(-losses)) ** gamma * losses).mean().backward()
        opt.step()

    return Trainer(step)


JTT_FIRING, JTT_UPWEIGHT = 0.1, 50.0


def _jtt(model, task):
    # JTT (Liu et al., 2021): ERM for a short first run, then a fresh model trained on the
    # training set with the first run's errors upsampled λ times. (T_id, λ) are tuned per data
    # set in the paper (λ from 6 to 100); (0.1·T, 50) is the best of the usual values in
    # docs/sample-gilding.md's study, so this baseline is, if anything, favoured.
    first = _plain("adam")(model, task)

    def second_pass(fresh):
        x, y = (t.to(next(model.parameters()).device) for t in task.train[:2])
        with torch.no_grad():
            errors = (model(x).argmax(1) != y).float()
        trainer = _plain("adam")(fresh, task)
        trainer.weights = 1 + (JTT_UPWEIGHT - 1) * errors
        return trainer

    first.firing_fraction, first.second_pass = JTT_FIRING, second_pass
    return first


def _sample_gilding(model, task):
    # Label-free Kintsugi with the package's defaults, following criterion.firing_fraction.
    criterion, gilder = sample_gilding(task.train[0].shape[0])
    criterion.to(next(model.parameters()).device)

    def trainer_for(net):
        opt = torch.optim.Adam(net.parameters(), lr=LR["adam"])

        def step(x, y, g, idx):
            loss = criterion(F.cross_entropy(net(x), y, reduction="none"), idx)
            opt.zero_grad()
            gilder.zero_grad()
            loss.backward()
            opt.step()
            gilder.step()

        return Trainer(step, criterion)

    first = trainer_for(model)
    if criterion.firing_fraction is not None:
        def second_pass(fresh):
            criterion.refire()
            return trainer_for(fresh)

        first.firing_fraction, first.second_pass = criterion.firing_fraction, second_pass
    return first


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[nn.Module, Task], Trainer]
    note: str


METHODS: list[Method] = [
    Method("Adam", _plain("adam"), "plain empirical risk minimisation"),
    Method("Adam + reweighted CE [uses labels]", _reweighted,
           "inverse-frequency weights per class/group: what users pick today"),
    Method("Sculptor (element)", _sculptor("element"), "KintsugiOptimizer, base adam, ϕ per weight"),
    Method("Sculptor (row)", _sculptor("row"), "KintsugiOptimizer, base adam, ϕ per neuron"),
    Method("VWPR + Adam + Gilder", _vwpr("adam"),
           "ϕ per activation channel; Adam's normalisation mostly cancels a steady ϕ"),
    Method("SGD", _plain("sgd"), "SGD with momentum 0.9"),
    Method("VWPR + SGD + Gilder", _vwpr("sgd"), "ϕ per activation channel, acting in full"),
    Method("GildedLoss (additive) [uses labels]", _gilded_loss,
           "ϕ per class/group, additive gilding"),
    Method("GildedLoss (Group DRO) [uses labels]", _group_dro,
           "ϕ per class/group, multiplicative and normalised: Group DRO"),
    Method("Focal loss", _focal, "label-free: (1 − p)²·CE"),
    Method("JTT", _jtt, "label-free, two passes: upsample a short first run's errors 50×"),
    Method("Kintsugi samples", _sample_gilding,
           "label-free: ϕ per training example, sample_gilding() defaults"),
]
LABEL_FREE_ONLY_TASKS = {"hidden"}  # where group labels are unknown, skip ϕ-per-weight variants



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
    x, y, g = (t.to(device) for t in task.train)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = make_model(task.train[0].shape[1], task.num_classes).to(device)
    trainer = method.build(model, task)
    if trainer.firing_fraction is not None:  # the firing run; then a fresh model, same init
        _train_steps(trainer, x, y, g, seed, int(trainer.firing_fraction * steps), batch_size)
        torch.manual_seed(seed)
        model = make_model(task.train[0].shape[1], task.num_classes).to(device)
        trainer = trainer.second_pass(model)
    _train_steps(trainer, x, y, g, seed, steps, batch_size)
    with torch.no_grad():
        logits = (trainer.forward or model)(task.test[0].to(device)).cpu()
    metrics = evaluate(logits, task)
    metrics["wall_time_s"] = time.perf_counter() - start
    return metrics, trainer


def _train_steps(trainer: Trainer, x, y, g, seed: int, steps: int, batch_size: int) -> None:
    order = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        if trainer.weights is None:
            idx = torch.randint(0, x.shape[0], (batch_size,), generator=order)
        else:
            idx = torch.multinomial(trainer.weights.cpu(), batch_size, replacement=True,
                                    generator=order)
        idx = idx.to(x.device)
        trainer.step(x[idx], y[idx], g[idx], idx)


def methods_for(task_name: str) -> list[Method]:
    """The methods the demo runs on a task: all, or on tasks whose groups are hidden from the
    learner, plain Adam, the loss-level and the label-free methods."""
    if task_name not in LABEL_FREE_ONLY_TASKS:
        return METHODS
    return [m for m in METHODS if not m.name.startswith(("Sculptor", "VWPR", "SGD"))]


# ---------------------------------------------------------------------------------------------
# The study and its report
# ---------------------------------------------------------------------------------------------

METRIC_COLUMNS = {
    "rare": ["accuracy", "balanced_accuracy", "minority_recall"],
    "spurious": ["accuracy", "balanced_accuracy", "worst_group_accuracy"],
    "hidden": ["accuracy", "balanced_accuracy", "worst_group_accuracy"],
}
COLUMN_TITLES = {"accuracy": "accuracy", "balanced_accuracy": "balanced acc.",
                 "minority_recall": "minority recall", "worst_group_accuracy": "worst-group acc.",
                 "wall_time_s": "wall time (s)"}


TRAINING_THREADS = 1


def run_study(tasks: Iterable[str], seeds: int, steps: int, device: torch.device,
              progress: Callable[[int, int, str], None] | None = None,
              n_train: int = 8000, n_test: int = 20000) -> dict:
    """Train every method on every task for ``seeds`` seeds; return per-run and summary results.

    Also returns, under "trainers", the seed-0 trainer of each (task, method) for the sigils.
    """
    tasks = list(tasks)
    # One thread: these models are too small to gain from intra-op threads, and on a busy
    # machine OpenMP's spinning threads made a run up to 40× slower (measured).
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAINING_THREADS)
    try:
        return _run_study(tasks, seeds, steps, device, progress, n_train, n_test)
    finally:
        torch.set_num_threads(threads)


def _run_study(tasks, seeds, steps, device, progress, n_train, n_test) -> dict:
    total, done = sum(len(methods_for(t)) for t in tasks) * seeds, 0
    results: dict = {"runs": [], "summary": {}, "trainers": {}}
    for task_name in tasks:
        for seed in range(seeds):
            task = make_task(task_name, seed, n_train=n_train, n_test=n_test)
            for method in methods_for(task_name):
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
        for method in methods_for(task_name):
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


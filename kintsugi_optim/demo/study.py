"""Training and evaluation: every method on every task over several seeds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from kintsugi_optim.demo.methods import Method, Trainer, methods_for
from kintsugi_optim.demo.tasks import Task, make_task

__all__ = ["make_model", "evaluate", "train_one", "run_study", "METRIC_COLUMNS",
           "TRAINING_THREADS"]


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
              batch_size: int = 256,
              model_fn: Callable[[int, int], nn.Module] = make_model,
              ) -> tuple[dict[str, float], Trainer]:
    """Train a fresh model on ``task`` with ``method``; return test metrics and the trainer.

    ``model_fn(features, classes)`` builds the model, ``features`` = ``task.train[0].shape[1]``
    (default: the demo's MLP)."""
    x, y, g = (t.to(device) for t in task.train)
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = model_fn(task.train[0].shape[1], task.num_classes).to(device)
    trainer = method.build(model, task)
    if trainer.firing_steps is not None:  # the firing run; then a fresh model, same init
        _train_steps(trainer, x, y, g, seed, trainer.firing_steps(steps, batch_size), batch_size)
        torch.manual_seed(seed)
        model = model_fn(task.train[0].shape[1], task.num_classes).to(device)
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


METRIC_COLUMNS = {
    "rare": ["accuracy", "balanced_accuracy", "minority_recall"],
    "spurious": ["accuracy", "balanced_accuracy", "worst_group_accuracy"],
    "hidden": ["accuracy", "balanced_accuracy", "worst_group_accuracy"],
}


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

"""The demo's three tasks, generated in-process from a seed (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn import functional as F

__all__ = ["Task", "TASKS", "make_task"]


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


def _rare_event(generator: torch.Generator, n_train: int, n_test: int, *,
                prevalence: float = 0.02) -> Task:
    dim = 16

    def sample(n):
        y = (torch.rand(n, generator=generator) < prevalence).long()
        x = torch.randn(n, dim, generator=generator)
        x[:, 0] += 2.5 * y  # the weak but informative feature
        x[:, 1] += 1.0 * y * torch.sign(x[:, 2])  # and a weaker interaction with a distractor
        return x, y, y.clone()

    return Task("rare", f"Rare event ({100 * prevalence:g}% minority class)", sample(n_train),
                sample(n_test),
                num_classes=2, num_groups=2, group_names=["majority", "minority"],
                minority_class=1)


def _spurious(generator: torch.Generator, n_train: int, n_test: int, *,
              agreement: float = 0.95) -> Task:
    dim = 12

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


def _hidden(generator: torch.Generator, n_train: int, n_test: int, *, classes: int = 3,
            typical: float = 0.9) -> Task:
    dim = 16

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
    return Task("hidden",
                f"Hidden groups ({classes} classes, a weak feature against a strong spurious one)",
                train, test, num_classes=classes, num_groups=2 * classes,
                group_names=[f"y{c}·{kind}" for c in range(classes)
                             for kind in ("typical", "atypical")],
                hidden_groups=True)


TASKS: dict[str, Callable[..., Task]] = {"rare": _rare_event, "spurious": _spurious,
                                         "hidden": _hidden}


def make_task(name: str, seed: int, *, n_train: int = 8000, n_test: int = 20000,
              **strength) -> Task:
    """Generate task ``name`` ("rare", "spurious" or "hidden") deterministically from ``seed``;
    ``strength`` overrides its imbalance (``prevalence``, ``agreement``, ``classes``,
    ``typical``)."""
    return TASKS[name](torch.Generator().manual_seed(10_000 + seed), n_train, n_test, **strength)

"""Tasks for benchmarks/sample_study.py beyond the demo's three, and each task's true minority.

Every claim of the sample-gilding study is also checked where the demo's tasks do not reach:
``clean0`` (nothing to find), ``clean`` (nothing to find, 5 % random labels), ``noisy`` (the
demo's spurious task with 10 % of its labels flipped), ``longtail`` (ten classes, imbalance
100) and the demo's tasks at other strengths of their imbalance (``VARIANTS``).
:func:`make_task` builds these and the demo's.
"""

from __future__ import annotations

import torch

from kintsugi_optim.demo import make_task as make_demo_task
from kintsugi_optim.demo.tasks import Task

__all__ = ["CHECK_TASKS", "VARIANTS", "make_task", "true_minority"]


def _noisy_spurious(seed: int, n_train: int = 8000) -> Task:
    """The demo's spurious task with 10 % of the training labels flipped at random: the firing
    run's errors now include examples no model should fit."""
    task = make_demo_task("spurious", seed, n_train=n_train)
    x, y, g = task.train
    flip = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(seed)) < 0.1
    task.train = (x, torch.where(flip, 1 - y, y), g)
    task.name = "noisy"
    return task


def _clean(seed: int, n_train: int = 8000, n_test: int = 20000, noise: float = 0.05) -> Task:
    """Nothing to find: four balanced Gaussian classes and 5 % of the training labels drawn
    at random (``noise``). A label-free reweighting can only lose here; the target is the worst
    class's accuracy, "majority" the overall accuracy."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    centres = 1.2 * torch.randn(4, 16, generator=gen)

    def sample(n, noise):
        y = torch.randint(0, 4, (n,), generator=gen)
        x = centres[y] + torch.randn(n, 16, generator=gen)
        flip = torch.rand(n, generator=gen) < noise
        y = torch.where(flip, torch.randint(0, 4, (n,), generator=gen), y)
        return x, y, y.clone()

    return Task("clean", "Nothing to find", sample(n_train, noise), sample(n_test, 0.0),
                num_classes=4, num_groups=4, group_names=[f"y{c}" for c in range(4)])


def _longtail(seed: int, n_train: int = 8000, n_test: int = 20000) -> Task:
    """Ten Gaussian classes whose training frequencies fall as 0.6^k (the last has about 30
    examples, 1/100 of the first); balanced at test. The target is the worst class's accuracy,
    "majority" the accuracy on the three head classes; the minority is the five tail classes."""
    gen = torch.Generator().manual_seed(30_000 + seed)
    centres = 1.0 * torch.randn(10, 16, generator=gen)
    prior = 0.6 ** torch.arange(10.0)

    def sample(n, weights):
        y = torch.multinomial(weights, n, replacement=True, generator=gen)
        return centres[y] + torch.randn(n, 16, generator=gen), y, y.clone()

    return Task("longtail", "Long tail (10 classes, imbalance 100)",
                sample(n_train, prior / prior.sum()), sample(n_test, torch.ones(10)),
                num_classes=10, num_groups=10, group_names=[f"y{c}" for c in range(10)])


CHECK_TASKS = {"noisy": _noisy_spurious, "clean": _clean,
               "clean0": lambda seed, n_train: _clean(seed, n_train, noise=0.0),
               "longtail": _longtail}

# The demo's tasks with another strength of their imbalance, evaluated as the demo's task:
# the rare class at 1 % and 5 %, the spurious cue agreeing 90 % and 99 % of the time, the
# hidden task with five classes or 80 % typical examples.
VARIANTS = {"rare1": ("rare", {"prevalence": 0.01}), "rare5": ("rare", {"prevalence": 0.05}),
            "spurious90": ("spurious", {"agreement": 0.90}),
            "spurious99": ("spurious", {"agreement": 0.99}),
            "hidden5": ("hidden", {"classes": 5}), "hidden80": ("hidden", {"typical": 0.8})}


def make_task(name: str, seed: int, n_train: int = 8000) -> Task:
    """Task ``name`` (a check task or one of the demo's) for ``seed``, with ``n_train``
    training examples."""
    if name in VARIANTS:
        base, strength = VARIANTS[name]
        return make_demo_task(base, seed, n_train=n_train, **strength)
    if name not in CHECK_TASKS:
        return make_demo_task(name, seed, n_train=n_train)
    task = CHECK_TASKS[name](seed, n_train=n_train)
    task.name = name.rstrip("0")  # clean0 is evaluated as clean
    return task


def true_minority(task) -> torch.Tensor:
    """The training examples the shortcut fails: the rare class, the groups whose cue disagrees
    with the label, or (hidden) those whose clean attribute, the argmax of x[:, C:2C], is not
    the class."""
    x, y, g = task.train
    if task.name == "rare":
        return y == 1
    if task.name in ("spurious", "noisy"):
        return (g == 1) | (g == 2)
    if task.name == "clean":
        return torch.zeros_like(y, dtype=torch.bool)
    if task.name == "longtail":
        return y >= 5
    C = task.num_classes
    return x[:, C:2 * C].argmax(1) != y

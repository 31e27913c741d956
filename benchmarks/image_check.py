"""The demo's label-free methods on a conv net and synthetic images: a check of the sample
gilding default (docs/sample-gilding.md) outside the model and data it was chosen on.

The study behind the default trained the demo's MLP on Gaussian features. Here the same methods
(``kintsugi_optim.demo``'s rows, its training loop and its metrics, unchanged) train a small CNN
on 16×16 colour images made in-process, with two tasks built after the default was chosen:

* ``stripes``: the class is the orientation of faint stripes under pixel noise (a weak feature
  that needs convolutions), and a colour tint agrees with the class in 95 % of the training
  images (a strong shortcut, any linear read of the channel means finds it); at test the two
  are independent. Target: worst (class, tint) group's accuracy.
* ``blob``: a rare class (2 %) whose images hold a faint blob at a random place; half of all
  images hold a brighter ring (a distractor). Target: the rare class's recall.

``--strength`` changes a task's keywords: ``agreement``, ``contrast``, ``tint``, ``noise`` (the
share of training labels flipped) (stripes), ``prevalence``, ``amplitude`` (blob).

    PYTHONPATH=. python benchmarks/image_check.py --seeds 5 --tasks stripes
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import numpy as np
import torch
from torch import nn

from kintsugi_optim.demo.methods import METHODS, Method, _sample_gilding
from kintsugi_optim.demo.study import train_one
from kintsugi_optim.demo.tasks import Task

SIZE = 16
ROWS = ["Adam", "Adam + reweighted CE [uses labels]", "GildedLoss (Group DRO) [uses labels]",
        "Focal loss", "JTT", "Kintsugi samples"]
# the up-weight of the default until the sixth round of docs/sample-gilding.md
BALANCED = Method("Kintsugi samples, balanced",
                  functools.partial(_sample_gilding, upweight="balanced"),
                  "sample_gilding(N, upweight='balanced')")


class ConcatPool(nn.Module):
    """Average and max over the image, side by side: [B, C, H, W] → [B, 2C]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


def make_cnn(in_channels: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), ConcatPool(), nn.Linear(64, num_classes))


def _stripes(seed: int, n_train: int, n_test: int, *, agreement: float = 0.95,
             contrast: float = 0.2, tint: float = 0.5, noise: float = 0.0) -> Task:
    gen = torch.Generator().manual_seed(40_000 + seed)
    coords = torch.arange(SIZE, dtype=torch.float32)

    def sample(n, agree):
        y = torch.randint(0, 2, (n,), generator=gen)
        a = torch.where(torch.rand(n, generator=gen) < agree, y, 1 - y)
        period = 3 + 3 * torch.rand(n, 1, generator=gen)
        phase = 2 * math.pi * torch.rand(n, 1, generator=gen)
        wave = torch.sin(2 * math.pi * coords / period + phase)  # [n, SIZE]
        horizontal = wave[:, :, None].expand(n, SIZE, SIZE)
        pattern = torch.where(y[:, None, None] == 0, horizontal, horizontal.transpose(1, 2))
        x = torch.randn(n, 3, SIZE, SIZE, generator=gen) + contrast * pattern[:, None]
        shift = tint * (2 * a - 1).float()[:, None, None]
        x[:, 0] += shift
        x[:, 1] -= shift
        return x, y, 2 * y + a

    (x, y, groups), test = sample(n_train, agreement), sample(n_test, 0.5)
    # wrong training labels (drawn last, so noise=0 leaves the task as it was); groups stay true
    flip = torch.rand(n_train, generator=gen) < noise
    return Task("stripes", f"Stripes' orientation against a colour tint ({100 * agreement:g} %)",
                (x, torch.where(flip, 1 - y, y), groups), test, num_classes=2, num_groups=4,
                group_names=["y0·a0", "y0·a1", "y1·a0", "y1·a1"])


def _blob(seed: int, n_train: int, n_test: int, *, prevalence: float = 0.02,
          amplitude: float = 2.0) -> Task:
    gen = torch.Generator().manual_seed(50_000 + seed)
    r2 = (torch.arange(SIZE, dtype=torch.float32)[:, None] - torch.arange(SIZE)[None, :]) ** 2

    def bumps(n, widths):  # Gaussian bumps of the given widths at one random place each
        cy, cx = (torch.randint(3, SIZE - 3, (n,), generator=gen) for _ in range(2))
        d2 = r2[cy][:, :, None] + r2[cx][:, None, :]  # [n, S, S]
        return [torch.exp(-d2 / (2 * w ** 2)) for w in widths]

    def sample(n):
        y = (torch.rand(n, generator=gen) < prevalence).long()
        x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
        (blob,) = bumps(n, [1.0])
        x += amplitude * y.float()[:, None, None, None] * blob[:, None]
        wide, narrow = bumps(n, [2.0, 1.0])  # a ring, brighter: a distractor in half the images
        ring = (wide - narrow).clamp_min(0) * (torch.rand(n, 1, 1, generator=gen) < 0.5)
        x += 2 * amplitude * ring[:, None]
        return x, y, y.clone()

    return Task("blob", f"A faint blob ({100 * prevalence:g}% of the images)", sample(n_train),
                sample(n_test), num_classes=2, num_groups=2, group_names=["majority", "minority"],
                minority_class=1)


TASKS = {"stripes": (_stripes, "worst_group_accuracy"), "blob": (_blob, "minority_recall")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="stripes,blob")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--seed-offset", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--n-train", type=int, default=8000)
    parser.add_argument("--n-test", type=int, default=10000)
    parser.add_argument("--rows", default=";".join(ROWS))
    parser.add_argument("--strength", default="", help="task keywords, e.g. agreement=0.85")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    strength = {k: float(v) for k, v in (kv.split("=") for kv in args.strength.split(",") if kv)}
    methods = [m for m in [*METHODS, BALANCED] if m.name in args.rows.split(";")]
    for name in args.tasks.split(","):
        build, target = TASKS[name]
        scores: dict[str, list[tuple[float, float]]] = {m.name: [] for m in methods}
        start = time.perf_counter()
        for seed in range(args.seed_offset, args.seed_offset + args.seeds):
            task = build(seed, args.n_train, args.n_test, **strength)
            for method in methods:
                metrics, _ = train_one(task, method, seed, args.steps, torch.device("cpu"),
                                       model_fn=make_cnn)
                scores[method.name].append((metrics[target], metrics["accuracy"]))
                print(f"{name} seed {seed} {method.name}: {target} {metrics[target]:.3f} "
                      f"accuracy {metrics['accuracy']:.3f} ({metrics['wall_time_s']:.1f} s)",
                      flush=True)
        print(f"\n{name}: {target} (accuracy), mean over seeds {args.seed_offset}–"
              f"{args.seed_offset + args.seeds - 1}, T = {args.steps}; paired Δ against "
              f"the first row [min, max] ({time.perf_counter() - start:.0f} s)")
        base = np.array(scores[methods[0].name])
        for method in methods:
            s = np.array(scores[method.name])
            d = s[:, 0] - base[:, 0]
            print(f"| {method.name} | {s[:, 0].mean():.3f} ({s[:, 1].mean():.3f}) | "
                  f"{d.mean():+.3f} [{d.min():+.3f}, {d.max():+.3f}] |")


if __name__ == "__main__":
    main()

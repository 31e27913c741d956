"""Drop-in check: swap torch's Adam/SGD for KintsugiOptimizer, change nothing else.

Two studies, both single-threaded, each comparing torch's optimizer with Kintsugi's on the
same thing:

* ``quality``: ordinary balanced tasks, small enough to train in seconds, with data made in
  this process (nothing downloaded) — ``mlp`` (10-class Gaussian blobs, MLP), ``cnn`` (10
  classes of 5×5 patterns placed at random in noisy 16×16 images, small CNN), ``regression``
  (Friedman #1, MLP, MSE), ``charlm`` (a 2-layer character transformer on the docstrings of
  Python's standard library, held-out text). For every seed, torch's optimizer and each
  Kintsugi configuration start from the same weights, see the same data in the same order
  (paired seeds); the figure is the final test loss, and Kintsugi's mean over seeds against
  torch's. Kintsugi runs also record the largest ϕ ever held: an SGD step is ϕ·lr·d, so that
  is the largest multiple of torch's step any weight took.
* ``speed``: one optimizer step on three model shapes (an MLP's 4 tensors, 12 tensors of 65k
  elements, a ResNet-like stack of 160 conv/norm tensors), torch's default Adam and SGD
  (momentum 0.9) against ``KintsugiOptimizer(params)`` as constructed by default, stepped in
  interleaved rounds in one process; medians and their ratio. A step is timed by the CPU time
  of its thread (``--clock wall``: wall time), so waiting for a shared core does not count. As in bench_step.py, glibc is
  told to keep freed memory (``--malloc default`` does not): otherwise torch's single-tensor
  step, which frees a few parameter-sized temporaries per tensor, page-faults them in again
  every step and measured 3-22 ms for the same 12 × 65k Adam step on a busy machine.

Usage::

    python benchmarks/dropin.py speed [--rounds 201]
    python benchmarks/dropin.py quality --configs defaults --seeds 6        # the check
    python benchmarks/dropin.py quality --configs screen --seeds 3          # candidate defaults
    python benchmarks/dropin.py quality --tasks mlp,cnn --bases sgdm --seeds 5
    python benchmarks/dropin.py quality --first-seed 100 --seeds 6          # fresh seeds
    python benchmarks/dropin.py quality --configs sgd-why --bases sgd --seeds 6   # plain SGD
    python benchmarks/dropin.py quality --bases sgd --tasks mlp,cnn --lr-scale 0.25

Results are printed and written to ``benchmarks/results/dropin-<study>-<date>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kintsugi_optim import KintsugiOptimizer  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# Tasks: each returns (model, batches, test_loss) for a seed; batches is a list of (x, y).
# ---------------------------------------------------------------------------------------------


def _batches(x, y, batch, epochs, g):
    out = []
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for k in range(0, len(x) - batch + 1, batch):
            idx = order[k:k + batch]
            out.append((x[idx], y[idx]))
    return out


def task_mlp(seed):
    g = torch.Generator().manual_seed(seed)
    classes, per_class, dim = 10, 300, 16
    centres = torch.randn(classes, 2, dim, generator=g) * 1.2  # two blobs per class

    def sample(n):
        y = torch.arange(classes).repeat_interleave(n)
        blob = torch.randint(0, 2, (len(y),), generator=g)
        return centres[y, blob] + torch.randn(len(y), dim, generator=g), y

    x, y = sample(per_class)
    xt, yt = sample(per_class)
    model = nn.Sequential(nn.Linear(dim, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, classes))
    return model, _batches(x, y, 64, 15, g), lambda m: F.cross_entropy(m(xt), yt)


def task_cnn(seed):
    g = torch.Generator().manual_seed(seed)
    classes, per_class, size = 10, 150, 16
    templates = torch.randn(classes, 5, 5, generator=g)

    def sample(n):
        y = torch.arange(classes).repeat_interleave(n)
        images = torch.randn(len(y), 1, size, size, generator=g) * 0.6
        rows = torch.randint(0, size - 4, (len(y),), generator=g)
        cols = torch.randint(0, size - 4, (len(y),), generator=g)
        for k in range(len(y)):
            r, c = int(rows[k]), int(cols[k])
            images[k, 0, r:r + 5, c:c + 5] += templates[y[k]]
        return images, y

    x, y = sample(per_class)
    xt, yt = sample(per_class)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        nn.Linear(32, classes),
    )
    return model, _batches(x, y, 50, 12, g), lambda m: F.cross_entropy(m(xt), yt)


def task_regression(seed):
    g = torch.Generator().manual_seed(seed)

    def sample(n):
        x = torch.rand(n, 10, generator=g)
        y = (10 * torch.sin(math.pi * x[:, 0] * x[:, 1]) + 20 * (x[:, 2] - 0.5) ** 2
             + 10 * x[:, 3] + 5 * x[:, 4] + torch.randn(n, generator=g))
        return x, ((y - 14.4) / 5.0).unsqueeze(1)  # Friedman #1, about unit variance

    x, y = sample(1000)
    xt, yt = sample(2000)
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 1))
    return model, _batches(x, y, 32, 20, g), lambda m: F.mse_loss(m(xt), yt)


_TEXT_MODULES = ("argparse", "collections", "functools", "itertools", "json", "logging", "os",
                 "pathlib", "re", "subprocess", "typing", "unittest", "string", "textwrap",
                 "dataclasses", "contextlib", "inspect", "pickle", "shutil", "tempfile")


def _stdlib_text() -> str:
    import importlib

    docs = []
    for name in _TEXT_MODULES:
        module = importlib.import_module(name)
        for obj in [module, *vars(module).values()]:
            doc = inspect.getdoc(obj) if callable(obj) or obj is module else None
            if doc and doc not in docs:
                docs.append(doc)
    return "\n\n".join(docs)


class CharTransformer(nn.Module):
    def __init__(self, vocab, width=64, layers=2, context=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x):
        h = self.embed(x) + self.position[: x.shape[1]]
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def task_charlm(seed):
    g = torch.Generator().manual_seed(seed)
    text = _stdlib_text()
    vocab = sorted(set(text))
    data = torch.tensor([vocab.index(c) for c in text])
    split = int(0.9 * len(data))
    train, test = data[:split], data[split:]
    context, batch, steps = 32, 32, 300

    def windows(source, n, gen):
        start = torch.randint(0, len(source) - context - 1, (n,), generator=gen)
        idx = start[:, None] + torch.arange(context + 1)
        chunk = source[idx]
        return chunk[:, :-1], chunk[:, 1:]

    batches = [windows(train, batch, g) for _ in range(steps)]
    xt, yt = windows(test, 512, torch.Generator().manual_seed(1234))
    model = CharTransformer(len(vocab), context=context)

    def test_loss(m):
        return F.cross_entropy(m(xt).flatten(0, 1), yt.flatten())

    return model, batches, test_loss


def _loss_for(task):
    return F.mse_loss if task == "regression" else (
        lambda out, y: F.cross_entropy(out.flatten(0, -2), y.flatten()))


TASKS = {"mlp": task_mlp, "cnn": task_cnn, "regression": task_regression, "charlm": task_charlm}

# The user's torch optimizer and its learning rate per task: common choices, each one that
# trains the task well with torch (so Kintsugi is compared where torch is at home).
BASES = {
    "adam": (torch.optim.Adam, dict(), dict(base="adam"),
             {"mlp": 1e-3, "cnn": 3e-3, "regression": 1e-3, "charlm": 3e-3}),
    "sgdm": (torch.optim.SGD, dict(momentum=0.9), dict(base="sgd", momentum=0.9),
             {"mlp": 0.05, "cnn": 0.05, "regression": 0.02, "charlm": 0.1}),
    "sgd": (torch.optim.SGD, dict(), dict(base="sgd"),
            {"mlp": 0.2, "cnn": 0.2, "regression": 0.1, "charlm": 0.5}),
}

# Kintsugi configurations: "defaults" is KintsugiOptimizer's own; "screen" the candidates the
# defaults were chosen from (benchmarks/README.md).
CONFIGS = {
    "defaults": {"defaults": {}},
    "screen": {
        "v0.1": dict(beta=0.01, gamma=0.0, phi_max=None),
        "g0.5": dict(beta=0.01, gamma=0.5, phi_max=None),
        "cap2": dict(beta=0.01, gamma=0.0, phi_max=2.0),
        "cap4": dict(beta=0.01, gamma=0.0, phi_max=4.0),
        "g0.5cap2": dict(beta=0.01, gamma=0.5, phi_max=2.0),
        "b.003g0.5cap2": dict(beta=0.003, gamma=0.5, phi_max=2.0),
        "b.03g0.5cap2": dict(beta=0.03, gamma=0.5, phi_max=2.0),
        "row-g0.5cap2": dict(beta=0.01, gamma=0.5, phi_max=2.0, pathway="row"),
        "tensor-g0.5cap2": dict(beta=0.01, gamma=0.5, phi_max=2.0, pathway="tensor"),
    },
    "confirm": {
        "row-g0.5cap2": dict(beta=0.01, gamma=0.5, phi_max=2.0, pathway="row"),
        "row-g.67cap1.5": dict(beta=0.01, gamma=2 / 3, phi_max=1.5, pathway="row"),
    },
    "confirm2": {
        "row-g.8cap1.25": dict(beta=0.01, gamma=0.8, phi_max=1.25, pathway="row"),
    },
    "confirm4": {
        "row-g.8cap1.25min.8": dict(beta=0.01, gamma=0.8, phi_max=1.25, phi_min=0.8,
                                    pathway="row"),
    },
    # Plain SGD (momentum 0): why the defaults cost it 1-4% on two tasks, and candidates.
    # "shuffled" keeps the defaults' ϕ values but hands them to random rows every step, so it
    # separates what ϕ's spread costs from what its choice of rows costs.
    "sgd-why": {
        "defaults": {},
        "shuffled": dict(_shuffle_phi=True),
        "[.9,1.1]": dict(gamma=1 / 1.1, phi_min=0.9, phi_max=1.1),
        "b.003": dict(beta=0.003),
        "tensor": dict(pathway="tensor"),
    },
    # The noise floor: ϕ moves by about 1e-6, which changes nothing but rounding, so its
    # spread against torch is what chaos alone does to a task's test loss.
    "null": {"β 1e-6": dict(beta=1e-6)},
    "confirm3": {
        "row-b.003g.8cap1.25": dict(beta=0.003, gamma=0.8, phi_max=1.25, pathway="row"),
        "row-g.8cap1.25min.8": dict(beta=0.01, gamma=0.8, phi_max=1.25, phi_min=0.8,
                                    pathway="row"),
    },
}


def _shuffle_phi_(opt):
    with torch.no_grad():
        for state in opt.state.values():
            phi = state.get("phi")
            if phi is not None and phi.dim() > 0:
                phi.copy_(phi.flatten()[torch.randperm(phi.numel())].view_as(phi))


def train(task, seed, make_optimizer, shuffle_phi=False):
    torch.manual_seed(seed)
    model, batches, test_loss = TASKS[task](seed)
    loss_fn = _loss_for(task)
    opt = make_optimizer(model.parameters())
    largest_phi = 1.0
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if shuffle_phi:
            _shuffle_phi_(opt)
        losses.append(loss.item())
        if isinstance(opt, KintsugiOptimizer):
            largest_phi = max(largest_phi, max(
                float(phi.max()) for group in opt.gilding().values() for phi in group.values()))
    with torch.no_grad():
        final = float(test_loss(model))
    return dict(test_loss=final if math.isfinite(final) else float("inf"),
                largest_phi=largest_phi, train_loss_max=max(losses))


def quality(args) -> dict:
    configs = CONFIGS[args.configs]
    rows = []
    for task in args.tasks:
        for base in args.bases:
            torch_cls, torch_options, kintsugi_options, lrs = BASES[base]
            lr = lrs[task] * args.lr_scale
            for seed in range(args.first_seed, args.first_seed + args.seeds):
                t0 = time.perf_counter()
                ref = train(task, seed, lambda p: torch_cls(p, lr=lr, **torch_options))
                rows.append(dict(task=task, base=base, seed=seed, config="torch", **ref))
                for name, config in configs.items():
                    config = dict(config)
                    shuffle = config.pop("_shuffle_phi", False)
                    out = train(task, seed, lambda p: KintsugiOptimizer(
                        p, lr=lr, **kintsugi_options, **config), shuffle_phi=shuffle)
                    rows.append(dict(task=task, base=base, seed=seed, config=name, **out))
                if args.log:  # every row as it comes, so a long study can be read half-way
                    with open(args.log, "a") as log:
                        for row in rows[-1 - len(configs):]:
                            log.write(json.dumps(row) + "\n")
                print(f"{task:10s} {base:5s} seed {seed}: {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
    summary = summarise(rows, list(configs))
    return dict(rows=rows, summary=summary)


def summarise(rows, configs) -> list[dict]:
    """Per task, base and configuration: mean test loss over seeds against torch's."""
    out = []
    keys = sorted({(r["task"], r["base"]) for r in rows})
    for task, base in keys:
        ref = {r["seed"]: r["test_loss"] for r in rows
               if (r["task"], r["base"], r["config"]) == (task, base, "torch")}
        torch_mean = statistics.fmean(ref.values())
        for name in configs:
            mine = [r for r in rows if (r["task"], r["base"], r["config"]) == (task, base, name)]
            mean = statistics.fmean(r["test_loss"] for r in mine)
            paired = [r["test_loss"] / ref[r["seed"]] - 1 for r in mine]
            out.append(dict(
                task=task, base=base, config=name, seeds=len(mine), torch=torch_mean,
                kintsugi=mean, change=mean / torch_mean - 1,
                paired_sd=statistics.stdev(paired) if len(paired) > 1 else 0.0,
                worse_seeds=sum(p > 0 for p in paired),
                largest_phi=max(r["largest_phi"] for r in mine),
            ))
    return out


def print_quality(summary) -> None:
    print(f"{'task':10s} {'base':5s} {'config':16s} {'torch':>8s} {'kintsugi':>8s} "
          f"{'change':>8s} {'sd':>6s} {'worse':>5s} {'max ϕ':>6s}")
    for s in summary:
        print(f"{s['task']:10s} {s['base']:5s} {s['config']:16s} {s['torch']:8.4f} "
              f"{s['kintsugi']:8.4f} {100 * s['change']:+7.2f}% {100 * s['paired_sd']:5.1f}% "
              f"{s['worse_seeds']:2d}/{s['seeds']:<2d} {s['largest_phi']:6.2f}")


# ---------------------------------------------------------------------------------------------
# Step time of the default path
# ---------------------------------------------------------------------------------------------


def shapes(name: str) -> list[tuple[int, ...]]:
    if name == "mlp-4":  # Linear(784, 256), Linear(256, 10)
        return [(256, 784), (256,), (10, 256), (10,)]
    if name == "12x65k":
        return [(256, 256)] * 12
    # ResNet-like: 40 blocks of conv weight, norm weight, norm bias, conv weight = 160 tensors
    out = []
    for block in range(40):
        width = (16, 32, 64, 64)[block // 10]
        out += [(width, width, 3, 3), (width,), (width,), (width, width, 1, 1)]
    return out


SPEED_MODELS = ("mlp-4", "12x65k", "conv-160")
IMPL_FLAGS = {"single": dict(foreach=False, fused=False), "foreach": dict(foreach=True),
              "fused": dict(fused=True)}


def speed(args) -> dict:
    if args.malloc == "steady":
        from bench_step import steady_malloc

        steady_malloc()
    # CPU time of this thread by default: on a shared machine the wall time of a step counts
    # the time it waited for a core, and a longer step waits more often.
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rows = []
    for model in SPEED_MODELS:
        g = torch.Generator().manual_seed(0)
        for base, torch_cls, options in (("adam", torch.optim.Adam, {}),
                                         ("sgd-momentum", torch.optim.SGD, dict(momentum=0.9))):
            kbase = "adam" if base == "adam" else "sgd"
            lr = 1e-3 if base == "adam" else 1e-2
            makers = {
                "torch": lambda p: torch_cls(p, lr=lr, **options),
                "kintsugi": lambda p: KintsugiOptimizer(p, lr=lr, base=kbase, **options),
                "kintsugi beta=0": lambda p: KintsugiOptimizer(p, lr=lr, base=kbase, beta=0.0,
                                                               **options),
            }
            for impl in args.impls:  # the other implementations, for comparison
                makers[f"kintsugi {impl}"] = (
                    lambda p, impl=impl: KintsugiOptimizer(p, lr=lr, base=kbase, **options,
                                                           **IMPL_FLAGS[impl]))
            sets = {}
            for name, make in makers.items():
                params = [torch.zeros(s).requires_grad_() for s in shapes(model)]
                for p in params:
                    p.grad = torch.randn(p.shape, generator=g)
                sets[name] = (params, make(params))
            times = {name: [] for name in makers}
            for _ in range(args.warmup):
                for _, opt in sets.values():
                    opt.step()
            for _ in range(args.rounds):
                for name, (_, opt) in sets.items():
                    t0 = clock()
                    opt.step()
                    times[name].append(clock() - t0)
            torch_ms = 1e3 * statistics.median(times["torch"])
            for name in makers:
                ms = 1e3 * statistics.median(times[name])
                rows.append(dict(model=model, base=base, optimizer=name, ms=ms,
                                 ratio=ms / torch_ms, numel=sum(math.prod(s) for s in shapes(model)),
                                 tensors=len(shapes(model))))
                print(f"{model:9s} {base:13s} {name:16s} {ms:8.3f} ms  {ms / torch_ms:5.2f}×",
                      flush=True)
    return dict(rows=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", choices=["quality", "speed"])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--bases", default=",".join(BASES))
    parser.add_argument("--configs", choices=list(CONFIGS), default="defaults")
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0,
                        help="quality: seeds first_seed, ..., first_seed + seeds - 1 (fresh seeds "
                        "for a confirmation: e.g. 100)")
    parser.add_argument("--lr-scale", type=float, default=1.0,
                        help="quality: every learning rate times this, torch's and Kintsugi's")
    parser.add_argument("--rounds", type=int, default=201)
    parser.add_argument("--impls", default="", help="speed: Kintsugi implementations to time "
                        "beside the default (single,foreach,fused)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--malloc", choices=["steady", "default"], default="steady",
                        help="speed: glibc keeps freed memory (as bench_step.py; default) or not")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="speed: time steps by this thread's CPU time (default) or wall time")
    parser.add_argument("--log", type=Path, help="quality: append each row to this JSON-lines file")
    args = parser.parse_args()
    args.tasks, args.bases = args.tasks.split(","), args.bases.split(",")
    args.impls = [impl for impl in args.impls.split(",") if impl]
    torch.set_num_threads(1)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, argv=sys.argv[1:])
    if args.study == "quality":
        result = quality(args)
        print_quality(result["summary"])
    else:
        result = speed(args)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = meta["date"].replace(":", "")[:15]
    path = args.out / f"dropin-{args.study}-{args.configs if args.study == 'quality' else 'cpu'}-{stamp}.json"
    path.write_text(json.dumps(dict(meta=meta, **result), indent=1))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()

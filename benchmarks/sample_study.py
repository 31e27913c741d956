"""Study of the sample-level gilding rule (docs/sample-gilding.md), on the demo's three tasks
and the check tasks of ``check_tasks.py`` (``--tasks``), with N examples each (``--n-train``).

Every configuration trains the demo's MLP (the same initialisation and batches per seed, so
comparisons are paired) with Adam, lr 3e-3, batch 256, T = 400 steps (``--optimizer``,
``--steps``). Many configurations train
at once as one batch of models (``torch.bmm``), single-threaded, so the whole grid fits in
minutes on a shared 2-core machine. Two-pass methods (JTT, Kintsugi re-fire) share one ERM
firing run per seed, snapshotted at each firing fraction: their first stage is ERM for all.

    python benchmarks/sample_study.py screen  --seeds 2  > screen.txt     # the whole grid
    python benchmarks/sample_study.py confirm --seeds 5  > confirm.txt    # the finalists
    python benchmarks/sample_study.py confirm --seeds 5 --seed-offset 100  # held-out seeds
    python benchmarks/sample_study.py firing  --seeds 5 --n-train 32000   # records, bounds, rules
    python benchmarks/sample_study.py timing                              # step-time overhead

Metric per task: minority recall (rare), worst-group accuracy (spurious, hidden); also the
accuracy on the majority (class 0 of rare, the groups where the spurious cue agrees).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from check_tasks import make_task, true_minority
from kintsugi_optim.demo import make_model

torch.set_num_threads(1)
STEPS, BATCH, LR = 400, 256, 3e-3
N_TRAIN = 8000  # training examples per task (the demo's)
OPTIMIZER = "adam"  # or "sgd": momentum 0.9, lr 0.05, the demo's SGD (a check beyond Adam)
LN2 = math.log(2.0)


# --------------------------------------------------------------------------------------------
# K MLPs trained at once
# --------------------------------------------------------------------------------------------


class Models:
    """K copies of the demo's MLP, all starting from ``torch.manual_seed(seed)``'s init."""

    def __init__(self, K: int, seed: int, D: int, C: int):
        torch.manual_seed(seed)
        net = make_model(D, C)
        self.params = []
        for layer in (net[0], net[2], net[4]):
            self.params.append(layer.weight.detach().t().unsqueeze(0).repeat(K, 1, 1).requires_grad_())
            self.params.append(layer.bias.detach().unsqueeze(0).repeat(K, 1).unsqueeze(1).requires_grad_())
        self.opt = (torch.optim.Adam(self.params, lr=LR) if OPTIMIZER == "adam" else
                    torch.optim.SGD(self.params, lr=0.05, momentum=0.9))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [K, b, D] -> logits [K, b, C]
        w1, b1, w2, b2, w3, b3 = self.params
        h = torch.relu(torch.baddbmm(b1, x, w1))
        h = torch.relu(torch.baddbmm(b2, h, w2))
        return torch.baddbmm(b3, h, w3)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:  # x [n, D] -> [K, n]
        K = self.params[0].shape[0]
        return torch.cat([self(x[i:i + chunk].expand(K, -1, -1)).argmax(-1)
                          for i in range(0, x.shape[0], chunk)], 1)


# --------------------------------------------------------------------------------------------
# Methods: each gives per-example weights (and, for JTT, a sampling distribution)
# --------------------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    kind: str  # erm, focal, wce, gdro, jtt, gild (one pass), refire
    fracture: str = "error"  # loss, relative, error
    ascent: str = "additive"
    beta: float = 1.0
    warmup: float = 0.0  # epochs without gilding (one pass)
    gamma: float = 0.0
    phi_max: float | None = None
    weighting: str = "dataset"  # dataset: (1/B)Σϕℓ with mean ϕ = 1; batch: Σϕℓ/Σϕ; sample: upsample by ϕ
    firing: float = 0.0
    accumulate: str = "mean"  # refire: mean over visits (mean1: after the first epoch), last, ema
    upweight: float | str = "balanced"  # refire / jtt: λ, or "balanced" (cracks weigh as much as the rest)
    persist: str = "rate"  # refire: e = the error rate, its square, or 1 when wrong in most visits
    firing_loss: str = "ce"  # refire / jtt: the firing run's loss, cross-entropy or GCE (q = 0.7)
    true_groups: bool = False  # wce / gdro on hidden: given the groups the learner is not told (a bound)
    strength: float = 1.0  # wce: group weights 1 + strength·(balanced − 1), from ERM (0) to balanced (1)
    state: dict = field(default_factory=dict)


def fracture_of(losses: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "loss":
        return losses
    if kind == "relative":
        return losses / losses.mean().clamp_min(1e-12)
    if kind == "margin":  # 1 − 2·p_y, clamped to [0, 1]: a confident error counts fully, a marginal one little
        return (1 - 2 * torch.exp(-losses)).clamp(0, 1)
    if kind == "confident":  # p_y < 1/4
        return (losses > 2 * LN2).float()
    if kind.startswith("p<"):  # p_y below a threshold
        return (losses > -math.log(float(kind[2:]))).float()
    return (losses > LN2).float()  # p_y < 1/2: an error for two classes, "not confidently right" for more


def gild_visit(cfg: Config, phi: torch.Tensor, idx: torch.Tensor, losses: torch.Tensor) -> None:
    """One-pass sample gilding of the batch's examples (in place)."""
    f = fracture_of(losses, cfg.fracture)
    old = phi[idx]
    s = f * (1 - cfg.gamma * old).clamp_min(0)
    new = old + cfg.beta * s if cfg.ascent == "additive" else old * torch.exp(cfg.beta * s)
    new = new.clamp(1e-3, cfg.phi_max if cfg.phi_max else 1e30)
    phi[idx] = new


def batch_weights(cfg: Config, phi: torch.Tensor, idx: torch.Tensor, N: int) -> torch.Tensor:
    w = phi[idx]
    if cfg.weighting == "dataset":
        return w * (N / phi.sum())
    return w * (w.numel() / w.sum())


def refire_weights(cfg: Config, crack: torch.Tensor, visits: float, N: int) -> torch.Tensor:
    if cfg.accumulate == "mean1":
        visits = max(visits - N, 0)
    e = crack / max(visits / N, 1e-12) if cfg.accumulate.startswith("mean") else crack
    if cfg.accumulate in ("last2", "last2n"):  # wrong at each of the last two visits
        e = (crack >= 2).float()
        if cfg.accumulate == "last2n" and cfg.upweight == "balanced":  # λ from the last visit
            phi = 1 + min(N / max(float((crack >= 1).sum()), 1e-12), 1e3) * e
            return phi * (N / phi.sum())
    if cfg.persist == "square":  # persistent errors count more than occasional ones
        e = e * e
    elif cfg.persist == "most":
        e = (e >= 0.5).float()
    if str(cfg.upweight).startswith("balanced"):  # "balanced×2": twice the balanced λ
        scale = float(cfg.upweight.split("×")[1]) if "×" in cfg.upweight else 1.0
        lam = scale * N / max(float(e.sum()), 1e-12)
    elif cfg.upweight == "even":  # cracked and uncracked examples weigh the same in all
        lam = max((N - float(e.sum())) / max(float(e.sum()), 1e-12) - 1, 0.0)
    else:
        lam = float(cfg.upweight)
    lam = min(lam, 1e3)
    phi = 1 + lam * e
    return phi * (N / phi.sum())


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def evaluate(pred: torch.Tensor, task) -> list[dict]:
    _, y, g = task.test
    out = []
    for p in pred:
        correct = (p == y).float()
        gacc = [correct[g == k].mean().item() for k in range(task.num_groups) if bool((g == k).any())]
        m = {"accuracy": correct.mean().item(), "worst_group": min(gacc)}
        if task.name == "rare":
            m["target"] = correct[y == 1].mean().item()
            m["majority"] = correct[y == 0].mean().item()
        else:
            m["target"] = m["worst_group"]
            if task.name in ("spurious", "noisy"):  # groups 2y+a: the cue agrees when a == y
                agree = (g == 0) | (g == 3)
            elif task.name == "clean":  # no minority: the overall accuracy
                agree = torch.ones_like(correct, dtype=torch.bool)
            elif task.name == "longtail":  # the three head classes
                agree = y < 3
            else:  # hidden: 2y + atypical
                agree = g % 2 == 0
            m["majority"] = correct[agree].mean().item()
        out.append(m)
    return out


def train(task, seed: int, configs: list[Config], firing_model_weights=None):
    """Train every config for STEPS steps from the seed's init; returns test metrics.

    ``firing_model_weights``: per config, fixed per-example weights (re-fire) or a JTT
    sampling distribution, from the firing run."""
    x, y, groups = task.train
    N, D, C = x.shape[0], x.shape[1], task.num_classes
    K = len(configs)
    models = Models(K, seed, D, C)
    order = torch.Generator().manual_seed(seed)
    sampler = torch.Generator().manual_seed(10_000 + seed)
    for k, cfg in enumerate(configs):
        if cfg.true_groups and task.hidden_groups:  # 2y + atypical, as in the test set
            known = 2 * y + true_minority(task).long()
            G = task.num_groups
        else:
            known, G = groups, task.num_pathways
        counts = torch.bincount(known, minlength=G).float()
        cfg.state = {"phi": torch.ones(N), "q": torch.full((G,), 1.0 / G), "seen": 0,
                     "groups": known,
                     "wce": 1 + cfg.strength * (counts.sum() / (G * counts.clamp_min(1)) - 1)}
    for step in range(STEPS):
        idx = torch.randint(0, N, (BATCH,), generator=order)
        idxs = idx.expand(K, -1).clone()
        for k, cfg in enumerate(configs):
            if cfg.kind == "jtt" or (cfg.kind == "refire" and cfg.weighting == "sample"):
                idxs[k] = torch.multinomial(firing_model_weights[k], BATCH, replacement=True,
                                            generator=sampler)
        logits = models(x[idxs])
        losses = F.cross_entropy(logits.reshape(-1, C), y[idxs].reshape(-1),
                                 reduction="none").view(K, BATCH)
        detached = losses.detach()
        terms = []
        for k, cfg in enumerate(configs):
            l, i, st = losses[k], idxs[k], cfg.state
            if cfg.kind in ("erm", "jtt") or cfg.weighting == "sample":
                terms.append(l.mean())
            elif cfg.kind == "focal":
                p = torch.exp(-l)
                terms.append(((1 - p) ** 2 * l).mean())
            elif cfg.kind == "wce":
                w = st["wce"][st["groups"][i]]
                terms.append((w * l).sum() / w.sum())
            elif cfg.kind == "gdro":
                g, G = st["groups"][i], st["q"].numel()
                means = torch.zeros(G).index_add_(0, g, l) / torch.bincount(g, minlength=G).clamp_min(1)
                terms.append((st["q"] * means).sum())
                q = st["q"] * torch.exp(0.05 * means.detach())
                st["q"] = q / q.sum()
            elif cfg.kind == "refire":
                w = firing_model_weights[k][i]
                terms.append((w * l).mean() if cfg.weighting == "dataset" else (w * l).sum() / w.sum())
            elif cfg.kind == "gild":
                w = batch_weights(cfg, st["phi"], i, N)
                terms.append((w * l).mean() if cfg.weighting == "dataset" else (w * l).sum() / w.sum())
                st["seen"] += BATCH
                if st["seen"] > cfg.warmup * N:
                    gild_visit(cfg, st["phi"], i, detached[k])
        models.opt.zero_grad()
        torch.stack(terms).sum().backward()
        models.opt.step()
    return evaluate(models.predict(task.test[0]), task)


GCE_Q = 0.7  # Zhang & Sabuncu (2018), as Learning from Failure's biased model uses it


def firing_loss(losses: torch.Tensor, kind: str) -> torch.Tensor:
    """The firing run's loss from per-example cross-entropies: their mean ("ce"), or the
    generalised cross-entropy (1 − p_y^q)/q ("gce"), whose gradient is p_y^q·∇CE: it fits
    what the model already finds easy and leaves the exceptions unfitted."""
    if kind == "gce":
        return ((1 - torch.exp(-GCE_Q * losses)) / GCE_Q).mean()
    if kind == "ngce":  # GCE's weights p_y^q, rescaled to mean 1: ERM's step size, GCE's emphasis
        w = torch.exp(-GCE_Q * losses.detach())
        return (w * losses).mean() / w.mean()
    return losses.mean()


def firing_run(task, seed: int, fractions: list[float], refires: list[Config], loss: str = "ce"):
    """One firing run (loss "ce": ERM) for max(fractions)·STEPS steps; per fraction, the JTT
    error set of the snapshot and each re-fire config's crack memory (accumulated during the
    run, as the criterion does)."""
    x, y, _ = task.train
    N, D, C = x.shape[0], x.shape[1], task.num_classes
    models = Models(1, seed, D, C)
    order = torch.Generator().manual_seed(seed)
    cracks = {(c.fracture, c.accumulate): torch.zeros(N) for c in refires
              if c.fracture != "snapshot"}
    snapshot = any(c.fracture == "snapshot" for c in refires)
    visits, snapshots = 0, {}
    last = max(fractions)
    for step in range(int(last * STEPS) + 1):
        for f in fractions:
            if step == int(f * STEPS):
                errors = (models.predict(x)[0] != y).float()
                cracked = None
                if snapshot:  # the snapshot's verdict p_y < 1/2 on every example
                    with torch.no_grad():
                        cracked = (F.cross_entropy(models(x.unsqueeze(0))[0], y,
                                                   reduction="none") > LN2).float()
                snapshots[f] = {"errors": errors, "cracked": cracked, "visits": visits,
                                "cracks": {k: v.clone() for k, v in cracks.items()}}
        if step == int(last * STEPS):
            break
        idx = torch.randint(0, N, (BATCH,), generator=order)
        logits = models(x[idx].unsqueeze(0))[0]
        losses = F.cross_entropy(logits, y[idx], reduction="none")
        with torch.no_grad():
            for (frac, acc), crack in cracks.items():
                f = (fracture_of(losses.detach(), frac) if frac != "argmax" else  # JTT's error
                     (logits.argmax(1) != y[idx]).float())
                if acc == "mean1":  # the mean after the first epoch
                    if visits >= N:
                        crack.index_add_(0, idx, f)
                elif acc == "mean":
                    crack.index_add_(0, idx, f)
                elif acc == "ema":  # half-life of one visit
                    crack[idx] = 0.5 * crack[idx] + 0.5 * f
                elif acc == "late":  # the last visit in the firing run's second half (one fraction only)
                    if step >= int(last * STEPS) // 2:
                        crack[idx] = f
                elif acc in ("last2", "last2n"):  # consecutive wrong visits, counted up to 2
                    crack[idx] = f * (crack[idx] + 1).clamp(max=2)
                else:
                    crack[idx] = f
        visits += BATCH
        models.opt.zero_grad()
        firing_loss(losses, loss).backward()
        models.opt.step()
    return snapshots


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def baselines() -> list[Config]:
    return [Config("ERM", "erm"), Config("focal (γ=2)", "focal"),
            Config("weighted CE [labels]", "wce"), Config("Group DRO [labels]", "gdro")]


def oracles() -> list[Config]:
    """Group-balanced CE and Group DRO told the groups that ``hidden`` keeps from the learner:
    the trade-off between its worst group and its majority that a method knowing them reaches."""
    return [Config("weighted CE [true groups]", "wce", true_groups=True),
            Config("Group DRO [true groups]", "gdro", true_groups=True)] + [
        Config(f"weighted CE [true groups] ×{a:g}", "wce", true_groups=True, strength=a)
        for a in (0.05, 0.1, 0.2, 0.4)]


def one_pass_grid() -> list[Config]:
    out = []
    for frac in ("loss", "relative", "error"):
        for ascent, betas in (("additive", (0.3, 1.0, 3.0)), ("multiplicative", (0.1, 0.3))):
            for beta in betas:
                for warm in (0.0, 1.0):
                    out.append(Config(f"1-pass {frac} {ascent[:4]} β={beta} warm={warm:g}", "gild",
                                      fracture=frac, ascent=ascent, beta=beta, warmup=warm,
                                      phi_max=1e3))
    out += [Config("1-pass error add β=1 γ=0.1", "gild", beta=1.0, gamma=0.1, phi_max=1e3),
            Config("1-pass error add β=1 cap 10", "gild", beta=1.0, phi_max=10.0),
            Config("1-pass error add β=1 batch-norm", "gild", beta=1.0, phi_max=1e3, weighting="batch"),
            Config("1-pass relative mult β=0.3 cap 10", "gild", fracture="relative",
                   ascent="multiplicative", beta=0.3, phi_max=10.0)]
    return out


def refire_grid(fractions) -> list[Config]:
    out = []
    for f in fractions:
        for lam in (6, 20, 50, "balanced"):
            out.append(Config(f"JTT f={f} λ={lam}", "jtt", firing=f, upweight=lam))
        for frac in ("error", "relative", "loss"):
            for acc in ("mean", "last", "ema", "mean1") if frac == "error" else ("mean", "last"):
                for lam in ("balanced", 6, 20):
                    out.append(Config(f"re-fire f={f} {frac} {acc} λ={lam}", "refire", fracture=frac,
                                      accumulate=acc, firing=f, upweight=lam))
    return out


def epochs_grid(epochs) -> list[Config]:
    """Re-fire with a firing run of a number of epochs (of the demo's 8 000 examples) instead
    of a fraction of T: the candidate rules of the second study."""
    out = []
    for e in epochs:
        f = e * 8000 / BATCH / STEPS
        for acc in ("mean1", "last"):
            for lam in ("balanced", "balanced×0.5", "balanced×2"):
                for weighting in ("dataset", "sample"):
                    out.append(Config(f"re-fire {e:g}ep error {acc} λ={lam} {weighting}", "refire",
                                      accumulate=acc, firing=f, upweight=lam, weighting=weighting))
        for persist in ("square", "most"):
            out.append(Config(f"re-fire {e:g}ep error mean1 λ=balanced dataset {persist}", "refire",
                              accumulate="mean1", firing=f, persist=persist))
        out.append(Config(f"JTT {e:g}ep λ=50", "jtt", firing=f, upweight=50))
        out.append(Config(f"JTT {e:g}ep λ=balanced", "jtt", firing=f, upweight="balanced"))
    return out


def firing_grid(epochs) -> list[Config]:
    """Third study: the firing run's loss, cross-entropy (ERM) or GCE (a model biased towards
    the easy rule, as in Learning from Failure), for re-fire and JTT."""
    out = []
    for e in epochs:
        f = e * N_TRAIN / BATCH / STEPS
        for loss in ("ce", "gce", "ngce"):
            for acc in ("mean1", "last"):
                for lam in ("balanced", "balanced×0.5"):
                    out.append(Config(f"re-fire {e:g}ep {loss} error {acc} λ={lam}", "refire",
                                      accumulate=acc, firing=f, firing_loss=loss, upweight=lam))
            out.append(Config(f"JTT {e:g}ep {loss} λ=50", "jtt", firing=f, upweight=50,
                              firing_loss=loss))
        for acc in ("last2", "last2n", "late"):
            out.append(Config(f"re-fire {e:g}ep gce error {acc} λ=balanced", "refire",
                              accumulate=acc, firing=f, firing_loss="gce"))
        for frac in ("margin", "confident", "argmax", "p<0.4", "p<0.3"):  # marginal errors discounted; JTT's error
            out.append(Config(f"re-fire {e:g}ep gce {frac} last λ=balanced", "refire",
                              fracture=frac, accumulate="last", firing=f, firing_loss="gce"))
        out.append(Config(f"re-fire {e:g}ep gce snapshot λ=balanced", "refire",
                          fracture="snapshot", firing=f, firing_loss="gce"))
        out.append(Config(f"re-fire {e:g}ep ce snapshot λ=balanced", "refire",
                          fracture="snapshot", firing=f, firing_loss="ce"))
        for frac in ("oracle", "oracle∩errors"):  # the true minority as the record: a bound
            out.append(Config(f"re-fire {e:g}ep gce {frac} λ=balanced", "refire",
                              fracture=frac, accumulate="last", firing=f, firing_loss="gce"))
    epoch = math.ceil(N_TRAIN / BATCH) / STEPS  # one epoch as a fraction of the main run
    for rule, f in (("0.25·T ≤ 4 epochs", min(0.25, 4 * epoch)),  # the third round's default
                    ("0.25·T in [1, 4] epochs", min(max(0.25, min(epoch, 1.0)), 4 * epoch))):
        for lam in ("balanced", "even"):
            out.append(Config(f"re-fire {rule}, gce error last λ={lam}", "refire",
                              accumulate="last", firing=f, firing_loss="gce", upweight=lam))
        out.append(Config(f"JTT {rule}, gce λ=50", "jtt", firing=f, upweight=50,
                          firing_loss="gce"))
    return out


def run(task_names, seeds, configs_one, configs_two, fractions, log=print, offset=0):
    results: dict[str, dict[str, list[dict]]] = {}
    for name in task_names:
        for seed in range(offset, offset + seeds):
            t0 = time.perf_counter()
            task = make_task(name, seed, N_TRAIN)
            N = task.train[0].shape[0]
            res = train(task, seed, configs_one) if configs_one else []
            for cfg, m in zip(configs_one, res):
                results.setdefault(cfg.name, {}).setdefault(name, []).append(m)
            if configs_two:
                snaps = {kind: firing_run(task, seed, fractions,
                                          [c for c in configs_two if c.kind == "refire"], kind)
                         for kind in sorted({c.firing_loss for c in configs_two})}
                weights = []
                for cfg in configs_two:
                    snap = snaps[cfg.firing_loss][cfg.firing]
                    if cfg.kind == "jtt":
                        lam = (N / max(float(snap["errors"].sum()), 1.0) if cfg.upweight == "balanced"
                               else cfg.upweight - 1)  # JTT's λ counts the example itself
                        weights.append(1 + lam * snap["errors"])
                    else:
                        crack = (snap["cracked"] if cfg.fracture == "snapshot" else
                                 snap["cracks"][(cfg.fracture, cfg.accumulate)])
                        if cfg.fracture.startswith("oracle"):  # diagnostics, not methods
                            crack = true_minority(task).float()
                            if cfg.fracture == "oracle∩errors":  # the minority the record finds
                                crack *= snap["cracks"][("error", "last")] > 0
                        weights.append(refire_weights(cfg, crack, snap["visits"], N))
                minority = true_minority(task)  # how much of ϕ's mass lies on it
                shares = [float(w[minority].sum() / w.sum()) for w in weights]
                res = train(task, seed, configs_two, weights)
                for m, share, w in zip(res, shares, weights):
                    m["share"] = share
                    cracked = w > w.min()  # the up-weighted examples: the record's verdict
                    hit = float((cracked & minority).sum())
                    m["precision"] = hit / max(float(cracked.sum()), 1.0)
                    m["recall"] = hit / max(float(minority.sum()), 1.0)
                for cfg, m in zip(configs_two, res):
                    results.setdefault(cfg.name, {}).setdefault(name, []).append(m)
            log(f"# {name} seed {seed}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return results


def table(results, task_names, ref="ERM"):
    """Mean target metric per task (and paired gain over ERM), majority accuracy, mean over
    tasks, and for two-pass methods the share of the weights' mass on the true minority."""
    rows = []
    for name, per_task in results.items():
        cells, gains, majors, shares = [], [], [], []
        for t in task_names:
            ms = per_task[t]
            target = statistics.mean(m["target"] for m in ms)
            gain = statistics.mean(m["target"] - r["target"] for m, r in zip(ms, results[ref][t]))
            cells.append(target)
            gains.append(gain)
            majors.append(statistics.mean(m["majority"] for m in ms))
            shares.append(statistics.mean(m["share"] for m in ms) if "share" in ms[0] else None)
        rows.append((name, cells, gains, majors, shares))
    rows.sort(key=lambda r: -statistics.mean(r[1]))
    head = ("| method | " + " | ".join(f"{t} target (Δ ERM)" for t in task_names)
            + " | mean target | min Δ ERM | " + " | ".join(f"{t} majority" for t in task_names)
            + " | " + " | ".join(f"{t} minority share" for t in task_names) + " |")
    lines = [head, "|" + "---|" * (3 + 3 * len(task_names))]
    for name, cells, gains, majors, shares in rows:
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f} ({g:+.3f})" for c, g in zip(cells, gains))
                     + f" | {statistics.mean(cells):.3f} | {min(gains):+.3f} | "
                     + " | ".join(f"{m:.3f}" for m in majors) + " | "
                     + " | ".join("" if s is None else f"{s:.2f}" for s in shares) + " |")
    return "\n".join(lines)


def record_quality(results, task_names) -> str:
    """Per two-pass method and task: the up-weighted examples' precision and recall against
    the true minority (what the record gets right, independently of the main run)."""
    lines = ["| method | " + " | ".join(f"{t} precision · recall" for t in task_names) + " |",
             "|---|" + "---|" * len(task_names)]
    for name, per_task in results.items():
        if "precision" not in per_task[task_names[0]][0]:
            continue
        cells = [f"{statistics.mean(m['precision'] for m in per_task[t]):.2f} · "
                 f"{statistics.mean(m['recall'] for m in per_task[t]):.2f}" for t in task_names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FINALISTS = ";".join([  # from the screening round (docs/sample-gilding.md); mean1 is the default
    "re-fire f=0.25 error mean1 λ=balanced", "re-fire f=0.5 error mean1 λ=balanced",
    "re-fire f=0.5 error last λ=balanced", "re-fire f=0.25 error last λ=balanced",
    "re-fire f=0.25 error last λ=20", "re-fire f=0.5 error mean λ=balanced",
    "JTT f=0.1 λ=50", "JTT f=0.25 λ=20", "JTT f=0.25 λ=balanced", "JTT f=0.5 λ=balanced",
    "1-pass error mult β=0.1 warm=0",
])


DEFAULT_BEFORE = "re-fire f=0.25 error mean1 λ=balanced"


def timing(repeats: int = 41, steps: int = 40) -> str:
    """Time of one training step of the demo's MLP (batch 256, Adam, one thread): the demo's
    ERM step (``F.cross_entropy(model(x), y)``) against the same step through sample_gilding's
    criterion and Gilder, in the firing run, after refire() and in one-pass mode. Interleaved,
    so machine load hits all alike; medians of wall time and of the thread's CPU time (which
    leaves out the time other processes hold the core), and the least CPU time of the repeats
    (the least disturbed). "ERM, per-example losses" is ERM's step computing the losses with
    ``reduction="none"`` and averaging them: the part of the overhead that any per-example
    weighting pays. Then the whole default two-pass run
    (firing_steps(T) + T steps) against ERM's T steps, T = 400, the demo's run."""
    from kintsugi_optim import sample_gilding

    lines = ["| N | step | wall ms | × ERM | CPU ms | × ERM | least CPU ms | × ERM |",
             "|---|---|---|---|---|---|---|---|"]
    for N in (8_000, 1_000_000):
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(N, 16, generator=g), torch.randint(0, 2, (N,), generator=g)
        variants = {"ERM": None, "ERM, per-example losses": "none", "firing run": {},
                    "after refire()": {},
                    "one pass": {"firing_fraction": None, "warmup": 0.0}}
        setups = {}
        for name, options in variants.items():
            torch.manual_seed(0)
            model = make_model(16, 2)
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            pair = sample_gilding(N, **options) if isinstance(options, dict) else options
            if name == "after refire()":
                with warnings.catch_warnings():  # nothing recorded: ϕ ≡ 1, the cost is the same
                    warnings.simplefilter("ignore")
                    pair[0].refire()
            setups[name] = (model, opt, pair)
        wall = {name: [] for name in variants}
        cpu = {name: [] for name in variants}
        order = torch.Generator().manual_seed(1)
        for _ in range(repeats):
            for name, (model, opt, pair) in setups.items():
                batches = [torch.randint(0, N, (BATCH,), generator=order) for _ in range(steps)]
                w0, c0 = time.perf_counter(), time.thread_time()
                for idx in batches:
                    _step(model, opt, pair, x[idx], y[idx], idx)
                wall[name].append((time.perf_counter() - w0) / steps * 1e3)
                cpu[name].append((time.thread_time() - c0) / steps * 1e3)
        erm_w, erm_c = statistics.median(wall["ERM"]), statistics.median(cpu["ERM"])
        erm_least = min(cpu["ERM"])
        for name in variants:
            w, c, least = statistics.median(wall[name]), statistics.median(cpu[name]), min(cpu[name])
            lines.append(f"| {N:,} | {name} | {w:.3f} | {w / erm_w:.2f} | {c:.3f} | "
                         f"{c / erm_c:.2f} | {least:.3f} | {least / erm_least:.2f} |")
    return "\n".join(lines) + "\n\n" + whole_run()


def _step(model, opt, pair, xb, yb, idx):
    if pair is None:  # the demo's ERM step
        opt.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        return
    if pair == "none":  # ERM through per-example losses, as every sample weighting needs them
        opt.zero_grad()
        F.cross_entropy(model(xb), yb, reduction="none").mean().backward()
        opt.step()
        return
    criterion, gilder = pair
    loss = criterion(F.cross_entropy(model(xb), yb, reduction="none"), idx)
    opt.zero_grad()
    gilder.zero_grad()
    loss.backward()
    opt.step()
    gilder.step()


def whole_run(repeats: int = 5, T: int = 400, N: int = 8_000) -> str:
    """Wall and CPU time of a whole run, the demo's protocol: ERM for T steps against the
    default two-pass run (firing_steps(T) steps, refire(), a fresh model for T steps);
    interleaved, medians over ``repeats``."""
    from kintsugi_optim import sample_gilding

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(N, 16, generator=g), torch.randint(0, 2, (N,), generator=g)
    y[x[:, 0] > 1.5] = 1 - y[x[:, 0] > 1.5]  # some examples to crack

    def run(two_pass: bool) -> None:
        order = torch.Generator().manual_seed(1)
        pair = sample_gilding(N) if two_pass else None
        phases = [pair[0].firing_steps(T, BATCH), T] if two_pass else [T]
        for phase, steps in enumerate(phases):
            if phase == 1:
                pair[0].refire()
            torch.manual_seed(0)
            model = make_model(16, 2)
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            for _ in range(steps):
                idx = torch.randint(0, N, (BATCH,), generator=order)
                _step(model, opt, pair, x[idx], y[idx], idx)

    times = {False: ([], []), True: ([], [])}
    for _ in range(repeats):
        for two_pass in (False, True):
            w0, c0 = time.perf_counter(), time.thread_time()
            run(two_pass)
            times[two_pass][0].append(time.perf_counter() - w0)
            times[two_pass][1].append(time.thread_time() - c0)
    erm_w, erm_c = (statistics.median(t) for t in times[False])
    two_w, two_c = (statistics.median(t) for t in times[True])
    firing = sample_gilding(N)[0].firing_steps(T, BATCH)
    return ("| whole run, T = 400 | θ steps | wall s | × ERM | CPU s | × ERM |\n"
            "|---|---|---|---|---|---|\n"
            f"| ERM | {T} | {erm_w:.2f} | 1.00 | {erm_c:.2f} | 1.00 |\n"
            f"| re-fire (default) | {firing} + {T} | {two_w:.2f} | {two_w / erm_w:.2f} | "
            f"{two_c:.2f} | {two_c / erm_c:.2f} |")


def main():
    global STEPS, OPTIMIZER, GCE_Q, N_TRAIN
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["screen", "confirm", "epochs", "firing", "timing"])
    ap.add_argument("--epochs", default="2,3,4", help="firing lengths in epochs (epochs mode)")
    ap.add_argument("--fractions", default="0.1,0.25,0.5", help="firing fractions (screen)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--tasks", default="rare,spurious,hidden")
    ap.add_argument("--steps", type=int, default=STEPS, help="steps of the main run (T)")
    ap.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                    help="θ's optimizer in every run (sgd: momentum 0.9, lr 0.05)")
    ap.add_argument("--gce-q", type=float, default=GCE_Q, help="the firing run's GCE q")
    ap.add_argument("--n-train", type=int, default=N_TRAIN, help="training examples per task")
    ap.add_argument("--seed-offset", type=int, default=0, help="first seed (held-out seeds: 100)")
    ap.add_argument("--only", default=FINALISTS, help="config names separated by ';' (confirm)")
    args = ap.parse_args()
    STEPS, OPTIMIZER, GCE_Q, N_TRAIN = args.steps, args.optimizer, args.gce_q, args.n_train
    if args.mode == "timing":
        print(f"timing: torch {torch.__version__}, 1 thread\n\n{timing()}")
        return
    tasks = args.tasks.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    one = baselines() + one_pass_grid()
    two = refire_grid(fractions)
    if args.mode == "epochs":
        one = baselines()
        two = epochs_grid([float(e) for e in args.epochs.split(",")])
        two += [c for c in refire_grid([0.25]) if c.name == DEFAULT_BEFORE]
        fractions = sorted({c.firing for c in two})
    if args.mode == "firing":
        one = baselines() + oracles()
        two = firing_grid([float(e) for e in args.epochs.split(",")])
        fractions = sorted({c.firing for c in two})
    if (args.mode == "confirm" and args.only) or (args.mode in ("epochs", "firing") and args.only != FINALISTS):
        keep = set(args.only.split(";")) | {c.name for c in baselines() + oracles()}
        one = [c for c in one if c.name in keep]
        two = [c for c in two if c.name in keep]
        fractions = sorted({c.firing for c in two}) or fractions
    names = [c.name for c in one + two]
    assert len(set(names)) == len(names), "configs share a name: their results would merge"
    t0 = time.perf_counter()
    results = run(tasks, args.seeds, one, two, fractions, offset=args.seed_offset)
    print(f"{args.mode}: {args.seeds} seeds from {args.seed_offset}, T = {STEPS} steps, tasks {tasks}, {time.perf_counter() - t0:.0f} s, "
          f"{OPTIMIZER}, GCE q = {GCE_Q}, N = {N_TRAIN}, torch {torch.__version__}, 1 thread\n")
    print(table(results, tasks))
    if args.mode == "firing":
        print("\n" + record_quality(results, tasks))


if __name__ == "__main__":
    main()

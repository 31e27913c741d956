"""The methods the demo compares: each builds a :class:`Trainer` (one training step on a
batch) for a fresh model. The baselines (JTT, focal loss, class-weighted CE, Group DRO) are
written from their papers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import (GildedLoss, GilderOptimizer, KintsugiOptimizer, PhiHistory, VWPR,
                            group_dro, sample_gilding)
from kintsugi_optim.demo.tasks import Task

__all__ = ["Trainer", "Method", "METHODS", "methods_for"]


@dataclass
class Trainer:
    """step(x, y, groups, indices) trains on one batch (``indices``: the examples' positions in
    the training set, for sample-level methods).

    ``gilded`` is the object carrying ϕ (a KintsugiOptimizer, VWPR, GildedLoss or sample
    criterion) and ``history`` its :class:`PhiHistory`, recorded every step, for the sigils;
    ``forward`` replaces the model at evaluation when the trainer wraps it. Two-pass methods
    (JTT, Kintsugi re-fire) first train ``firing_steps(T, batch_size)`` steps, then
    ``second_pass(model)`` gives the trainer of a fresh model; ``weights`` (JTT) makes batches
    sample the training set in proportion to them.
    """

    step: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    gilded: object | None = None
    history: PhiHistory | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None
    firing_steps: Callable[[int, int], int] | None = None
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

    first.firing_steps = lambda steps, batch_size: int(JTT_FIRING * steps)
    first.second_pass = second_pass
    return first


def _sample_gilding(model, task, **options):
    # Label-free Kintsugi with the package's defaults (``options`` change them, for studies):
    # two passes when criterion.firing_fraction is set, the firing run as long as
    # criterion.firing_steps says.
    criterion, gilder = sample_gilding(task.train[0].shape[0], **options)
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

        first.firing_steps, first.second_pass = criterion.firing_steps, second_pass
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


def methods_for(task_name: str) -> list[Method]:
    """The methods the demo runs on a task: all, or on tasks whose groups are hidden from the
    learner, plain Adam, the loss-level and the label-free methods."""
    if task_name not in LABEL_FREE_ONLY_TASKS:
        return METHODS
    return [m for m in METHODS if not m.name.startswith(("Sculptor", "VWPR", "SGD"))]

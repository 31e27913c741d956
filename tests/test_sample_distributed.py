"""Sample-level gilding under DDP, for real: 2 gloo ranks on 127.0.0.1 (tests/rank_pool.py).

Every rank exchanges only its batch's (index, loss) pairs, applies all ranks' in rank order and
so holds the same ϕ, equal to a single process's on the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import sample_gilding

pytestmark = pytest.mark.distributed

N, STEPS, GLOBAL_BATCH = 24, 5, 16
# "balanced": with an untrained model most examples crack, and "even" would leave ϕ at 1;
# the exchange under test is the record's, the same for every up-weight
MODES = {
    "re-fire": dict(accumulate="mean", upweight="balanced"),
    "re-fire last": dict(accumulate="last", upweight="balanced"),
    "one pass": dict(firing_fraction=None, fracture="relative", beta=0.5, warmup=0.0,
                     ascent="multiplicative", gamma=0.1),
}



def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 6, generator=g), torch.randint(0, 3, (N,), generator=g)


def global_batch(step, size=GLOBAL_BATCH):
    return torch.randint(0, N, (size,), generator=torch.Generator().manual_seed(100 + step))


def train(mode, rank=None, world=1):
    """The model and ϕ after STEPS steps; with ``rank``, DDP on this rank's half of each
    global batch, else a single process on the whole batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    net = DDP(model) if rank is not None else model
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    criterion, gilder = sample_gilding(N, **MODES[mode])
    x, y = data()
    for step in range(STEPS):
        idx = global_batch(step)
        if rank is not None:
            idx = idx.chunk(world)[rank]
        loss = criterion(F.cross_entropy(net(x[idx]), y[idx], reduction="none"), idx)
        opt.zero_grad()
        gilder.zero_grad()
        loss.backward()
        opt.step()
        gilder.step()
        if criterion.firing and step == 2:
            criterion.refire()
    return criterion.phi.clone(), [p.detach().clone() for p in model.parameters()]


def ddp_job(mode):
    return train(mode, dist.get_rank(), dist.get_world_size())


def uneven_job():
    """Ranks record 5 and 3 examples per step (a last, short batch) and no model at all."""
    rank = dist.get_rank()
    criterion, gilder = sample_gilding(N, accumulate="mean", fracture="loss", upweight="balanced")
    for step in range(STEPS):
        idx = global_batch(step, 8)
        losses = torch.linspace(0.1, 2.0, 8) * (step + 1)
        mine = slice(0, 5) if rank == 0 else slice(5, 8)
        criterion(losses[mine].requires_grad_(), idx[mine])
        gilder.step()
    return criterion.phi.clone(), criterion.visits


@pytest.mark.parametrize("mode", list(MODES))
def test_ddp_ranks_hold_the_single_process_phi(pool, mode):
    ranks = pool.run(ddp_job, mode)
    phi, params = train(mode)
    assert torch.equal(ranks[0][0], ranks[1][0])  # identical across ranks, bitwise
    torch.testing.assert_close(ranks[0][0], phi, rtol=1e-5, atol=1e-6)
    for rank_param, param in zip(ranks[0][1], params):
        torch.testing.assert_close(rank_param, param, rtol=1e-5, atol=1e-6)
    assert not torch.equal(phi, torch.ones(N))  # it gilded


def test_uneven_batches_exchange_to_the_global_batch(pool):
    ranks = pool.run(uneven_job)
    criterion, gilder = sample_gilding(N, accumulate="mean", fracture="loss", upweight="balanced")
    for step in range(STEPS):
        losses = torch.linspace(0.1, 2.0, 8) * (step + 1)
        criterion(losses.requires_grad_(), global_batch(step, 8))
        gilder.step()
    for phi, visits in ranks:
        assert visits == STEPS * 8
        torch.testing.assert_close(phi, criterion.phi, rtol=0, atol=0)

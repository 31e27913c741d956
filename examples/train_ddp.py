"""Data-parallel Kintsugi with DistributedDataParallel.

    torchrun --nproc-per-node 2 examples/train_ddp.py

Each rank trains on its own shard of the data (gloo on the CPU, nccl on GPUs). DDP averages θ's
gradients, so the Sculptor's ϕ (in its state) stays identical on every rank by itself. VWPR's ϕ
are buffers, gilded from each rank's own fracture: GilderOptimizer(process_group=...) averages
ϕ.grad over the ranks first, as DDP does for θ, so every rank gilds with the global batch's
fracture and ϕ stays identical (DDP's buffer broadcast from rank 0 then changes nothing).
"""

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from kintsugi_optim import GilderOptimizer, KintsugiOptimizer, VWPR


def main(epochs: int = 5) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")

    torch.manual_seed(0)  # the same data and initial model on every rank
    x = torch.randn(1024, 20)
    y = (x[:, :5].sum(1) > 0).long()
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=world, rank=rank)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, sampler=sampler)

    vwpr = VWPR(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)).to(device),
                history=False)
    model = DDP(vwpr)
    opt_theta = KintsugiOptimizer(model.parameters(), lr=3e-3, pathway="row")
    opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.01, fracture="relative",
                              process_group=dist.group.WORLD)

    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            opt_theta.zero_grad()
            opt_phi.zero_grad()
            loss = F.cross_entropy(model(xb.to(device)), yb.to(device))
            loss.backward()
            opt_theta.step()
            opt_phi.step()
        if rank == 0:
            print(f"epoch {epoch}  loss {loss.item():.4f}")

    # Every ϕ, of both levels, is the same on every rank.
    mine = torch.cat([phi.flatten() for group in opt_theta.gilding().values()
                      for phi in group.values()] + [phi for phi in vwpr.phi_parameters()])
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.detach())
    if rank == 0:
        same = all(torch.equal(gathered[0], other) for other in gathered[1:])
        print(f"ϕ identical on all {world} ranks: {same}  (mean {mine.mean():.4f})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Fully sharded Kintsugi with FSDP2 (torch.distributed.fsdp.fully_shard), and a checkpoint.

    torchrun --nproc-per-node 2 examples/train_fsdp2.py

Each rank holds a shard of every parameter, and the Sculptor's ϕ is sharded with it: a DTensor
placed like its parameter (element pathway) or Shard(0) over the rows (row pathway, here), so
each rank gilds exactly the rows it holds while every reduction of the maths spans the shards.
torch.distributed.checkpoint saves and restores ϕ with the rest of the optimizer state (each rank
writes its own shards); the restored run continues exactly where the first left off.
"""

import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn import functional as F

from kintsugi_optim import KintsugiOptimizer


def build(device_type: str, mesh) -> tuple[nn.Module, KintsugiOptimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)).to(device_type)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, KintsugiOptimizer(model.parameters(), lr=3e-3, pathway="row")


def train(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return loss.item()


def main() -> None:
    cuda = torch.cuda.is_available()
    device_type = "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device_type, (world,))

    g = torch.Generator().manual_seed(rank)  # each rank its own batch
    x = torch.randn(128, 20, generator=g).to(device_type)
    y = (x[:, :5].sum(1) > 0).long()

    model, opt = build(device_type, mesh)
    loss = train(model, opt, x, y, 30)
    phi = opt.state[model[0].weight]["phi"]
    if rank == 0:
        print(f"loss {loss:.4f}; ϕ of layer 0: {type(phi).__name__} {tuple(phi.shape)} "
              f"{phi.placements}, {tuple(phi.to_local().shape)} rows on this rank")

    # A sharded checkpoint: each rank writes its shards of θ and ϕ into one folder.
    path = [tempfile.mkdtemp(prefix="kintsugi_fsdp2_") if rank == 0 else None]
    dist.broadcast_object_list(path)
    path = path[0]
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)

    restored, restored_opt = build(device_type, mesh)
    state = {"model": get_model_state_dict(restored),
             "optim": get_optimizer_state_dict(restored, restored_opt)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(restored, state["model"])
    set_optimizer_state_dict(restored, restored_opt, state["optim"])

    train(model, opt, x, y, 10)
    train(restored, restored_opt, x, y, 10)
    same = all(torch.equal(p.full_tensor(), q.full_tensor())
               for p, q in zip(model.parameters(), restored.parameters()))
    same &= all(torch.equal(opt.state[p]["phi"].full_tensor(),
                            restored_opt.state[q]["phi"].full_tensor())
                for p, q in zip(model.parameters(), restored.parameters()))
    if rank == 0:
        print(f"resumed run identical to the uninterrupted one: {same}")
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

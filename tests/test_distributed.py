"""Kintsugi on torch.distributed, for real: 2 ranks, gloo, 127.0.0.1 (docs/maths.md §4, docs/distributed.md).

* DDP: θ and ϕ identical across ranks and equal to a single process on the global batch —
  the Sculptor's ϕ (optimizer state), VWPR's ϕ (buffers, which DDP broadcasts from rank 0) and
  GildedLoss's ϕ (outside the DDP module), the last two through GilderOptimizer(process_group).
* ZeroRedundancyOptimizer(optimizer_class=KintsugiOptimizer): the non-ZeRO result for element
  and row pathways; the tensor pathway's scope is each rank's share; consolidate and reload.
* FSDP2 (fully_shard): ϕ is a DTensor sharded like its parameter; training matches an
  unsharded run; torch.distributed.checkpoint round-trips ϕ sharded and full, and a resumed run
  continues identically.

Each test is one job of a pool of ranks (tests/rank_pool.py), bounded by a timeout. Jobs are
module-level functions (the ranks import this module) that return plain data; the asserts
that compare ranks run here, in the test.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from helpers import requires_torch
from kintsugi_optim import GildedLoss, GilderOptimizer, KintsugiOptimizer, VWPR
from optim_db import cases

pytestmark = pytest.mark.distributed
# Older torch lacks DTensor rules for the ops ϕ's gilding uses (clamp_min, softplus, their foreach
# forms) and 2.6's FSDP2 stream API; FSDP2 is claimed from the version CI tests it on.
requires_fsdp2 = requires_torch("2.13", "FSDP2 with DTensor ϕ")

STEPS = 4
GLOBAL_BATCH = 16  # each of the 2 ranks takes one half



# -- shared helpers (run on the ranks) -----------------------------------------------------------


def make_model(seed=0):
    torch.manual_seed(seed)
    # 5 and 3 rows: uneven shards for FSDP2 (3+2, 2+1)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def global_data(step, groups=4):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g)
    y = torch.randint(0, 3, (GLOBAL_BATCH,), generator=g)
    # every rank's half holds each group equally often (see test_ddp_gilded_loss)
    group_ids = torch.arange(GLOBAL_BATCH) % groups
    return x, y, group_ids


def local(tensors):
    rank, world = dist.get_rank(), dist.get_world_size()
    size = GLOBAL_BATCH // world
    return [t[rank * size:(rank + 1) * size] for t in tensors]


def flat(tensors):
    return torch.cat([t.detach().reshape(-1).double() for t in tensors])


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, opt, steps, data_of=lambda step: global_data(step)[:2], first_step=0):
    for step in range(first_step, first_step + steps):
        x, y = data_of(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def assert_ranks_identical(per_rank):
    first = per_rank[0]
    for other in per_rank[1:]:
        assert torch.equal(first, other), f"ranks differ by {(first - other).abs().max():.3g}"


def assert_matches_one_process(results):
    """For jobs returning (ϕ, θ, ϕ and θ of one process on the global batch): the ranks agree
    bitwise, match that process, and ϕ was really gilded."""
    assert_ranks_identical([r[0] for r in results])
    assert_ranks_identical([r[1] for r in results])
    phi, theta, ref_phi, ref_theta = results[0]
    torch.testing.assert_close(phi, ref_phi, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta, ref_theta, rtol=1e-5, atol=1e-6)
    assert not torch.equal(phi, torch.ones_like(phi))


# -- DDP -----------------------------------------------------------------------------------------


def ddp_sculptor_job(options):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = KintsugiOptimizer(model.parameters(), lr=0.05, beta=0.2, **options)
    train(model, opt, STEPS, lambda step: local(global_data(step)[:2]))
    reference = make_model()
    ref_opt = KintsugiOptimizer(reference.parameters(), lr=0.05, beta=0.2, **options)
    train(reference, ref_opt, STEPS)
    phis = [opt.state[p]["phi"] for p in model.parameters()]
    ref_phis = [ref_opt.state[p]["phi"] for p in reference.parameters()]
    return flat(model.parameters()), flat(phis), flat(reference.parameters()), flat(ref_phis)


def _id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


# Each rule, pathway and implementation once; the jobs choose lr and β.
DDP_CASES = [pytest.param({k: v for k, v in param.values[0].kwargs.items()
                           if k not in ("lr", "beta")}, id=param.id)
             for param in cases(gildings=("element", "row", "tensor"), cover="each")]


@pytest.mark.parametrize("options", DDP_CASES)
def test_ddp_sculptor(pool, options):
    """DDP averages gradients, so every rank takes the same step: θ and ϕ bitwise identical on
    all ranks, and equal to one process training on the global batch."""
    results = pool.run(ddp_sculptor_job, options)
    for i in (0, 1):
        assert_ranks_identical([r[i] for r in results])
    params, phis, ref_params, ref_phis = results[0]
    torch.testing.assert_close(params, ref_params, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(phis, ref_phis, rtol=1e-5, atol=1e-6)
    assert not torch.equal(phis, torch.ones_like(phis))


def ddp_vwpr_job(average):
    from torch.nn.parallel import DistributedDataParallel as DDP

    vwpr = VWPR(make_model(), history=False)
    model = DDP(vwpr)  # ϕ are buffers: DDP broadcasts them from rank 0 before each forward
    opt = KintsugiOptimizer(vwpr.theta_parameters(), lr=0.05)
    gilder = GilderOptimizer(vwpr.phi_parameters(), beta=0.5, fracture="relative",
                             process_group=dist.group.WORLD if average else None)
    after_steps = []
    for step in range(STEPS):
        x, y = local(global_data(step)[:2])
        opt.zero_grad()
        gilder.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        gilder.step()
        after_steps.append(flat(vwpr.phi_parameters()))  # before the next broadcast
    reference = VWPR(make_model(), history=False)
    ref_opt = KintsugiOptimizer(reference.theta_parameters(), lr=0.05)
    ref_gilder = GilderOptimizer(reference.phi_parameters(), beta=0.5, fracture="relative")
    for step in range(STEPS):
        x, y = global_data(step)[:2]
        reference.apply_vwpr_step(F.cross_entropy(reference(x), y), ref_opt, ref_gilder)
    return (torch.stack(after_steps), flat(vwpr.theta_parameters()),
            flat(reference.phi_parameters()), flat(reference.theta_parameters()))


def test_ddp_vwpr_phi_follows_the_global_batch(pool):
    """GilderOptimizer(process_group=WORLD) averages ϕ.grad over the ranks before gilding, as
    DDP does for θ: after every step ϕ is identical on all ranks (DDP's buffer broadcast then
    overwrites nothing), and θ and ϕ equal VWPR trained on the global batch in one process.
    (VWPR's fracture is a mean |∂L/∂a| with L a batch mean, so the ranks' average is the global
    fracture times the world size; fracture="relative" is scale-free, hence equal.)"""
    results = pool.run(ddp_vwpr_job, True)
    assert_ranks_identical([r[0] for r in results])
    assert_ranks_identical([r[1] for r in results])
    phis_per_step, theta, ref_phis, ref_theta = results[0]
    torch.testing.assert_close(phis_per_step[-1], ref_phis, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theta, ref_theta, rtol=1e-5, atol=1e-6)
    assert not torch.equal(phis_per_step[-1], torch.ones_like(phis_per_step[-1]))


def test_ddp_vwpr_without_process_group_diverges(pool):
    """The control: gilded from its own half batch, each rank's ϕ differs after the step (and
    DDP's broadcast would silently replace rank 1's with rank 0's at the next forward)."""
    results = pool.run(ddp_vwpr_job, False)
    assert not torch.equal(results[0][0][0], results[1][0][0])


def ddp_gilded_loss_job(reduction, equal_counts):
    from torch.nn.parallel import DistributedDataParallel as DDP

    def data(step):
        x, y, groups = global_data(step)
        if not equal_counts:  # unequal group counts on the two ranks
            g = torch.Generator().manual_seed(step)
            groups = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        return x, y, groups

    def run(model, criterion, gilder, opt, batch_of):
        for step in range(STEPS):
            x, y, groups = batch_of(step)
            opt.zero_grad()
            gilder.zero_grad()
            criterion(F.cross_entropy(model(x), y, reduction="none"), groups).backward()
            opt.step()
            gilder.step()

    model = DDP(make_model())
    criterion = GildedLoss(4, reduction=reduction)  # outside the DDP module
    gilder = GilderOptimizer([criterion.phi], beta=0.5, process_group=dist.group.WORLD)
    opt = KintsugiOptimizer(model.parameters(), lr=0.05)
    run(model, criterion, gilder, opt, lambda step: local(data(step)))
    reference = make_model()
    ref_criterion = GildedLoss(4, reduction=reduction)
    ref_gilder = GilderOptimizer([ref_criterion.phi], beta=0.5)
    ref_opt = KintsugiOptimizer(reference.parameters(), lr=0.05)
    run(reference, ref_criterion, ref_gilder, ref_opt, data)
    return (flat([criterion.phi]), flat(model.parameters()), flat([ref_criterion.phi]),
            flat(reference.parameters()))


@pytest.mark.parametrize("reduction,equal_counts", [("mean", True), ("sum", True),
                                                    ("sample", False)])
def test_ddp_gilded_loss_phi_follows_the_global_batch(pool, reduction, equal_counts):
    """ϕ.grad averaged over the ranks is the global batch's ϕ.grad when each rank's batch has
    the same size and, for "mean"/"sum" (per-group means), the same count of every group — the
    rule docs/distributed.md states. "sample" needs equal batch sizes only."""
    assert_matches_one_process(pool.run(ddp_gilded_loss_job, reduction, equal_counts))


def gilder_grad_scaler_job():
    phi = torch.ones(4, requires_grad=True)
    gilder = GilderOptimizer([phi], beta=0.5, process_group=dist.group.WORLD)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    history = []
    for step in range(3):
        phi.grad = None
        weights = torch.arange(4.0) * (dist.get_rank() + 1)
        scaler.scale((phi * weights).sum()).backward()  # ϕ.grad = scale · weights
        if step == 1 and dist.get_rank() == 0:
            phi.grad[3] = float("inf")  # only rank 0 overflows
        scaler.step(gilder)
        scaler.update()
        history.append(phi.detach().clone())
    return torch.stack(history)


def test_gilder_skips_an_inf_step_on_every_rank(pool):
    """Under GradScaler the Gilder sums the inf flag over its process group: when one rank's
    ϕ.grad overflows, every rank skips, so ϕ stays identical (and unscaled, averaged grads
    are gilded on the other steps)."""
    results = pool.run(gilder_grad_scaler_job)
    assert_ranks_identical(results)
    history = results[0]
    assert torch.equal(history[1], history[0])  # skipped everywhere
    torch.testing.assert_close(history[0], 1 + 0.5 * 1.5 * torch.arange(4.0))  # mean grad 1.5·i
    assert not torch.equal(history[2], history[1])


# -- ZeRO ----------------------------------------------------------------------------------------


def zero_job(pathway):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    options = dict(lr=0.05, beta=0.2, pathway=pathway)
    model = DDP(make_model())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=KintsugiOptimizer,
                                   **options)
    train(model, zero, STEPS, lambda step: local(global_data(step)[:2]))
    plain = DDP(make_model())
    plain_opt = KintsugiOptimizer(plain.parameters(), **options)
    train(plain, plain_opt, STEPS, lambda step: local(global_data(step)[:2]))
    # ϕ lives with the rank that owns the parameter
    owned = [p for p in model.parameters() if p in zero.optim.state]
    local_phis = [zero.optim.state[p]["phi"] for p in owned]
    plain_phis = [plain_opt.state[q]["phi"] for p, q in zip(model.parameters(), plain.parameters())
                  if p in zero.optim.state]
    return flat(model.parameters()), flat(plain.parameters()), local_phis, plain_phis


@pytest.mark.parametrize("pathway", ["element", "row"])
def test_zero_matches_the_non_zero_result(pool, pathway):
    """Element and row ϕ are scoped per tensor, so sharding whole tensors over ranks changes
    nothing: θ and every ϕ are bitwise those of DDP with a plain KintsugiOptimizer."""
    results = pool.run(zero_job, pathway)
    assert_ranks_identical([r[0] for r in results])
    owned = 0
    for params, plain_params, phis, plain_phis in results:
        assert torch.equal(params, plain_params)
        for phi, plain_phi in zip(phis, plain_phis):
            assert torch.equal(phi, plain_phi)
        owned += len(phis)
    assert owned == 4  # every parameter's ϕ lives on exactly one rank


def test_zero_tensor_pathway_scope_is_each_ranks_share(pool):
    """The tensor pathway normalises its ϕ over the param group; under ZeRO each rank's local
    optimizer holds only its share of the group, so the mean-1 scope is that share (documented;
    it differs from the non-ZeRO ϕ)."""
    results = pool.run(zero_job, "tensor")
    assert_ranks_identical([r[0] for r in results])
    differs = False
    for _, _, phis, plain_phis in results:
        assert len(phis) >= 1
        torch.testing.assert_close(torch.stack(phis).mean(), torch.tensor(1.0))
        differs |= not torch.equal(torch.stack(phis), torch.stack(plain_phis))
    assert differs


def zero_checkpoint_job(path):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    options = dict(lr=0.05, beta=0.2, pathway="row", positivity="softplus")
    data = lambda step: local(global_data(step)[:2])  # noqa: E731

    def build(module):
        model = DDP(module)
        return model, ZeroRedundancyOptimizer(model.parameters(),
                                              optimizer_class=KintsugiOptimizer, **options)

    model, zero = build(make_model())
    train(model, zero, STEPS, data)
    zero.consolidate_state_dict(to=0)
    if dist.get_rank() == 0:
        state = zero.state_dict()
        assert {tuple(s["phi"].shape) for s in state["state"].values()} == {(5,), (3,)}
        assert all("rho" in s for s in state["state"].values())
        torch.save({"model": model.module.state_dict(), "optim": state}, path)
    dist.barrier()
    saved = torch.load(path, weights_only=True)
    restored = make_model(seed=1)
    restored.load_state_dict(saved["model"])
    restored_model, restored_zero = build(restored)
    restored_zero.load_state_dict(saved["optim"])
    train(model, zero, STEPS, data, first_step=STEPS)
    train(restored_model, restored_zero, STEPS, data, first_step=STEPS)
    phis = [zero.optim.state[p]["phi"] for p in model.parameters() if p in zero.optim.state]
    restored_phis = [restored_zero.optim.state[p]["phi"] for p in restored_model.parameters()
                     if p in restored_zero.optim.state]
    return (flat(model.parameters()), flat(restored_model.parameters()), flat(phis),
            flat(restored_phis))


def test_zero_consolidate_and_reload_continues_identically(pool, tmp_path):
    results = pool.run(zero_checkpoint_job, str(tmp_path / "zero.pt"))
    for params, restored_params, phis, restored_phis in results:
        assert torch.equal(params, restored_params)
        assert torch.equal(phis, restored_phis)


# -- FSDP2 ---------------------------------------------------------------------------------------


def sharded_model(seed=0):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp2_job(options):
    from torch.distributed.tensor import DTensor, Replicate, Shard

    model = sharded_model()
    opt = KintsugiOptimizer(model.parameters(), lr=0.05, beta=0.2, **options)
    train(model, opt, STEPS, lambda step: local(global_data(step)[:2]))
    reference = make_model()
    ref_opt = KintsugiOptimizer(reference.parameters(), lr=0.05, beta=0.2, **options)
    train(reference, ref_opt, STEPS)
    pathway = options["pathway"]
    for p in model.parameters():
        phi = opt.state[p]["phi"]
        assert isinstance(phi, DTensor) and phi.device_mesh == p.device_mesh
        if pathway == "element":
            assert phi.placements == p.placements and phi.shape == p.shape
            assert phi.to_local().shape == p.to_local().shape
        elif pathway == "row":  # one ϕ per row, split over the ranks as the rows are
            assert phi.placements == (Shard(0),) and phi.shape == p.shape[:1]
            assert phi.to_local().shape[0] == p.to_local().shape[0]
        else:
            assert phi.placements == (Replicate(),) and phi.shape == ()
    phis = [full(opt.state[p]["phi"]) for p in model.parameters()]
    ref_phis = [ref_opt.state[p]["phi"] for p in reference.parameters()]
    return (flat(full(p) for p in model.parameters()), flat(phis),
            flat(reference.parameters()), flat(ref_phis))


@pytest.mark.parametrize("options", [
    dict(pathway="element"),
    dict(pathway="row", base="sgd", momentum=0.9, foreach=True),
    dict(pathway="row", positivity="softplus", gamma=0.3),
    dict(pathway="tensor"),
], ids=_id)
@requires_fsdp2
def test_fsdp2_phi_is_sharded_like_its_parameter_and_matches_unsharded(pool, options):
    """Under fully_shard ϕ is a DTensor: element ϕ placed exactly like θ, row ϕ Shard(0) with
    each rank holding its own rows' ϕ (uneven shards included), the tensor pathway's ϕ
    replicated. Reductions (row means, scope means) span the shards, so the gathered θ and ϕ
    match an unsharded run on the global batch."""
    # The job returns (θ, ϕ, reference θ, reference ϕ): reorder to the helper's (ϕ, θ, ...).
    results = [(phis, params, ref_phis, ref_params)
               for params, phis, ref_params, ref_phis in pool.run(fsdp2_job, options)]
    assert_matches_one_process(results)


def fsdp2_checkpoint_job(path, full_state_dict):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.tensor import DTensor

    options = dict(lr=0.05, beta=0.2, pathway="row", positivity="softplus")
    data = lambda step: local(global_data(step)[:2])  # noqa: E731
    sd_options = StateDictOptions(full_state_dict=full_state_dict)

    model = sharded_model()
    opt = KintsugiOptimizer(model.parameters(), **options)
    train(model, opt, STEPS, data)
    model_sd = get_model_state_dict(model, options=sd_options)
    optim_sd = get_optimizer_state_dict(model, opt, options=sd_options)
    phi_type = {type(s["phi"]) for s in optim_sd["state"].values()}
    phi_shapes = {fqn: tuple(s["phi"].shape) for fqn, s in optim_sd["state"].items()}
    # sharded: DTensors (each rank writes its shards); full: plain tensors, the global ϕ
    assert phi_type == ({torch.Tensor} if full_state_dict else {DTensor}), phi_type
    assert phi_shapes == {"0.weight": (5,), "0.bias": (5,), "2.weight": (3,), "2.bias": (3,)}

    restored = sharded_model(seed=1)
    restored_opt = KintsugiOptimizer(restored.parameters(), **options)
    if full_state_dict:  # an ordinary file: rank 0 writes it, every rank reads it
        if dist.get_rank() == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, path)
        dist.barrier()
        saved = torch.load(path, weights_only=True)
        set_model_state_dict(restored, saved["model"], options=sd_options)
        set_optimizer_state_dict(restored, restored_opt, saved["optim"], options=sd_options)
    else:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=path)
        target = {"model": get_model_state_dict(restored),
                  "optim": get_optimizer_state_dict(restored, restored_opt)}
        dcp.load(target, checkpoint_id=path)
        set_model_state_dict(restored, target["model"])
        set_optimizer_state_dict(restored, restored_opt, target["optim"])
    for p, q in zip(model.parameters(), restored.parameters()):
        for key in ("phi", "rho", "exp_avg", "step"):
            a, b = opt.state[p][key], restored_opt.state[q][key]
            assert type(a) is type(b) and torch.equal(full(a), full(b)), key
    train(model, opt, STEPS, data, first_step=STEPS)
    train(restored, restored_opt, STEPS, data, first_step=STEPS)
    phis = [full(opt.state[p]["phi"]) for p in model.parameters()]
    restored_phis = [full(restored_opt.state[p]["phi"]) for p in restored.parameters()]
    return (flat(full(p) for p in model.parameters()),
            flat(full(p) for p in restored.parameters()), flat(phis), flat(restored_phis))


@pytest.mark.parametrize("full_state_dict", [False, True], ids=["sharded", "full"])
@requires_fsdp2
def test_fsdp2_checkpoint_round_trip_and_resume(pool, tmp_path, full_state_dict):
    """get/set_optimizer_state_dict round-trip ϕ (and ρ, moments, steps) sharded (through
    dcp.save/load) and full; the restored run then continues bitwise like the original."""
    results = pool.run(fsdp2_checkpoint_job, str(tmp_path / "ckpt"), full_state_dict)
    for params, restored_params, phis, restored_phis in results:
        assert torch.equal(params, restored_params)
        assert torch.equal(phis, restored_phis)

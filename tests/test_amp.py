"""torch.amp.GradScaler with both optimizers (docs/maths.md §4).

The Sculptor leaves scaling to the scaler like torch's unfused optimizers (unscale_, the inf
check, a skipped step), or, with ``fused=True``, takes ``grad_scale``/``found_inf`` into its
kernel. The Gilder always takes them itself: ϕ.grad is unscaled in place, an inf/nan step
leaves ϕ (and ρ) bitwise untouched, and a step where no ϕ has a grad is a no-op rather than
GradScaler's "No inf checks were recorded".

A scale that is a power of two scales every gradient exactly, so a scaled run equals the
unscaled one bitwise: that is what most tests compare.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_same_snapshot, requires_cuda
from helpers import model_and_data as _model_and_data
from helpers import snapshot as _snapshot
from kintsugi_optim import GildedLoss, GilderOptimizer, KintsugiOptimizer, VWPR
from optim_db import cases

SCALE = 2.0**12


def make_scaler(device="cpu", init_scale=SCALE):
    # growth_interval: the scale stays put unless a step overflows
    return torch.amp.GradScaler(device, init_scale=init_scale, growth_interval=1000)


def model_and_data(device="cpu"):
    return _model_and_data(sizes=(6, 8, 3), device=device)


def snapshot(model, opt):
    return _snapshot(list(model.parameters()), opt)


SCULPTORS = cases(gildings=("element", "row", "tensor", "softplus"), impls=("single", "foreach"),
                  cover="each")


def backward_and_step(loss, optimizers, scaler):
    """``loss.backward()`` and each optimizer's step, through ``scaler`` when one is given."""
    if scaler is None:
        loss.backward()
        for opt in optimizers:
            opt.step()
        return
    scaler.scale(loss).backward()
    for opt in optimizers:
        scaler.step(opt)
    scaler.update()


def _id(options):
    return "-".join(str(v) for v in options.values())


@pytest.mark.parametrize("case", SCULPTORS)
def test_sculptor_scaled_run_equals_unscaled_run(case):
    runs = []
    for scaler in (None, make_scaler()):
        model, x, y = model_and_data()
        opt = case.make(model.parameters(), lr=0.01, beta=0.1)
        for _ in range(4):
            opt.zero_grad()
            backward_and_step(F.cross_entropy(model(x), y), [opt], scaler)
        runs.append(snapshot(model, opt))
    assert_same_snapshot(*runs)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("case", SCULPTORS)
def test_sculptor_step_with_inf_or_nan_grads_is_skipped(case, bad):
    """θ, ϕ (ρ), moments and step counters stay bitwise as they were; the scale backs off;
    the next finite step proceeds."""
    model, x, y = model_and_data()
    opt = case.make(model.parameters(), lr=0.01, beta=0.1)
    scaler = make_scaler()
    for step in range(3):
        opt.zero_grad()
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = bad
            before = snapshot(model, opt)
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert_same_snapshot(before, snapshot(model, opt))
            assert scaler.get_scale() == SCALE / 2
    assert all(torch.isfinite(phi).all() for group in opt.gilding().values()
               for phi in group.values())
    if case.rule.base != "sgd":
        assert opt.state[model[0].weight]["step"].item() == 2


def test_sculptor_unscale_then_clip_equals_unscaled_clipping():
    runs = []
    for scaler in (None, make_scaler()):
        model, x, y = model_and_data()
        opt = KintsugiOptimizer(model.parameters(), lr=0.05, beta=0.1)
        for _ in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), 0.1)
                scaler.step(opt)
                scaler.update()
        runs.append(snapshot(model, opt))
    assert_same_snapshot(*runs)


def _fused_available():
    try:
        from kintsugi_optim._kernels import fused_cpu  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _fused_available(), reason="kintsugi_optim._kernels.fused_cpu is not built here")
def test_fused_sculptor_takes_the_scale_into_its_kernel():
    """fused=True: GradScaler hands the step grad_scale/found_inf (no unscale_, no host sync).
    Same trajectory as the unscaled fused run, and an inf step changes nothing."""
    runs = []
    for scaler in (None, make_scaler()):
        model, x, y = model_and_data()
        opt = KintsugiOptimizer(model.parameters(), lr=0.01, beta=0.1, fused=True)
        assert opt._step_supports_amp_scaling
        for step in range(4):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            if scaler is None:
                if step == 2:
                    continue  # the scaled run skips this step
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                if step == 2:
                    model[2].bias.grad[0] = float("inf")
                scaler.step(opt)
                scaler.update()
                # rescale: after a backoff the next gradients are scaled by SCALE/2
        runs.append(snapshot(model, opt))
    assert_same_snapshot(*runs)


# -- Gilder -------------------------------------------------------------------------------------


def gilded_setup(**options):
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    criterion = GildedLoss(4, reduction="mean")
    gilder = GilderOptimizer([criterion.phi], beta=0.5, **options)
    opt = KintsugiOptimizer(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 6), torch.randint(0, 4, (32,))
    groups = torch.arange(32) % 4
    return model, criterion, gilder, opt, (x, y, groups)


def gilded_loss(model, criterion, data):
    x, y, groups = data
    return criterion(F.cross_entropy(model(x), y, reduction="none"), groups)


GILDERS = [dict(), dict(positivity="softplus", phi_norm="mean"),
           dict(ascent="multiplicative", foreach=True)]


@pytest.mark.parametrize("options", GILDERS, ids=lambda o: _id(o) or "defaults")
def test_gilder_scaled_run_equals_unscaled_run(options):
    """fracture="abs" sees the gradient's scale: it must be unscaled before gilding. ϕ.grad
    reads unscaled after scaler.step, as after torch's own unscale_."""
    runs = []
    for scaler in (None, make_scaler()):
        model, criterion, gilder, opt, data = gilded_setup(**options)
        for _ in range(4):
            opt.zero_grad()
            gilder.zero_grad()
            backward_and_step(gilded_loss(model, criterion, data), [opt, gilder], scaler)
        runs.append((criterion.phi.detach().clone(), criterion.phi.grad.clone(),
                     copy.deepcopy(gilder.state_dict()["state"])))
    (phi_a, grad_a, state_a), (phi_b, grad_b, state_b) = runs
    assert torch.equal(phi_a, phi_b)
    assert torch.equal(grad_a, grad_b)
    for k in state_a:
        assert torch.equal(state_a[k]["rho"], state_b[k]["rho"])


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("unscale_first", [False, True])
def test_gilder_step_with_inf_grads_leaves_phi_and_rho_untouched(bad, unscale_first):
    model, criterion, gilder, opt, data = gilded_setup(positivity="softplus", phi_norm="mean")
    scaler = make_scaler()
    for step in range(3):
        opt.zero_grad()
        gilder.zero_grad()
        scaler.scale(gilded_loss(model, criterion, data)).backward()
        if step == 1:
            criterion.phi.grad[2] = bad
            phi, rho = criterion.phi.detach().clone(), gilder.state[criterion.phi]["rho"].clone()
        if unscale_first:
            scaler.unscale_(gilder)
        scaler.step(opt)
        scaler.step(gilder)
        scaler.update()
        if step == 1:
            assert torch.equal(criterion.phi.detach(), phi)
            assert torch.equal(gilder.state[criterion.phi]["rho"], rho)
    assert not torch.equal(criterion.phi.detach(), phi)  # the next finite step gilds again


def test_gilder_with_no_phi_grad_is_a_no_op_not_an_error():
    """A Gilder step where no ϕ got a gradient (here ϕ is frozen out of this loss) must not trip
    GradScaler's "No inf checks were recorded for this optimizer"."""
    model, criterion, gilder, opt, data = gilded_setup()
    scaler = make_scaler()
    x, y, _ = data
    opt.zero_grad()
    gilder.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()  # no GildedLoss: ϕ.grad stays None
    scaler.step(opt)
    scaler.step(gilder)
    scaler.update()
    assert torch.equal(criterion.phi.detach(), torch.ones(4))


def test_vwpr_fracture_is_unscaled_before_gilding():
    """VWPR writes its fracture (from scaled gradients) into ϕ.grad: through scaler.step the
    Gilder gilds with the unscaled fracture, so the scaled run is the unscaled one."""
    runs = []
    for scaler in (None, make_scaler()):
        model, x, y = model_and_data()
        vwpr = VWPR(model, history=False)
        opt = KintsugiOptimizer(vwpr.theta_parameters(), lr=0.01)
        gilder = GilderOptimizer(vwpr.phi_parameters(), beta=5.0, fracture="abs")
        for _ in range(3):
            vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt, gilder, scaler=scaler)
        runs.append({k: v.clone() for k, v in vwpr.phi().items()})
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name])
        assert not torch.equal(runs[0][name], torch.ones_like(runs[0][name]))


# -- autocast -----------------------------------------------------------------------------------


def _autocast_training(device, dtype, steps=20):
    model, x, y = model_and_data(device)
    opt = KintsugiOptimizer(model.parameters(), lr=0.02, beta=0.1, pathway="row")
    scaler = make_scaler(device, init_scale=2.0**8) if dtype == torch.float16 else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.autocast(device, dtype=dtype):
            loss = F.cross_entropy(model(x), y)
        backward_and_step(loss, [opt], scaler)
        losses.append(loss.item())
    for p in model.parameters():
        phi = opt.state[p]["phi"]
        assert phi.dtype == torch.float32 and torch.isfinite(phi).all()
    assert losses[-1] < losses[0]


def test_cpu_autocast_bf16_training():
    _autocast_training("cpu", torch.bfloat16)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_training(dtype):
    _autocast_training("cuda", dtype)


@requires_cuda
@pytest.mark.parametrize("foreach", [False, True])
def test_cuda_inf_step_is_skipped(foreach):
    model, x, y = model_and_data("cuda")
    opt = KintsugiOptimizer(model.parameters(), lr=0.01, foreach=foreach)
    scaler = make_scaler("cuda")
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    before = snapshot(model, opt)
    scaler.step(opt)
    scaler.update()
    assert_same_snapshot(before, snapshot(model, opt))

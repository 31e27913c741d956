"""torch.optim.lr_scheduler drives both optimizers: the Sculptor reads lr, momentum and betas
from its group at every step (with beta=0 it then follows torch's optimizer under the same
schedule bitwise), the Gilder's lr anneals β, a tensor lr stays a tensor, and a scheduler
resumes with last_epoch (docs/maths.md §4)."""

import pytest
import torch
from torch.optim import lr_scheduler

from helpers import make_params, requires_cuda
from kintsugi_optim import GilderOptimizer, KintsugiOptimizer
from optim_db import IMPLS, RULES, Case, GILDINGS, cases

STEPS = 12

SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "LinearLR": lambda opt: lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
    "SequentialLR": lambda opt: lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
         lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS - 3)],
        milestones=[3],
    ),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS),
}
BETA0_SINGLE = cases(gildings=("beta0",), impls=("single",))


def tensors(seed=0):
    return make_params([(5, 4), (5,)], seed=seed)


def train(opt, params, make_scheduler, steps=STEPS, seed=1, record=None):
    g = torch.Generator().manual_seed(seed)
    scheduler = make_scheduler(opt)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device)
        opt.step()
        scheduler.step()
        if record is not None:  # what the base rule reads: lr and momentum or betas
            group = opt.param_groups[0]
            record.append((group["lr"], group["momentum"] if "betas" not in opt.defaults
                           else group["betas"]))
    return scheduler


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("case", BETA0_SINGLE)
def test_beta0_follows_torch_under_every_scheduler(name, case):
    """Same schedule, same trajectory: lr (and OneCycleLR's momentum/betas) is read from the
    group at every step. Bitwise, as the single-tensor path is torch's arithmetic."""
    ours, theirs = tensors(), tensors()
    sculptor = case.make(ours, lr=0.01)
    reference = case.make_torch(theirs, lr=0.01)
    our_groups, their_groups = [], []
    train(sculptor, ours, SCHEDULERS[name], record=our_groups)
    train(reference, theirs, SCHEDULERS[name], record=their_groups)
    assert our_groups == their_groups
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base,cycled,untouched", [("sgd", "momentum", "betas"),
                                                    ("adam", "betas", "momentum")])
def test_one_cycle_cycles_the_base_rules_own_momentum(base, cycled, untouched):
    """OneCycleLR picks `betas` over `momentum` when `defaults` has them: `defaults` holds only
    the constructor's base rule, so an SGD Sculptor has its momentum cycled."""
    params = tensors()
    opt = KintsugiOptimizer(params, lr=0.01, base=base, momentum=0.9 if base == "sgd" else 0.0)
    assert cycled in opt.defaults and untouched not in opt.defaults
    before = opt.param_groups[0][untouched]
    seen = []
    train(opt, params, SCHEDULERS["OneCycleLR"], record=seen)
    momenta = [m if cycled == "momentum" else m[0] for _, m in seen]
    # OneCycleLR's defaults: from 0.95 down to 0.85 at the lr peak and back up
    assert max(momenta) == pytest.approx(0.95) and min(momenta) == pytest.approx(0.85, abs=1e-3)
    assert opt.param_groups[0][untouched] == before


def test_groups_that_switch_base_get_the_other_rules_options():
    """Options of another rule are back-filled into each group (with the constructor's values),
    so a group may use a base other than the constructor's."""
    w, b = tensors()
    opt = KintsugiOptimizer([w], base="sgd", momentum=0.9, betas=(0.8, 0.99))
    opt.add_param_group({"params": [b], "base": "adam"})
    assert "betas" not in opt.defaults
    assert opt.param_groups[1]["betas"] == (0.8, 0.99)
    assert opt.param_groups[1]["momentum"] == 0.9
    b.grad = torch.ones_like(b)
    opt.step()
    assert "exp_avg" in opt.state[b]


def _tensor_lr_run(case, device="cpu", **options):
    ours, theirs = (make_params([(5, 4), (5,)], device=device) for _ in range(2))
    lr = torch.tensor(0.01, device=device if options.get("capturable") else "cpu")
    sculptor = case.make(ours, lr=lr, **options)
    reference = case.make_torch(theirs, lr=lr.clone(), **options)
    train(sculptor, ours, SCHEDULERS["SequentialLR"])
    train(reference, theirs, SCHEDULERS["SequentialLR"])
    group_lr = sculptor.param_groups[0]["lr"]
    if torch.__version__ >= "2.10":  # older schedulers put a new tensor in the group
        assert group_lr is lr  # schedulers fill a tensor lr in place
    assert group_lr.item() == pytest.approx(reference.param_groups[0]["lr"].item())
    return ours, theirs


@pytest.mark.parametrize("case", BETA0_SINGLE)
def test_tensor_lr_under_a_scheduler(case):
    """A 0-d tensor lr stays the same tensor, and the trajectory is torch's, bitwise."""
    for p, q in zip(*_tensor_lr_run(case)):
        assert torch.equal(p, q)


@requires_cuda
@pytest.mark.parametrize("rule", ["adam", "adamw"])
def test_cuda_tensor_lr_foreach_capturable_under_a_scheduler(rule):
    """foreach with a tensor lr needs capturable=True (as torch), which needs a CUDA device."""
    case = Case(RULES[rule], GILDINGS["beta0"], IMPLS["foreach"])
    for p, q in zip(*_tensor_lr_run(case, device="cuda", capturable=True)):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["StepLR", "CosineAnnealingLR", "OneCycleLR"])
def test_scheduler_resumes_with_last_epoch(name):
    """Stop after 5 steps, rebuild optimizer and scheduler from state (the scheduler with
    last_epoch, as torch documents), continue: same θ and ϕ as an uninterrupted run."""
    make = SCHEDULERS[name]
    full = tensors()
    full_opt = KintsugiOptimizer(full, lr=0.01, base="sgd", momentum=0.9, beta=0.05)
    train(full_opt, full, make, steps=STEPS, seed=1)

    first = tensors()
    opt = KintsugiOptimizer(first, lr=0.01, base="sgd", momentum=0.9, beta=0.05)
    g = torch.Generator().manual_seed(1)
    scheduler = make(opt)
    for _ in range(5):
        for p in first:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        scheduler.step()
    saved = opt.state_dict()

    resumed = [p.detach().clone().requires_grad_() for p in first]
    opt2 = KintsugiOptimizer(resumed, lr=0.01, base="sgd", momentum=0.9, beta=0.05)
    opt2.load_state_dict(saved)  # brings back 'initial_lr' (and OneCycleLR's keys)
    if name == "OneCycleLR":
        scheduler2 = lr_scheduler.OneCycleLR(opt2, max_lr=0.05, total_steps=STEPS, last_epoch=4)
    else:
        scheduler2 = type(scheduler)(opt2, **_args(name), last_epoch=4)
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])
    for _ in range(STEPS - 5):
        for p in resumed:
            p.grad = torch.randn(p.shape, generator=g)
        opt2.step()
        scheduler2.step()
    for p, q in zip(resumed, full):
        assert torch.equal(p, q)
        assert torch.equal(opt2.state[p]["phi"], full_opt.state[q]["phi"])


def _args(name):
    return {"StepLR": dict(step_size=3, gamma=0.5), "CosineAnnealingLR": dict(T_max=STEPS)}[name]


def test_gilder_lr_anneals_the_gilding_rate():
    """The Gilder's lr multiplies β: under a scheduler each step gilds with β·lr_t."""
    phi = torch.ones(4, requires_grad=True)
    opt = GilderOptimizer([phi], beta=0.1, lr=1.0)
    scheduler = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    grad = torch.tensor([1.0, 2.0, 0.0, 4.0])
    expected = torch.ones(4)
    for t in range(4):
        phi.grad = grad.clone()
        opt.step()
        scheduler.step()
        expected += 0.1 * 0.5**t * grad
        torch.testing.assert_close(phi.detach(), expected)

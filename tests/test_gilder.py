"""GilderOptimizer: gradient ascent on explicit ϕ through the shared kernel (docs/maths.md §2.4)."""

import copy
import math

import pytest
import torch

from kintsugi_optim import Gilder, GilderOptimizer
from reference import gild as reference_gild, relative


def plain(**overrides):
    options = dict(beta=0.1, gamma=0.0, l1=0.0, phi_min=1e-3, phi_max=None, phi_norm=None,
                   ascent="additive", positivity="clamp")
    options.update(overrides)
    return options


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("options,fracture", [
    (plain(), "abs"),
    (plain(gamma=0.5, l1=0.02, phi_norm="mean"), "relative"),
    (plain(ascent="multiplicative", phi_norm="mean"), "abs"),
    (plain(positivity="softplus", phi_max=3.0), "relative"),
])
def test_gilder_follows_the_spec(options, fracture, foreach):
    torch.manual_seed(0)
    phis = [torch.ones(4, 3, dtype=torch.float64, requires_grad=True),
            torch.full((5,), 2.0, dtype=torch.float64, requires_grad=True)]
    expected = [p.detach().clone() for p in phis]
    rhos = [torch.log(torch.expm1(e)) for e in expected]
    opt = GilderOptimizer(phis, fracture=fracture, foreach=foreach, lr=0.5, **options)
    rate = dict(options, beta=options["beta"] * 0.5)  # lr multiplies β
    for _ in range(6):
        grads = [torch.rand(p.shape, dtype=torch.float64) * 3 for p in phis]
        for p, g in zip(phis, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            l = relative(g) if fracture == "relative" else g
            new_phi, new_rho = reference_gild(expected[i], l, rhos[i], **rate)
            expected[i], rhos[i] = new_phi.reshape(g.shape), (
                new_rho.reshape(g.shape) if new_rho is not None else rhos[i])
    for p, e in zip(phis, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12)


def test_lr_scheduler_anneals_the_gilding_rate():
    phi = torch.ones(3, requires_grad=True)
    opt = GilderOptimizer([phi], beta=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    rises = []
    for _ in range(3):
        phi.grad = torch.ones(3)
        before = phi.detach().clone()
        opt.step()
        scheduler.step()
        rises.append((phi.detach() - before)[0].item())
    assert rises == pytest.approx([0.1, 0.05, 0.025])


def test_phi_without_grad_is_skipped_and_alias():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = Gilder([a, b], beta=1.0)
    a.grad = torch.tensor([1.0, 2.0])
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2))
    assert torch.equal(a.detach(), torch.tensor([2.0, 3.0]))
    assert Gilder is GilderOptimizer
    assert set(opt.gilding()[0]) == {0, 1}


def test_gilder_state_dict_round_trip_keeps_rho():
    phi = torch.ones(3, requires_grad=True)
    opt = GilderOptimizer([phi], positivity="softplus", beta=0.5)
    phi.grad = torch.tensor([0.5, 1.0, 2.0])
    opt.step()
    phi2 = phi.detach().clone().requires_grad_()
    opt2 = GilderOptimizer([phi2], positivity="softplus", beta=0.5)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in (phi, phi2):
        p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    opt2.step()
    assert torch.equal(phi, phi2)
    assert math.isclose(torch.nn.functional.softplus(opt.state[phi]["rho"])[0].item(),
                        phi[0].item(), rel_tol=1e-6)


def test_softplus_rho_follows_phi_changed_from_outside():
    phi = torch.ones(3, requires_grad=True)
    opt = GilderOptimizer([phi], positivity="softplus", beta=0.5)
    phi.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    with torch.no_grad():
        phi.fill_(5.0)  # e.g. a loaded checkpoint of the module holding ϕ
    phi.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(phi.detach(), torch.full((3,), 5.0))

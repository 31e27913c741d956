"""The Sculptor's trajectories (θ and ϕ) equal docs/maths.md §2 written out plainly (tests/reference.py)."""

import itertools

import pytest
import torch

from kintsugi_optim import KintsugiOptimizer
from reference import ReferenceSculptor

GILDING_CONFIGS = [
    dict(pathway=pw, fracture=fr, phi_norm=pn, ascent=asc, positivity=pos)
    for pw, fr, pn, asc, pos in itertools.product(
        ("element", "row", "tensor"), ("relative", "abs"), ("mean", None),
        ("additive", "multiplicative"), ("clamp", "softplus"))
    if not (asc == "multiplicative" and pos == "softplus")
]
BASES = [
    dict(base="adam", lr=0.05),
    dict(base="adamw", lr=0.05, weight_decay=0.1),
    dict(base="sgd", lr=0.05, momentum=0.9, weight_decay=0.01),
]


def make_params():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (), (2, 3, 2, 2)]  # weight, 1-D bias, 0-d scalar, conv weight
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def grads_for(step, params):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) * (1 + i) for i, p in
            enumerate(params)]


def two_groups(params, base, config):
    """Group 0: weight and bias; group 1: scalar and conv weight, with different β/γ/λ."""
    common = dict(base, **config, phi_min=1e-3, phi_max=None)
    return [
        dict(params=params[:2], **common, beta=0.05, gamma=0.3, l1=0.0),
        dict(params=params[2:], **common, beta=0.2, gamma=0.0, l1=0.01),
    ]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base", BASES, ids=lambda b: b["base"])
@pytest.mark.parametrize("config", GILDING_CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_trajectory_matches_spec(config, base, foreach):
    ours, theirs = make_params(), make_params()
    opt = KintsugiOptimizer(two_groups(ours, base, config), foreach=foreach)
    ref = ReferenceSculptor(two_groups(theirs, base, config))
    for step in range(8):
        for p, q, g in zip(ours, theirs, grads_for(step, ours)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(opt.state[p]["phi"], ref.phi(q), rtol=1e-9, atol=1e-12)


def test_theta_step_uses_phi_from_before_gilding():
    p = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    opt = KintsugiOptimizer([p], lr=0.1, base="sgd", beta=1.0, gamma=0.0, phi_init=2.0,
                            phi_max=10.0, phi_norm=None, fracture="abs")
    p.grad = torch.tensor([1.0, -4.0, 0.5], dtype=torch.float64)
    opt.step()
    # θ moved with ϕ = phi_init = 2, and only then did ϕ rise by β·|g|.
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, 2.8, 2.9], dtype=torch.float64))
    torch.testing.assert_close(opt.state[p]["phi"], torch.tensor([3.0, 6.0, 2.5], dtype=torch.float64))


def test_single_and_foreach_agree_in_float32():
    torch.manual_seed(0)
    for config, base in itertools.product(GILDING_CONFIGS, BASES):
        results = []
        for foreach in (False, True):
            params = [t.float().detach().requires_grad_() for t in make_params()]
            opt = KintsugiOptimizer(two_groups(params, base, config), foreach=foreach)
            for step in range(5):
                for p, g in zip(params, grads_for(step, params)):
                    p.grad = g.float()
                opt.step()
            results.append([p.detach() for p in params] + [opt.state[p]["phi"] for p in params])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{config} {base}")

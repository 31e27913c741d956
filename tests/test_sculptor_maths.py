"""The Sculptor's trajectories (θ and ϕ) equal docs/maths.md §2 written out plainly (tests/reference.py)."""

import itertools

import pytest
import torch

from helpers import grads_for, make_params, run_steps
from kintsugi_optim import KintsugiOptimizer
from optim_db import config_id, gilding_product, rule_configs
from reference import ReferenceSculptor

GILDING_CONFIGS = gilding_product()
BASES = rule_configs("adam-plain", "adamw-wd", "sgd-nesterov-wd")
SHAPES = [(4, 3), (4,), (), (2, 3, 2, 2)]  # weight, 1-D bias, 0-d scalar, conv weight


def uneven_grads_for(params, step):
    """Gradients of a different size in each tensor, so relative fracture has work to do."""
    return [g * (1 + i) for i, g in enumerate(grads_for(params, step))]


def two_groups(params, base, config):
    """Group 0: weight and bias; group 1: scalar and conv weight, with different β/γ/λ."""
    common = dict(base, lr=0.05, **config, phi_min=1e-3, phi_max=None)
    return [
        dict(params=params[:2], **common, beta=0.05, gamma=0.3, l1=0.0),
        dict(params=params[2:], **common, beta=0.2, gamma=0.0, l1=0.01),
    ]


@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("config", GILDING_CONFIGS, ids=config_id)
def test_trajectory_matches_spec(config, base, foreach):
    ours, theirs = make_params(SHAPES, dtype=torch.float64), make_params(SHAPES, dtype=torch.float64)
    opt = KintsugiOptimizer(two_groups(ours, base, config), foreach=foreach)
    ref = ReferenceSculptor(two_groups(theirs, base, config))
    for step in range(8):
        for p, q, g in zip(ours, theirs, uneven_grads_for(ours, step)):
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
    for config, base in itertools.product(GILDING_CONFIGS, [b.values[0] for b in BASES]):
        results = []
        for foreach in (False, True):
            params = make_params(SHAPES)
            opt = KintsugiOptimizer(two_groups(params, base, config), foreach=foreach)
            run_steps(opt, params, 5, grads=uneven_grads_for)
            results.append([p.detach() for p in params] + [opt.state[p]["phi"] for p in params])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{config} {base}")

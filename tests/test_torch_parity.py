"""With beta=0 the Sculptor is torch's SGD / Adam / AdamW (docs/maths.md §2.3), for every
option combination that torch takes (tests/optim_db.py: each rule's option axes).

Its own maths at β = 0: bitwise on the single-tensor path and for SGD's foreach path,
allclose(rtol=1e-6, atol=1e-7) on Adam's foreach and on fused (the C++ kernel, and the CUDA
path's Triton kernels, in Triton's interpreter or on a GPU): the registry's tolerances. Those tests turn off the shortcut that a step
with β = 0 and ϕ ≡ 1 normally takes, torch's own functional step, which is tested on its own
below: bitwise torch on every path.
"""

import pytest
import torch

from helpers import (assert_same_run, gilding_machinery_at_beta_zero, grads_for, make_params,
                     run_side_by_side, run_steps)
from kintsugi_optim import KintsugiOptimizer
from optim_db import FUSED, GILDINGS, IMPLS, PATHWAYS, RULES, Case, cases


@pytest.fixture(autouse=True)
def gilding_machinery(monkeypatch):
    """Step through the Sculptor's own paths at β = 0, not torch's (see the module docstring)."""
    gilding_machinery_at_beta_zero(monkeypatch)


def run_pair(case, *, steps=20, lr=0.01, dtype=torch.float32, complex_param=False, torch_impl=None,
             **overrides):
    """The Sculptor of ``case`` and torch's optimizer for its rule (with ``torch_impl`` for
    its implementation flags, if given) stepped side by side from the same parameters and
    gradients (lr 0.01 for every rule); returns both parameter lists."""
    shapes = [(6, 5), (6,), ()]
    params = make_params(shapes, dtype=dtype, device=case.device)
    if complex_param:
        params.append(make_params([(4, 3)], dtype=torch.complex64, seed=1, device=case.device)[0])
    ours, _, theirs, _ = run_side_by_side(
        lambda ps: case.make(ps, lr=lr, **overrides),
        lambda ps: case.make_torch(ps, lr=lr.clone() if torch.is_tensor(lr) else lr,
                                   **({"fused": None, **torch_impl} if torch_impl else {})),
        params, steps)
    return ours, theirs


def assert_params_close(ours, theirs, rtol=0.0, atol=0.0):
    assert_same_run(ours, None, theirs, None, rtol=rtol, atol=atol, state=False)


EVERY_OPTION = dict(gildings=("beta0",), options="product")


@pytest.mark.parametrize("case", cases(impls=("single",), **EVERY_OPTION))
@pytest.mark.parametrize("pathway", PATHWAYS)
def test_single_tensor_is_bitwise_torch(case, pathway):
    assert_params_close(*run_pair(case, pathway=pathway))


@pytest.mark.parametrize("case", cases(impls=("foreach",), **EVERY_OPTION))
def test_foreach_matches_torch(case):
    # SGD: ϕ·d = d exactly, then torch's own update, its bits; Adam: ϕ divides the
    # denominator, whose scalars are folded, within an ulp (optim_db.TOLERANCES).
    assert_params_close(*run_pair(case), **case.tolerance)


@pytest.mark.parametrize("case", cases(impls=FUSED, **EVERY_OPTION))
def test_fused_matches_torch(case):
    """The C++ kernel, the CUDA path's Triton kernels (interpreted here, compiled on a GPU):
    against torch's single-tensor step."""
    ours, theirs = run_pair(case, steps=5, torch_impl=dict(foreach=False))
    assert_params_close(ours, theirs, **case.tolerance)


@pytest.mark.parametrize("case", cases(impls=("single",), gildings=("beta0",)))
def test_tensor_lr_is_bitwise_torch(case):
    assert_params_close(*run_pair(case, lr=torch.tensor(0.01)))


@pytest.mark.parametrize("case", cases(impls=("single", "foreach"), gildings=("beta0",),
                                       needs=("complex",)))
def test_complex_parameters_match_torch(case):
    ours, theirs = run_pair(case, complex_param=True)
    assert_params_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_float64_and_default_construction_match_torch():
    case = Case(RULES["adam"], GILDINGS["beta0"], IMPLS["single"], options={})
    assert_params_close(*run_pair(case, dtype=torch.float64))


@pytest.mark.parametrize("case", cases(rules=("adam",), gildings=("beta0",),
                                       impls=("foreach", *FUSED)))
def test_beta_zero_keeps_phi_exactly_one_whatever_the_size(case):
    # Mean normalisation must not drift ϕ ≡ 1 by a rounding (it did for n = 41, 47, 55, ...).
    for n in range(1, 130):
        p = make_params([(n,)], seed=n, device=case.device)[0]
        q = p.detach().clone().requires_grad_()
        sculptor = KintsugiOptimizer([p], beta=0.0, **case.impl.kwargs)
        adam = torch.optim.Adam([q], **case.impl.kwargs)
        for step in range(3):
            p.grad = grads_for([p], step, seed=1000 * n)[0]
            q.grad = p.grad.clone()
            sculptor.step()
            adam.step()
        assert torch.equal(sculptor.state[p]["phi"], torch.ones_like(p)), n
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


ALL_PATHS = ("default", "single", "foreach", "fused")


@pytest.mark.parametrize("case", cases(impls=ALL_PATHS, **EVERY_OPTION))
def test_beta_zero_steps_are_torch_bitwise_on_every_path(case, monkeypatch):
    # With β = 0 and ϕ ≡ 1 the step is handed to torch's functional optimizer: no gilding cost.
    gilding_machinery_at_beta_zero(monkeypatch, on=False)
    ours, opt, theirs, reference = run_side_by_side(
        lambda ps: case.make(ps, lr=0.01), lambda ps: case.make_torch(ps, lr=0.01),
        make_params([(6, 5), (6,), ()]), 5)
    assert_same_run(ours, opt, theirs, reference, state="shared")
    for p in ours:
        phi = opt.state[p]["phi"]
        assert torch.equal(phi, torch.ones_like(phi))


@pytest.mark.parametrize("case", cases(rules=("sgd", "adam"), gildings=("beta0",),
                                       impls=ALL_PATHS))
def test_beta_zero_still_scales_by_a_phi_that_is_not_one(case, monkeypatch):
    # β set to 0 after gilding: the shortcut must see that ϕ is no longer 1 and step as the
    # Sculptor does (ϕ·d), exactly as with the shortcut turned off.
    init = make_params([(8, 3), (5,)], seed=1)
    runs = []
    for machinery in (False, True):
        params = [t.detach().clone().requires_grad_() for t in init]
        opt = case.make(params, beta=0.5)
        for step in range(8):
            if step == 3:
                opt.param_groups[0]["beta"] = 0.0
            gilding_machinery_at_beta_zero(monkeypatch, on=machinery)
            run_steps(opt, params, 1, start=step)
        runs.append((params, opt))
    (ours, opt), (reference, ref_opt) = runs
    assert not torch.equal(opt.state[ours[0]]["phi"], torch.ones(8, 3))
    assert_same_run(ours, opt, reference, ref_opt)


def test_beta_zero_shortcut_notices_a_phi_edited_in_place(monkeypatch):
    gilding_machinery_at_beta_zero(monkeypatch, on=False)  # the shortcut is what is tested here
    g = torch.Generator().manual_seed(3)
    p = torch.randn(4, 4, generator=g, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = KintsugiOptimizer([p], lr=0.1, base="sgd", beta=0.0)
    torch_sgd = torch.optim.SGD([q], lr=0.1)
    grad = torch.randn(4, 4, generator=g)
    for _ in range(2):  # ϕ ≡ 1 is seen and remembered (the second step reuses its lists)
        p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        torch_sgd.step()
    assert torch.equal(p, q)
    opt.state[p]["phi"][0].fill_(3.0)
    before = p.detach().clone()
    opt.step()
    # row 0 steps 3× (ϕ from before this step's gilding), the others as SGD
    torch.testing.assert_close(before - p.detach(), 0.1 * grad * opt.state[p]["phi"].new_tensor(
        [[3.0]] + [[1.0]] * 3), rtol=1e-5, atol=1e-7)

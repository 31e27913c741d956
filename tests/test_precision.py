"""Low precision and complex parameters (docs/maths.md §3.1, §4).

* bf16/fp16 θ keep ϕ (and ρ) in float32; with beta=0 the step is torch's, bitwise on the
  single-tensor path; ϕ of a half θ is computed exactly as for a float32 θ with the same grads.
* A group may mix dtypes; the foreach path matches the single-tensor one.
* Complex θ are stepped as their real view, as torch does; the row pathway still means rows of
  the complex tensor (a 0-d complex θ has one ϕ).
"""

import pytest
import torch

from helpers import grads_for, make_params, randn, run_side_by_side, run_steps
from kintsugi_optim import KintsugiOptimizer
from optim_db import PATHWAYS, cases, rule_configs

HALF = [torch.bfloat16, torch.float16]
SHAPES = [(6, 5), (6,), (4, 3, 2), ()]
SINGLE_AND_FOREACH = ("single", "foreach")


@pytest.mark.parametrize("pathway", PATHWAYS)
@pytest.mark.parametrize("case", cases(gildings=("beta0",), impls=SINGLE_AND_FOREACH))
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_parameters_with_beta0_are_torch(dtype, case, pathway):
    ours, sculptor, theirs, _ = run_side_by_side(
        lambda ps: case.make(ps, lr=0.01, pathway=pathway),
        lambda ps: case.make_torch(ps, lr=0.01), make_params(SHAPES, dtype=dtype), 8)
    for p, q in zip(ours, theirs):
        assert p.dtype == dtype
        assert torch.equal(p, q)
        assert sculptor.state[p]["phi"].dtype == torch.float32


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("pathway", PATHWAYS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_phi_is_gilded_in_float32_like_a_float32_parameter(dtype, pathway, foreach):
    """ϕ depends only on the gradients: given the same (half-representable) gradients, a half θ
    and a float32 θ end with bitwise the same float32 ϕ and ρ. A bf16 ϕ could not even hold
    these increments (its spacing near 1 is 2**-7)."""
    options = dict(lr=0.01, beta=0.003, pathway=pathway, foreach=foreach,
                   positivity="softplus", gamma=0.2)
    half, full = make_params(SHAPES, dtype=dtype), make_params(SHAPES)
    half_opt = KintsugiOptimizer(half, **options)
    full_opt = KintsugiOptimizer(full, **options)
    run_steps(half_opt, half, 5)
    run_steps(full_opt, full, 5, grads=lambda ps, step: grads_for(half, step))
    moved = False
    for p, q in zip(half, full):
        for key in ("phi", "rho"):
            assert torch.equal(half_opt.state[p][key], full_opt.state[q][key])
        phi = half_opt.state[p]["phi"]
        moved |= bool(((phi - 1).abs() > 0).any() and ((phi - 1).abs() < 2**-8).any())
    assert moved, "sub-bf16-resolution increments should be visible in ϕ"


@pytest.mark.parametrize("pathway", PATHWAYS)
@pytest.mark.parametrize("base", rule_configs("sgd-momentum", "adam-amsgrad"))
def test_mixed_dtype_group_foreach_matches_single_tensor(base, pathway):
    """One group holding float32, float64, bf16 and fp16 θ (foreach groups them by dtype)."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    shapes = [(5, 4), (3,), (4, 2), (6, 3)]
    # float32 draws rounded to each dtype, and one stream of float32 gradients: with other
    # draws the half θ of the two paths can part by an ulp more than the default tolerance
    g = torch.Generator().manual_seed(1)
    stream = [[randn(s, generator=g) for s in shapes] for _ in range(6)]
    runs = []
    for foreach in (False, True):
        ps = [p.detach().to(d).requires_grad_() for p, d in zip(make_params(shapes), dtypes)]
        # Unbounded, undamped ϕ (the defaults before benchmarks/dropin.py): with damping and
        # bounds the paths' half-precision θ part by a few ulps more than this test allows.
        opt = KintsugiOptimizer(ps, lr=0.01, **base, beta=0.05, pathway=pathway,
                                foreach=foreach, gamma=0.0, phi_min=1e-3, phi_max=None)
        run_steps(opt, ps, 6, grads=lambda ps, step: stream[step])
        runs.append((ps, [opt.state[p]["phi"] for p in ps]))
    (ps_a, phis_a), (ps_b, phis_b) = runs
    for p, q, dtype in zip(ps_a, ps_b, dtypes):
        assert p.dtype == q.dtype == dtype
        tol = dict(rtol=1e-6, atol=1e-7) if dtype in (torch.float32, torch.float64) else {}
        torch.testing.assert_close(p, q, **tol)
    for phi, psi, dtype in zip(phis_a, phis_b, dtypes):
        expected = torch.float64 if dtype == torch.float64 else torch.float32
        assert phi.dtype == psi.dtype == expected
        torch.testing.assert_close(phi, psi, rtol=1e-6, atol=1e-7)


def test_half_state_dict_round_trip_keeps_float32_phi():
    ps = make_params(SHAPES, dtype=torch.bfloat16)
    opt = run_steps(KintsugiOptimizer(ps, lr=0.01, positivity="softplus"), ps, 1)
    again = KintsugiOptimizer(ps, lr=0.01, positivity="softplus")
    again.load_state_dict(opt.state_dict())
    for p in ps:
        for key in ("phi", "rho"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])


# -- complex ------------------------------------------------------------------------------------

COMPLEX_SHAPES = [(4, 3), (5,), ()]


@pytest.mark.parametrize("pathway", PATHWAYS)
@pytest.mark.parametrize("case", cases(gildings=("element",), impls=SINGLE_AND_FOREACH,
                                       needs=("complex",)))
def test_complex_parameter_is_its_real_view(case, pathway):
    """A complex θ steps exactly like a real θ holding its view_as_real, except that the row
    pathway keeps the complex tensor's rows: a [4, 3] complex θ has 4 row ϕ, a 0-d one has one
    ϕ (its real view [2] would have two)."""
    complex_params = make_params(COMPLEX_SHAPES, dtype=torch.complex64)
    real_params = [torch.view_as_real(t.detach()).clone().requires_grad_() for t in complex_params]
    options = dict(lr=0.01, beta=0.1, pathway=pathway)
    # the real run gives the 0-d complex θ the tensor pathway it falls back to
    complex_opt = case.make(complex_params, **options)
    real_opt = case.make(real_params[:2], **options)
    real_opt.add_param_group({"params": real_params[2:],
                              "pathway": "tensor" if pathway == "row" else pathway})
    if pathway == "tensor":  # the tensor pathway's scope is the group: keep one group
        real_opt = case.make(real_params, **options)
    run_steps(complex_opt, complex_params, 5)
    run_steps(real_opt, real_params, 5, grads=lambda ps, step: [
        torch.view_as_real(g) for g in grads_for(complex_params, step)])
    for c, r, shape in zip(complex_params, real_params, COMPLEX_SHAPES):
        torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), rtol=1e-6,
                                   atol=1e-7)
        phi = complex_opt.state[c]["phi"]
        expected_shape = {"element": shape + (2,), "row": shape[:1], "tensor": ()}[pathway]
        assert phi.shape == expected_shape and phi.dtype == torch.float32
        torch.testing.assert_close(phi, real_opt.state[r]["phi"], rtol=1e-6, atol=1e-7)

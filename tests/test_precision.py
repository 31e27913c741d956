"""Low precision and complex parameters (docs/maths.md §3.1, §4).

* bf16/fp16 θ keep ϕ (and ρ) in float32; with beta=0 the step is torch's, bitwise on the
  single-tensor path; ϕ of a half θ is computed exactly as for a float32 θ with the same grads.
* A group may mix dtypes; the foreach path matches the single-tensor one.
* Complex θ are stepped as their real view, as torch does; the row pathway still means rows of
  the complex tensor (a 0-d complex θ has one ϕ).
"""

import pytest
import torch

from kintsugi_optim import KintsugiOptimizer

HALF = [torch.bfloat16, torch.float16]
TORCH = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
OPTIONS = {"sgd": {"momentum": 0.9}, "adam": {"amsgrad": True}, "adamw": {}}
SHAPES = [(6, 5), (6,), (4, 3, 2), ()]


def make(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def feed(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.to(p.dtype).clone()


def grad_stream(shapes, steps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_parameters_with_beta0_are_torch(dtype, base, foreach, pathway):
    ours, theirs = make(dtype), make(dtype)
    sculptor = KintsugiOptimizer(ours, lr=0.01, base=base, beta=0.0, foreach=foreach,
                                 pathway=pathway, **OPTIONS[base])
    reference = TORCH[base](theirs, lr=0.01, foreach=foreach, **OPTIONS[base])
    for grads in grad_stream(SHAPES, 8, dtype):
        feed(ours, grads)
        feed(theirs, grads)
        sculptor.step()
        reference.step()
    for p, q in zip(ours, theirs):
        assert p.dtype == dtype
        assert torch.equal(p, q)
        assert sculptor.state[p]["phi"].dtype == torch.float32


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_phi_is_gilded_in_float32_like_a_float32_parameter(dtype, pathway, foreach):
    """ϕ depends only on the gradients: given the same (half-representable) gradients, a half θ
    and a float32 θ end with bitwise the same float32 ϕ and ρ. A bf16 ϕ could not even hold
    these increments (its spacing near 1 is 2**-7)."""
    options = dict(lr=0.01, beta=0.003, pathway=pathway, foreach=foreach,
                   positivity="softplus", gamma=0.2)
    half, full = make(dtype), make(torch.float32)
    half_opt = KintsugiOptimizer(half, **options)
    full_opt = KintsugiOptimizer(full, **options)
    for grads in grad_stream(SHAPES, 5, dtype):
        feed(half, grads)
        feed(full, grads)
        half_opt.step()
        full_opt.step()
    moved = False
    for p, q in zip(half, full):
        for key in ("phi", "rho"):
            assert torch.equal(half_opt.state[p][key], full_opt.state[q][key])
        phi = half_opt.state[p]["phi"]
        moved |= bool(((phi - 1).abs() > 0).any() and ((phi - 1).abs() < 2**-8).any())
    assert moved, "sub-bf16-resolution increments should be visible in ϕ"


@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_mixed_dtype_group_foreach_matches_single_tensor(base, pathway):
    """One group holding float32, float64, bf16 and fp16 θ (foreach groups them by dtype)."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    shapes = [(5, 4), (3,), (4, 2), (6, 3)]

    def params():
        g = torch.Generator().manual_seed(0)
        return [torch.randn(s, generator=g).to(d).requires_grad_() for s, d in zip(shapes, dtypes)]

    runs = []
    for foreach in (False, True):
        ps = params()
        # Unbounded, undamped ϕ (the defaults before benchmarks/dropin.py): with damping and
        # bounds the paths' half-precision θ part by a few ulps more than this test allows.
        opt = KintsugiOptimizer(ps, lr=0.01, base=base, beta=0.05, pathway=pathway,
                                foreach=foreach, gamma=0.0, phi_min=1e-3, phi_max=None,
                                **OPTIONS[base])
        for grads in grad_stream(shapes, 6, torch.float32):
            feed(ps, grads)
            opt.step()
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
    ps = make(torch.bfloat16)
    opt = KintsugiOptimizer(ps, lr=0.01, positivity="softplus")
    feed(ps, grad_stream(SHAPES, 1, torch.bfloat16)[0])
    opt.step()
    again = KintsugiOptimizer(ps, lr=0.01, positivity="softplus")
    again.load_state_dict(opt.state_dict())
    for p in ps:
        for key in ("phi", "rho"):
            assert again.state[p][key].dtype == torch.float32
            assert torch.equal(again.state[p][key], opt.state[p][key])


# -- complex ------------------------------------------------------------------------------------

COMPLEX_SHAPES = [(4, 3), (5,), ()]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("base", ["sgd", "adam", "adamw"])
def test_complex_parameter_is_its_real_view(base, pathway, foreach):
    """A complex θ steps exactly like a real θ holding its view_as_real, except that the row
    pathway keeps the complex tensor's rows: a [4, 3] complex θ has 4 row ϕ, a 0-d one has one
    ϕ (its real view [2] would have two)."""
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g, dtype=torch.complex64) for s in COMPLEX_SHAPES]
    complex_params = [t.clone().requires_grad_() for t in init]
    real_params = [torch.view_as_real(t).clone().requires_grad_() for t in init]
    options = dict(lr=0.01, base=base, beta=0.1, foreach=foreach, **OPTIONS[base])
    # the real run gives the 0-d complex θ the tensor pathway it falls back to
    complex_opt = KintsugiOptimizer(complex_params, pathway=pathway, **options)
    real_opt = KintsugiOptimizer(real_params[:2], pathway=pathway, **options)
    real_opt.add_param_group({"params": real_params[2:],
                              "pathway": "tensor" if pathway == "row" else pathway})
    if pathway == "tensor":  # the tensor pathway's scope is the group: keep one group
        real_opt = KintsugiOptimizer(real_params, pathway=pathway, **options)
    for _ in range(5):
        for c, r in zip(complex_params, real_params):
            grad = torch.randn(c.shape, generator=g, dtype=torch.complex64)
            c.grad, r.grad = grad.clone(), torch.view_as_real(grad).clone()
        complex_opt.step()
        real_opt.step()
    for c, r, shape in zip(complex_params, real_params, COMPLEX_SHAPES):
        torch.testing.assert_close(torch.view_as_real(c.detach()), r.detach(), rtol=1e-6,
                                   atol=1e-7)
        phi = complex_opt.state[c]["phi"]
        expected_shape = {"element": shape + (2,), "row": shape[:1], "tensor": ()}[pathway]
        assert phi.shape == expected_shape and phi.dtype == torch.float32
        torch.testing.assert_close(phi, real_opt.state[r]["phi"], rtol=1e-6, atol=1e-7)

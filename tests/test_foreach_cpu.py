"""The CPU foreach path's shortcuts change no result.

On the CPU the foreach Sculptor steps its tensors in cache-sized runs and reads a few per-tensor
sums back to the host to skip passes that cannot change anything (`functional._runs`,
`functional._cpu_eager`). Both are checked here against the same step taken without them:
every run of one tensor, and the path an accelerator takes (no host reads), which the CPU would
otherwise never exercise.
"""

import pytest
import torch

import kintsugi_optim.functional as functional
from kintsugi_optim import GilderOptimizer, KintsugiOptimizer
from test_properties import CONFIGS, SPECIAL

BASES = [
    dict(base="adam"),
    dict(base="adam", amsgrad=True, maximize=True, weight_decay=0.1),
    dict(base="adamw", weight_decay=0.1),
    dict(base="sgd", momentum=0.9, nesterov=True, weight_decay=0.01),
    dict(base="sgd", momentum=0.9, dampening=0.1, maximize=True),
    dict(base="sgd"),
]
SHAPES = [(6, 5), (5,), (), (3, 2, 2), (7, 1)]


def make_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in SHAPES]
    # one complex and one float32 parameter: a second device/dtype group
    params.append(torch.randn(4, 3, generator=g, dtype=torch.complex128).requires_grad_())
    params.append(torch.randn(3, 4, generator=g, dtype=torch.float32).requires_grad_())
    return params


def grads_for(step, params, special=False):
    g = torch.Generator().manual_seed(100 + step)
    grads = []
    for p in params:
        grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if special and p.numel() > 1 and not p.is_complex():
            # one tensor with a non-finite entry and one with huge ones
            grad.view(-1)[0] = SPECIAL[step % len(SPECIAL)]
        grads.append(grad)
    return grads


def trajectory(base, config, monkeypatch, *, run_bytes=None, host_reads=True, special=False,
               steps=6, **extra):
    with monkeypatch.context() as patch:
        if run_bytes is not None:
            patch.setattr(functional, "_CPU_RUN_BYTES", run_bytes)
        if not host_reads:
            patch.setattr(functional, "_cpu_eager", lambda tensors: False)
        params = make_params()
        opt = KintsugiOptimizer(params, lr=0.05, beta=0.3, foreach=True, **base, **config,
                                **extra)
        for step in range(steps):
            for p, g in zip(params, grads_for(step, params, special)):
                p.grad = g
            opt.step()
        return [p.detach() for p in params], [opt.state[p]["phi"] for p in params]


def assert_same(a, b, exact, float32_scope=False):
    """θ and ϕ agree (a NaN gradient makes θ NaN, as in torch; ϕ stays finite).

    ``float32_scope``: the tensor pathway's scope is the whole group, which mixes the float32
    parameter's fracture (rounded differently on the two paths) into the float64 ones.
    """
    for phi in a[1] + b[1]:
        assert torch.isfinite(phi).all() and (phi > 0).all()
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        if exact:
            assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())
        else:
            single = x.dtype == torch.float32 or float32_scope
            torch.testing.assert_close(x, y, rtol=1e-5 if single else 1e-10,
                                       atol=1e-6 if single else 1e-12, equal_nan=True)


@pytest.mark.parametrize("base", BASES, ids=lambda b: "-".join(map(str, b.values())))
@pytest.mark.parametrize("config", CONFIGS[::7], ids=lambda c: "-".join(map(str, c.values())))
def test_runs_of_one_tensor_give_the_same_bits(base, config, monkeypatch):
    assert_same(trajectory(base, config, monkeypatch),
                trajectory(base, config, monkeypatch, run_bytes=1), exact=True)


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("base", BASES[:4], ids=lambda b: "-".join(map(str, b.values())))
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_host_reads_skip_only_what_changes_nothing(base, config, special, monkeypatch):
    assert_same(trajectory(base, config, monkeypatch, special=special),
                trajectory(base, config, monkeypatch, special=special, host_reads=False),
                exact=False, float32_scope=config["pathway"] == "tensor")


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("phi_max", [1.02, None])
def test_caps_and_tiny_floor_bind_alike(phi_max, host_reads, monkeypatch):
    """ϕ near the overflow cap and near the dtype's smallest normal number, on both paths."""
    with monkeypatch.context() as patch:
        if not host_reads:
            patch.setattr(functional, "_cpu_eager", lambda tensors: False)
        p = torch.zeros(4, requires_grad=True)
        opt = KintsugiOptimizer([p], base="sgd", beta=1.0, phi_max=phi_max, foreach=True)
        single = KintsugiOptimizer([q := torch.zeros(4, requires_grad=True)], base="sgd",
                                   beta=1.0, phi_max=phi_max, foreach=False)
        for o, t in ((opt, p), (single, q)):
            o.step()  # creates ϕ (no grad yet: nothing moves)
            o.state[t]["phi"] = torch.tensor([3e38, 1e-3, 1e-3, 1.0])
            t.grad = torch.tensor([1.0, 2.0, 0.0, 1.0])
            o.step()
        phi = opt.state[p]["phi"]
        assert torch.isfinite(phi).all() and (phi >= torch.finfo(phi.dtype).tiny).all()
        torch.testing.assert_close(phi, single.state[q]["phi"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("fracture", ["relative", "abs"])
def test_gilder_signed_fracture_on_both_paths(fracture, host_reads, monkeypatch):
    """A Gilder's ϕ.grad may be signed: the relative scale is mean |l|, not |mean l|."""
    with monkeypatch.context() as patch:
        if not host_reads:
            patch.setattr(functional, "_cpu_eager", lambda tensors: False)
        phis = [torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)]
        opt = GilderOptimizer(phis, beta=0.1, fracture=fracture, foreach=True)
        phis[0].grad = torch.tensor([1.0, -1.0, 2.0, -2.0])
        phis[1].grad = torch.tensor([0.5, 0.5, -1.0, 0.0])
        opt.step()
    for phi, grad in zip(phis, ([1.0, -1.0, 2.0, -2.0], [0.5, 0.5, -1.0, 0.0])):
        l = torch.tensor(grad)
        if fracture == "relative":
            l = l / l.abs().mean()
        torch.testing.assert_close(phi.detach(), (1 + 0.1 * l).clamp(min=1e-3))


def steps_of(foreach, config, base, params_fn, grads_fn, steps=5, **extra):
    params = params_fn()
    opt = KintsugiOptimizer(params, lr=0.05, foreach=foreach, **base, **config, **extra)
    for step in range(steps):
        for p, g in zip(params, grads_fn(step, params)):
            p.grad = g
        opt.step()
    return [p.detach() for p in params], [opt.state[p]["phi"] for p in params]


def mixed_params():
    """float64, float32 and bfloat16 tensors, one of each whose gradient is always zero."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g, dtype=d).requires_grad_()
            for d in (torch.float64, torch.float32, torch.bfloat16) for s in ((5, 4), (3,))]


def zero_in_each_dtype(step, params):
    g = torch.Generator().manual_seed(7 + step)
    return [torch.zeros(p.shape, dtype=p.dtype) if p.dim() == 1 else
            torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.mark.parametrize("beta", [0.01, 4.0, 100.0])
@pytest.mark.parametrize("base", BASES[:4], ids=lambda b: "-".join(map(str, b.values())))
@pytest.mark.parametrize("config", CONFIGS[::5], ids=lambda c: "-".join(map(str, c.values())))
def test_foreach_matches_single_tensor_with_zero_gradients(config, base, beta):
    """A tensor whose gradient is all zero has 1/mean|g| = 1/tiny: a large β must not overflow
    the folded rate β/mean into inf (0·inf = NaN). bfloat16 θ takes torch's own op order."""
    ours = steps_of(True, config, base, mixed_params, zero_in_each_dtype, beta=beta)
    for phi in ours[1]:
        assert torch.isfinite(phi).all() and (phi > 0).all()
    if config["phi_norm"] is None and beta > 1:
        return  # ϕ grows without bound, and θ with it: only rounding would be compared
    single = steps_of(False, config, base, mixed_params, zero_in_each_dtype, beta=beta)
    for x, y in zip(ours[0] + ours[1], single[0] + single[1]):
        tol = dict(rtol=2e-2, atol=2e-2) if x.dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x, y, **tol)


def test_float16_gilder_beyond_float16_range_matches_single_tensor():
    """Relative l/mean reaches n, past float16's largest value for n > 65504: not finite."""
    results = []
    for foreach in (False, True):
        phi = torch.ones(70_000, dtype=torch.float16, requires_grad=True)
        opt = GilderOptimizer([phi], beta=0.01, fracture="relative", foreach=foreach)
        grad = torch.zeros(70_000, dtype=torch.float16)
        grad[0] = 10.0
        phi.grad = grad
        opt.step()
        results.append(phi.detach().clone())
    assert torch.isfinite(results[1]).all()
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("impl", ["single", "foreach", "fused"])
@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_parameters_without_elements_step_beside_others(shape, pathway, impl):
    empty, other = torch.zeros(shape, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    opt = KintsugiOptimizer([empty, other], base="adam", pathway=pathway,
                            foreach=impl == "foreach", fused=(impl == "fused") or None)
    for _ in range(2):
        empty.grad, other.grad = torch.zeros(shape), torch.randn(4, 3)
        opt.step()
    phi = opt.state[other]["phi"]
    assert torch.isfinite(phi).all() and (phi > 0).all()
    assert opt.state[empty]["phi"].shape == (() if pathway == "tensor" else
                                             shape if pathway == "element" else shape[:1])

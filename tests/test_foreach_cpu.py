"""The CPU foreach path's shortcuts change no result.

On the CPU the foreach Sculptor steps its tensors in cache-sized runs and reads a few per-tensor
sums back to the host to skip passes that cannot change anything (`_kernels.host._runs`,
`_kernels.host._cpu_eager`). Both are checked here against the same step taken without them:
every run of one tensor, and the path an accelerator takes (no host reads), which the CPU would
otherwise never exercise.
"""

import pytest
import torch

from helpers import (assert_phi_finite_and_positive, foreach_cpu_paths, grads_for, make_params,
                     run_steps)
from kintsugi_optim import GilderOptimizer, KintsugiOptimizer
from optim_db import IMPLS, PATHWAYS, SPECIAL_VALUES, config_id, gilding_product, rule_configs

CONFIGS = gilding_product(gamma=(0.0, 0.5), l1=(0.0, 0.1))
BASES = rule_configs("adam-plain", "adam-amsgrad-wd-maximize", "adamw-wd", "sgd-nesterov-wd",
                     "sgd-dampening-maximize", "sgd-plain")
# float64 tensors of every rank, and one complex and one float32 parameter: a second and a
# third device/dtype group
SHAPES = [(6, 5), (5,), (), (3, 2, 2), (7, 1), (4, 3), (3, 4)]
DTYPES = [torch.float64] * 5 + [torch.complex128, torch.float32]


def special_grads_for(params, step):
    """grads_for with a non-finite or huge entry in each real tensor of more than one element."""
    grads = grads_for(params, step)
    for p, grad in zip(params, grads):
        if p.numel() > 1 and not p.is_complex():
            grad.view(-1)[0] = SPECIAL_VALUES[step % len(SPECIAL_VALUES)]
    return grads


def trajectory(base, config, monkeypatch, *, run_bytes=None, host_reads=True, special=False,
               steps=6, **extra):
    with monkeypatch.context() as patch:
        foreach_cpu_paths(patch, run_bytes=run_bytes, host_reads=host_reads)
        params = make_params(SHAPES, dtype=DTYPES)
        opt = KintsugiOptimizer(params, lr=0.05, beta=0.3, foreach=True, **base, **config,
                                **extra)
        run_steps(opt, params, steps, grads=special_grads_for if special else grads_for)
        return [p.detach() for p in params], [opt.state[p]["phi"] for p in params]


def assert_same(a, b, exact, float32_scope=False):
    """θ and ϕ agree (a NaN gradient makes θ NaN, as in torch; ϕ stays finite).

    ``float32_scope``: the tensor pathway's scope is the whole group, which mixes the float32
    parameter's fracture (rounded differently on the two paths) into the float64 ones.
    """
    assert_phi_finite_and_positive(a[1] + b[1])
    for x, y in zip(a[0] + a[1], b[0] + b[1]):
        if exact:
            assert torch.equal(x.nan_to_num(), y.nan_to_num()) and torch.equal(x.isnan(), y.isnan())
        else:
            single = x.dtype == torch.float32 or float32_scope
            torch.testing.assert_close(x, y, rtol=1e-5 if single else 1e-10,
                                       atol=1e-6 if single else 1e-12, equal_nan=True)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("config", CONFIGS[::7], ids=config_id)
def test_runs_of_one_tensor_give_the_same_bits(base, config, monkeypatch):
    assert_same(trajectory(base, config, monkeypatch),
                trajectory(base, config, monkeypatch, run_bytes=1), exact=True)


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nonfinite"])
@pytest.mark.parametrize("base", BASES[:4])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_host_reads_skip_only_what_changes_nothing(base, config, special, monkeypatch):
    assert_same(trajectory(base, config, monkeypatch, special=special),
                trajectory(base, config, monkeypatch, special=special, host_reads=False),
                exact=False, float32_scope=config["pathway"] == "tensor")


@pytest.mark.parametrize("host_reads", [True, False])
@pytest.mark.parametrize("phi_max", [1.02, None])
def test_caps_and_tiny_floor_bind_alike(phi_max, host_reads, monkeypatch):
    """ϕ near the overflow cap and near the dtype's smallest normal number, on both paths."""
    with monkeypatch.context() as patch:
        foreach_cpu_paths(patch, host_reads=host_reads)
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
        foreach_cpu_paths(patch, host_reads=host_reads)
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


def steps_of(foreach, config, base, steps=5, **extra):
    """float64, float32 and bfloat16 tensors, one of each whose gradient is always zero."""
    dtypes = [d for d in (torch.float64, torch.float32, torch.bfloat16) for _ in range(2)]
    params = make_params([(5, 4), (3,)] * 3, dtype=dtypes, seed=1)

    def zero_in_each_dtype(params, step):
        return [torch.zeros_like(g) if g.dim() == 1 else g
                for g in grads_for(params, step, seed=7)]

    opt = KintsugiOptimizer(params, lr=0.05, foreach=foreach, **base, **config, **extra)
    run_steps(opt, params, steps, grads=zero_in_each_dtype)
    return [p.detach() for p in params], [opt.state[p]["phi"] for p in params]


@pytest.mark.parametrize("beta", [0.01, 4.0, 100.0])
@pytest.mark.parametrize("base", BASES[:4])
@pytest.mark.parametrize("config", CONFIGS[::5], ids=config_id)
def test_foreach_matches_single_tensor_with_zero_gradients(config, base, beta):
    """A tensor whose gradient is all zero has 1/mean|g| = 1/tiny: a large β must not overflow
    the folded rate β/mean into inf (0·inf = NaN). bfloat16 θ takes torch's own op order."""
    ours = steps_of(True, config, base, beta=beta)
    assert_phi_finite_and_positive(ours[1])
    if config["phi_norm"] is None and beta > 1:
        return  # ϕ grows without bound, and θ with it: only rounding would be compared
    single = steps_of(False, config, base, beta=beta)
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


@pytest.mark.parametrize("impl", [name for name, impl in IMPLS.items() if impl.crossed])
@pytest.mark.parametrize("pathway", PATHWAYS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
def test_parameters_without_elements_step_beside_others(shape, pathway, impl):
    empty, other = torch.zeros(shape, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    opt = KintsugiOptimizer([empty, other], base="adam", pathway=pathway, **IMPLS[impl].kwargs)
    for _ in range(2):
        empty.grad, other.grad = torch.zeros(shape), torch.randn(4, 3)
        opt.step()
    assert_phi_finite_and_positive([opt.state[other]["phi"]])
    assert opt.state[empty]["phi"].shape == (() if pathway == "tensor" else
                                             shape if pathway == "element" else shape[:1])

"""KintsugiOptimizer(fused=True) against the single-tensor reference path (docs/maths.md §2.3).

Rule and gilding configurations from the registry (tests/optim_db.py) drive the parity tests
over each fused implementation there: "fused" on the CPU in CI (the first test builds the C++
extension, about half a minute once per machine), "fused-cuda" where a GPU is present (the
Triton kernels), and "fused-triton-interpreter": CPU tensors stepped by the CUDA path's Triton
kernels in Triton's interpreter, which checks their logic without a GPU (where triton is
installed).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from helpers import (assert_phi_finite_and_positive, assert_same_run, cpu_kernel,
                     functional_sculpt, fused_kernel_step, grads_for, make_params, requires_cuda,
                     run_steps)
from kintsugi_optim import KintsugiOptimizer
from optim_db import FUSED, GILDINGS, IMPLS, impls, rule_configs
from triton_interpreter import requires_triton

FUSED_IMPLS = impls(*FUSED)


def _configs():
    """Rule configurations over the element pathway, then gilding configurations over Adam (two
    over SGD and AdamW): each branch of the kernels once."""
    rules = {param.id: param.values[0] for param in rule_configs(
        "sgd-plain", "sgd-momentum", "sgd-nesterov-wd", "sgd-dampening-maximize", "adam-plain",
        "adam-amsgrad-wd-maximize", "adamw-plain")}
    pairs = [("adam-plain", name) for name in (
        "row", "tensor-relative", "abs-unnormalised", "damping-l1", "multiplicative",
        "softplus-element", "softplus-row-unnormalised", "softplus-tensor-capped", "bounds",
        "phi-init", "l1", "capped-l1")]
    pairs += [("sgd-momentum", "row-abs"), ("adamw-plain", "tensor-abs-unnormalised")]
    return {**rules, **{f"{rule}-{gilding}": {**rules[rule], **GILDINGS[gilding].kwargs}
                        for rule, gilding in pairs}}


# beta=0.2 (where the gilding row sets none) makes gilding visible within a few steps.
CONFIGS = _configs()
# Scalars, biases, rows of one element, odd row lengths, a row length of 16 bytes' multiple and
# (on CUDA) tensors longer than one block, so whole blocks and tails both run.
SHAPES = [(6, 5), (17,), (), (3, 4, 5), (1, 7), (70, 64), (41, 33)]


def params_on(impl, dtype=torch.float32, shapes=SHAPES):
    return make_params(shapes, dtype=dtype, device=impl.device)


def grads_x3(params, step, scale=1.0):
    return grads_for(params, step, scale=3 * scale)


def run(params, steps=3, groups=None, **options):
    """Steps `params` (as `groups` when given) with fresh gradients each step."""
    options.setdefault("beta", 0.2)
    options.setdefault("lr", 0.05)
    # The gilding defaults before benchmarks/dropin.py chose gentler ones: unbounded, undamped
    # element ϕ, so that each configuration above exercises the part of the kernels it names.
    for key, value in dict(pathway="element", gamma=0.0, phi_min=1e-3, phi_max=None).items():
        options.setdefault(key, value)
    return run_steps(KintsugiOptimizer(groups or params, **options), params, steps, grads=grads_x3)


def assert_same(params_a, opt_a, params_b, opt_b, rtol=1e-5, atol=1e-6):
    assert_same_run(params_a, opt_a, params_b, opt_b, rtol=rtol, atol=atol)


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    """Build (or load from the cache) the CPU extension once, outside the timed tests."""
    cpu_kernel()


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_fused_equals_single_tensor(config, impl):
    reference, fused = params_on(impl), params_on(impl)
    opt_ref = run(reference, foreach=False, **config)
    opt_fused = run(fused, fused=True, **config)
    assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("pathway", ["element", "row"])
def test_large_tensors_split_across_threads(pathway, impl):
    """Tensors past the CPU kernel's 2^18 elements are stepped by all threads together."""
    shapes = [(520, 512), (300_001,)]
    reference, fused = params_on(impl, shapes=shapes), params_on(impl, shapes=shapes)
    opt_ref = run(reference, steps=2, foreach=False, pathway=pathway)
    opt_fused = run(fused, steps=2, fused=True, pathway=pathway)
    assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("pathway", ["element", "row"])
def test_float64_is_exact_to_rounding(pathway, impl):
    reference, fused = params_on(impl, torch.float64), params_on(impl, torch.float64)
    opt_ref = run(reference, foreach=False, pathway=pathway)
    opt_fused = run(fused, fused=True, pathway=pathway)
    assert_same(reference, opt_ref, fused, opt_fused, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_the_float32_step(dtype, impl):
    """bf16/fp16 params: θ and moments stored in their dtype, ϕ in float32, all maths in float32
    (so closer to a float32 run than the single-tensor path, which rounds after every op)."""
    low = params_on(impl, dtype)
    high = [nn.Parameter(p.detach().float()) for p in low]
    opt_low = KintsugiOptimizer(low, lr=0.05, beta=0.2, fused=True)
    opt_high = KintsugiOptimizer(high, lr=0.05, beta=0.2, fused=True)
    for step in range(3):
        for p, q, g in zip(low, high, grads_x3(low, step)):
            p.grad, q.grad = g, g.float()
        opt_low.step()
        opt_high.step()
    for p, q in zip(low, high):
        assert p.dtype == dtype and opt_low.state[p]["phi"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q.detach(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(opt_low.state[p]["phi"], opt_high.state[q]["phi"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_layouts_that_are_not_walked_flat(impl):
    """A transposed parameter with a contiguous grad and a channels_last conv weight under the
    row pathway step like the reference."""
    def params():
        generator = torch.Generator().manual_seed(3)
        transposed = nn.Parameter(torch.randn(12, 9, generator=generator).to(impl.device).t())
        conv = nn.Parameter(torch.randn(4, 3, 3, 3, generator=generator).to(impl.device)
                            .contiguous(memory_format=torch.channels_last))
        return [transposed, conv]

    for pathway in ("element", "row"):
        reference, fused = params(), params()
        opt_ref = KintsugiOptimizer(reference, lr=0.05, beta=0.2, pathway=pathway, foreach=False)
        opt_fused = KintsugiOptimizer(fused, lr=0.05, beta=0.2, pathway=pathway, fused=True)
        for step in range(2):
            for a, b, g in zip(reference, fused, grads_x3(reference, step)):
                a.grad, b.grad = g.contiguous(), g.contiguous()
            opt_ref.step()
            opt_fused.step()
        assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_tensor_pathway_spans_param_groups_separately(impl):
    """The tensor pathway's scope is each param group: two groups gild independently."""
    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:], "lr": 0.01, "fracture": "abs"}]

    reference, fused = params_on(impl), params_on(impl)
    opt_ref = run(reference, groups=groups(reference), foreach=False, pathway="tensor")
    opt_fused = run(fused, groups=groups(fused), fused=True, pathway="tensor")
    assert_same(reference, opt_ref, fused, opt_fused)


SCALED_CONFIGS = ["adam-plain", "sgd-momentum", "adam-plain-row", "adam-plain-tensor-relative"]


def scaled_run(impl, config, steps=3):
    """The reference stepped on plain gradients beside the fused step on gradients ×1024 with
    GradScaler's grad_scale = 1024 and found_inf = 0; returns both, with the params."""
    options = dict(CONFIGS[config], lr=0.05)
    options.setdefault("beta", 0.2)
    reference, fused = params_on(impl), params_on(impl)
    opt_ref = KintsugiOptimizer(reference, foreach=False, **options)
    opt_fused = KintsugiOptimizer(fused, fused=True, **options)
    for step in range(steps):
        for a, b, g, scaled in zip(reference, fused, grads_x3(reference, step),
                                   grads_x3(reference, step, scale=1024.0)):
            a.grad, b.grad = g, scaled
        opt_ref.step()
        opt_fused.grad_scale = torch.tensor(1024.0, device=impl.device)
        opt_fused.found_inf = torch.tensor(0.0, device=impl.device)
        opt_fused.step()
        for a, b in zip(reference, fused):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=0)
    return reference, opt_ref, fused, opt_fused


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("config", SCALED_CONFIGS)
def test_grad_scale_is_divided_out(config, impl):
    """As torch's fused Adam under GradScaler: grads divided by grad_scale (and stored back
    unscaled), then the step of the unscaled grads."""
    assert_same(*scaled_run(impl, config))


# The interpreted CUDA kernels never see found_inf or a tensor lr through the optimizer
# (optim_db: IMPLS' "unsupported"): their branches for these run on CUDA (and found_inf's also
# in test_interpreted_kernels_skip_the_whole_step_on_found_inf).
def host_read_impls(feature):
    return impls(*(name for name in FUSED if feature not in IMPLS[name].unsupported))


@pytest.mark.parametrize("impl", host_read_impls("found_inf"))
@pytest.mark.parametrize("config", SCALED_CONFIGS)
def test_found_inf_skips_the_whole_step(config, impl):
    """found_inf = 1 leaves θ, ϕ, moments and step counts as they were."""
    _, _, fused, opt_fused = scaled_run(impl, config, steps=2)
    before = copy.deepcopy((fused, opt_fused.state_dict()))
    for b, g in zip(fused, grads_x3(fused, 9)):
        b.grad = g
    opt_fused.grad_scale = torch.tensor(1024.0, device=impl.device)
    opt_fused.found_inf = torch.tensor(1.0, device=impl.device)
    opt_fused.step()
    for p, q in zip(before[0], fused):
        assert torch.equal(p, q)
    for key, state in before[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_fused.state_dict()["state"][key][name]), name


@pytest.mark.parametrize("impl", host_read_impls("tensor_lr"))
def test_lr_as_tensor(impl):
    as_float, as_tensor = params_on(impl), params_on(impl)
    opt_float = run(as_float, fused=True, lr=0.05)
    opt_tensor = run(as_tensor, fused=True, lr=torch.tensor(0.05, device=impl.device))
    assert_same(as_float, opt_float, as_tensor, opt_tensor, rtol=1e-6, atol=1e-7)


def sparse_grads_for(params, step):
    """grads_for with nine entries in ten zero: runs of equal ϕ, which sum with rounding errors
    all of one sign."""
    generator = torch.Generator().manual_seed(200 + step)
    return [g * (torch.rand(g.shape, generator=generator) < 0.1).to(g.device, g.dtype)
            for g in grads_x3(params, step)]


@pytest.mark.parametrize("impl", FUSED_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gradients", [grads_x3, sparse_grads_for], ids=["dense", "sparse"])
def test_foreseen_normalisation_keeps_mean_phi_within_rounding(gradients, dtype, impl):
    """The kernels store ϕ'·n/Σϕ' in the step's own pass, with Σϕ' foreseen from Σϕ = n.
    Rounding makes Σϕ drift from n; at a small β it drifts past the kernels' bound of four
    rounding errors within a few steps (the 0-d parameter first), and ϕ must then be rescaled
    after all. With a bound of 64 roundings in the kernel this fails by step 10; with ϕ summed
    as plain floats on the CPU, the sparse case ends over 20 eps off at the first step."""
    shapes = [*SHAPES, (16384,)]
    params = params_on(impl, dtype, shapes)
    reference = params_on(impl, dtype, shapes)
    options = dict(beta=1e-3, lr=1e-3)
    opt = KintsugiOptimizer(params, fused=True, **options)
    opt_ref = KintsugiOptimizer(reference, foreach=False, **options)
    bound = 6 * torch.finfo(dtype).eps  # the kernel's four, and the rounding of its own Σϕ
    for step in range(40):
        for p, q, g in zip(params, reference, gradients(params, step)):
            p.grad, q.grad = g, g.clone()
        opt.step()
        opt_ref.step()
        for i, p in enumerate(params):
            phi = opt.state[p]["phi"]
            mean = math.fsum(phi.flatten().tolist()) / phi.numel()  # exact to one rounding
            assert abs(mean - 1) <= bound, f"step {step}, param {i}: mean ϕ {mean!r}"
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    assert_same(reference, opt_ref, params, opt, rtol=rtol, atol=rtol / 10)


@requires_triton
@pytest.mark.parametrize("phi_scale", [1.0, 2.0], ids=["foresight-holds", "foresight-misses"])
def test_interpreted_kernels_skip_the_whole_step_on_found_inf(phi_scale, monkeypatch):
    """The CUDA kernels' own found_inf check, called directly: the dispatcher reads found_inf on
    the host for CPU tensors, so test_found_inf_skips_the_whole_step never reaches it here."""
    IMPLS["fused-triton-interpreter"].setup(monkeypatch)
    params = params_on(IMPLS["fused"])
    opt = run(params, steps=2, fused=True)
    states = [opt.state[p] for p in params]
    for state in states:
        state["phi"].mul_(phi_scale)
    grads = [1024 * g for g in grads_x3(params, 9)]
    before = copy.deepcopy((params, grads, states))
    fused_kernel_step(cpu_kernel(), params, grads, states, torch.tensor(1024.0),
                      torch.tensor(1.0), lr=0.05, beta=0.2)
    for old, new in zip(before[0] + before[1], params + grads):
        assert torch.equal(old, new)
    for old, new in zip(before[2], states):
        for key, value in old.items():
            assert torch.equal(value, new[key]), key


@pytest.mark.parametrize("impl", FUSED_IMPLS)
def test_non_finite_grads_keep_phi_finite_and_positive(impl):
    params = params_on(impl)
    opt = KintsugiOptimizer(params, fused=True, beta=0.5)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
        if p.numel() > 1:
            p.grad.view(-1)[0] = float("inf")
    opt.step()
    assert_phi_finite_and_positive(opt.state[p]["phi"] for p in params)


def test_complex_params_step_as_their_real_view():
    """Through the functional API (the optimizer's fused check refuses complex params, as
    torch's does): every real component is a pathway, as on the single-tensor path."""
    results = []
    for fused in (False, True):
        p, g = make_params([(4, 3), (4, 3)], dtype=torch.complex64, seed=5)
        results.append(functional_sculpt(p.detach(), g.detach(), fused=fused, lr=0.05, beta=0.2))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# -- errors and defaults --------------------------------------------------------------------------


def test_fused_and_foreach_together_raise():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        functional_sculpt(torch.ones(3), torch.ones(3), foreach=True, fused=True)


def test_unsupported_device_raises():
    p = nn.Parameter(torch.ones(3, device="meta"))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="fused=True"):
        KintsugiOptimizer([p], fused=True).step()
    with pytest.raises(RuntimeError, match="runs on CPU and CUDA tensors"):
        functional_sculpt(torch.ones(3, device="meta"), torch.ones(3, device="meta"), fused=True)


def test_unsupported_dtype_raises():
    with pytest.raises(RuntimeError, match="supports float32, float64, bfloat16 and float16"):
        functional_sculpt(torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32),
                          phi_dtype=torch.float32, fused=True)


def test_fused_with_differentiable_raises():
    with pytest.raises(RuntimeError, match="`fused` does not support `differentiable`"):
        KintsugiOptimizer([nn.Parameter(torch.ones(2))], fused=True, differentiable=True)


@requires_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests launch the kernels")
def test_cuda_kernels_compile_for_hopper(monkeypatch, tmp_path):
    """Without a GPU: every kernel specialisation the configurations reach (dtypes, bases,
    pathways, gilding options, GradScaler) compiles down to an sm_90 cubin, and where the
    maths is float32 the flat kernels hold no float64 blocks (the float64 scalars are rounded
    before they meet the data)."""
    from triton_interpreter import compile_only

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    compiled = compile_only(monkeypatch, arch=90)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        start = len(compiled)
        for config in CONFIGS.values():
            params = params_on(IMPLS["fused"], dtype)
            run(params, steps=1, fused=True, **config)
        opt = KintsugiOptimizer(params_on(IMPLS["fused"], dtype), fused=True)
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        opt.step()
        flat = ("_abs_sum_kernel", "_flat_step_kernel", "_normalise_kernel")
        for name, kernel in compiled[start:]:
            if dtype != torch.float64 and name in flat:  # (row and scope sums are float64)
                blocks = re.findall(r"tensor<[0-9x]+xf64", kernel.asm["ttgir"])
                assert not blocks, (name, dtype, blocks[:3])
    names = {name for name, _ in compiled}
    assert names == {"_abs_sum_kernel", "_flat_step_kernel", "_normalise_kernel",
                     "_row_step_kernel", "_gild_scopes_kernel"}
    assert all("cubin" in kernel.asm for _, kernel in compiled)


@requires_cuda
@pytest.mark.cuda
def test_cuda_step_never_syncs_with_the_host():
    params = params_on(IMPLS["fused-cuda"])
    opt = KintsugiOptimizer(params, fused=True, lr=torch.tensor(0.05, device="cuda"))
    for p, g in zip(params, grads_x3(params, 0)):
        p.grad = g
    opt.step()  # builds and caches the launch tables
    opt.grad_scale = torch.tensor(2.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

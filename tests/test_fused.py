"""KintsugiOptimizer(fused=True) against the single-tensor reference path (docs/maths.md §2.3).

One table of configurations (as torch's OptimizerInfo) drives the parity tests on every device:
CPU in CI (the first test builds the C++ extension, about half a minute once per machine), CUDA
where present (the Triton kernels), and "triton-interpreter": CPU tensors stepped by the CUDA
path's Triton kernels in Triton's interpreter, which checks their logic without a GPU (where
triton is installed).
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn

from kintsugi_optim import KintsugiOptimizer
from kintsugi_optim import functional as F
from triton_interpreter import requires_triton

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda]),
    pytest.param("triton-interpreter", marks=requires_triton),
]


@pytest.fixture
def device(request, monkeypatch):
    """The device the parameters live on; "triton-interpreter" puts them on the CPU and sends
    the fused step to the interpreted Triton kernels in place of the C++ one."""
    if request.param != "triton-interpreter":
        return request.param
    from triton_interpreter import use_interpreted_cuda_kernels

    use_interpreted_cuda_kernels(monkeypatch)
    return "cpu"

# beta=0.2 makes gilding visible within a few steps.
CONFIGS = {
    "adam-default": dict(),
    "adamw": dict(base="adamw"),
    "adam-amsgrad-wd-maximize": dict(amsgrad=True, weight_decay=0.1, maximize=True),
    "sgd-plain": dict(base="sgd"),
    "sgd-momentum": dict(base="sgd", momentum=0.9),
    "sgd-nesterov-wd": dict(base="sgd", momentum=0.9, nesterov=True, weight_decay=0.05),
    "sgd-dampening-maximize": dict(base="sgd", momentum=0.8, dampening=0.3, maximize=True),
    "row": dict(pathway="row"),
    "row-sgd-abs": dict(pathway="row", base="sgd", momentum=0.9, fracture="abs"),
    "tensor": dict(pathway="tensor"),
    "tensor-adamw-abs-nonorm": dict(pathway="tensor", base="adamw", fracture="abs", phi_norm=None),
    "abs-nonorm": dict(fracture="abs", phi_norm=None),
    "damping-l1": dict(gamma=2.0, l1=0.3),
    "multiplicative": dict(ascent="multiplicative"),
    "softplus": dict(positivity="softplus"),
    "softplus-row-nonorm": dict(positivity="softplus", pathway="row", phi_norm=None),
    "softplus-tensor": dict(positivity="softplus", pathway="tensor", phi_max=1.3),
    "bounds": dict(phi_min=0.95, phi_max=1.05, beta=1.0),
    "phi-init": dict(phi_init=2.0),  # mean ϕ starts at 2: the kernels' foresight misses
    "l1": dict(l1=0.3),  # λ in the foreseen Σϕ'
    "phi-max-l1": dict(phi_max=1.05, l1=0.05),
}
# Scalars, biases, rows of one element, odd row lengths, a row length of 16 bytes' multiple and
# (on CUDA) tensors longer than one block, so whole blocks and tails both run.
SHAPES = [(6, 5), (17,), (), (3, 4, 5), (1, 7), (70, 64), (41, 33)]


def make_params(device, dtype=torch.float32, shapes=SHAPES):
    generator = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(s, generator=generator, dtype=dtype).to(device)) for s in shapes]


def grads_for(params, step, scale=1.0):
    generator = torch.Generator().manual_seed(100 + step)
    return [(3 * scale * torch.randn(p.shape, generator=generator, dtype=p.dtype)).to(p.device)
            for p in params]


def run(params, steps=3, groups=None, **options):
    """Steps `params` (as `groups` when given) with fresh gradients each step."""
    options.setdefault("beta", 0.2)
    options.setdefault("lr", 0.05)
    # The gilding defaults before benchmarks/dropin.py chose gentler ones: unbounded, undamped
    # element ϕ, so that each configuration above exercises the part of the kernels it names.
    for key, value in dict(pathway="element", gamma=0.0, phi_min=1e-3, phi_max=None).items():
        options.setdefault(key, value)
    opt = KintsugiOptimizer(groups or params, **options)
    for step in range(steps):
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        opt.step()
    return opt


def assert_same(params_a, opt_a, params_b, opt_b, rtol=1e-5, atol=1e-6):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=rtol, atol=atol, msg=f"param {i}")
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key, value in state_a.items():
            torch.testing.assert_close(state_b[key].to(value.device), value, rtol=rtol, atol=atol,
                                       msg=f"param {i}: state {key!r}")


@pytest.fixture(scope="module", autouse=True)
def built_kernel():
    """Build (or load from the cache) the CPU extension once, outside the timed tests."""
    from kintsugi_optim._fused import _cpu_kernel

    _cpu_kernel()


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_fused_equals_single_tensor(config, device):
    reference, fused = make_params(device), make_params(device)
    opt_ref = run(reference, foreach=False, **config)
    opt_fused = run(fused, fused=True, **config)
    assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("pathway", ["element", "row"])
def test_large_tensors_split_across_threads(pathway, device):
    """Tensors past the CPU kernel's 2^18 elements are stepped by all threads together."""
    shapes = [(520, 512), (300_001,)]
    reference, fused = make_params(device, shapes=shapes), make_params(device, shapes=shapes)
    opt_ref = run(reference, steps=2, foreach=False, pathway=pathway)
    opt_fused = run(fused, steps=2, fused=True, pathway=pathway)
    assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("pathway", ["element", "row"])
def test_float64_is_exact_to_rounding(pathway, device):
    reference, fused = make_params(device, torch.float64), make_params(device, torch.float64)
    opt_ref = run(reference, foreach=False, pathway=pathway)
    opt_fused = run(fused, fused=True, pathway=pathway)
    assert_same(reference, opt_ref, fused, opt_fused, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_follow_the_float32_step(dtype, device):
    """bf16/fp16 params: θ and moments stored in their dtype, ϕ in float32, all maths in float32
    (so closer to a float32 run than the single-tensor path, which rounds after every op)."""
    low = make_params(device, dtype)
    high = [nn.Parameter(p.detach().float()) for p in low]
    opt_low = KintsugiOptimizer(low, lr=0.05, beta=0.2, fused=True)
    opt_high = KintsugiOptimizer(high, lr=0.05, beta=0.2, fused=True)
    for step in range(3):
        for p, q, g in zip(low, high, grads_for(low, step)):
            p.grad, q.grad = g, g.float()
        opt_low.step()
        opt_high.step()
    for p, q in zip(low, high):
        assert p.dtype == dtype and opt_low.state[p]["phi"].dtype == torch.float32
        torch.testing.assert_close(p.float(), q.detach(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(opt_low.state[p]["phi"], opt_high.state[q]["phi"], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_layouts_that_are_not_walked_flat(device):
    """A transposed parameter with a contiguous grad and a channels_last conv weight under the
    row pathway step like the reference."""
    def params():
        generator = torch.Generator().manual_seed(3)
        transposed = nn.Parameter(torch.randn(12, 9, generator=generator).to(device).t())
        conv = nn.Parameter(torch.randn(4, 3, 3, 3, generator=generator).to(device)
                            .contiguous(memory_format=torch.channels_last))
        return [transposed, conv]

    for pathway in ("element", "row"):
        reference, fused = params(), params()
        opt_ref = KintsugiOptimizer(reference, lr=0.05, beta=0.2, pathway=pathway, foreach=False)
        opt_fused = KintsugiOptimizer(fused, lr=0.05, beta=0.2, pathway=pathway, fused=True)
        for step in range(2):
            for a, b, g in zip(reference, fused, grads_for(reference, step)):
                a.grad, b.grad = g.contiguous(), g.contiguous()
            opt_ref.step()
            opt_fused.step()
        assert_same(reference, opt_ref, fused, opt_fused)


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_tensor_pathway_spans_param_groups_separately(device):
    """The tensor pathway's scope is each param group: two groups gild independently."""
    def groups(params):
        return [{"params": params[:3]}, {"params": params[3:], "lr": 0.01, "fracture": "abs"}]

    reference, fused = make_params(device), make_params(device)
    opt_ref = run(reference, groups=groups(reference), foreach=False, pathway="tensor")
    opt_fused = run(fused, groups=groups(fused), fused=True, pathway="tensor")
    assert_same(reference, opt_ref, fused, opt_fused)


def scaled_run(device, config, steps=3):
    """The reference stepped on plain gradients beside the fused step on gradients ×1024 with
    GradScaler's grad_scale = 1024 and found_inf = 0; returns both, with the params."""
    options = dict(CONFIGS[config], beta=0.2, lr=0.05)
    reference, fused = make_params(device), make_params(device)
    opt_ref = KintsugiOptimizer(reference, foreach=False, **options)
    opt_fused = KintsugiOptimizer(fused, fused=True, **options)
    for step in range(steps):
        for a, b, g, scaled in zip(reference, fused, grads_for(reference, step),
                                   grads_for(reference, step, scale=1024.0)):
            a.grad, b.grad = g, scaled
        opt_ref.step()
        opt_fused.grad_scale = torch.tensor(1024.0, device=device)
        opt_fused.found_inf = torch.tensor(0.0, device=device)
        opt_fused.step()
        for a, b in zip(reference, fused):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=0)
    return reference, opt_ref, fused, opt_fused


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("config", ["adam-default", "sgd-momentum", "row", "tensor"])
def test_grad_scale_is_divided_out(config, device):
    """As torch's fused Adam under GradScaler: grads divided by grad_scale (and stored back
    unscaled), then the step of the unscaled grads."""
    assert_same(*scaled_run(device, config))


# On CPU tensors the dispatcher (kintsugi_optim._fused) reads found_inf and a tensor lr on the
# host, so the interpreted CUDA kernels never see them through the optimizer: their branches for
# these run on CUDA (and found_inf's also in test_interpreted_kernels_skip_the_whole_step_on_found_inf).
HOST_READ_DEVICES = [d for d in DEVICES if getattr(d, "values", [d])[0] != "triton-interpreter"]


@pytest.mark.parametrize("device", HOST_READ_DEVICES, indirect=True)
@pytest.mark.parametrize("config", ["adam-default", "sgd-momentum", "row", "tensor"])
def test_found_inf_skips_the_whole_step(config, device):
    """found_inf = 1 leaves θ, ϕ, moments and step counts as they were."""
    _, _, fused, opt_fused = scaled_run(device, config, steps=2)
    before = copy.deepcopy((fused, opt_fused.state_dict()))
    for b, g in zip(fused, grads_for(fused, 9)):
        b.grad = g
    opt_fused.grad_scale = torch.tensor(1024.0, device=device)
    opt_fused.found_inf = torch.tensor(1.0, device=device)
    opt_fused.step()
    for p, q in zip(before[0], fused):
        assert torch.equal(p, q)
    for key, state in before[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, opt_fused.state_dict()["state"][key][name]), name


@pytest.mark.parametrize("device", HOST_READ_DEVICES, indirect=True)
def test_lr_as_tensor(device):
    as_float, as_tensor = make_params(device), make_params(device)
    opt_float = run(as_float, fused=True, lr=0.05)
    opt_tensor = run(as_tensor, fused=True, lr=torch.tensor(0.05, device=device))
    assert_same(as_float, opt_float, as_tensor, opt_tensor, rtol=1e-6, atol=1e-7)


def sparse_grads_for(params, step):
    """grads_for with nine entries in ten zero: runs of equal ϕ, which sum with rounding errors
    all of one sign."""
    generator = torch.Generator().manual_seed(200 + step)
    return [g * (torch.rand(g.shape, generator=generator) < 0.1).to(g.device, g.dtype)
            for g in grads_for(params, step)]


@pytest.mark.parametrize("device", DEVICES, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gradients", [grads_for, sparse_grads_for], ids=["dense", "sparse"])
def test_foreseen_normalisation_keeps_mean_phi_within_rounding(gradients, dtype, device):
    """The kernels store ϕ'·n/Σϕ' in the step's own pass, with Σϕ' foreseen from Σϕ = n.
    Rounding makes Σϕ drift from n; at a small β it drifts past the kernels' bound of four
    rounding errors within a few steps (the 0-d parameter first), and ϕ must then be rescaled
    after all. With a bound of 64 roundings in the kernel this fails by step 10; with ϕ summed
    as plain floats on the CPU, the sparse case ends over 20 eps off at the first step."""
    shapes = [*SHAPES, (16384,)]
    params = make_params(device, dtype, shapes)
    reference = make_params(device, dtype, shapes)
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
    from triton_interpreter import use_interpreted_cuda_kernels

    import kintsugi_optim._fused

    use_interpreted_cuda_kernels(monkeypatch)
    params = make_params("cpu")
    opt = run(params, steps=2, fused=True)
    states = [opt.state[p] for p in params]
    for state in states:
        state["phi"].mul_(phi_scale)
    grads = [1024 * g for g in grads_for(params, 9)]
    before = copy.deepcopy((params, grads, states))
    kintsugi_optim._fused._cpu_kernel()(
        params, grads, [s["phi"] for s in states], [], [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states], [], [], [], [s["step"] for s in states],
        torch.tensor(1024.0), torch.tensor(1.0), base="adam", lr=0.05, beta1=0.9, beta2=0.999,
        eps=1e-8, amsgrad=False, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0,
        maximize=False, pathway="element", relative=True, beta=0.2, gamma=0.0, l1=0.0,
        phi_min=1e-3, phi_max=None, norm_mean=True, multiplicative=False, softplus=False,
    )
    for old, new in zip(before[0] + before[1], params + grads):
        assert torch.equal(old, new)
    for old, new in zip(before[2], states):
        for key, value in old.items():
            assert torch.equal(value, new[key]), key


@pytest.mark.parametrize("device", DEVICES, indirect=True)
def test_non_finite_grads_keep_phi_finite_and_positive(device):
    params = make_params(device)
    opt = KintsugiOptimizer(params, fused=True, beta=0.5)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
        if p.numel() > 1:
            p.grad.view(-1)[0] = float("inf")
    opt.step()
    for p in params:
        phi = opt.state[p]["phi"]
        assert torch.isfinite(phi).all() and (phi > 0).all()


def test_complex_params_step_as_their_real_view():
    """Through the functional API (the optimizer's fused check refuses complex params, as
    torch's does): every real component is a pathway, as on the single-tensor path."""
    def state():
        generator = torch.Generator().manual_seed(5)
        p = torch.randn(4, 3, dtype=torch.complex64, generator=generator)
        g = torch.randn(4, 3, dtype=torch.complex64, generator=generator)
        phi = F.new_phi(p, "element", 1.0)
        return p, g, phi, torch.zeros_like(p), torch.zeros_like(p), torch.zeros(())

    options = dict(
        base="adam", lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, amsgrad=False, momentum=0.0,
        dampening=0.0, nesterov=False, weight_decay=0.0, maximize=False, capturable=False,
        differentiable=False, pathway="element", fracture="relative", beta=0.2, gamma=0.0,
        l1=0.0, phi_min=1e-3, phi_max=None, phi_norm="mean", ascent="additive",
        positivity="clamp",
    )
    results = []
    for fused in (False, True):
        p, g, phi, m, v, step = state()
        F.sculpt([p], [g], [phi], None, [m], [v], [], [None], [step], foreach=False, fused=fused,
                 **options)
        results.append((p, phi, m, v))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# -- errors and defaults --------------------------------------------------------------------------


def functional_args(p, dtype=None):
    return dict(
        params=[p], grads=[torch.ones_like(p)], phis=[torch.ones_like(p, dtype=dtype)], rhos=None,
        exp_avgs=[torch.zeros_like(p)], exp_avg_sqs=[torch.zeros_like(p)], max_exp_avg_sqs=[],
        momentum_buffers=[None], state_steps=[torch.zeros(())], base="adam", lr=0.1, beta1=0.9,
        beta2=0.999, eps=1e-8, amsgrad=False, momentum=0.0, dampening=0.0, nesterov=False,
        weight_decay=0.0, maximize=False, capturable=False, differentiable=False,
        pathway="element", fracture="relative", beta=0.1, gamma=0.0, l1=0.0, phi_min=1e-3,
        phi_max=None, phi_norm="mean", ascent="additive", positivity="clamp",
    )


def test_fused_and_foreach_together_raise():
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        F.sculpt(**functional_args(torch.ones(3)), foreach=True, fused=True)


def test_unsupported_device_raises():
    p = nn.Parameter(torch.ones(3, device="meta"))
    p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="fused=True"):
        KintsugiOptimizer([p], fused=True).step()
    with pytest.raises(RuntimeError, match="runs on CPU and CUDA tensors"):
        F.sculpt(**functional_args(torch.ones(3, device="meta")), fused=True)


def test_unsupported_dtype_raises():
    with pytest.raises(RuntimeError, match="supports float32, float64, bfloat16 and float16"):
        F.sculpt(**functional_args(torch.ones(3, dtype=torch.int32), torch.float32), fused=True)


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
            params = make_params("cpu", dtype)
            run(params, steps=1, fused=True, **config)
        opt = KintsugiOptimizer(make_params("cpu", dtype), fused=True)
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
    params = make_params("cuda")
    opt = KintsugiOptimizer(params, fused=True, lr=torch.tensor(0.05, device="cuda"))
    for p, g in zip(params, grads_for(params, 0)):
        p.grad = g
    opt.step()  # builds and caches the launch tables
    opt.grad_scale = torch.tensor(2.0, device="cuda")
    opt.found_inf = torch.tensor(0.0, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

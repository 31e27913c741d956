"""With beta=0 the Sculptor is torch's SGD / Adam / AdamW (docs/maths.md §2.3), for every
option combination.

Its own maths at β = 0: bitwise on the single-tensor path and for SGD's foreach path,
allclose(rtol=1e-6, atol=1e-7) on Adam's foreach and on fused (the C++ kernel, and the CUDA
path's Triton kernels in Triton's interpreter). Those tests turn off the shortcut that a step
with β = 0 and ϕ ≡ 1 normally takes, torch's own functional step, which is tested on its own
below: bitwise torch on every path.
"""

import itertools

import pytest
import torch

import kintsugi_optim.sculptor
from kintsugi_optim import KintsugiOptimizer
from triton_interpreter import requires_triton


@pytest.fixture(autouse=True)
def gilding_machinery(monkeypatch):
    """Step through the Sculptor's own paths at β = 0, not torch's (see the module docstring)."""
    monkeypatch.setattr(kintsugi_optim.sculptor, "_BETA_ZERO_SHORTCUT", False)


def _combos(**axes):
    return [dict(zip(axes, values)) for values in itertools.product(*axes.values())]


SGD_OPTIONS = [
    o for o in _combos(momentum=[0.0, 0.9], dampening=[0.0, 0.3], nesterov=[False, True],
                       weight_decay=[0.0, 0.1], maximize=[False, True])
    if not (o["nesterov"] and (o["momentum"] == 0 or o["dampening"] != 0))
]
ADAM_OPTIONS = _combos(betas=[(0.9, 0.999), (0.8, 0.95)], eps=[1e-8, 1e-3], amsgrad=[False, True],
                       weight_decay=[0.0, 0.1], maximize=[False, True])
CASES = (
    [("sgd", torch.optim.SGD, o) for o in SGD_OPTIONS]
    + [("adam", torch.optim.Adam, o) for o in ADAM_OPTIONS]
    + [("adamw", torch.optim.AdamW, o) for o in ADAM_OPTIONS]
)


def _case_id(case):
    base, _, options = case
    return base + "-" + "-".join(f"{k}={v}" for k, v in options.items())


def run_pair(base, torch_cls, options, *, foreach, lr=0.01, pathway="element", steps=20,
             dtype=torch.float32, complex_param=False, fused=None):
    """The Sculptor with β = 0 (``fused=True``: its fused step) and ``torch_cls`` stepped side
    by side from the same parameters and gradients; returns both sets of parameters."""
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (6,), ()]
    init = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    if complex_param:
        init.append(torch.randn(4, 3, generator=g, dtype=torch.complex64))
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    options = dict(options)
    if base == "adamw" and "weight_decay" not in options:
        options["weight_decay"] = 1e-2
    sculptor = KintsugiOptimizer(ours, lr=lr, base=base, beta=0.0, pathway=pathway,
                                 foreach=None if fused else foreach, fused=fused, **options)
    reference = torch_cls(theirs, lr=lr, foreach=foreach, **options)
    for _ in range(steps):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.grad, q.grad = grad.clone(), grad.clone()
        sculptor.step()
        reference.step()
    return ours, theirs


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
def test_single_tensor_is_bitwise_torch(case, pathway):
    ours, theirs = run_pair(*case, foreach=False, pathway=pathway)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_foreach_matches_torch(case):
    ours, theirs = run_pair(*case, foreach=True)
    for p, q in zip(ours, theirs):
        if case[0] == "sgd":  # ϕ·d = d exactly, then torch's own update: its bits
            assert torch.equal(p, q)
        else:  # ϕ divides Adam's denominator, whose scalars are folded: within an ulp
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def use_kernel(kernel, monkeypatch):
    """The fused step's kernel: "cpu" (C++) or "triton-interpreter" (the CUDA path's)."""
    if kernel == "triton-interpreter":
        from triton_interpreter import use_interpreted_cuda_kernels

        use_interpreted_cuda_kernels(monkeypatch)


FUSED_KERNELS = ["cpu", pytest.param("triton-interpreter", marks=requires_triton)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_fused_matches_torch(case, kernel, monkeypatch):
    use_kernel(kernel, monkeypatch)
    ours, theirs = run_pair(*case, foreach=False, fused=True, steps=5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base,torch_cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_tensor_lr_is_bitwise_torch(base, torch_cls):
    options = {"momentum": 0.9} if base == "sgd" else {}
    ours, theirs = run_pair(base, torch_cls, options, foreach=False, lr=torch.tensor(0.01))
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("base,torch_cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                            ("adamw", torch.optim.AdamW)])
def test_complex_parameters_match_torch(base, torch_cls, foreach):
    options = {"momentum": 0.9} if base == "sgd" else {"amsgrad": True}
    ours, theirs = run_pair(base, torch_cls, options, foreach=foreach, complex_param=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_float64_and_default_construction_match_torch():
    ours, theirs = run_pair("adam", torch.optim.Adam, {}, foreach=False, dtype=torch.float64)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("impl", [
    "foreach", "fused", pytest.param("fused-triton-interpreter", marks=requires_triton)])
def test_beta_zero_keeps_phi_exactly_one_whatever_the_size(impl, monkeypatch):
    # Mean normalisation must not drift ϕ ≡ 1 by a rounding (it did for n = 41, 47, 55, ...).
    if impl == "fused-triton-interpreter":
        use_kernel("triton-interpreter", monkeypatch)
        impl = "fused"
    g = torch.Generator().manual_seed(0)
    for n in range(1, 130):
        p = torch.randn(n, generator=g, requires_grad=True)
        q = p.detach().clone().requires_grad_()
        sculptor = KintsugiOptimizer([p], beta=0.0, **{impl: True})
        adam = torch.optim.Adam([q], **{impl: True})
        for _ in range(3):
            grad = torch.randn(n, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
            sculptor.step()
            adam.step()
        assert torch.equal(sculptor.state[p]["phi"], torch.ones(n)), n
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


IMPLS = {"default": {}, "single": dict(foreach=False), "foreach": dict(foreach=True),
         "fused": dict(fused=True)}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", list(IMPLS))
def test_beta_zero_steps_are_torch_bitwise_on_every_path(case, impl, monkeypatch):
    # With β = 0 and ϕ ≡ 1 the step is handed to torch's functional optimizer: no gilding cost.
    monkeypatch.setattr(kintsugi_optim.sculptor, "_BETA_ZERO_SHORTCUT", True)
    base, torch_cls, options = case
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in [(6, 5), (6,), ()]]
    ours = [t.clone().requires_grad_() for t in init]
    theirs = [t.clone().requires_grad_() for t in init]
    options = dict(options, **({"weight_decay": 1e-2} if base == "adamw" else {}))
    options = {**options, **IMPLS[impl]}
    sculptor = KintsugiOptimizer(ours, lr=0.01, base=base, beta=0.0, **options)
    reference = torch_cls(theirs, lr=0.01, **options)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        sculptor.step()
        reference.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        phi = sculptor.state[p]["phi"]
        assert torch.equal(phi, torch.ones_like(phi))
        for key, value in reference.state[q].items():
            assert torch.equal(sculptor.state[p][key], value), key


def _step_with_shortcut(opt, on, monkeypatch):
    monkeypatch.setattr(kintsugi_optim.sculptor, "_BETA_ZERO_SHORTCUT", on)
    opt.step()


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_beta_zero_still_scales_by_a_phi_that_is_not_one(base, impl, monkeypatch):
    # β set to 0 after gilding: the shortcut must see that ϕ is no longer 1 and step as the
    # Sculptor does (ϕ·d), exactly as with the shortcut turned off.
    options = dict(base=base, lr=0.05, **({"momentum": 0.9} if base == "sgd" else {}),
                   **IMPLS[impl])
    g = torch.Generator().manual_seed(1)
    init = [torch.randn(8, 3, generator=g), torch.randn(5, generator=g)]
    runs = []
    for shortcut in (True, False):
        params = [t.clone().requires_grad_() for t in init]
        opt = KintsugiOptimizer(params, beta=0.5, **options)
        grads = torch.Generator().manual_seed(2)
        for step in range(8):
            if step == 3:
                opt.param_groups[0]["beta"] = 0.0
            for p in params:
                p.grad = torch.randn(p.shape, generator=grads)
            _step_with_shortcut(opt, shortcut, monkeypatch)
        runs.append((params, opt))
    (ours, opt), (reference, ref_opt) = runs
    assert not torch.equal(opt.state[ours[0]]["phi"], torch.ones(8, 3))
    for p, q in zip(ours, reference):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["phi"], ref_opt.state[q]["phi"])


def test_beta_zero_shortcut_notices_a_phi_edited_in_place(monkeypatch):
    g = torch.Generator().manual_seed(3)
    p = torch.randn(4, 4, generator=g, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    opt = KintsugiOptimizer([p], lr=0.1, base="sgd", beta=0.0)
    torch_sgd = torch.optim.SGD([q], lr=0.1)
    grad = torch.randn(4, 4, generator=g)
    p.grad, q.grad = grad.clone(), grad.clone()
    opt.step()  # ϕ ≡ 1 is seen and remembered
    torch_sgd.step()
    assert torch.equal(p, q)
    opt.state[p]["phi"][0].fill_(3.0)
    before = p.detach().clone()
    opt.step()
    # row 0 steps 3× (ϕ from before this step's gilding), the others as SGD
    torch.testing.assert_close(before - p.detach(), 0.1 * grad * opt.state[p]["phi"].new_tensor(
        [[3.0]] + [[1.0]] * 3), rtol=1e-5, atol=1e-7)

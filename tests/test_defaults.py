"""What ``KintsugiOptimizer(params)`` chooses when given nothing but parameters.

* the implementation: the fused kernel on the CPU where it applies (plain float tensors,
  eagerly), torch's choice elsewhere (complex parameters, ``differentiable``, torch.compile);
* the gilding defaults, chosen with benchmarks/dropin.py: β, γ and ϕ's bounds, which keep
  every step within [phi_min / phi_max, phi_max] times the base rule's (README.md,
  "Performance"); β = 0 for plain SGD (momentum 0), which is then torch's SGD.
"""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from helpers import cpu_kernel, make_params, replace_cpu_kernel, run_steps, sculptor_defaults
from kintsugi_optim import KintsugiOptimizer
from optim_db import IMPLS, PATHWAYS, rule_configs

_DEFAULTS = sculptor_defaults()


def trajectory(make, shapes, steps=6, dtype=torch.float32, seed=0):
    params = make_params(shapes, dtype=dtype, seed=seed)
    return params, run_steps(make(params), params, steps)


@pytest.mark.parametrize("options", rule_configs("adam-plain", "sgd-momentum", "adamw-wd"))
def test_cpu_default_is_the_fused_kernel(options, monkeypatch):
    calls = []
    kernel = cpu_kernel()
    replace_cpu_kernel(monkeypatch, lambda: calls.append(1) or kernel)
    shapes = [(7, 5), (5,), ()]
    ours, _ = trajectory(lambda p: KintsugiOptimizer(p, lr=0.01, **options), shapes)
    assert len(calls) >= 6
    monkeypatch.undo()
    chosen, _ = trajectory(lambda p: KintsugiOptimizer(p, lr=0.01, fused=True, **options), shapes)
    for p, q in zip(ours, chosen):
        assert torch.equal(p, q)


def test_complex_parameters_keep_torchs_choice(monkeypatch):
    def no_kernel():
        raise AssertionError("the fused kernel was chosen")

    replace_cpu_kernel(monkeypatch, no_kernel)
    shapes = [(3, 2)]
    ours, _ = trajectory(lambda p: KintsugiOptimizer(p), shapes, dtype=torch.complex64)
    single, _ = trajectory(lambda p: KintsugiOptimizer(p, foreach=False), shapes,
                           dtype=torch.complex64)
    assert torch.equal(ours[0], single[0])


def test_beta_zero_default_is_torchs_default_step():
    shapes = [(7, 5), (5,), ()]
    ours, _ = trajectory(lambda p: KintsugiOptimizer(p, lr=0.01, beta=0.0), shapes)
    theirs, _ = trajectory(lambda p: torch.optim.Adam(p, lr=0.01), shapes)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


def test_plain_sgd_default_is_torchs_sgd():
    shapes = [(7, 5), (5,), ()]
    ours, opt = trajectory(lambda p: KintsugiOptimizer(p, lr=0.1, base="sgd"), shapes)
    theirs, _ = trajectory(lambda p: torch.optim.SGD(p, lr=0.1), shapes)
    assert opt.param_groups[0]["beta"] == 0.0
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("options", [dict(base="sgd", momentum=0.9), dict(base="adam"),
                                     dict(base="adamw"), dict(base="sgd", beta=0.01)])
def test_gilding_is_on_by_default_but_for_plain_sgd(options):
    _, opt = trajectory(lambda p: KintsugiOptimizer(p, lr=0.01, **options), [(7, 5), (5,)])
    assert opt.param_groups[0]["beta"] == 0.01 == _DEFAULTS["beta"]
    assert any(not torch.equal(phi, torch.ones_like(phi))
               for phi in opt.gilding()[0].values())


def test_each_groups_rule_decides_beta_unless_one_is_given():
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    opt = KintsugiOptimizer([{"params": [a]}, {"params": [b], "momentum": 0.9},
                             {"params": [c], "beta": 0.5}], base="sgd")
    assert [g["beta"] for g in opt.param_groups] == [0.0, 0.01, 0.5]
    opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "base": "adam"})
    assert opt.param_groups[-1]["beta"] == 0.01
    adam = KintsugiOptimizer([{"params": [a]}, {"params": [b], "base": "sgd"}])
    assert [g["beta"] for g in adam.param_groups] == [0.01, 0.0]
    given = KintsugiOptimizer([{"params": [a]}, {"params": [b], "momentum": 0.9}], base="sgd",
                              beta=0.02)
    assert [g["beta"] for g in given.param_groups] == [0.02, 0.02]
    # None is the rule's default in a group too, as for weight_decay, whatever the constructor's
    named = KintsugiOptimizer([{"params": [a], "beta": None},
                               {"params": [b], "beta": None, "momentum": 0.9}], base="sgd", beta=0.5)
    assert [g["beta"] for g in named.param_groups] == [0.0, 0.01]
    named.param_groups[1]["beta"] = None  # an edit mid-training is resolved at the next step
    a.grad, b.grad = torch.ones(2), torch.ones(2)
    named.step()
    assert named.param_groups[1]["beta"] == 0.01


@settings(max_examples=40, deadline=None)
@given(
    impl=st.sampled_from([impl.kwargs for impl in IMPLS.values() if impl.crossed]),
    pathway=st.sampled_from(PATHWAYS),
    momentum=st.sampled_from([0.0, 0.9]),
    beta=st.sampled_from([0.01, 1.0, 100.0]),
    scale=st.sampled_from([1e-6, 1.0, 1e6]),
    seed=st.integers(0, 2**16),
)
def test_sgd_never_steps_more_than_phi_max_times_torchs_step(impl, pathway, momentum, beta,
                                                            scale, seed):
    # Whatever the gradients and the rate, ϕ ≤ phi_max (l1 = 0: gilding never lowers a ϕ before
    # the normalisation, so its mean is ≥ 1 and dividing by it cannot lift a ϕ past the cap),
    # and ϕ ≥ phi_min / phi_max. So every SGD step is at most phi_max times torch's.
    cap = _DEFAULTS["phi_max"]
    g = torch.Generator().manual_seed(seed)
    params = [torch.zeros(s, requires_grad=True) for s in [(6, 5), (4,), ()]]
    opt = KintsugiOptimizer(params, lr=0.1, base="sgd", momentum=momentum, beta=beta,
                            pathway=pathway, **impl)
    buffers = [torch.zeros(p.shape) for p in params]
    for _ in range(6):
        before = [p.detach().clone() for p in params]
        for p, buf in zip(params, buffers):
            p.grad = torch.randn(p.shape, generator=g) ** 3 * scale  # heavy-tailed
            buf.mul_(momentum).add_(p.grad)  # torch's SGD direction (dampening 0)
        opt.step()
        for p, old, d in zip(params, before, buffers):
            step = (old - p.detach()).abs()
            assert (step <= cap * (1 + 1e-5) * 0.1 * d.abs() + 1e-6 * old.abs()).all()
    for phi in opt.gilding()[0].values():
        assert phi.max() <= cap * (1 + 1e-5)
        assert phi.min() >= _DEFAULTS["phi_min"] / cap * (1 - 1e-5)

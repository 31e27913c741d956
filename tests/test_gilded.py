"""Gilded(any optimizer), docs/maths.md §2.7: with β = 0 it is the base bitwise; otherwise
θ ← θ₀ + ϕ·(θ_base − θ₀) with θ_base from torch's own step and ϕ gilded as §2.1–2.2 write it,
checked against the plain reference in tests/reference.py over every torch optimizer that applies
and a small third-party-style one; schedulers, clipping, hooks, GradScaler, resume and errors."""

from __future__ import annotations

import copy
import functools
import math
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.optim import lr_scheduler

import reference
from helpers import (assert_bitwise, assert_same_run, grad_stream, make_params, run_steps,
                     set_grads)
from optim_db import GILDED_BASES, Lion
from kintsugi_optim import Gilded, KintsugiOptimizer
from kintsugi_optim.history import flat_gilding


STEPS = 4


# Three shapes drawn as one float64 stream (gradients too: helpers.grad_stream), so runs over
# float64, float32 and bf16 parameters hold the same numbers, rounded.
new_params = functools.partial(make_params, [(5, 4), (5,), (3, 2, 2)], draw=torch.float64)


# ---------------------------------------------------------------------------------------------
# β = 0 and ϕ ≡ 1: the base optimizer, bitwise
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(GILDED_BASES))
def test_beta0_is_the_base_bitwise(name):
    ours, theirs = new_params(), new_params()
    gilded = Gilded(GILDED_BASES[name](ours), beta=0.0, pathway="element")
    bare = GILDED_BASES[name](theirs)
    run_steps(gilded, ours, STEPS, grads=grad_stream())
    run_steps(bare, theirs, STEPS, grads=grad_stream())
    assert_same_run(ours, gilded, theirs, bare)
    assert all("phi" not in s for s in gilded.state.values())
    for p, phi in zip(ours, gilded.gilding()[0].values()):
        assert torch.equal(phi, torch.ones_like(p))


@pytest.mark.parametrize("name", list(GILDED_BASES))
def test_phi_identically_one_is_the_base_bitwise(name):
    """One parameter per group on the tensor pathway with phi_norm="mean": ϕ is gilded every
    step and renormalised to exactly 1, so the rescale runs and must leave θ_base's bits."""
    ours, theirs = new_params(), new_params()
    gilded = Gilded(GILDED_BASES[name]([{"params": [p]} for p in ours]), beta=0.5,
                    pathway="tensor")
    bare = GILDED_BASES[name]([{"params": [p]} for p in theirs])
    run_steps(gilded, ours, STEPS, grads=grad_stream())
    run_steps(bare, theirs, STEPS, grads=grad_stream())
    assert_bitwise(ours, theirs)
    assert all(torch.equal(s["phi"], torch.tensor(1.0)) for s in gilded.state.values())


def test_first_step_at_phi_init_one_is_the_base_bitwise():
    ours, theirs = new_params(), new_params()
    gilded = Gilded(torch.optim.Adagrad(ours, lr=0.1), beta=0.5)
    run_steps(gilded, ours, 1, grads=grad_stream())
    run_steps(torch.optim.Adagrad(theirs, lr=0.1), theirs, 1, grads=grad_stream())
    assert_bitwise(ours, theirs)
    assert not all(torch.equal(s["phi"], torch.ones_like(s["phi"])) for s in gilded.state.values())


# ---------------------------------------------------------------------------------------------
# The maths against the plain reference
# ---------------------------------------------------------------------------------------------


GILDING_OPTIONS = dict(beta=0.3, gamma=0.0, l1=0.0, phi_init=1.0, phi_min=1e-3, phi_max=None,
                       pathway="element", fracture="relative", phi_norm="mean",
                       ascent="additive", positivity="clamp")


def reference_run(make_base, params, options, steps=STEPS, seed=1):
    """θ₀ → θ_base by the bare base optimizer, θ ← θ₀ + ϕ·(θ_base − θ₀), then ϕ gilded as
    tests/reference.py writes §2.1–2.2, one scope at a time, in float64."""
    o = {**GILDING_OPTIONS, **options}
    gild_options = {k: o[k] for k in ("beta", "gamma", "l1", "phi_min", "phi_max", "phi_norm",
                                       "ascent", "positivity")}
    softplus = o["positivity"] == "softplus"
    base = make_base(params)
    phis = [torch.full(reference.fracture(p.detach(), o["pathway"]).shape, o["phi_init"],
                       dtype=torch.float64) for p in params]
    grads = grad_stream(seed=seed)
    for step in range(steps):
        set_grads(params, grads(params, step))
        fractures = [reference.fracture(p.grad.double(), o["pathway"]) for p in params]
        theta0 = [p.detach().double().clone() for p in params]
        base.step()
        with torch.no_grad():
            for p, t0, phi in zip(params, theta0, phis):
                phi_b = phi if phi.dim() in (0, p.dim()) else phi.view(-1, *[1] * (p.dim() - 1))
                p.copy_(t0 + phi_b * (p.double() - t0))
        if o["pathway"] == "tensor":  # one scope: the group
            scopes = [(list(range(len(params))), torch.stack(phis), torch.stack(fractures))]
        else:
            scopes = [([k], phis[k], fractures[k]) for k in range(len(params))]
        for ks, phi, l in scopes:
            if o["fracture"] == "relative":
                l = reference.relative(l)
            rho = torch.log(torch.expm1(phi)) if softplus else None
            new, _ = reference.gild(phi, l, rho, **gild_options)
            for j, k in enumerate(ks):
                phis[k] = new[j] if o["pathway"] == "tensor" else new.view(phi.shape)
    return phis


@pytest.mark.parametrize("name", list(GILDED_BASES))
def test_matches_the_written_out_maths(name):
    ours, theirs = new_params(dtype=torch.float64), new_params(dtype=torch.float64)
    gilded = Gilded(GILDED_BASES[name](ours), **GILDING_OPTIONS)
    run_steps(gilded, ours, STEPS, grads=grad_stream())
    ref_phis = reference_run(GILDED_BASES[name], theirs, {})
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(list(gilded.gilding()[0].values()), ref_phis, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", [
    dict(pathway="row"),
    dict(pathway="tensor"),
    dict(fracture="abs", phi_norm=None, phi_max=1.2),
    dict(gamma=0.5, l1=0.1, phi_init=2.0),
    dict(ascent="multiplicative"),
    dict(positivity="softplus", pathway="row"),
], ids=str)
@pytest.mark.parametrize("foreach", [False, True])
def test_gilding_options_match_the_written_out_maths(options, foreach):
    ours, theirs = new_params(dtype=torch.float64), new_params(dtype=torch.float64)
    make_base = GILDED_BASES["Adagrad"]
    gilded = Gilded(make_base(ours, foreach=foreach), **{**GILDING_OPTIONS, **options})
    run_steps(gilded, ours, STEPS, grads=grad_stream())
    ref_phis = reference_run(make_base, theirs, options)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(list(gilded.gilding()[0].values()), ref_phis, rtol=1e-10, atol=1e-12)


def test_foreach_rescale_gives_the_single_tensor_bits():
    """The base's foreach flag picks Gilded's implementation; the rescale is the same
    arithmetic either way (ϕ's gilding is compared to rounding)."""
    a, b = new_params(), new_params()
    single = Gilded(Lion(a, lr=0.01, foreach=False), beta=0.3, phi_norm=None, fracture="abs")
    multi = Gilded(Lion(b, lr=0.01, foreach=True), beta=0.3, phi_norm=None, fracture="abs")
    run_steps(single, a, STEPS, grads=grad_stream())
    run_steps(multi, b, STEPS, grads=grad_stream())
    assert_bitwise(a, b)
    torch.testing.assert_close(list(single.gilding()[0].values()),
                               list(multi.gilding()[0].values()))


@pytest.mark.parametrize("pathway", ["element", "row", "tensor"])
@pytest.mark.parametrize("base,options", [
    ("sgd", dict(weight_decay=0.01)),
    ("sgd", dict(momentum=0.9)),
    ("adam", dict()),
])
def test_agrees_with_the_sculptor(pathway, base, options):
    """Where both apply, Gilded(torch's SGD/Adam) and KintsugiOptimizer take the same steps:
    θ_base − θ₀ is −lr·d, so θ₀ + ϕ·(θ_base − θ₀) is the Sculptor's θ − lr·ϕ·d."""
    ours, theirs = new_params(), new_params()
    torch_cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[base]
    gilded = Gilded(torch_cls(ours, lr=0.05, **options), beta=0.2, pathway=pathway)
    sculptor = KintsugiOptimizer(theirs, lr=0.05, base=base, beta=0.2, pathway=pathway,
                                 foreach=False, **options)
    run_steps(gilded, ours, 8, grads=grad_stream())
    run_steps(sculptor, theirs, 8, grads=grad_stream())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gilded.gilding(), sculptor.gilding(), rtol=1e-5, atol=1e-6)


def test_complex_parameters_step_as_their_real_view():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex128, generator=g).requires_grad_()
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    opts = [Gilded(torch.optim.Adam([t], lr=0.1), beta=0.3, pathway=pathway)
            for t, pathway in ((z, "element"), (r, "element"))]
    for _ in range(3):
        grad = torch.randn(4, 3, dtype=torch.complex128, generator=g)
        z.grad, r.grad = grad, torch.view_as_real(grad).clone()
        for opt in opts:
            opt.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert torch.equal(opts[0].gilding()[0][0], opts[1].gilding()[0][0])


def test_bf16_parameters_keep_a_float32_phi():
    ours = new_params(dtype=torch.bfloat16)
    gilded = Gilded(torch.optim.RMSprop(ours, lr=0.01), beta=0.3)
    run_steps(gilded, ours, STEPS, grads=grad_stream())
    phis = list(gilded.gilding()[0].values())
    assert all(phi.dtype == torch.float32 for phi in phis)
    assert all(p.dtype == torch.bfloat16 for p in ours)
    assert any(not torch.equal(phi, torch.ones_like(phi)) for phi in phis)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.sampled_from([0.0, 1e-30, 1.0, -3.0, 1e30, math.inf, -math.inf, math.nan]),
                min_size=6, max_size=6))
def test_phi_stays_finite_and_positive_whatever_the_gradient(values):
    p = torch.zeros(2, 3, requires_grad=True)
    gilded = Gilded(torch.optim.RMSprop([p], lr=0.01), beta=1.0)
    for _ in range(2):
        p.grad = torch.tensor(values).view(2, 3)
        gilded.step()
    phi = gilded.gilding()[0][0]
    assert torch.isfinite(phi).all() and (phi > 0).all()


# ---------------------------------------------------------------------------------------------
# torch.optim's conventions
# ---------------------------------------------------------------------------------------------


def test_shares_groups_and_state_with_the_base():
    params = new_params()
    base = torch.optim.NAdam(params, lr=0.01)
    gilded = Gilded(base)
    assert gilded.param_groups is base.param_groups and gilded.state is base.state
    assert gilded.defaults["betas"] == base.defaults["betas"] and gilded.defaults["beta"] == 0.01
    assert "Gilded(NAdam)" in repr(gilded)


def test_add_param_group_fills_the_base_and_gilding_defaults():
    base = torch.optim.SGD(new_params()[:1], lr=0.1)
    gilded = Gilded(base, beta=0.2)
    extra = torch.zeros(3, requires_grad=True)
    gilded.add_param_group({"params": [extra], "pathway": "tensor"})
    group = base.param_groups[-1]
    assert (group["lr"], group["beta"], group["pathway"]) == (0.1, 0.2, "tensor")
    extra.grad = torch.ones(3)
    gilded.step()
    assert gilded.gilding()[1][0].shape == ()


@pytest.mark.parametrize("make_scheduler", [
    lambda opt: lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS),
    lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
], ids=["StepLR", "OneCycleLR", "CosineAnnealingLR"])
def test_lr_schedulers_drive_the_base(make_scheduler, recwarn):
    """The schedule reaches the base through the shared groups (OneCycleLR also cycles Adam's
    betas, found in Gilded.defaults): the same trajectory as the lr and betas set by hand."""
    ours, theirs = new_params(), new_params()
    scheduled = Gilded(torch.optim.Adam(ours, lr=0.01), beta=0.3)
    by_hand = Gilded(torch.optim.Adam(theirs, lr=0.01), beta=0.3)
    scheduler = make_scheduler(scheduled)
    ours_grads, their_grads = grad_stream(), grad_stream()
    for step in range(STEPS):
        by_hand.param_groups[0]["lr"] = scheduled.param_groups[0]["lr"]
        by_hand.param_groups[0]["betas"] = scheduled.param_groups[0]["betas"]
        set_grads(ours, ours_grads(ours, step))
        set_grads(theirs, their_grads(theirs, step))
        scheduled.step()
        by_hand.step()
        scheduler.step()
    assert_bitwise(ours, theirs)
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_clipping_zero_grad_and_missing_grads():
    ours, theirs = new_params(), new_params()
    gilded = Gilded(torch.optim.Adamax(ours, lr=0.01), beta=0.3)
    twin = Gilded(torch.optim.Adamax(theirs, lr=0.01), beta=0.3)
    set_grads(ours, grad_stream(seed=3)(ours, 0))
    for p, q in zip(ours, theirs):
        q.grad = p.grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(ours, max_norm=0.5)
    for q in theirs:
        q.grad.mul_(0.5 / (norm + 1e-6))  # clip_grad_norm_'s factor, applied by hand
    ours[1].grad = theirs[1].grad = None  # skipped: no step, no ϕ
    before = ours[1].detach().clone()
    gilded.step()
    twin.step()
    assert_bitwise(ours, theirs)
    assert torch.equal(ours[1], before) and "phi" not in gilded.state.get(ours[1], {})
    gilded.zero_grad(set_to_none=False)
    assert torch.equal(ours[0].grad, torch.zeros_like(ours[0]))
    gilded.zero_grad()
    assert all(p.grad is None for p in ours)


def test_closure_is_evaluated_once_and_its_loss_returned():
    ours, theirs = new_params(), new_params()
    gilded = Gilded(torch.optim.RAdam(ours, lr=0.01), beta=0.3)
    twin = Gilded(torch.optim.RAdam(theirs, lr=0.01), beta=0.3)
    calls = []

    def closure():
        calls.append(1)
        gilded.zero_grad()
        loss = sum((p ** 2).sum() for p in ours)
        loss.backward()
        return loss

    for _ in range(2):
        loss = gilded.step(closure)
        twin.zero_grad()
        expected = sum((q ** 2).sum() for q in theirs)
        expected.backward()
        twin.step()
        assert torch.equal(loss, expected)
    assert len(calls) == 2
    assert_bitwise(ours, theirs)


def test_hooks_run_once_on_the_gilded_optimizer():
    params = new_params()
    base = torch.optim.Rprop(params, lr=0.01)
    gilded = Gilded(base, beta=0.3)
    calls = []
    gilded.register_step_pre_hook(lambda opt, args, kwargs: calls.append(("pre", opt)))
    gilded.register_step_post_hook(lambda opt, args, kwargs: calls.append(("post", opt)))
    base.register_step_post_hook(lambda opt, args, kwargs: calls.append(("base", opt)))
    gilded.register_state_dict_post_hook(lambda opt, sd: {**sd, "tag": 1})
    gilded.register_load_state_dict_post_hook(lambda opt: calls.append(("loaded", opt)))
    run_steps(gilded, params, 1, grads=grad_stream())
    assert calls == [("pre", gilded), ("base", base), ("post", gilded)]
    state_dict = gilded.state_dict()
    assert state_dict["tag"] == 1
    gilded.load_state_dict(state_dict)
    assert calls[-1] == ("loaded", gilded)


def test_grad_scaler_unscales_and_skips_inf_steps():
    ours, theirs = new_params(), new_params()
    gilded = Gilded(torch.optim.Adagrad(ours, lr=0.1), beta=0.3)
    twin = Gilded(torch.optim.Adagrad(theirs, lr=0.1), beta=0.3)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    run_steps(gilded, ours, 1, grads=grad_stream())
    run_steps(twin, theirs, 1, grads=grad_stream())
    phis = [phi.clone() for phi in gilded.gilding()[0].values()]
    thetas = [p.detach().clone() for p in ours]
    scaler.scale(torch.tensor(1.0))  # sets the scale, as scaling the loss does
    for p in ours:
        p.grad = torch.full_like(p, math.inf)
    scaler.step(gilded)  # inf: skipped, nothing moves
    scaler.update()
    assert_bitwise(ours, thetas)
    assert_bitwise(gilded.gilding()[0].values(), phis)
    set_grads(theirs, grad_stream(seed=7)(theirs, 0))
    for p, q in zip(ours, theirs):
        p.grad = q.grad * scaler.get_scale()  # a power of two: unscaling is exact
    scaler.step(gilded)
    twin.step()
    assert_bitwise(ours, theirs)


@pytest.mark.parametrize("name", list(GILDED_BASES))
def test_state_dict_resume_continues_bitwise(name):
    ours, resumed = new_params(), new_params()
    gilded = Gilded(GILDED_BASES[name](ours), beta=0.3, pathway="row")
    run_steps(gilded, ours, 3, grads=grad_stream())
    saved = copy.deepcopy(gilded.state_dict())
    assert all("phi" in s for s in saved["state"].values())
    with torch.no_grad():
        for p, q in zip(ours, resumed):
            q.copy_(p)
    restarted = Gilded(GILDED_BASES[name](resumed), beta=0.3, pathway="row")
    restarted.load_state_dict(saved)
    run_steps(gilded, ours, 3, grads=grad_stream(seed=2))
    run_steps(restarted, resumed, 3, grads=grad_stream(seed=2))
    assert_same_run(ours, gilded, resumed, restarted)


def test_resume_keeps_a_float32_phi_for_bf16_parameters_and_loads_a_bare_base_state():
    ours = new_params(dtype=torch.bfloat16)
    gilded = Gilded(torch.optim.Adam(ours, lr=0.01), beta=0.3)
    run_steps(gilded, ours, 2, grads=grad_stream())
    saved = copy.deepcopy(gilded.state_dict())
    restarted = Gilded(torch.optim.Adam(new_params(dtype=torch.bfloat16), lr=0.01), beta=0.3)
    restarted.load_state_dict(saved)
    for a, b in zip(gilded.gilding()[0].values(), restarted.gilding()[0].values()):
        assert b.dtype == torch.float32 and torch.equal(a, b)
    bare = torch.optim.Adam(new_params(), lr=0.01)
    run_steps(bare, bare.param_groups[0]["params"], 1, grads=grad_stream())
    fresh = Gilded(torch.optim.Adam(new_params(), lr=0.01), beta=0.3, pathway="row")
    fresh.load_state_dict(bare.state_dict())
    assert fresh.param_groups[0]["pathway"] == "row"  # the gilding options are back-filled


def test_deepcopy_and_pickle_keep_the_link_to_the_base():
    params = new_params()
    gilded = Gilded(torch.optim.Adam(params, lr=0.01), beta=0.3)
    run_steps(gilded, params, 2, grads=grad_stream())
    for other in (copy.deepcopy(gilded), pickle.loads(pickle.dumps(gilded))):
        assert other.param_groups is other.base_optimizer.param_groups
        assert other.param_groups[0]["beta"] == 0.3
        assert len(other.state) == len(params)


def test_gilding_is_keyed_like_the_sculptor():
    w, b, frozen = torch.randn(3, 2), torch.randn(3), torch.randn(2)
    for t in (w, b, frozen):
        t.requires_grad_()
    base = torch.optim.RMSprop([
        {"params": [("layer.weight", w), ("layer.bias", b)], "name": "body"},
        {"params": [("head", frozen)], "beta": 0.0},
    ], lr=0.01)
    gilded = Gilded(base, beta=0.3, phi_init=2.0, phi_max=None, pathway="element")
    before = gilded.gilding()
    assert list(before) == ["body", 1]
    assert list(before["body"]) == ["layer.weight", "layer.bias"] and list(before[1]) == ["head"]
    assert torch.equal(before["body"]["layer.weight"], torch.full((3, 2), 2.0))
    assert torch.equal(before[1]["head"], torch.ones(2))  # β = 0: the base's own step
    for t in (w, b, frozen):
        t.grad = torch.randn_like(t)
    gilded.step()
    after = gilded.gilding()
    assert after["body"]["layer.weight"] is gilded.state[w]["phi"]
    assert "phi" not in gilded.state[frozen]
    assert torch.equal(after[1]["head"], torch.ones(2))
    assert list(flat_gilding(gilded)) == ["body/layer.weight", "body/layer.bias", "1/head"]


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError naming the argument and value, before anything changes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(beta=-0.1), "Invalid beta: -0.1"),
    (dict(gamma=math.nan), "Invalid gamma: nan"),
    (dict(pathway="neuron"), "Invalid pathway: 'neuron'"),
    (dict(fracture="rel"), "Invalid fracture: 'rel'"),
    (dict(phi_init=1e-4), "Invalid phi_init: 0.0001"),
    (dict(phi_max=0.5), "Invalid phi_max: 0.5"),
    (dict(ascent="multiplicative", positivity="softplus"), "Invalid positivity: 'softplus'"),
])
def test_bad_options_raise_naming_the_argument(kwargs, match):
    params = new_params()
    base = torch.optim.Adagrad(params, lr=0.1)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"}
                            for g in base.param_groups])
    with pytest.raises(ValueError, match=match):
        Gilded(base, **kwargs)
    assert [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups] == groups
    gilded = Gilded(base)
    with pytest.raises(ValueError, match=match):
        gilded.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **kwargs})
    assert len(gilded.param_groups) == 1


@pytest.mark.parametrize("make_base,match", [
    (lambda ps: [ps], "Invalid base_optimizer"),
    (lambda ps: torch.optim.LBFGS(ps), "Invalid base_optimizer: 'LBFGS'"),
    (lambda ps: KintsugiOptimizer(ps), r"Invalid base_optimizer: 'KintsugiOptimizer'.*'beta'"),
    (lambda ps: torch.optim.Adam(ps, differentiable=True), "Invalid differentiable: True"),
])
def test_bad_base_optimizers_are_refused(make_base, match):
    with pytest.raises(ValueError, match=match):
        Gilded(make_base(new_params()))


def test_sparse_gradients_are_refused_before_anything_changes():
    dense, sparse = torch.randn(4, 3, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    gilded = Gilded(torch.optim.SGD([dense, sparse], lr=0.1), beta=0.3)
    dense.grad = torch.randn(4, 3)
    sparse.grad = torch.randn(5, 2).to_sparse()
    before = [dense.detach().clone(), sparse.detach().clone()]
    with pytest.raises(RuntimeError, match="sparse"):
        gilded.step()
    assert_bitwise([dense, sparse], before)
    assert len(gilded.state) == 0


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's Adagrad, not ours
def test_sparse_gradients_pass_through_where_beta_is_zero():
    ours, theirs = torch.randn(5, 2, requires_grad=True), torch.randn(5, 2, requires_grad=True)
    with torch.no_grad():
        theirs.copy_(ours)
    gilded = Gilded(torch.optim.Adagrad([ours], lr=0.1), beta=0.0)
    bare = torch.optim.Adagrad([theirs], lr=0.1)
    grad = torch.randn(5, 2).to_sparse()
    for p, opt in ((ours, gilded), (theirs, bare)):
        p.grad = grad.clone()
        opt.step()
    assert torch.equal(ours, theirs)


def test_a_phi_that_does_not_fit_the_pathway_is_refused_on_load():
    params = new_params()
    gilded = Gilded(torch.optim.Adam(params, lr=0.01), beta=0.3, pathway="row")
    run_steps(gilded, params, 1, grads=grad_stream())
    saved = copy.deepcopy(gilded.state_dict())
    saved["state"][0]["phi"] = torch.ones(7)
    other = Gilded(torch.optim.Adam(new_params(), lr=0.01), beta=0.3, pathway="row")
    with pytest.raises(ValueError, match=r"Invalid phi for parameter .*shape \(7,\)"):
        other.load_state_dict(saved)
    assert len(other.state) == 0

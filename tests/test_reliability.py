"""Regressions of issue 15 (hostile input, faults, torch's generic suite): one test per item,
each failing before its fix. Items 14 and 16 are covered where they were fixed."""

import copy
import errno
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from torch import nn

import kintsugi_optim.__main__ as cli
from helpers import assert_same_state_dict
from kintsugi_optim import GildedLoss, GilderOptimizer, KintsugiOptimizer, VWPR, group_dro
from optim_db import IMPLS

F32_EPS = torch.finfo(torch.float32).eps


def _state_copy(opt):
    return copy.deepcopy(opt.state_dict())


# 1 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pathway", ["element", "row"])
@pytest.mark.parametrize("phi_min", [1e-8, 1e-6])
def test_fused_phi_stays_finite_and_mean_one_when_every_pathway_clamps(phi_min, pathway):
    """A zero gradient with l1·β ≥ 1 clamps every ϕ to phi_min; Σ(ϕ−1) then cancels."""
    torch.manual_seed(0)
    p = torch.randn(64, 16, requires_grad=True)
    opt = KintsugiOptimizer([p], fused=True, l1=1.0, beta=2.0, phi_min=phi_min, pathway=pathway)
    p.grad = torch.zeros_like(p)
    opt.step()
    phi = opt.state[p]["phi"]
    assert phi.isfinite().all() and (phi > 0).all()
    assert abs(phi.double().mean().item() - 1) <= 4 * F32_EPS
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.isfinite().all() and opt.state[p]["phi"].isfinite().all()


# 2 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value", [("base", "SGD"), ("phi_min", -5.0), ("beta", math.nan),
                                       ("pathway", "neuron"), ("lr", -1.0), ("amsgrad", "yes")])
def test_edited_group_is_validated_at_step_before_anything_changes(key, value):
    p = torch.ones(5, requires_grad=True)
    opt = KintsugiOptimizer([p], lr=0.1)
    p.grad = torch.ones(5)
    opt.step()
    before, theta = _state_copy(opt), p.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        opt.step()
    assert torch.equal(p, theta)
    after = _state_copy(opt)
    after["param_groups"][0][key] = before["param_groups"][0][key]
    assert_same_state_dict(before, after)


def test_loaded_group_is_validated_before_anything_changes():
    p = torch.ones(5, requires_grad=True)
    opt = KintsugiOptimizer([p], lr=0.1)
    p.grad = torch.ones(5)
    opt.step()
    saved, before = _state_copy(opt), _state_copy(opt)
    saved["param_groups"][0]["base"] = "SGD"
    with pytest.raises(ValueError, match="Invalid base: 'SGD'"):
        opt.load_state_dict(saved)
    assert_same_state_dict(before, _state_copy(opt))


def test_scheduler_changes_are_still_checked():
    p = torch.ones(3, requires_grad=True)
    opt = KintsugiOptimizer([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["lr"] = 0.05  # what a scheduler does: accepted
    opt.step()
    opt.param_groups[0]["lr"] = float("nan")
    with pytest.raises(ValueError, match="Invalid lr: nan"):
        opt.step()


# 3 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [math.nan, -1.0, 0.0, math.inf])
def test_sculptor_checkpoint_with_corrupt_phi_is_refused(bad):
    p = torch.ones(4, requires_grad=True)
    opt = KintsugiOptimizer([("w", p)], lr=0.1)
    p.grad = torch.ones(4)
    opt.step()
    saved, before = _state_copy(opt), _state_copy(opt)
    saved["state"][0]["phi"][1] = bad
    with pytest.raises(ValueError, match=r"Invalid phi for parameter 'w'.*finite and > 0"):
        opt.load_state_dict(saved)
    assert_same_state_dict(before, _state_copy(opt))


def test_vwpr_and_gilded_loss_checkpoints_with_corrupt_phi_are_refused():
    vwpr = VWPR(nn.Linear(3, 4))
    saved = vwpr.state_dict()
    key = next(k for k in saved if k.startswith("gilding_weights."))
    saved[key] = torch.tensor([1.0, math.nan, 1.0, 1.0])
    saved["model.weight"] = torch.zeros(4, 3)
    weight = vwpr.model.weight.detach().clone()
    with pytest.raises(ValueError, match="Invalid gilding_weights.*finite and > 0"):
        vwpr.load_state_dict(saved)
    assert torch.equal(vwpr.model.weight, weight)  # nothing loaded
    loss = GildedLoss(3)
    saved = loss.state_dict()
    saved["phi"] = torch.tensor([1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match=r"Invalid phi.*\[-2.0\]"):
        loss.load_state_dict(saved)
    assert torch.equal(loss.phi.detach(), torch.ones(3))


# 4 -------------------------------------------------------------------------------------------
def test_phi_bounds_below_what_phi_dtype_holds_are_refused():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid phi_min: 1e-50.*smallest normal float32"):
        KintsugiOptimizer([p], phi_min=1e-50, phi_init=1e-50)
    KintsugiOptimizer([p.double().detach().requires_grad_()], phi_min=1e-50)  # float64 holds it
    with pytest.raises(ValueError, match="Invalid phi_min: 1e-08.*float16"):
        GilderOptimizer([torch.ones(3, dtype=torch.float16)], phi_min=1e-8)
    with pytest.raises(ValueError, match="Invalid phi_init: 1e-50"):
        VWPR(nn.Linear(2, 2), phi_init=1e-50)
    with pytest.raises(ValueError, match="Invalid phi_init: 1e\\+39.*largest float32"):
        KintsugiOptimizer([p], phi_init=1e39, phi_max=None)


# 5 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ascent", ["multiplicative", "additive"])
def test_gilder_half_phi_with_a_rate_beyond_its_range(ascent):
    """β·lr > 65504: the foreach path agrees with the single-tensor one, finite and ≥ phi_min."""
    out = []
    for foreach in (False, True):
        phi = torch.ones(4, dtype=torch.float16, requires_grad=True)
        opt = GilderOptimizer([phi], beta=1e5, ascent=ascent, foreach=foreach)
        phi.grad = torch.tensor([0.0, 1e-3, 0.0, -1e-3], dtype=torch.float16)
        opt.step()
        out.append(phi.detach().clone())
    assert torch.equal(out[0], out[1])
    assert out[1].isfinite().all() and (out[1] >= 1e-3).all()
    assert out[1][0] == 1 and out[1][2] == 1  # a zero fracture leaves ϕ where it was


# 6 -------------------------------------------------------------------------------------------
def test_fused_parameter_listed_twice_steps_like_torch_fused_adam():
    torch.manual_seed(0)
    p = torch.randn(6, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    with pytest.warns(UserWarning, match="duplicate"):
        ours = KintsugiOptimizer([p, p], lr=0.1, beta=0, fused=True)
    with pytest.warns(UserWarning, match="duplicate"):
        theirs = torch.optim.Adam([q, q], lr=0.1, fused=True)
    for _ in range(4):
        g = torch.randn(6)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert ours.state[p]["step"].item() == theirs.state[q]["step"].item() == 8
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# 7 -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", [impl.kwargs for impl in IMPLS.values() if impl.crossed],
                         ids=[name for name, impl in IMPLS.items() if impl.crossed])
def test_checkpoint_with_a_plain_number_step_resumes(impl):
    torch.manual_seed(0)
    p = torch.randn(5, requires_grad=True)
    opt = KintsugiOptimizer([p], lr=0.1, **impl)
    p.grad = torch.randn(5)
    opt.step()
    saved = opt.state_dict()
    reference = copy.deepcopy(saved)
    saved["state"][0]["step"] = 1  # older torch, or hand-made
    q, r = p.detach().clone().requires_grad_(), p.detach().clone().requires_grad_()
    a, b = KintsugiOptimizer([q], lr=0.1, **impl), KintsugiOptimizer([r], lr=0.1, **impl)
    a.load_state_dict(saved)
    b.load_state_dict(reference)
    assert torch.is_tensor(a.state[q]["step"])
    for _ in range(2):
        g = torch.randn(5)
        q.grad, r.grad = g.clone(), g.clone()
        a.step()
        b.step()
    assert a.state[q]["step"].item() == 3
    assert torch.equal(q, r)


# 8 -------------------------------------------------------------------------------------------
def test_torch_adamw_checkpoint_keeps_the_constructors_rule_and_gilding():
    torch.manual_seed(0)
    p = torch.randn(5, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    theirs = torch.optim.AdamW([q], lr=0.1, weight_decay=0.1)
    q.grad = torch.randn(5)
    theirs.step()
    p.data.copy_(q.detach())
    ours = KintsugiOptimizer([p], lr=0.1, base="adamw", beta=0, pathway="row")
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    group = ours.param_groups[0]
    assert (group["base"], group["beta"], group["pathway"], group["weight_decay"]) == (
        "adamw", 0, "row", 0.1)
    for _ in range(3):
        g = torch.randn(5)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.equal(p, q)


# 9 -------------------------------------------------------------------------------------------
def test_tensor_betas_with_foreach_are_refused_at_construction():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"Invalid betas\[0\].*foreach=True"):
        KintsugiOptimizer([p], foreach=True, betas=(torch.tensor(0.9), torch.tensor(0.999)))


def test_tensor_betas_without_foreach_match_float_betas():
    torch.manual_seed(0)
    p = torch.randn(4, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    a = KintsugiOptimizer([p], lr=0.1, betas=(torch.tensor(0.9), torch.tensor(0.99)))
    b = KintsugiOptimizer([q], lr=0.1, betas=(0.9, 0.99))
    for _ in range(3):
        g = torch.randn(4)
        p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(p, q)


# 10 ------------------------------------------------------------------------------------------
def test_sgd_foreach_takes_a_tensor_lr_like_torch():
    torch.manual_seed(0)
    p = torch.randn(4, 3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    ours = KintsugiOptimizer([p], base="sgd", lr=torch.tensor(0.1), momentum=0.9, foreach=True,
                             beta=0)
    theirs = torch.optim.SGD([q], lr=torch.tensor(0.1), momentum=0.9, foreach=True)
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


# 11 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_fused_accepts_an_expanded_gradient(base):
    """(torch's own fused CPU Adam reads such a gradient as dense memory and returns garbage,
    so the reference is the single-tensor step.)"""
    p, q = torch.zeros(4, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True)
    fused = KintsugiOptimizer([p], base=base, lr=0.1, fused=True)
    single = KintsugiOptimizer([q], base=base, lr=0.1, foreach=False)
    for step in range(2):
        g = torch.tensor([1.0 + step, -2.0, 0.5]).expand(4, 3)
        p.grad, q.grad = g, g.clone()
        fused.step()
        single.step()
    torch.testing.assert_close(p, q)
    torch.testing.assert_close(fused.state[p]["phi"], single.state[q]["phi"])


# 12 ------------------------------------------------------------------------------------------
def test_step_error_in_a_later_group_leaves_earlier_groups_unstepped():
    a, b = torch.ones(3, requires_grad=True), torch.ones(4, 2, requires_grad=True)
    opt = KintsugiOptimizer([{"params": [a]}, {"params": [b]}], lr=0.1, pathway="element")
    a.grad, b.grad = torch.ones(3), torch.ones(4, 2)
    opt.step()
    before, theta = _state_copy(opt), a.detach().clone()
    opt.param_groups[1]["pathway"] = "row"
    with pytest.raises(ValueError, match="Invalid pathway: 'row'"):
        opt.step()
    assert torch.equal(a, theta)
    opt.param_groups[1]["pathway"] = "element"
    after = _state_copy(opt)
    assert_same_state_dict(before, after)


# 13 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [np.float32(0.25), np.float64(0.25), Fraction(1, 4), np.int64(1)])
def test_numpy_and_fraction_hyperparameters_are_numbers(lr):
    p, q = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    a = KintsugiOptimizer([p], lr=lr, beta=np.float64(0.1), betas=(np.float32(0.5), 0.75),
                          fused=True)
    b = KintsugiOptimizer([q], lr=float(lr), beta=0.1, betas=(float(np.float32(0.5)), 0.75),
                          fused=True)
    for _ in range(2):
        p.grad, q.grad = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([1.0, -2.0, 3.0])
        a.step()
        b.step()
    assert torch.equal(p, q)
    GilderOptimizer([torch.ones(2)], beta=Fraction(1, 100), lr=np.float32(1.0))
    assert torch.equal(GildedLoss(2, phi_init=np.float32(0.5)).phi.detach(), torch.full((2,), 0.5))
    vwpr = VWPR(nn.Linear(2, 3), phi_init=Fraction(1, 2))
    assert all(torch.equal(phi, torch.full((3,), 0.5)) for phi in vwpr.phi().values())


def test_more_bad_values_name_their_argument():
    p = torch.ones(3, requires_grad=True)
    opt = KintsugiOptimizer([p], base="adamw")
    opt.param_groups[0]["weight_decay"] = None  # the constructor's meaning: the rule's default
    p.grad = torch.ones(3)
    opt.step()
    assert opt.param_groups[0]["weight_decay"] == 1e-2
    with pytest.raises(ValueError, match=r"Invalid step_size: 1e\+308"):
        group_dro(2, step_size=1e308)
    with pytest.raises(ValueError, match="Invalid adjustment: 'abcd'"):
        GildedLoss(2, adjustment="abcd")
    with pytest.raises(ValueError, match="Invalid process_group: 'world'"):
        GilderOptimizer([torch.ones(2)], process_group="world")


def test_large_gilding_rate_on_a_half_phi_gilds_instead_of_raising():
    for foreach in (False, True):
        phi = torch.ones(3, dtype=torch.float16, requires_grad=True)
        opt = GilderOptimizer([phi], beta=1e5, foreach=foreach)
        phi.grad = torch.tensor([1e-3, 0.0, 1.0], dtype=torch.float16)
        opt.step()
        assert phi.isfinite().all() and phi[1] == 1 and phi[2] == 65504


# 15 ------------------------------------------------------------------------------------------
@pytest.fixture
def fake_study(monkeypatch):
    """The demo's study replaced by instant stand-ins: these tests are about the writing."""
    from kintsugi_optim import demo as study

    monkeypatch.setattr(study, "run_study", lambda *a, **k: {"trainers": {}})
    monkeypatch.setattr(study, "report", lambda *a, **k: ("table", "markdown"))
    monkeypatch.setattr(study, "environment", lambda: {})
    return study


def test_cli_write_failure_is_one_line_and_exit_2(fake_study, monkeypatch, tmp_path, capsys):
    def full_disk(results, tasks, out, markdown, meta):
        (out / "results.md").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "results.json"))

    monkeypatch.setattr(fake_study, "write_outputs", full_disk)
    assert cli.main(["demo", "--out", str(tmp_path), "--quick"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert list(tmp_path.iterdir()) == []  # no partial file, no staging folder


def test_cli_interrupt_leaves_no_truncated_file_and_exits_130(fake_study, monkeypatch, tmp_path,
                                                              capsys):
    (tmp_path / "sigils.png").write_bytes(b"old and whole")

    def interrupted(results, tasks, out, markdown, meta):
        (out / "sigils.png").write_bytes(b"\x89PNG trunc")
        raise KeyboardInterrupt

    monkeypatch.setattr(fake_study, "write_outputs", interrupted)
    assert cli.main(["demo", "--out", str(tmp_path), "--quick"]) == 130
    assert [p.name for p in tmp_path.iterdir()] == ["sigils.png"]
    assert (tmp_path / "sigils.png").read_bytes() == b"old and whole"


def test_cli_files_land_under_their_final_names(fake_study, monkeypatch, tmp_path, capsys):
    def write(results, tasks, out, markdown, meta):
        (out / "results.md").write_text(markdown)
        return [out / "results.md"]

    monkeypatch.setattr(fake_study, "write_outputs", write)
    assert cli.main(["demo", "--out", str(tmp_path), "--quick"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]
    assert (tmp_path / "results.md").read_text() == "markdown"

"""torch's generic optimizer checks (test/test_optim.py over common_optimizers.py's OptimizerInfo
table), written here and run over the registry in tests/optim_db.py: every base rule × gilding
configuration × implementation."""

import copy
import io
import math
import pickle

import pytest
import torch

from helpers import assert_same_state_dict, loss_of, make_batch, make_model, train
from kintsugi_optim import KintsugiOptimizer
from optim_db import ERROR_INPUTS, GILDINGS, IMPLS, RULES, cases, error_id


def _model(dtype=torch.float32):
    return make_model(dtype=dtype)


def _data(dtype=torch.float32, seed=1):
    return make_batch(dtype=dtype, seed=seed)


def _train(model, opt, steps, seed=1, dtype=torch.float32):
    train(model, opt, *_data(dtype, seed), steps)


def _assert_equal_models(a, b, case=None):
    for p, q in zip(a.parameters(), b.parameters()):
        if case is None:
            assert torch.equal(p, q)
        else:
            case.assert_close(p, q)


def _assert_equal_states(a, b):
    assert_same_state_dict(a.state_dict(), b.state_dict())


ALL = cases()
SINGLE_AND_FOREACH = cases(impls=("single", "foreach"))


@pytest.mark.parametrize("case", ALL)
def test_step_with_closure_returns_its_loss_and_descends(case):
    model = _model()
    opt = case.make(model.parameters())
    x, y = _data()
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and len(calls) == 1
    for _ in range(8):
        last = opt.step(closure)
    assert last < first


@pytest.mark.parametrize("case", cases(impls=("single",)))
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(case, set_to_none):
    model = _model()
    opt = case.make(model.parameters())
    _train(model, opt, 1)
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("case", ALL)
def test_state_dict_into_a_fresh_optimizer_continues_identically(case):
    """torch's test_state_dict_deterministic: save after some steps, load into a new optimizer
    over a copy of the model, and both continue bitwise alike (also through torch.save)."""
    model = _model()
    opt = case.make(model.parameters())
    _train(model, opt, 3)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    twin = copy.deepcopy(model)
    twin_opt = case.make(twin.parameters())
    twin_opt.load_state_dict(torch.load(buffer))
    _assert_equal_states(opt, twin_opt)
    _train(model, opt, 3, seed=2)
    _train(twin, twin_opt, 3, seed=2)
    _assert_equal_models(model, twin)
    _assert_equal_states(opt, twin_opt)


@pytest.mark.parametrize("case", SINGLE_AND_FOREACH)
def test_deepcopy_and_pickle_round_trip(case):
    model = _model()
    opt = case.make(model.parameters())
    _train(model, opt, 2)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.defaults == opt.defaults
        assert [{k: v for k, v in g.items() if k != "params"} for g in clone.param_groups] == [
            {k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        for p, q in zip(opt.param_groups[0]["params"], clone.param_groups[0]["params"]):
            for name, value in opt.state[p].items():
                assert torch.equal(value, clone.state[q][name]), name


@pytest.mark.parametrize("case", ALL)
def test_state_dict_keys_are_torchs_plus_phi(case):
    model = _model()
    opt = case.make(model.parameters())
    _train(model, opt, 1)
    ref_model = _model()
    ref_opt = case.make_torch(ref_model.parameters())
    _train(ref_model, ref_opt, 1)
    extra = {"phi", "rho"} if case.gilding.kwargs.get("positivity") == "softplus" else {"phi"}
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert set(opt.state[p]) == set(ref_opt.state[q]) | extra
        if "step" in opt.state[p]:
            assert opt.state[p]["step"].dtype == ref_opt.state[q]["step"].dtype
            assert opt.state[p]["step"].device == ref_opt.state[q]["step"].device


@pytest.mark.parametrize("case", cases(gildings=("beta0",)))
def test_beta_zero_is_torchs_optimizer(case):
    model, twin = _model(), _model()
    opt, reference = case.make(model.parameters()), case.make_torch(twin.parameters())
    _train(model, opt, 5)
    _train(twin, reference, 5)
    _assert_equal_models(model, twin, case)


@pytest.mark.parametrize("case", ALL)
def test_add_param_group_mid_training(case):
    """A group added later steps from then on with its own options; the first group goes on
    as if alone (its state and scope are its own)."""
    torch.manual_seed(0)
    a, b = torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True)
    a_alone, b_start = a.detach().clone().requires_grad_(), b.detach().clone()
    opt, alone = case.make([a]), case.make([a_alone])
    grads = [(torch.randn(4, 3), torch.randn(5)) for _ in range(4)]
    for step, (ga, gb) in enumerate(grads):
        if step == 2:
            opt.add_param_group({"params": [b], "lr": 0.5 * case.kwargs["lr"]})
            assert opt.param_groups[1]["lr"] == 0.5 * case.kwargs["lr"]
            assert opt.param_groups[1]["base"] == case.rule.base
        a.grad, a_alone.grad, b.grad = ga.clone(), ga.clone(), gb.clone()
        opt.step()
        alone.step()
    assert torch.equal(a, a_alone)
    assert not torch.equal(b, b_start) and "phi" in opt.state[b]


@pytest.mark.parametrize("case", SINGLE_AND_FOREACH + cases(impls=("fused",),
                                                            gildings=("beta0", "row")))
def test_param_groups_with_different_options_are_separate_optimizers(case):
    """Two groups with different lr and β step as two optimizers each over one group."""
    model, twin = _model(), _model()
    lr = case.kwargs["lr"]
    opt = case.make([{"params": model[0].parameters()},
                     {"params": model[2].parameters(), "lr": 2 * lr, "beta": 0.1}])
    first = case.make(twin[0].parameters())
    second = case.make(twin[2].parameters(), lr=2 * lr, beta=0.1)
    x, y = _data()
    for _ in range(3):
        for o in (opt, first, second):
            o.zero_grad()
        loss_of(model, x, y).backward()
        loss_of(twin, x, y).backward()
        opt.step()
        first.step()
        second.step()
    _assert_equal_models(model, twin)


@pytest.mark.parametrize("case", cases(impls=("single",), gildings=("element",)))
def test_hooks_run_in_torchs_order(case):
    model = _model()
    opt = case.make(model.parameters())
    events = []
    opt.register_step_pre_hook(lambda o, args, kwargs: events.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: events.append("post"))
    opt.register_state_dict_pre_hook(lambda o: events.append("sd_pre"))

    def tag_state_dict(o, state_dict):
        events.append("sd_post")
        state_dict["note"] = "tagged"
        return state_dict

    opt.register_state_dict_post_hook(tag_state_dict)

    def drop_note(o, state_dict):
        events.append("load_pre")
        state_dict = dict(state_dict)
        state_dict.pop("note")
        return state_dict

    opt.register_load_state_dict_pre_hook(drop_note)
    opt.register_load_state_dict_post_hook(lambda o: events.append("load_post"))
    _train(model, opt, 1)
    saved = opt.state_dict()
    assert saved["note"] == "tagged"
    opt.load_state_dict(saved)
    assert events == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("case", cases(needs=("complex",)))
def test_complex_parameters_step_as_their_real_view(case):
    """torch's test_complex: a complex parameter steps like its real view."""
    torch.manual_seed(0)
    z = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z.detach()).clone().requires_grad_()
    opt_z, opt_r = case.make([z]), case.make([r])
    for _ in range(3):
        g = torch.randn(4, 3, dtype=torch.complex64)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    torch.testing.assert_close(torch.view_as_real(z.detach()), r.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", cases(impls=("fused",), gildings=("beta0", "element")))
def test_fused_refuses_complex_parameters(case):
    z = torch.randn(3, dtype=torch.complex64, requires_grad=True)
    opt = case.make([z])
    z.grad = torch.ones_like(z)
    with pytest.raises(RuntimeError, match="(?i)complex|dtype"):
        opt.step()
    assert torch.equal(opt.state.get(z, {}).get("phi", torch.ones(3, 2)), torch.ones(3, 2))


@pytest.mark.parametrize("case", ALL)
def test_params_without_grad_and_empty_groups_are_left_alone(case):
    model = _model()
    frozen = model[2].weight
    opt = case.make([{"params": list(model.parameters())}, {"params": []}])
    before = frozen.detach().clone()
    x, y = _data()
    for _ in range(2):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        frozen.grad = None
        opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    opt.zero_grad()
    opt.step()  # no gradient anywhere: a no-op
    assert torch.equal(frozen, before)


@pytest.mark.parametrize("case", cases(needs=("tensor_lr_adam",)))
def test_tensor_lr_steps_like_the_same_float(case):
    model, twin = _model(), _model()
    lr = case.kwargs["lr"]
    opt = case.make(model.parameters(), lr=torch.tensor(lr))
    reference = case.make(twin.parameters(), lr=lr)
    _train(model, opt, 3)
    _train(twin, reference, 3)
    # A tensor lr takes other scalar paths (no folded constants): equal to rounding.
    _assert_equal_models(model, twin, _Close())


class _Close:
    """Tolerance for paths that round differently: a few float32 ulps."""

    @staticmethod
    def assert_close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ALL)
def test_maximize_is_descent_on_the_negated_gradient(case):
    torch.manual_seed(0)
    p = torch.randn(4, 3, requires_grad=True)
    q = p.detach().clone().requires_grad_()
    up, down = case.make([p], maximize=True), case.make([q])
    for _ in range(3):
        g = torch.randn(4, 3)
        p.grad, q.grad = g.clone(), -g
        up.step()
        down.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    torch.testing.assert_close(up.state[p]["phi"], down.state[q]["phi"], rtol=0, atol=0)


def _column_major(t):
    return t.t().contiguous().t()  # dense, strides (1, rows)


def _every_other_column(t):
    wide = torch.zeros(t.shape[0], 2 * t.shape[1])
    wide[:, ::2] = t
    return wide[:, ::2]  # not dense: a slice of a wider tensor


@pytest.mark.parametrize("layout", [_column_major, _every_other_column])
@pytest.mark.parametrize("case", ALL)
def test_non_contiguous_params_and_grads(case, layout):
    """A parameter and gradient laid out otherwise step like their contiguous copies."""
    torch.manual_seed(0)
    base = torch.randn(3, 5)
    p = layout(base).requires_grad_()
    q = base.clone().requires_grad_()
    assert not p.is_contiguous() and p.is_leaf
    opt_p, opt_q = case.make([p]), case.make([q])
    for _ in range(3):
        g = torch.randn(3, 5)
        p.grad, q.grad = layout(g), g.clone()
        opt_p.step()
        opt_q.step()
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(opt_p.state[p]["phi"], opt_q.state[q]["phi"], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", cases(gildings=("beta0", "element", "row")))
def test_float64(case):
    model, twin = _model(torch.float64), _model(torch.float64)
    opt = case.make(model.parameters())
    _train(model, opt, 3, dtype=torch.float64)
    assert all(phi.dtype == torch.float64 for phi in opt.gilding()[0].values())
    if case.gilding.is_base_rule:
        reference = case.make_torch(twin.parameters())
        _train(twin, reference, 3, dtype=torch.float64)
        _assert_equal_models(model, twin, case)


@pytest.mark.parametrize("case", cases(impls=("single",), gildings=("beta0", "element")))
def test_lr_scheduler_drives_the_group_lr(case):
    model, twin = _model(), _model()
    opt, reference = case.make(model.parameters()), case.make(twin.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _data()
    lr = case.kwargs["lr"]
    for step in range(3):
        for o in (opt, reference):
            o.zero_grad()
        loss_of(model, x, y).backward()
        loss_of(twin, x, y).backward()
        opt.step()
        reference.param_groups[0]["lr"] = lr * 0.5**step
        reference.step()
        scheduler.step()
    _assert_equal_models(model, twin)


@pytest.mark.parametrize("kwargs,error,match", ERROR_INPUTS,
                         ids=[error_id(k) for k, _, _ in ERROR_INPUTS])
@pytest.mark.parametrize("rule", RULES)
def test_error_inputs(rule, kwargs, error, match):
    """torch's optim_error_inputs: bad arguments raise at construction, naming the value."""
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(error, match=match):
        KintsugiOptimizer([p], **{"base": rule, **kwargs})


@pytest.mark.parametrize("case", cases(impls=("single",)))
def test_load_state_dict_does_not_alias_the_source(case):
    """Changing the loaded dict afterwards must not change the optimizer (torch copies)."""
    model = _model()
    opt = case.make(model.parameters())
    _train(model, opt, 1)
    saved = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    twin_opt = case.make(twin.parameters())
    twin_opt.load_state_dict(saved)
    for state in saved["state"].values():
        for value in state.values():
            value.fill_(math.nan)
    for state in twin_opt.state.values():
        assert state["phi"].isfinite().all()


def test_registry_covers_every_rule_gilding_and_impl():
    ids = {param.id for param in ALL}
    crossed = [sum(row.crossed for row in table.values()) for table in (GILDINGS, IMPLS)]
    assert len(ids) == len(RULES) * crossed[0] * crossed[1]
    every = cases(gildings=tuple(GILDINGS), impls=tuple(IMPLS))
    assert len({param.id for param in every}) == len(RULES) * len(GILDINGS) * len(IMPLS)

"""Parameters in every form torch accepts, gilding(), state_dict round trips, back-fill."""

import copy
import io

import pytest
import torch
from torch import nn

from helpers import model_and_data as _model_and_data
from helpers import train
from kintsugi_optim import KintsugiOptimizer, Sculptor
from optim_db import cases


def model_and_data(dtype=torch.float32):
    return _model_and_data(dtype=dtype, sizes=(6, 8, 3), batch=32)


def test_alias_and_param_forms():
    model, x, y = model_and_data()
    w, b = model[0].weight, model[0].bias
    assert Sculptor is KintsugiOptimizer
    for params in (model.parameters(), [{"params": [w, b]}, {"params": model[2].parameters()}],
                   model.named_parameters()):
        opt = KintsugiOptimizer(params, lr=0.01)
        train(model, opt, x, y, 2)
        assert sum(len(g) for g in opt.gilding().values()) == 4


def test_gilding_is_keyed_by_group_name_and_param_name():
    model, x, y = model_and_data()
    opt = KintsugiOptimizer([
        {"params": list(model[0].named_parameters()), "name": "encoder", "beta": 0.1,
         "pathway": "element"},
        {"params": list(model[2].named_parameters()), "pathway": "row"},
    ])
    train(model, opt, x, y, 1)
    phis = opt.gilding()
    assert set(phis) == {"encoder", 1}
    assert set(phis["encoder"]) == {"weight", "bias"}
    assert phis["encoder"]["weight"].shape == (8, 6)
    assert phis[1]["weight"].shape == (3,)  # one ϕ per row: per output neuron
    assert phis["encoder"]["weight"] is opt.state[model[0].weight]["phi"]
    unnamed = KintsugiOptimizer(model.parameters())
    train(model, unnamed, x, y, 1)
    assert set(unnamed.gilding()[0]) == {0, 1, 2, 3}


def test_per_group_hyperparameters_are_used():
    torch.manual_seed(0)
    a, b = torch.ones(4, requires_grad=True), torch.ones(4, requires_grad=True)
    opt = KintsugiOptimizer([{"params": [a], "beta": 0.0}, {"params": [b], "beta": 0.5}],
                            phi_norm=None, fracture="abs", gamma=0.0, phi_max=None)
    a.grad = b.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])
    opt.step()
    assert torch.equal(opt.state[a]["phi"], torch.ones(4))
    torch.testing.assert_close(opt.state[b]["phi"], torch.tensor([1.5, 2.0, 2.5, 3.0]))


@pytest.mark.parametrize("case", cases(impls=("single", "foreach", "fused"), cover="each",
                                       gildings=("element", "row", "softplus", "multiplicative")))
def test_reload_mid_training_continues_bitwise(case):
    model, x, y = model_and_data()
    opt = case.make(model.parameters(), lr=0.01)
    train(model, opt, x, y, 5)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(model, opt, x, y, 5)

    buffer.seek(0)
    saved = torch.load(buffer)
    model2, _, _ = model_and_data()
    model2.load_state_dict(saved["model"])
    opt2 = case.make(model2.parameters(), lr=0.01)
    opt2.load_state_dict(saved["opt"])
    train(model2, opt2, x, y, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(opt2.state[q][key])), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_phi_stays_float32_for_half_parameters_across_round_trip(dtype):
    model, x, y = model_and_data(dtype)
    opt = KintsugiOptimizer(model.parameters(), lr=0.01, beta=0.05)
    train(model, opt, x, y, 3)
    phis = {k: v.clone() for k, v in opt.gilding()[0].items()}
    assert all(v.dtype == torch.float32 for v in phis.values())
    opt2 = KintsugiOptimizer(model.parameters(), lr=0.01, beta=0.05)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for key, phi in opt2.gilding()[0].items():
        assert phi.dtype == torch.float32
        assert torch.equal(phi, phis[key])  # no detour through bf16/fp16


def test_loaded_phi_of_the_wrong_shape_raises_naming_the_parameter():
    model, x, y = model_and_data()
    opt = KintsugiOptimizer(model.named_parameters(), lr=0.01, pathway="element")
    train(model, opt, x, y, 1)
    saved = opt.state_dict()
    row_opt = KintsugiOptimizer(model.named_parameters(), lr=0.01, pathway="row")
    train(model, row_opt, x, y, 1)
    before = copy.deepcopy(row_opt.state_dict())
    saved["param_groups"][0]["pathway"] = "row"  # element-shaped ϕ under a row pathway
    with pytest.raises(ValueError, match=r"Invalid phi for parameter '0.weight': shape \(8, 6\).*\(8,\)"):
        row_opt.load_state_dict(saved)
    after = row_opt.state_dict()
    for key, value in before["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["state"][key][name]))


def test_checkpoint_without_newer_group_keys_is_back_filled():
    model, x, y = model_and_data()
    torch_adam = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, torch_adam, x, y, 3)
    opt = KintsugiOptimizer(model.parameters(), lr=0.01)
    opt.load_state_dict(torch_adam.state_dict())  # an Adam checkpoint has no Kintsugi keys
    group = opt.param_groups[0]
    assert (group["base"], group["pathway"], group["beta"], group["weight_decay"]) == (
        "adam", "row", 0.01, 0)
    train(model, opt, x, y, 2)  # ϕ is created lazily and training goes on
    assert all(p.shape[:1] == phi.shape
               for p, phi in zip(model.parameters(), opt.gilding()[0].values()))


def test_zero_grad_and_closure_as_torch():
    model, x, y = model_and_data()
    opt = KintsugiOptimizer(model.parameters(), lr=0.01)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())

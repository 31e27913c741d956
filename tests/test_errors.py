"""Bad input raises a clear error naming the argument and value, and never corrupts state."""

import re

import pytest
import torch

from kintsugi_optim import GilderOptimizer, KintsugiOptimizer

INVALID = [
    ("lr", -1e-3), ("lr", float("nan")), ("beta", -0.1), ("beta", float("inf")), ("gamma", -1.0),
    ("l1", -0.5), ("eps", -1e-8), ("weight_decay", -0.1), ("momentum", -0.9),
    ("betas", (1.0, 0.999)), ("betas", (0.9, -0.1)), ("betas", (0.9, 1.5)),
    ("phi_min", 0.0), ("phi_min", -1.0), ("phi_init", 1e-4), ("phi_init", 5.0),
    ("phi_max", 0.5), ("base", "adagrad"), ("pathway", "neuron"), ("fracture", "squared"),
    ("phi_norm", "sum"), ("ascent", "geometric"), ("positivity", "relu"),
]
EXTRA = {"phi_init": {"phi_max": 2.0}}  # phi_init=5 is out of bounds only below a cap


def _expect(name, value):
    """The message names the argument and shows the offending value (a pair's bad component)."""
    if name == "betas":
        index = 0 if not 0 <= value[0] < 1 else 1
        name, value = f"betas[{index}]", value[index]
    return rf"Invalid .*{re.escape(name)}.*{re.escape(repr(value))}"


@pytest.mark.parametrize("name,value", INVALID, ids=lambda v: str(v))
def test_invalid_hyperparameter_at_construction(name, value):
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=_expect(name, value)):
        KintsugiOptimizer([p], **{name: value, **EXTRA.get(name, {})})


@pytest.mark.parametrize("name,value", INVALID, ids=lambda v: str(v))
def test_invalid_hyperparameter_in_add_param_group_leaves_optimizer_intact(name, value):
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = KintsugiOptimizer([p])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=_expect(name, value)):
        opt.add_param_group({"params": [q], name: value, **EXTRA.get(name, {})})
    assert opt.param_groups == before
    p.grad = torch.ones(3)
    opt.step()  # still usable


def test_multiplicative_with_softplus_is_rejected():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid positivity: 'softplus'.*multiplicative"):
        KintsugiOptimizer([p], ascent="multiplicative", positivity="softplus")
    with pytest.raises(ValueError, match="Invalid positivity: 'softplus'"):
        GilderOptimizer([torch.ones(2)], ascent="multiplicative", positivity="softplus")


def test_nesterov_needs_momentum_and_no_dampening():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid nesterov: True.*momentum=0"):
        KintsugiOptimizer([p], base="sgd", nesterov=True)
    with pytest.raises(ValueError, match="Invalid nesterov: True.*dampening=0.5"):
        KintsugiOptimizer([p], base="sgd", nesterov=True, momentum=0.9, dampening=0.5)


def test_tensor_lr_must_have_one_element():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="Invalid lr"):
        KintsugiOptimizer([p], lr=torch.tensor([0.1, 0.2]))


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = KintsugiOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_fused_with_foreach_raises():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        KintsugiOptimizer([p], fused=True, foreach=True)


@pytest.mark.parametrize("name,value", [("beta", -1.0), ("lr", -0.1), ("gamma", -2.0),
                                        ("phi_min", 0.0), ("fracture", "none"),
                                        ("phi_norm", "max")])
def test_gilder_invalid_hyperparameters(name, value):
    with pytest.raises(ValueError, match=rf"Invalid {name}: {re.escape(repr(value))}"):
        GilderOptimizer([torch.ones(3)], **{name: value})


def test_gilder_rejects_non_positive_or_integer_phi_and_stays_intact():
    opt = GilderOptimizer([torch.ones(3)])
    with pytest.raises(ValueError, match="Invalid phi.*positive"):
        opt.add_param_group({"params": [torch.tensor([1.0, 0.0])]})
    with pytest.raises(ValueError, match="Invalid phi.*floating"):
        opt.add_param_group({"params": [torch.ones(2, dtype=torch.long)]})
    assert len(opt.param_groups) == 1


def test_tensor_hyperparameter_errors_name_their_own_argument():
    p = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"Invalid beta: tensor\(\[1\., 2\.\]\)"):
        KintsugiOptimizer([p], beta=torch.tensor([1.0, 2.0]))


def test_changing_pathway_after_phi_exists_raises_naming_it():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = KintsugiOptimizer([p], pathway="element")
    p.grad = torch.ones(4, 3)
    opt.step()
    opt.param_groups[0]["pathway"] = "row"
    with pytest.raises(ValueError, match=r"Invalid pathway: 'row'.*\(4, 3\)"):
        opt.step()

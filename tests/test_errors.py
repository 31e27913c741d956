"""Bad input raises a clear error naming the argument and value, and never corrupts state."""

import re

import pytest
import torch

from kintsugi_optim import GilderOptimizer, KintsugiOptimizer
from optim_db import ERROR_INPUTS, error_id

# At construction: tests/test_generic.py (test_error_inputs, every rule).
VALUE_ERRORS = [pytest.param(kwargs, match, id=error_id(kwargs))
                for kwargs, error, match in ERROR_INPUTS if error is ValueError]


@pytest.mark.parametrize("kwargs,match", VALUE_ERRORS)
def test_invalid_hyperparameter_in_add_param_group_leaves_optimizer_intact(kwargs, match):
    p, q = torch.zeros(3, requires_grad=True), torch.zeros(2, requires_grad=True)
    opt = KintsugiOptimizer([p])
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [q], **kwargs})
    assert opt.param_groups == before
    p.grad = torch.ones(3)
    opt.step()  # still usable


def test_gilder_refuses_multiplicative_with_softplus():
    with pytest.raises(ValueError, match="Invalid positivity: 'softplus'"):
        GilderOptimizer([torch.ones(2)], ascent="multiplicative", positivity="softplus")


def test_sparse_gradients_raise():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = KintsugiOptimizer(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


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


def test_changing_pathway_after_phi_exists_raises_naming_it():
    p = torch.zeros(4, 3, requires_grad=True)
    opt = KintsugiOptimizer([p], pathway="element")
    p.grad = torch.ones(4, 3)
    opt.step()
    opt.param_groups[0]["pathway"] = "row"
    with pytest.raises(ValueError, match=r"Invalid pathway: 'row'.*\(4, 3\)"):
        opt.step()


def test_a_rule_that_redefines_an_options_default_is_refused():
    from dataclasses import replace

    from kintsugi_optim.rules import RULES, register_rule

    before = dict(RULES)
    clash = replace(RULES["adam"], name="adam_eps", options={**RULES["adam"].options, "eps": 1e-6})
    with pytest.raises(ValueError, match=r"Invalid rule 'adam_eps': option 'eps' defaults to 1e-06"):
        register_rule(clash)
    assert RULES == before
    try:  # the same defaults under another name are fine, as AdamW shares Adam's
        register_rule(replace(RULES["adam"], name="adam_again"))
        assert RULES["adam_again"].options == RULES["adam"].options
    finally:
        RULES.pop("adam_again", None)

"""GildedLoss and Group DRO as its setting (docs/maths.md §2.5). The expected values are written
out in numpy, independently of the library."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from kintsugi_optim import GildedLoss, GilderOptimizer, group_dro


def group_means(losses, groups, G):
    """l̄_g: mean loss of group g's samples, 0 for a group absent from the batch."""
    return np.array([losses[groups == g].mean() if (groups == g).any() else 0.0 for g in range(G)])


def group_dro_q(q, losses, groups, eta, adjustment=0.0):
    """Group DRO's update of its adversarial group probabilities (Sagawa et al., 2020)."""
    q = q * np.exp(eta * (group_means(losses, groups, len(q)) + adjustment))
    return q / q.sum()


def stream(G, steps, seed=0):
    """Per-step (losses [B], groups [B]); some groups are missing from some batches."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        B = int(rng.integers(4, 24))
        yield rng.uniform(0, 3, B) * (1 + rng.integers(0, G, 1)), rng.integers(0, G, B)


@pytest.mark.parametrize("adjustment", [None, [0.5, 0.0, 1.0, 0.25, 2.0]])
def test_group_dro_is_gilded_loss_with_a_multiplicative_gilder(adjustment):
    G, eta = 5, 0.05
    loss_fn = GildedLoss(G, "mean", adjustment=adjustment).double()
    gilder = GilderOptimizer([loss_fn.phi], beta=eta * G, ascent="multiplicative", phi_norm="mean")
    q = np.full(G, 1.0 / G)
    a = 0.0 if adjustment is None else np.array(adjustment)
    for losses, groups in stream(G, 50):
        loss = loss_fn(torch.from_numpy(losses), torch.from_numpy(groups))
        # The streams are simultaneous: this batch is weighted by q from before its update.
        np.testing.assert_allclose(loss.item(), q @ group_means(losses, groups, G), rtol=1e-12)
        gilder.zero_grad()
        loss.backward()
        gilder.step()
        q = group_dro_q(q, losses, groups, eta, a)
        np.testing.assert_allclose(loss_fn.phi.detach().numpy() / G, q, rtol=1e-10)


def test_group_dro_helper_builds_that_pair():
    criterion, gilder = group_dro(3, step_size=0.1)
    assert criterion.reduction == "mean" and criterion.num_groups == 3
    group = gilder.param_groups[0]
    assert group["params"] == [criterion.phi]
    assert (group["beta"], group["ascent"], group["phi_norm"], group["fracture"]) == (
        pytest.approx(0.3), "multiplicative", "mean", "abs")
    q = np.full(3, 1 / 3)
    for losses, groups in stream(3, 20, seed=1):
        gilder.zero_grad()
        criterion(torch.tensor(losses, dtype=torch.float32), torch.from_numpy(groups)).backward()
        gilder.step()
        q = group_dro_q(q, losses, groups, 0.1)
    np.testing.assert_allclose(criterion.phi.detach().numpy() / 3, q, rtol=1e-5)
    adjusted, _ = group_dro(3, adjustment=[1.0, 2.0, 3.0])
    assert adjusted.adjustment.tolist() == [1.0, 2.0, 3.0]


@given(G=st.integers(1, 6), B=st.integers(1, 20), seed=st.integers(0, 2**16),
       reduction=st.sampled_from(["mean", "sum", "sample"]), adjusted=st.booleans())
def test_property_value_and_phi_grad_follow_the_spec(G, B, seed, reduction, adjusted):
    rng = np.random.default_rng(seed)
    losses, groups = rng.uniform(0, 5, B), rng.integers(0, G, B)
    phi = rng.uniform(0.2, 3, G)
    a = rng.uniform(0, 2, G).astype(np.float32).astype(float) if adjusted else np.zeros(G)
    loss_fn = GildedLoss(G, reduction, adjustment=a if adjusted else None).double()
    with torch.no_grad():
        loss_fn.phi.copy_(torch.from_numpy(phi))
    loss = loss_fn(torch.from_numpy(losses), torch.from_numpy(groups))
    loss.backward()
    means, counts = group_means(losses, groups, G), np.bincount(groups, minlength=G)
    if reduction == "mean":
        value, weight = phi @ means / G, np.full(G, 1 / G)
    elif reduction == "sum":
        value, weight = phi @ means, np.ones(G)
    else:
        value, weight = np.mean(phi[groups] * losses), counts / B
    np.testing.assert_allclose(loss.item(), value, rtol=1e-12)
    np.testing.assert_allclose(loss_fn.phi.grad.numpy(), weight * (means + a), rtol=1e-12,
                               atol=1e-15)


def test_sample_reduction_with_unit_phi_is_the_ordinary_mean_loss():
    torch.manual_seed(0)
    logits, y = torch.randn(10, 4), torch.randint(0, 4, (10,))
    per_sample = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(GildedLoss(4, "sample")(per_sample, y), F.cross_entropy(logits, y))


def test_adjustment_reaches_phi_grad_only_and_survives_grad_scaling():
    torch.manual_seed(0)
    theta = torch.randn(6, requires_grad=True)
    groups = torch.tensor([0, 0, 1, 2, 2, 2])
    grads = []
    for adjustment in (None, [1.0, 2.0, 3.0]):
        loss_fn = GildedLoss(3, adjustment=adjustment)
        loss = loss_fn(theta**2, groups)
        theta.grad = None
        loss.backward()
        grads.append((loss.detach(), theta.grad.clone(), loss_fn.phi.grad.clone()))
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
        gilder = GilderOptimizer([loss_fn.phi])
        gilder.zero_grad()
        scaler.scale(loss_fn(theta**2, groups)).backward()
        scaler.unscale_(gilder)
        torch.testing.assert_close(loss_fn.phi.grad, grads[-1][2])
    (value, theta_grad, phi_grad), (value_adj, theta_grad_adj, phi_grad_adj) = grads
    assert torch.equal(value, value_adj) and torch.equal(theta_grad, theta_grad_adj)
    torch.testing.assert_close(phi_grad_adj, phi_grad + torch.tensor([1.0, 2.0, 3.0]) / 3)


def test_gilding_state_dict_and_repr():
    loss_fn = GildedLoss(3, "sum", phi_init=2.0, adjustment=[0.1, 0.2, 0.3])
    assert list(loss_fn.gilding()) == ["groups"] and loss_fn.gilding()["groups"] is loss_fn.phi
    assert set(loss_fn.state_dict()) == {"phi", "adjustment"}
    assert set(GildedLoss(3).state_dict()) == {"phi"}
    assert "reduction='sum'" in repr(loss_fn)


@pytest.mark.parametrize("losses,groups,match", [
    (torch.ones(4, 2), torch.zeros(4, dtype=torch.long), r"Invalid losses: tensor of shape \(4, 2\)"),
    (torch.ones(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), r"Invalid losses: .*torch.int64"),
    (torch.ones(4), torch.zeros(4), r"Invalid groups: .*torch.float32.*int64 or int32"),
    (torch.ones(4), torch.zeros(4, dtype=torch.uint8), r"Invalid groups: .*torch.uint8.*mask"),
    (torch.ones(4), torch.zeros(3, dtype=torch.long), r"Invalid groups: tensor of shape \(3,\).*\(4,\)"),
    (torch.ones(4), torch.tensor([0, 3, 7, 3]), r"Invalid groups: \[3, 7\].*\[0, 3\)"),
    (torch.ones(2), torch.tensor([-1, 0]), r"Invalid groups: \[-1\]"),
    ([1.0, 2.0], torch.tensor([0, 1]), r"Invalid losses: list"),
])
def test_bad_batches_raise_naming_the_argument(losses, groups, match):
    with pytest.raises(ValueError, match=match):
        GildedLoss(3)(losses, groups)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_groups=0), r"Invalid num_groups: 0"),
    (dict(num_groups=2.5), r"Invalid num_groups: 2.5"),
    (dict(num_groups=2, reduction="avg"), r"Invalid reduction: 'avg'"),
    (dict(num_groups=2, phi_init=-1.0), r"Invalid phi_init: -1.0"),
    (dict(num_groups=2, adjustment=[1.0]), r"Invalid adjustment: \[1.0\]"),
    (dict(num_groups=2, adjustment=[1.0, float("nan")]), r"Invalid adjustment: \[1.0, nan\]"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GildedLoss(**kwargs)


def test_group_dro_rejects_a_negative_step_size():
    with pytest.raises(ValueError, match=r"Invalid step_size: -0.1"):
        group_dro(3, step_size=-0.1)


def test_phi_is_not_a_parameter_of_a_model_that_holds_the_criterion():
    """Inside a LightningModule-like model, θ's optimizer over model.parameters() must never
    see ϕ (it would descend it below 0); ϕ still saves, loads, moves and collects its grad."""
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.net = torch.nn.Linear(3, 2)
    model.criterion = GildedLoss(2)
    assert [p for p in model.parameters() if p is model.criterion.phi] == []
    from kintsugi_optim import KintsugiOptimizer

    opt = KintsugiOptimizer(model.parameters(), lr=0.5)
    gilder = GilderOptimizer([model.criterion.phi], beta=0.1)
    x, y = torch.randn(8, 3), torch.tensor([0, 1] * 4)
    for _ in range(5):
        loss = model.criterion(F.cross_entropy(model.net(x), y, reduction="none"), y)
        opt.zero_grad()
        gilder.zero_grad()
        loss.backward()
        assert model.criterion.phi.grad is not None
        opt.step()
        gilder.step()
    assert bool((model.criterion.phi > 1).all())  # ascended by the Gilder only
    assert "criterion.phi" in model.state_dict()
    restored = GildedLoss(2)
    restored.load_state_dict(model.criterion.state_dict())
    assert torch.equal(restored.phi, model.criterion.phi) and restored.phi.is_leaf
    moved = GildedLoss(2).double()
    phi = moved.phi
    assert phi.dtype == torch.float64 and phi.is_leaf and phi.requires_grad
    assert moved.half().phi is phi and phi.dtype == torch.float32  # stays a float32 leaf

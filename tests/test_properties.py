"""Properties that hold for every configuration, whatever the gradients (hypothesis)."""

import itertools

import torch
from hypothesis import given, strategies as st

from kintsugi_optim import GilderOptimizer, KintsugiOptimizer

SPECIAL = [0.0, 1e30, -1e30, float("inf"), float("-inf"), float("nan")]
values = st.one_of(st.sampled_from(SPECIAL), st.floats(-10, 10))
CONFIGS = [
    dict(pathway=pw, fracture=fr, phi_norm=pn, ascent=asc, positivity=pos, gamma=gm, l1=l1)
    for pw, fr, pn, asc, pos, gm, l1 in itertools.product(
        ("element", "row", "tensor"), ("relative", "abs"), ("mean", None),
        ("additive", "multiplicative"), ("clamp", "softplus"), (0.0, 0.5), (0.0, 0.1))
    if not (asc == "multiplicative" and pos == "softplus")
]


def grads_strategy(shape):
    n = 1
    for s in shape:
        n *= s
    return st.lists(values, min_size=n, max_size=n).map(
        lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape))


@given(
    config=st.sampled_from(CONFIGS),
    base=st.sampled_from(["sgd", "adam", "adamw"]),
    foreach=st.booleans(),
    beta=st.sampled_from([0.01, 1.0, 100.0]),
    g1=grads_strategy((3, 4)), g2=grads_strategy((3,)), g3=grads_strategy(()),
)
def test_phi_stays_finite_and_positive(config, base, foreach, beta, g1, g2, g3):
    params = [torch.zeros(g.shape, requires_grad=True) for g in (g1, g2, g3)]
    opt = KintsugiOptimizer(params, base=base, beta=beta, foreach=foreach, **config)
    for step in range(3):
        for p, g in zip(params, (g1, g2, g3)):
            p.grad = g * (step + 1)
        opt.step()
    phis = list(opt.gilding()[0].values())
    for phi in phis:
        assert torch.isfinite(phi).all() and (phi > 0).all(), phi
    if config["phi_norm"] == "mean":
        scopes = [torch.stack(phis)] if config["pathway"] == "tensor" else phis
        for scope in scopes:
            torch.testing.assert_close(scope.double().mean(), torch.tensor(1.0, dtype=torch.float64),
                                       rtol=1e-5, atol=0)


@given(
    fracture=st.sampled_from(["abs", "relative"]),
    ascent=st.sampled_from(["additive", "multiplicative"]),
    phi_norm=st.sampled_from([None, "mean"]),
    g=grads_strategy((5,)),
)
def test_gilder_phi_stays_finite_and_positive(fracture, ascent, phi_norm, g):
    phi = torch.ones(5, requires_grad=True)
    opt = GilderOptimizer([phi], beta=10.0, fracture=fracture, ascent=ascent, phi_norm=phi_norm)
    for _ in range(3):
        phi.grad = g.clone()
        opt.step()
    assert torch.isfinite(phi).all() and (phi > 0).all()
    if phi_norm == "mean":
        torch.testing.assert_close(phi.double().mean(), torch.tensor(1.0, dtype=torch.float64),
                                   rtol=1e-5, atol=0)

"""Properties that hold for every configuration, whatever the gradients (hypothesis)."""

import torch
from hypothesis import given, strategies as st

from helpers import assert_phi_finite_and_positive
from kintsugi_optim import GilderOptimizer, KintsugiOptimizer
from optim_db import IMPLS, RULES, SPECIAL_VALUES, gilding_product

values = st.one_of(st.sampled_from(SPECIAL_VALUES), st.floats(-10, 10))
CONFIGS = gilding_product(gamma=(0.0, 0.5), l1=(0.0, 0.1))


def grads_strategy(shape):
    n = 1
    for s in shape:
        n *= s
    return st.lists(values, min_size=n, max_size=n).map(
        lambda v: torch.tensor(v, dtype=torch.float32).reshape(shape))


@given(
    config=st.sampled_from(CONFIGS),
    base=st.sampled_from(list(RULES)),
    impl=st.sampled_from([impl.kwargs for impl in IMPLS.values() if impl.crossed]),
    beta=st.sampled_from([0.01, 1.0, 100.0]),
    g1=grads_strategy((3, 4)), g2=grads_strategy((3,)), g3=grads_strategy(()),
)
def test_phi_stays_finite_and_positive(config, base, impl, beta, g1, g2, g3):
    params = [torch.zeros(g.shape, requires_grad=True) for g in (g1, g2, g3)]
    opt = KintsugiOptimizer(params, base=base, beta=beta, **impl, **config)
    for step in range(3):
        for p, g in zip(params, (g1, g2, g3)):
            p.grad = g * (step + 1)
        opt.step()
    phis = list(opt.gilding()[0].values())
    assert_phi_finite_and_positive(phis)
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
    assert_phi_finite_and_positive([phi.detach()])
    if phi_norm == "mean":
        torch.testing.assert_close(phi.double().mean(), torch.tensor(1.0, dtype=torch.float64),
                                   rtol=1e-5, atol=0)

"""Sparse gradients (nn.Embedding(sparse=True)) with base="sgd", as torch.optim.SGD takes them.

References: torch's own SGD (β = 0, bitwise), the same model with dense gradients (every
pathway), and one step of the row pathway's gilding written out in plain torch.
"""

import pytest
import torch
from torch import nn

from kintsugi_optim import KintsugiOptimizer
from optim_db import PATHWAYS, RULES, config_id

# SGD's configurations that sparse gradients take (weight decay is refused below)
SGD_OPTIONS = [options for options in RULES["sgd"].configs.values() if "weight_decay" not in options]


def train(sparse, make_optimizer, steps=5, dtype=torch.float32):
    """An embedding trained on batches where tokens 0–9 are frequent and 40–42 rare; each batch
    repeats tokens, so its sparse gradient holds repeated (uncoalesced) indices."""
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, sparse=sparse).to(dtype)
    optimizer = make_optimizer(emb.parameters())
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 10, (16,), generator=g)
        idx[0] = 40 + torch.randint(0, 3, (1,), generator=g)
        optimizer.zero_grad()
        target = torch.randn(16, 4, generator=g).to(dtype)
        (emb(idx) - target).pow(2).sum().backward()
        assert emb.weight.grad.is_sparse == sparse
        optimizer.step()
    return emb.weight.detach(), optimizer


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=config_id)
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_beta_zero_is_torch_sgd_bitwise_on_sparse_gradients(options, foreach, dtype):
    ours, _ = train(True, lambda p: KintsugiOptimizer(p, lr=0.05, base="sgd", beta=0.0,
                                                      foreach=foreach, **options), dtype=dtype)
    torch_sgd, _ = train(True, lambda p: torch.optim.SGD(p, lr=0.05, foreach=foreach, **options),
                         dtype=dtype)
    assert torch.equal(ours, torch_sgd)


@pytest.mark.parametrize("options", SGD_OPTIONS, ids=config_id)
@pytest.mark.parametrize("pathway", PATHWAYS)
def test_sparse_gradients_step_as_their_dense_form_does(options, pathway):
    # One tensor in the group: the tensor pathway's ϕ, normalised over the group, would stay 1.
    phi_norm = None if pathway == "tensor" else "mean"

    def make(params):
        return KintsugiOptimizer(params, lr=0.02, base="sgd", beta=0.2, pathway=pathway,
                                 phi_norm=phi_norm, **options)

    sparse_weight, sparse_opt = train(True, make)
    dense_weight, dense_opt = train(False, make)
    torch.testing.assert_close(sparse_weight, dense_weight, rtol=1e-5, atol=1e-6)
    phi = sparse_opt.gilding()[0][0]
    torch.testing.assert_close(phi, dense_opt.gilding()[0][0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(phi, torch.ones_like(phi))  # gilding did act


def test_each_looked_up_row_gets_its_own_phi_from_its_summed_gradient():
    emb = nn.Embedding(6, 3, sparse=True)
    before = emb.weight.detach().clone()
    opt = KintsugiOptimizer(emb.parameters(), lr=0.1, base="sgd", beta=0.5, pathway="row",
                            gamma=0.0, phi_min=1e-3, phi_max=None)  # the maths written below
    idx = torch.tensor([1, 1, 4, 1])  # row 1 three times (frequent), row 4 once (rare)
    weights = torch.tensor([[1.0], [-0.5], [2.0], [0.25]])
    (emb(idx) * weights).sum().backward()
    opt.step()
    # Plain torch: the dense gradient, |g| averaged over each row, relative to the mean over
    # the rows, ϕ = 1 + β·l, normalised to mean 1; θ stepped with ϕ from before (≡ 1).
    dense = torch.zeros(6, 3).index_add_(0, idx, weights.expand(4, 3))
    l = dense.abs().mean(1)
    l = l / l.mean()
    phi = 1 + 0.5 * l
    phi = phi * 6 / phi.sum()
    torch.testing.assert_close(opt.gilding()[0][0], phi)
    torch.testing.assert_close(emb.weight.detach(), before - 0.1 * dense)
    assert phi[4] > phi[1] > phi[0]  # the rare row's summed gradient is larger here


@pytest.mark.parametrize("options,match", [
    (dict(base="adam"), r"sparse gradients with base='sgd' only.*base='adam'"),
    (dict(base="adamw"), r"base='adamw'"),
    (dict(base="sgd", fused=True), r"without fused.*fused=True"),
    (dict(base="sgd", weight_decay=0.01), r"sparse gradients do not take weight_decay.*0.01"),
])
def test_what_sparse_gradients_cannot_do_raises_before_any_step(options, match):
    emb = nn.Embedding(5, 2, sparse=True)
    before = emb.weight.detach().clone()
    opt = KintsugiOptimizer(emb.parameters(), lr=0.1, **options)
    emb(torch.tensor([0, 3])).sum().backward()
    with pytest.raises(RuntimeError, match=match):
        opt.step()
    assert torch.equal(emb.weight, before)

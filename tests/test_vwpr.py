"""VWPR: ϕ per output feature/channel, gating the backward pass only (docs/maths.md §3.3).

The reference used throughout is written here in plain torch, independently of the library:
a gate is ``a.detach() + (a - a.detach()) * ϕ_b``, whose value is exactly ``a`` and whose
gradient into ``a`` is ϕ_b times the gradient arriving at the gate.
"""

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from kintsugi_optim import EnhancedVWPRWrapper, GilderOptimizer, VWPR


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(inplace=True), nn.Conv2d(5, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def batch(model, n=7):
    torch.manual_seed(1)
    x = torch.randn(n, 3, 10, 10) if isinstance(model[0], nn.Conv2d) else torch.randn(n, 6)
    return x, torch.randint(0, 3, (n,))


def reference_gate(a, phi, dim):
    shape = (-1,) + (1,) * (a.dim() - dim - 1)
    return a.detach() + (a - a.detach()) * phi.view(shape)


def reference_step(bare, phis, x, y):
    """Forward/backward of a copy of the bare model with plain-torch gates after the layers
    named in ``phis``: returns its parameters' gradients and each gate's fracture."""
    model = copy.deepcopy(bare)
    arriving = {}  # gradient arriving at each gate (a tensor hook sees it before any in-place op)
    h = x
    for name, layer in model.named_children():
        h = layer(h)
        if name in phis:
            dim = 1 if isinstance(layer, nn.Conv2d) else h.dim() - 1
            h = reference_gate(h, phis[name], dim)
            h.register_hook(lambda grad, name=name, dim=dim: arriving.__setitem__(name, (grad, dim)))
    F.cross_entropy(h, y).backward()
    fractures = {name: grad.abs().mean([d for d in range(grad.dim()) if d != dim])
                 for name, (grad, dim) in arriving.items()}
    return [p.grad for p in model.parameters()], fractures


def random_phis(vwpr, seed=2):
    torch.manual_seed(seed)
    with torch.no_grad():
        for phi in vwpr.phi_parameters():
            phi.copy_(torch.rand_like(phi) * 2 + 0.25)
    return {name: phi.detach().clone() for name, phi in vwpr.phi().items()}


@pytest.mark.parametrize("make", [mlp, cnn])
def test_forward_output_is_bitwise_unchanged(make):
    model = make()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    random_phis(vwpr)
    x, _ = batch(model)
    assert torch.equal(vwpr(x), bare(x))
    with torch.no_grad():
        assert torch.equal(vwpr(x), bare(x))


@pytest.mark.parametrize("make", [mlp, cnn])
def test_gradients_and_fractures_match_a_plain_torch_gate(make):
    model = make()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    phis = random_phis(vwpr)
    x, y = batch(model)
    F.cross_entropy(vwpr(x), y).backward()
    grads, fractures = reference_step(bare, phis, x, y)
    for p, expected in zip(vwpr.theta_parameters(), grads):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)
    assert vwpr.phi().keys() == fractures.keys()
    for name, phi in vwpr.phi().items():
        torch.testing.assert_close(phi.grad, fractures[name], rtol=1e-5, atol=1e-8)


def test_fracture_is_mean_abs_gradient_of_the_activation():
    """With ϕ ≡ 1 the gradients are the bare model's; the fracture is mean |∂L/∂a|."""
    model = mlp()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    x, y = batch(model)
    F.cross_entropy(vwpr(x), y).backward()
    a1 = bare[0](x)
    a1.retain_grad()
    a2 = bare[2](torch.relu(a1))  # not bare[1], which is in place and would move a1.grad
    a2.retain_grad()
    F.cross_entropy(bare[4](bare[3](a2)), y).backward()
    torch.testing.assert_close(vwpr.phi()["0"].grad, a1.grad.abs().mean(0))
    torch.testing.assert_close(vwpr.phi()["2"].grad, a2.grad.abs().mean(0))
    for p, q in zip(vwpr.theta_parameters(), bare.parameters()):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("gated,doubled", [("4", {"0", "2", "4"}), ("2", {"0", "2"}), ("0", {"0"})])
def test_phi_two_doubles_the_gradient_of_its_layer_and_upstream(gated, doubled):
    model = mlp()
    vwpr = VWPR(model)
    x, y = batch(model)
    F.cross_entropy(vwpr(x), y).backward()
    before = {name: p.grad.clone() for name, p in model.named_parameters()}
    vwpr.zero_grad()
    with torch.no_grad():
        vwpr.phi()[gated].fill_(2.0)
    F.cross_entropy(vwpr(x), y).backward()
    for name, p in model.named_parameters():
        factor = 2 if name.split(".")[0] in doubled else 1
        torch.testing.assert_close(p.grad, before[name] * factor)


def test_the_source_ritual_runs_verbatim():
    model = mlp()
    batch_, labels = batch(model)
    vwpr = EnhancedVWPRWrapper(model)
    optimizer_theta = torch.optim.Adam(vwpr.theta_parameters(), lr=1e-2)
    optimizer_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.05, fracture="relative")
    theta_before = [p.detach().clone() for p in model.parameters()]

    output = vwpr(batch_)
    base_loss = F.cross_entropy(output, labels)
    l_map, phi_vals = vwpr.apply_vwpr_step(base_loss, optimizer_theta, optimizer_phi)

    assert list(l_map) == list(phi_vals) == ["0", "2", "4"]
    for name, phi in vwpr.phi().items():
        assert phi_vals[name].shape == phi.shape == l_map[name].shape
        assert torch.equal(phi_vals[name], phi.detach()) and phi_vals[name] is not phi
        assert (l_map[name] >= 0).all() and l_map[name].sum() > 0
        assert (phi > 0).all() and not torch.equal(phi, torch.ones_like(phi))
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), theta_before))
    assert len(vwpr.history) == 1 and vwpr.history.layers == ["0", "2", "4"]


def test_apply_vwpr_step_equals_the_users_own_loop():
    results = []
    for use_helper in (True, False):
        vwpr = VWPR(mlp())
        opt_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.1, momentum=0.9)
        opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.1, fracture="relative")
        x, y = batch(vwpr.model)
        for _ in range(3):
            loss = F.cross_entropy(vwpr(x), y)
            if use_helper:
                vwpr.apply_vwpr_step(loss, opt_theta, opt_phi)
            else:
                opt_theta.zero_grad()
                opt_phi.zero_grad()
                loss.backward()
                opt_theta.step()
                opt_phi.step()
                vwpr.record()
        results.append(vwpr.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key


def test_grad_scaler_unscales_the_fracture():
    outcomes = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        vwpr = VWPR(mlp())
        opt_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.1)
        opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.5)
        x, y = batch(vwpr.model)
        l_map, phi_vals = vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt_theta, opt_phi,
                                               scaler=scaler)
        outcomes.append((l_map, phi_vals, [p.detach().clone() for p in vwpr.theta_parameters()]))
    (l_plain, phi_plain, theta_plain), (l_scaled, phi_scaled, theta_scaled) = outcomes
    for name in l_plain:
        torch.testing.assert_close(l_scaled[name], l_plain[name])
        torch.testing.assert_close(phi_scaled[name], phi_plain[name])
    for p, q in zip(theta_scaled, theta_plain):
        torch.testing.assert_close(p, q)


def test_fracture_accumulates_like_grad_and_autograd_grad_leaves_it_alone():
    vwpr = VWPR(mlp())
    x, y = batch(vwpr.model)
    F.cross_entropy(vwpr(x), y).backward()
    once = {name: phi.grad.clone() for name, phi in vwpr.phi().items()}
    F.cross_entropy(vwpr(x), y).backward()
    for name, phi in vwpr.phi().items():
        torch.testing.assert_close(phi.grad, 2 * once[name])
    vwpr.zero_grad()
    x.requires_grad_(True)
    torch.autograd.grad(F.cross_entropy(vwpr(x), y), x)
    assert all(phi.grad is None for phi in vwpr.phi_parameters())


def test_double_backward_through_the_gate():
    """A gradient penalty differentiates the backward pass: the gate's is grad·ϕ."""
    model = mlp()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    x, y = batch(model)
    for net in (vwpr, bare):
        x_ = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(net(x_), y), x_, create_graph=True)
        g.pow(2).sum().backward()
    for p, q in zip(model.parameters(), bare.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_remove_restores_the_bare_model():
    model = mlp()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    random_phis(vwpr)
    assert vwpr.remove() is model and not vwpr.gated
    assert all(not m._forward_hooks for m in model.modules())
    x, y = batch(model)
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(bare(x), y).backward()
    for p, q in zip(model.parameters(), bare.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert all(phi.grad is None for phi in vwpr.phi_parameters())
    VWPR(model)  # the layers are free to be gated again


def test_state_dict_round_trip_keeps_phi_and_working_hooks():
    vwpr = VWPR(cnn())
    opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.2, fracture="relative")
    x, y = batch(vwpr.model)
    for _ in range(2):
        vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y),
                             torch.optim.SGD(vwpr.theta_parameters(), lr=0.1), opt_phi)
    assert {k for k in vwpr.state_dict() if k.startswith("gilding_weights.")} == {
        "gilding_weights.0", "gilding_weights.2", "gilding_weights.5"}
    buffer = io.BytesIO()
    torch.save(vwpr.state_dict(), buffer)
    buffer.seek(0)
    restored = VWPR(cnn())
    restored.load_state_dict(torch.load(buffer))
    pickled = io.BytesIO()
    torch.save(vwpr, pickled)
    pickled.seek(0)
    copies = [restored, copy.deepcopy(vwpr), torch.load(pickled, weights_only=False)]
    vwpr.zero_grad()
    F.cross_entropy(vwpr(x), y).backward()
    for other in copies:
        other.zero_grad()
        for name, phi in other.phi().items():
            assert torch.equal(phi, vwpr.phi()[name]) and phi is not vwpr.phi()[name]
            assert phi.is_leaf and phi.requires_grad
        F.cross_entropy(other(x), y).backward()
        for name, phi in other.phi().items():
            torch.testing.assert_close(phi.grad, vwpr.phi()[name].grad)
        for p, q in zip(other.theta_parameters(), vwpr.theta_parameters()):
            torch.testing.assert_close(p.grad, q.grad)


def test_eval_and_no_grad_have_no_side_effects():
    model = mlp()
    bare = copy.deepcopy(model)
    vwpr = VWPR(model)
    phis = random_phis(vwpr)
    x, y = batch(model)
    with torch.no_grad():
        out = vwpr(x)
    assert not out.requires_grad
    vwpr.eval()
    F.cross_entropy(vwpr(x), y).backward()  # eval with grad: the bare model, backward included
    F.cross_entropy(bare.eval()(x), y).backward()
    for p, q in zip(model.parameters(), bare.parameters()):
        assert torch.equal(p.grad, q.grad)
    assert all(phi.grad is None for phi in vwpr.phi_parameters())
    assert all(torch.equal(vwpr.phi()[k], v) for k, v in phis.items())
    assert len(vwpr.history) == 0
    vwpr.train()
    F.cross_entropy(vwpr(x), y).backward()
    assert all(phi.grad is not None for phi in vwpr.phi_parameters())


def test_moving_or_casting_keeps_phi_a_float32_leaf_held_by_its_optimizer():
    vwpr = VWPR(mlp())
    opt_phi = GilderOptimizer(vwpr.phi_parameters())
    held = opt_phi.param_groups[0]["params"]
    vwpr.double()
    assert all(p is q and p.dtype == torch.float64 for p, q in zip(vwpr.phi_parameters(), held))
    vwpr.bfloat16()
    assert all(p is q and p.dtype == torch.float32 and p.is_leaf for p, q in zip(vwpr.phi_parameters(), held))
    x, y = batch(vwpr.model)
    F.cross_entropy(vwpr(x.bfloat16()).float(), y).backward()
    assert all(phi.grad.dtype == torch.float32 for phi in vwpr.phi_parameters())
    assert all(p.grad.dtype == torch.bfloat16 for p in vwpr.theta_parameters())


def test_adam_mostly_cancels_a_steady_phi_in_the_layers_own_step_sgd_does_not():
    steps = {}
    for name, make_opt in [("adam", lambda ps: torch.optim.Adam(ps, lr=1e-2)),
                           ("sgd", lambda ps: torch.optim.SGD(ps, lr=1e-2))]:
        for phi_value in (1.0, 3.0):
            vwpr = VWPR(mlp(), phi_init=phi_value)
            before = vwpr.model[4].weight.detach().clone()
            opt = make_opt(vwpr.theta_parameters())
            x, y = batch(vwpr.model)
            F.cross_entropy(vwpr(x), y).backward()
            opt.step()
            steps[name, phi_value] = vwpr.model[4].weight.detach() - before
    torch.testing.assert_close(steps["adam", 3.0], steps["adam", 1.0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(steps["sgd", 3.0], 3 * steps["sgd", 1.0])


def test_layers_by_name_and_type_and_shared_layers():
    model = cnn()
    assert VWPR(model, layers=nn.Conv2d).layers == ["0", "2"]
    assert VWPR(copy.deepcopy(model), layers=["5", nn.Linear]).layers == ["5"]
    shared = nn.Linear(4, 4)
    bare = copy.deepcopy(shared)
    twice = nn.Sequential(shared, nn.Tanh(), shared)
    vwpr = VWPR(twice)
    assert vwpr.layers == ["0"]
    x = torch.randn(3, 4)
    twice(x).sum().backward()
    a = bare(x)
    a.retain_grad()
    bare(torch.tanh(a)).sum().backward()
    # One fracture term per call of the layer: |1| from the top, |∂L/∂a| from the bottom.
    torch.testing.assert_close(vwpr.phi()["0"].grad, 1 + a.grad.abs().mean(0))


def test_a_model_that_is_one_layer_and_unbatched_inputs():
    vwpr = VWPR(nn.Conv1d(2, 3, 3))
    assert vwpr.layers == [""] and "(model)" in dict(vwpr.gilding_weights.named_buffers())
    x = torch.randn(2, 9)  # unbatched [C, L]
    out = vwpr(x)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    torch.testing.assert_close(vwpr.phi()[""].grad, upstream.abs().mean(1))


def test_frozen_phi_scales_without_fracture():
    vwpr = VWPR(mlp(), phi_init=2.0)
    for phi in vwpr.phi_parameters():
        phi.requires_grad_(False)
    x, y = batch(vwpr.model)
    F.cross_entropy(vwpr(x), y).backward()
    assert all(phi.grad is None for phi in vwpr.phi_parameters())
    assert vwpr.model[0].weight.grad is not None


@given(kind=st.sampled_from(["linear", "conv1d", "conv2d"]), lead=st.integers(0, 2),
       size=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_property_gate_scales_by_phi_and_reports_mean_abs_gradient(kind, lead, size, seed):
    torch.manual_seed(seed)
    if kind == "linear":
        layer, x, dim = nn.Linear(3, 5), torch.randn(*(size + 1,) * lead, 3), lead
    else:
        spatial = int(kind[-2])
        layer = (nn.Conv1d if spatial == 1 else nn.Conv2d)(2, 5, 1)
        x = torch.randn(*(size,) * min(lead, 1), 2, *(size + 1,) * spatial)
        dim = min(lead, 1)
    bare = copy.deepcopy(layer)
    vwpr = VWPR(layer)
    phi = random_phis(vwpr, seed)[""]
    x.requires_grad_(True)
    out = vwpr(x)
    assert torch.equal(out, bare(x))
    upstream = torch.randn_like(out)  # L = Σ out·upstream, so ∂L/∂out = upstream
    (out * upstream).sum().backward()
    others = [d for d in range(out.dim()) if d != dim]
    expected = upstream.abs().mean(others) if others else upstream.abs()
    torch.testing.assert_close(vwpr.phi()[""].grad, expected)
    x_ref = x.detach().requires_grad_(True)
    (reference_gate(bare(x_ref), phi, dim) * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(layer.weight.grad, bare.weight.grad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers=["nope"]), r"Invalid layers: 'nope'"),
    (dict(layers=[nn.ReLU]), r"Invalid layers: '1'.*out_features, out_channels or nf"),
    (dict(layers=[3]), r"Invalid layers: 3"),
    (dict(layers=[nn.GRU]), r"Invalid layers: .*matched no module"),
    (dict(phi_init=0.0), r"Invalid phi_init: 0.0"),
    (dict(phi_init=float("nan")), r"Invalid phi_init: nan"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VWPR(mlp(), **kwargs)


def test_a_rejected_wrapper_leaves_the_model_ungated():
    model = mlp()
    for kwargs in (dict(layers=["0", "1"]), dict(history="yes")):
        with pytest.raises(ValueError):
            VWPR(model, **kwargs)
        assert all(not m._forward_hooks for m in model.modules())
    collide = nn.ModuleDict({"a_b": nn.Linear(2, 2), "a": nn.ModuleDict({"b": nn.Linear(2, 2)})})
    assert VWPR(collide).layers == ["a_b", "a.b"]  # "a.b" is stored as "a/b"
    clash = nn.ModuleDict({"a/b": nn.Linear(2, 2), "a": nn.ModuleDict({"b": nn.Linear(2, 2)})})
    with pytest.raises(ValueError, match=r"Invalid layers: 'a.b'.*collides with that of layer 'a/b'"):
        VWPR(clash)
    assert all(not m._forward_hooks for m in clash.modules())


def test_bad_models_and_optimizers_raise_naming_them():
    with pytest.raises(ValueError, match=r"Invalid model: 'Sequential'.*no nn.Linear"):
        VWPR(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"Invalid model: 'str'"):
        VWPR("model")
    model = mlp()
    vwpr = VWPR(model)
    with pytest.raises(ValueError, match=r"Invalid layers: '0'.*already gated"):
        VWPR(model)
    opt_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.1)
    opt_phi = GilderOptimizer(vwpr.phi_parameters())
    x, y = batch(model)
    with pytest.raises(ValueError, match=r"Invalid optimizer_phi: 'SGD'"):
        vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt_phi, opt_theta)


class HFConv1D(nn.Module):
    """Hugging Face's Conv1D (GPT-2's projections) as transformers defines it: a Linear whose
    weight is stored transposed, [nx, nf], with ``nf`` output features and no out_features."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(*x.shape[:-1], self.nf)


def test_a_conv1d_with_nf_is_gated_on_its_last_dim_like_a_linear():
    torch.manual_seed(0)
    model = nn.Sequential(HFConv1D(8, 6), nn.Tanh(), nn.Linear(8, 3))
    bare = copy.deepcopy(model)
    vwpr = VWPR(model, layers=["0", "2"])
    assert vwpr.gated_layers() == {"0": 8, "2": 3}
    phis = random_phis(vwpr)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (5, 4))  # a sequence: [B, T, features]
    F.cross_entropy(vwpr(x).flatten(0, 1), y.flatten()).backward()
    # Plain torch: the gate's value is a, its gradient ϕ_b times the arriving one.
    arriving = {}
    h = reference_gate(bare[0](x), phis["0"], 2)
    h.register_hook(lambda g: arriving.__setitem__("0", g))
    h = reference_gate(bare[2](bare[1](h)), phis["2"], 2)
    h.register_hook(lambda g: arriving.__setitem__("2", g))
    F.cross_entropy(h.flatten(0, 1), y.flatten()).backward()
    for p, q in zip(model.parameters(), bare.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for name, phi in vwpr.phi().items():
        torch.testing.assert_close(phi.grad, arriving[name].abs().mean([0, 1]))


def test_default_choice_reports_the_weight_bearing_modules_it_skips(caplog):
    class Odd(nn.Module):  # a weight matrix but no out_features/out_channels/nf
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(nn.Embedding(10, 4), Odd(), nn.ConvTranspose1d(4, 4, 1), nn.Linear(4, 2),
                          nn.LayerNorm(2))
    with caplog.at_level("INFO", logger="kintsugi_optim.vwpr"):
        vwpr = VWPR(model)
    assert vwpr.gated_layers() == {"3": 2}
    assert vwpr.skipped_layers() == {
        "0": "Embedding has no out_features, out_channels or nf",
        "1": "Odd has no out_features, out_channels or nf",
        "2": "ConvTranspose1d is not a default type; name it in `layers` to gate it",
    }  # LayerNorm's weight is a vector, not a pathway matrix: not listed
    assert "skips 3 weight-bearing modules" in caplog.text and "0 (Embedding" in caplog.text
    assert VWPR(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)), layers=["1"]).skipped_layers() == {}


class Classifier(nn.Module):
    """A model with a Hugging Face-like forward and attributes."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.config = {"hidden": 4}

    def forward(self, input_ids, attention_mask=None, labels=None, return_loss=True):
        return self.fc(input_ids)

    def can_generate(self):
        return False


def test_the_wrapper_has_the_models_forward_signature_on_its_class():
    import inspect

    vwpr = VWPR(Classifier())
    # Frameworks read it from the class (the HF Trainer: inspect.signature(type(model).forward)).
    for forward in (vwpr.forward, type(vwpr).forward):
        names = [n for n in inspect.signature(forward).parameters if n != "self"]
        assert names == ["input_ids", "attention_mask", "labels", "return_loss"]
    assert isinstance(vwpr, VWPR) and type(VWPR(Classifier())) is type(vwpr)
    assert repr(vwpr).startswith("VWPR(")
    # Public attributes the wrapper lacks come from the model; its own and private ones do not.
    assert vwpr.config == {"hidden": 4} and vwpr.can_generate() is False
    assert vwpr.layers == ["fc"]
    with pytest.raises(AttributeError):
        vwpr._private_thing
    with pytest.raises(AttributeError):
        vwpr.no_such_attribute
    x = torch.randn(2, 4)
    assert torch.equal(vwpr(x, labels=None), vwpr.model(x))
    restored = pickle_round_trip(vwpr)
    assert type(restored) is type(vwpr) and restored.config == {"hidden": 4}


def pickle_round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_model_built_on_the_meta_device_materialises_with_to_empty_and_reset_parameters():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3))
    vwpr = VWPR(model, phi_init=2.0)
    assert all(phi.is_meta for phi in vwpr.phi_parameters())
    vwpr.to_empty(device="cpu")  # raised on ϕ, with the model's parameters already moved
    for module in vwpr.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for phi in vwpr.phi_parameters():
        assert phi.device.type == "cpu" and phi.is_leaf and phi.requires_grad
        assert torch.equal(phi, torch.full_like(phi, 2.0))
    opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.1, fracture="relative")
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    l_map, _ = vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y),
                                    torch.optim.SGD(vwpr.theta_parameters(), lr=0.1), opt_phi)
    assert set(l_map) == {"0", "2"} and all(torch.isfinite(v).all() for v in l_map.values())
    with torch.no_grad():
        next(vwpr.phi_parameters()).mul_(3)
    vwpr.reset_parameters()
    assert all(torch.equal(phi, torch.full_like(phi, 2.0)) and phi.grad is None
               for phi in vwpr.phi_parameters())


def test_save_pretrained_needs_a_model_that_has_it():
    with pytest.raises(ValueError, match=r"Invalid model: 'Sequential'.*no save_pretrained"):
        VWPR(mlp()).save_pretrained("unused")

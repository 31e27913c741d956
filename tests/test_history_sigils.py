"""PhiHistory (bounded ϕ summaries) and sigils (pictures of ϕ), docs/maths.md §3.3."""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from kintsugi_optim import (GildedLoss, GilderOptimizer, KintsugiOptimizer, PhiHistory, VWPR,
                            sigils)
from kintsugi_optim.history import flat_gilding

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tiny_vwpr():
    torch.manual_seed(0)
    return VWPR(nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 3)))


def train(vwpr, steps, beta=0.5):
    opt_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.05)
    opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=beta, fracture="relative")
    torch.manual_seed(1)
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    for _ in range(steps):
        vwpr.apply_vwpr_step(F.cross_entropy(vwpr(x), y), opt_theta, opt_phi)
    return vwpr


def test_history_stays_bounded_and_spans_the_run_over_1000_steps():
    history = PhiHistory(max_records=64)
    phi = {"layer": torch.ones(10)}
    history.record(phi)
    tables = [t.nbytes for t in (*history._stats.values(), *history._hists.values())]
    for step in range(1, 1000):
        phi["layer"] = torch.linspace(0.5, 1.5, 10) * (1 + step / 1000)
        history.record(phi)
    steps = history.steps
    assert len(history) <= 64 and history.stride == 16  # full at 64, 128, 256, 512 calls
    assert [t.nbytes for t in (*history._stats.values(), *history._hists.values())] == tables
    assert steps[0] == 0 and steps[-1] > 1000 - history.stride
    assert set(np.diff(steps)) == {history.stride}


@given(max_records=st.integers(2, 9), calls=st.integers(1, 300))
def test_property_thinning_keeps_evenly_spaced_records_from_the_start(max_records, calls):
    history = PhiHistory(max_records=max_records)
    for _ in range(calls):
        history.record({"a": torch.ones(2)})
    steps = history.steps
    assert 1 <= len(history) <= max_records and steps[0] == 0
    assert all(np.diff(steps) == history.stride)
    assert steps[-1] > calls - 1 - history.stride


def test_summaries_match_numpy():
    edges = [0.0, 0.5, 1.0, 1.5, 2.0]
    history = PhiHistory(bin_edges=edges)
    torch.manual_seed(0)
    phis = {"w": torch.rand(1000) * 2.5,  # some beyond the last edge: counted in the last bin
            "one": torch.tensor([0.7]), "rows": torch.rand(7, 3) + 0.2,
            "empty": torch.ones(0)}
    history.record(phis, step=17)
    data = history.arrays()
    assert data["steps"].tolist() == [17] and "empty" not in data["layers"]
    for name, phi in phis.items():
        if not phi.numel():
            continue
        stats, x = data["layers"][name], phi.double().flatten().numpy()
        for stat, expected in [("mean", x.mean()), ("std", x.std()), ("min", x.min()),
                               ("max", x.max()), ("q5", np.quantile(x, 0.05)),
                               ("q50", np.median(x)), ("q95", np.quantile(x, 0.95))]:
            np.testing.assert_allclose(stats[stat], [expected], rtol=1e-12, err_msg=f"{name} {stat}")
        counts, _ = np.histogram(np.clip(x, 0, 2), bins=edges)
        assert stats["histogram"].tolist() == [counts.tolist()] and counts.sum() == x.size


def test_layers_missing_from_a_record_are_nan_and_export_is_plain():
    history = PhiHistory(max_records=4)
    history.record({"a": torch.ones(3)})
    history.record({"a": torch.ones(3), "b": torch.full((2,), 2.0)})
    history.record({"b": torch.full((2,), 3.0)})
    layers = history.arrays()["layers"]
    assert np.isnan(layers["b"]["mean"][0]) and layers["b"]["mean"][1:].tolist() == [2.0, 3.0]
    assert np.isnan(layers["a"]["mean"][2]) and layers["a"]["histogram"][2].sum() == 0
    exported = history.to_dict()
    json.dumps(exported)  # plain Python types throughout
    assert exported["steps"] == [0, 1, 2] and exported["layers"]["a"]["max"][:2] == [1.0, 1.0]


def test_flat_gilding_accepts_every_phi_holder():
    vwpr = tiny_vwpr()
    assert list(flat_gilding(vwpr)) == ["0", "2"]
    loss = GildedLoss(3)
    assert list(flat_gilding(loss)) == ["groups"]
    model = nn.Linear(2, 2)
    sculptor = KintsugiOptimizer(model.named_parameters(), pathway="row")
    model(torch.randn(3, 2)).sum().backward()
    sculptor.step()
    assert list(flat_gilding(sculptor)) == ["weight", "bias"]
    two_groups = KintsugiOptimizer([{"params": [model.weight], "name": "w"},
                                    {"params": [model.bias]}])
    two_groups.step()
    assert list(flat_gilding(two_groups)) == ["w/0", "1/0"]
    with pytest.raises(ValueError, match=r"Invalid source: 'int'"):
        flat_gilding(3)
    with pytest.raises(ValueError, match=r"Invalid source: 'x'.*list"):
        flat_gilding({"x": [1.0]})


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_records=1), r"Invalid max_records: 1"),
    (dict(quantiles=(0.5, 1.5)), r"Invalid quantiles"),
    (dict(bin_edges=[0.0, 2.0, 1.0]), r"Invalid bin_edges"),
])
def test_bad_history_arguments_raise_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhiHistory(**kwargs)


def test_vwpr_history_options():
    assert VWPR(nn.Linear(2, 2), history=False).history is None
    mine = PhiHistory(max_records=8)
    vwpr = VWPR(nn.Linear(2, 2), history=mine)
    vwpr.record()
    assert vwpr.history is mine and len(mine) == 1


def test_sigils_need_the_viz_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'kintsugi-optim\[viz\]'"):
        sigils.plot_phi_distribution({"a": torch.ones(3)})
    with pytest.raises(ImportError, match=r"viz"):
        tiny_vwpr().visualize_phi_distribution(0)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG_SIGNATURE


def test_sigils_and_evolution_write_png(tmp_path):
    pytest.importorskip("matplotlib")
    vwpr = train(tiny_vwpr(), 30)
    figure = vwpr.visualize_phi_distribution(3, tmp_path / "sigils" / "epoch3.png")
    assert _is_png(tmp_path / "sigils" / "epoch3.png")
    assert figure._suptitle.get_text() == "Sigils — gilding weight ϕ distribution per layer, epoch 3"
    assert [ax.get_xlabel() for ax in figure.axes] == ["gilding weight ϕ", "pathway index (unit, channel, group or class)"]
    figure = sigils.plot_phi_evolution(vwpr, tmp_path / "evolution.png")
    assert _is_png(tmp_path / "evolution.png") and len(figure.axes) == 2
    assert figure.axes[0].get_ylabel() == "gilding weight ϕ"


def test_sigils_of_a_sculptor_a_gilded_loss_and_a_dict(tmp_path):
    pytest.importorskip("matplotlib")
    model = nn.Linear(6, 4)
    sculptor = KintsugiOptimizer(model.named_parameters(), beta=0.2)
    for _ in range(3):
        sculptor.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        sculptor.step()
    for i, source in enumerate([sculptor, GildedLoss(4), {"custom": torch.rand(500) + 0.5}]):
        figure = sigils.plot_phi_distribution(source, path=tmp_path / f"{i}.png")
        assert _is_png(tmp_path / f"{i}.png") and figure.axes
    with pytest.raises(ValueError, match=r"Invalid source: 'KintsugiOptimizer'.*no gilding weights"):
        sigils.plot_phi_distribution(KintsugiOptimizer(model.parameters()))
    with pytest.raises(ValueError, match=r"Invalid source: .*no records"):
        sigils.plot_phi_evolution(PhiHistory())


def test_sigils_of_nan_inf_and_empty_phi_count_them_instead_of_crashing(tmp_path):
    pytest.importorskip("matplotlib")
    nan, inf = float("nan"), float("inf")
    source = {"diverged": torch.tensor([1.0, nan, 2.0, inf, -inf] * 8),
              "few": torch.tensor([0.5, nan, 1.5]),
              "all nan": torch.full((30,), nan),
              "empty": torch.empty(0),
              "fine": torch.tensor([0.5, 1.5] * 10)}
    figure = sigils.plot_phi_distribution(source, path=tmp_path / "broken.png")
    assert _is_png(tmp_path / "broken.png")
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0].startswith("diverged — 40 pathways, 8 NaN, 16 inf\nmean 1.5 · ")
    assert titles[0].endswith("min 1 · max 2")  # statistics of the finite values only
    assert titles[1].startswith("few — 3 pathways, 1 NaN\nmean 1 · ")
    assert titles[2] == "all nan — 30 pathways, 30 NaN"
    assert titles[3] == "empty — 0 pathways"
    assert titles[4].startswith("fine — 20 pathways\nmean 1 · ")
    # A Sculptor over a parameter with no elements has an empty ϕ: it gets its panel too.
    empty, weight = nn.Parameter(torch.empty(0, 3)), nn.Parameter(torch.ones(4))
    sculptor = KintsugiOptimizer([empty, weight], beta=0.1)
    empty.grad, weight.grad = torch.empty(0, 3), torch.rand(4)
    sculptor.step()
    figure = sigils.plot_phi_distribution(sculptor)
    assert [ax.get_title().split("\n")[0] for ax in figure.axes] == ["0 — 0 pathways",
                                                                        "1 — 4 pathways"]

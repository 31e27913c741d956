"""Sigils: pictures of the gilding weights ϕ (docs/maths.md §3.3).

* :func:`plot_phi_distribution` — a *sigil* is the distribution of one layer's ϕ at one moment: one
  histogram per layer (a bar per pathway when a layer has only a few, e.g. loss groups).
* :func:`plot_phi_evolution` — how each layer's ϕ spread over training: median and quantile
  bands from a :class:`~kintsugi_optim.PhiHistory`.

The first takes whatever :func:`~kintsugi_optim.history.flat_gilding` takes (a VWPR, a
KintsugiOptimizer, a GilderOptimizer, a GildedLoss or a dict of tensors), the second a
PhiHistory (or a VWPR, for its ``.history``). Both return a ``matplotlib.figure.Figure``,
saved as PNG when ``path`` is given. They draw on a bare
``Figure`` (Agg canvas): no window, no pyplot state, the user's backend untouched.
matplotlib is the optional ``viz`` extra and is imported only when a function is called.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from kintsugi_optim._validation import require
from kintsugi_optim.history import PhiHistory, flat_gilding, quantile_name

__all__ = ["plot_phi_distribution", "plot_phi_evolution"]

GOLD, INK, RED = "#c9a227", "#3b2f1e", "#a23b2a"  # gold in the cracks, on dark lacquer
FEW_PATHWAYS = 16  # at most this many ϕ: one bar per pathway reads better than a histogram


def _new_figure(panels: int, columns: int):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "kintsugi_optim.sigils draws with matplotlib, the optional 'viz' extra: "
            "pip install 'kintsugi-optim[viz]'") from error
    require(isinstance(columns, int) and columns >= 1, "columns", columns, "must be an int >= 1")
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    # At least 7.5 inches wide, so that the title and legend fit above a single panel.
    figure = Figure(figsize=(max(4.6 * cols, 7.5), 3.3 * rows + 0.9), layout="constrained")
    axes = figure.subplots(rows, cols, squeeze=False).flatten()
    for spare in axes[panels:]:
        spare.remove()
    return figure, axes[:panels]


def _reference_lines(line, mean: float | None = None) -> None:
    """``line`` is ax.axvline or ax.axhline. ϕ = 1 is drawn last, dashed, so that it stays
    visible on top of a mean that ``phi_norm="mean"`` pins at 1."""
    if mean is not None:
        line(mean, color=INK, linewidth=1.6, label="mean ϕ of the layer")
    line(1.0, color=RED, linestyle=(0, (4, 3)), linewidth=1.2, label="ϕ = 1 (initial value)")


def _finish(figure, title: str, path: str | os.PathLike | None):
    handles, labels = figure.axes[0].get_legend_handles_labels()
    figure.suptitle(title, fontsize=13)
    # About 2.3 inches per legend entry, so a narrow figure wraps its legend instead of clipping it.
    per_row = max(1, int(figure.get_figwidth() // 2.3))
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), per_row),
                  frameon=False)
    if path is not None:
        os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
        figure.savefig(path, dpi=110)
    return figure


def _titles(source: Any, names) -> dict[str, str]:
    """Panel titles: the layer name, with its module type when ``source`` wraps a model."""
    model = getattr(source, "model", None)
    titles = {}
    for name in names:
        title = name or "(model)"  # a model gated as a whole has the empty module name
        if model is not None and hasattr(model, "get_submodule"):
            title += f" · {type(model.get_submodule(name)).__name__}"
        titles[name] = title
    return titles


def _non_finite_note(values: np.ndarray) -> str:
    """", 2 NaN, 1 inf" for the title of a panel whose ϕ are not all finite; "" otherwise."""
    counts = {"NaN": int(np.isnan(values).sum()), "inf": int(np.isinf(values).sum())}
    return "".join(f", {n:,} {kind}" for kind, n in counts.items() if n)


def plot_phi_distribution(
    source: Any,
    epoch: int | None = None,
    path: str | os.PathLike | None = None,
    *,
    bins: int = 40,
    columns: int = 3,
    title: str | None = None,
):
    """Sigils: one panel per layer with the distribution of its gilding weights ϕ right now.

    Each panel: histogram of ϕ over the layer's pathways (x: gilding weight ϕ, y: number of
    pathways), a dashed line at ϕ = 1 (the initial value) and a solid one at the layer's mean,
    and its mean / std / min / max. Layers with at most 16 pathways (loss groups, a small
    head) get one bar per pathway instead (x: pathway index, y: ϕ). NaN and inf ϕ (a run
    that diverged) are counted in the panel's title and left out of its picture and
    statistics; a layer without pathways gets a panel that says so.

    Args:
        source: a VWPR, KintsugiOptimizer, GilderOptimizer, GildedLoss or ``{name: tensor}``.
        epoch (int, optional): shown in the title.
        path (str or PathLike, optional): where to save a PNG (parent folders are created).
        bins (int): histogram bins per layer (default: 40). columns (int): panels per row (3).
        title (str, optional): replaces the default title
            ("Sigils — gilding weight ϕ distribution per layer, epoch <epoch>").

    Returns:
        the ``matplotlib.figure.Figure``.
    """
    gilding = flat_gilding(source)
    require(bool(gilding), "source", type(source).__name__,
            "holds no gilding weights yet (a Sculptor creates ϕ at its first step)")
    require(isinstance(bins, int) and bins >= 1, "bins", bins, "must be an int >= 1")
    figure, axes = _new_figure(len(gilding), columns)  # imports matplotlib, or says how to
    from matplotlib.ticker import MaxNLocator

    titles = _titles(source, gilding)
    for ax, (name, phi) in zip(axes, gilding.items()):
        everything = phi.detach().flatten().float().cpu().numpy()
        # A diverged run (NaN or inf ϕ) or an empty parameter still gets its panel: the finite
        # values are drawn and the rest are counted in the title, rather than a crash.
        finite = np.isfinite(everything)
        values = everything[finite]
        broken = _non_finite_note(everything[~finite])
        if values.size == 0:
            what = "no pathways" if everything.size == 0 else "no finite ϕ"
            ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes,
                    color=RED if everything.size else INK)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{titles[name]} — {everything.size:,} pathways{broken}", fontsize=9.5)
            continue
        mean = float(values.mean())
        if everything.size <= FEW_PATHWAYS:
            ax.bar(np.arange(everything.size)[finite], values, color=GOLD, edgecolor=INK,
                   linewidth=0.6)
            _reference_lines(ax.axhline, mean)
            ax.set_xticks(np.arange(everything.size))
            ax.set_xlabel("pathway index (unit, channel, group or class)")
            ax.set_ylabel("gilding weight ϕ")
        else:
            low, high = min(values.min(), 1.0), max(values.max(), 1.0)
            pad = 0.05 * max(high - low, 0.1)
            counts, edges = np.histogram(values, bins=bins, range=(low - pad, high + pad))
            ax.stairs(counts, edges, fill=True, color=GOLD, edgecolor=INK, linewidth=0.6)
            _reference_lines(ax.axvline, mean)
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("gilding weight ϕ")
            ax.set_ylabel("pathways")
        ax.set_title(f"{titles[name]} — {everything.size:,} pathways{broken}\n"
                     f"mean {mean:.3g} · std {values.std():.2g} · "
                     f"min {values.min():.3g} · max {values.max():.3g}", fontsize=9.5)
    if title is None:
        when = f", epoch {epoch}" if epoch is not None else ""
        title = f"Sigils — gilding weight ϕ distribution per layer{when}"
    return _finish(figure, title, path)


def plot_phi_evolution(
    source: PhiHistory | Any,
    path: str | os.PathLike | None = None,
    *,
    columns: int = 3,
    title: str | None = None,
):
    """ϕ over training: per layer, the median and quantile bands of ϕ at each recorded step.

    Args:
        source: a :class:`~kintsugi_optim.PhiHistory`, or an object with one as ``.history``
            (a VWPR).
        path (str or PathLike, optional): where to save a PNG (parent folders are created).
        columns (int): panels per row (default: 3).
        title (str, optional): replaces the default title.

    Returns:
        the ``matplotlib.figure.Figure``. Bands pair the history's quantiles from the outside in
        (5–95 %, 25–75 % by default); the outermost band is min–max.
    """
    history = source if isinstance(source, PhiHistory) else getattr(source, "history", None)
    require(isinstance(history, PhiHistory), "source", type(source).__name__,
            "expected a PhiHistory or an object with one as .history (a VWPR with history=True)")
    require(len(history) > 0, "source", history, "has no records yet: call record() first")
    data = history.arrays()
    steps = data["steps"]
    quantiles = history.quantiles
    pairs = list(zip(quantiles[: len(quantiles) // 2], reversed(quantiles)))
    marker = "o" if len(steps) == 1 else None
    figure, axes = _new_figure(len(data["layers"]), columns)
    titles = _titles(source, data["layers"])
    for ax, (name, stats) in zip(axes, data["layers"].items()):
        ax.fill_between(steps, stats["min"], stats["max"], color=GOLD, alpha=0.12, linewidth=0,
                        label="min–max over pathways")
        for k, (low, high) in enumerate(pairs):
            ax.fill_between(steps, stats[quantile_name(low)], stats[quantile_name(high)],
                            color=GOLD, alpha=0.3 + 0.4 * (k + 1) / len(pairs), linewidth=0,
                            label=f"{100 * low:g}–{100 * high:g} % of pathways")
        centre = "q50" if 0.5 in quantiles else "mean"
        ax.plot(steps, stats[centre], color=INK, linewidth=1.5, marker=marker,
                label="median ϕ" if centre == "q50" else "mean ϕ")
        _reference_lines(ax.axhline)
        low, high = ax.get_ylim()
        if high - low < 0.1:  # ϕ pinned (e.g. two logits that always fracture alike): show it
            middle = (low + high) / 2  # flat, not rounding noise blown up to fill the panel
            ax.set_ylim(middle - 0.05, middle + 0.05)
        ax.ticklabel_format(axis="y", useOffset=False)
        pathways = int(stats["histogram"].sum(1).max())  # every pathway falls in some bin
        ax.set_title(f"{titles[name]} — {pathways:,} pathways", fontsize=10)
        ax.set_xlabel("training step (recorded)")
        ax.set_ylabel("gilding weight ϕ")
    title = title or "ϕ evolution — spread of the gilding weights per layer over training"
    return _finish(figure, title, path)

"""PhiHistory: bounded summaries of gilding weights ϕ over training (docs/maths.md §3.3).

A run of a million steps and one of a hundred take the same memory: each record stores a few
numbers and a fixed-bin histogram per layer, and when the table is full every second record is
dropped and the stride between kept records doubles. The history always spans the whole run,
evenly spaced, from its first record to (within one stride) its latest.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kintsugi_optim._validation import require

__all__ = ["PhiHistory", "flat_gilding", "quantile_name"]


def quantile_name(q: float) -> str:
    """Key of quantile ``q`` in a history's statistics: 0.05 → "q5", 0.5 → "q50"."""
    return f"q{100 * q:g}"


def flat_gilding(source: Any) -> dict[str, Tensor]:
    """Every ϕ of ``source`` as ``{name: tensor}``: :func:`kintsugi_optim.gilding`.

    ``source`` is anything with a ``gilding()`` method (:class:`~kintsugi_optim.VWPR`,
    :class:`~kintsugi_optim.KintsugiOptimizer`, :class:`~kintsugi_optim.GilderOptimizer`,
    :class:`~kintsugi_optim.GildedLoss`), a framework's wrapper around one (``.optimizer``) or a
    mapping of tensors. Nested mappings (the optimizers' ``{group: {param: ϕ}}``) are flattened
    to ``"group/param"``, dropping the group key when there is a single group.
    """
    from kintsugi_optim.integrations import gilding

    return gilding(source)


class PhiHistory:
    """Per layer and recorded step: mean, std, min, max, quantiles and a histogram of ϕ.

    Args:
        max_records (int): rows kept, ≥ 2 (default: 256). Memory is
            ``max_records × layers × (stats + bins)`` 8-byte numbers whatever the run length
            (about 180 kB per layer with the defaults).
        quantiles (sequence of float): in [0, 1] (default: 5, 25, 50, 75 and 95 %), stored as
            ``"q5"``, ``"q25"``, ... (``"q50"`` is the median).
        bin_edges (sequence of float): increasing histogram edges, ≥ 2 (default: 0 to 4 in steps
            of 0.05). Values outside them are counted in the outermost bins, so each row sums to
            the layer's number of pathways (min and max show how far out they lie).

    ``record(source, step=None)`` accepts whatever :func:`flat_gilding` accepts; it copies ϕ to
    the host (one transfer per device) and summarizes it with numpy. A layer missing
    from some records has NaN statistics and empty histograms there. Export with
    :meth:`arrays` (numpy) or :meth:`to_dict` (plain lists, JSON-ready).
    """

    def __init__(
        self,
        max_records: int = 256,
        *,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        bin_edges: Sequence[float] | None = None,
    ) -> None:
        require(isinstance(max_records, int) and not isinstance(max_records, bool)
                and max_records >= 2, "max_records", max_records, "must be an int >= 2")
        quantiles = tuple(float(q) for q in quantiles)
        require(all(0 <= q <= 1 for q in quantiles), "quantiles", quantiles, "must lie in [0, 1]")
        edges = np.linspace(0.0, 4.0, 81) if bin_edges is None else np.asarray(bin_edges, float)
        require(edges.ndim == 1 and edges.size >= 2 and bool(np.all(np.diff(edges) > 0)),
                "bin_edges", bin_edges, "must be an increasing 1-d sequence of >= 2 edges")
        self.max_records = max_records
        self.quantiles = tuple(sorted(quantiles))
        self.bin_edges = edges
        self.stat_names = ("mean", "std", "min", "max") + tuple(map(quantile_name, self.quantiles))
        self.stride = 1  # record() calls between kept rows; doubles at each thinning
        self._calls = 0
        self._rows = 0
        self._steps = np.zeros(max_records, dtype=np.int64)
        self._stats: dict[str, np.ndarray] = {}  # layer -> [max_records, len(stat_names)]
        self._hists: dict[str, np.ndarray] = {}  # layer -> [max_records, bins]

    def __len__(self) -> int:
        return self._rows

    @property
    def layers(self) -> list[str]:
        return list(self._stats)

    @property
    def steps(self) -> np.ndarray:
        """The step of each kept record, shape ``[len(self)]``."""
        return self._steps[: self._rows].copy()

    def record(self, source: Any, step: int | None = None) -> None:
        """Summarize every ϕ of ``source`` as one record. ``step`` defaults to the number of
        earlier ``record`` calls. Calls between kept rows (see ``stride``) are skipped cheaply."""
        call = self._calls
        self._calls += 1
        if call % self.stride:
            return
        if self._rows == self.max_records:
            self._thin()
            if call % self.stride:
                return
        row = self._rows
        self._rows += 1
        self._steps[row] = call if step is None else int(step)
        for name in self._stats:  # stays so for layers absent from this record
            self._stats[name][row], self._hists[name][row] = np.nan, 0
        gilding = {name: phi for name, phi in flat_gilding(source).items() if phi.numel()}
        for device in {phi.device for phi in gilding.values()}:
            names = [name for name, phi in gilding.items() if phi.device == device]
            stats, hists = self._summarize([gilding[name] for name in names])
            for name, layer_stats, layer_hist in zip(names, stats, hists):
                if name not in self._stats:
                    self._stats[name] = np.full((self.max_records, len(self.stat_names)), np.nan)
                    self._hists[name] = np.zeros((self.max_records, len(self.bin_edges) - 1),
                                                 np.int64)
                self._stats[name][row], self._hists[name][row] = layer_stats, layer_hist

    def _summarize(self, phis: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """Statistics ``[L, stats]`` and histograms ``[L, bins]`` of L non-empty ϕ on one device.

        One transfer to the host per device and record, then a fixed number of numpy calls
        whatever L: per-layer tensor ops would cost a kernel launch each, and a GPU sync per layer.
        """
        sizes = np.array([phi.numel() for phi in phis])
        x = torch.cat([phi.detach().flatten() for phi in phis]).to(torch.float64).cpu().numpy()
        layer = np.repeat(np.arange(len(phis)), sizes)
        mean = np.bincount(layer, weights=x) / sizes
        std = np.sqrt(np.bincount(layer, weights=(x - mean[layer]) ** 2) / sizes)
        # Sorted by layer, then by value: each layer's values sorted in its own slice. Min, max
        # and the quantiles (linear interpolation, as torch.quantile) are read off it.
        ordered = x[np.lexsort((x, layer))]
        first = np.cumsum(sizes) - sizes
        pos = (sizes - 1)[:, None] * np.array(self.quantiles)
        lo, hi = first[:, None] + np.floor(pos).astype(int), first[:, None] + np.ceil(pos).astype(int)
        quantiles = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - np.floor(pos))
        stats = np.column_stack([mean, std, ordered[first], ordered[first + sizes - 1], quantiles])
        bins = len(self.bin_edges) - 1
        bucket = np.searchsorted(self.bin_edges[1:-1], x, side="right")
        counts = np.bincount(layer * bins + bucket, minlength=len(phis) * bins)
        return stats, counts.reshape(len(phis), bins)

    def _thin(self) -> None:
        """Keep every second row (the first included) and double the stride."""
        kept = (self._rows + 1) // 2
        for table in (self._steps, *self._stats.values(), *self._hists.values()):
            table[:kept] = table[: self._rows : 2].copy()
        self._rows = kept
        self.stride *= 2

    # -- export ------------------------------------------------------------------------------

    def arrays(self) -> dict[str, Any]:
        """``{"steps": [R], "bin_edges": [bins + 1], "stride": int, "layers": {layer: {stat: [R],
        "histogram": [R, bins]}}}`` as numpy arrays (copies), R = ``len(self)``; ``stride`` is
        the number of record() calls between consecutive kept records."""
        rows = self._rows
        layers = {}
        for name, stats in self._stats.items():
            layers[name] = {stat: stats[:rows, k].copy() for k, stat in enumerate(self.stat_names)}
            layers[name]["histogram"] = self._hists[name][:rows].copy()
        return {"steps": self.steps, "bin_edges": self.bin_edges.copy(), "layers": layers,
                "stride": self.stride}

    def to_dict(self) -> dict[str, Any]:
        """:meth:`arrays` as plain Python lists and numbers (NaN where a layer was absent)."""

        def plain(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value.tolist() if isinstance(value, np.ndarray) else value

        return plain(self.arrays())

    def __repr__(self) -> str:
        return (f"PhiHistory({len(self)} records of {len(self._stats)} layers, "
                f"stride {self.stride}, max_records={self.max_records})")

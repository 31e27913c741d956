"""kintsugi_optim: Kintsugi Optimization (Value-Weighted Pathway Reinforcement) for PyTorch.

Every pathway of a network (a weight, a neuron, a tensor, an activation channel, a class or group
of samples) carries a positive gilding weight ϕ that rises with that pathway's error (its
fracture signal) and scales the ordinary descent step.

* :class:`KintsugiOptimizer` (alias ``Sculptor``): SGD/Adam/AdamW with ϕ in the optimizer state.
* :class:`GilderOptimizer` (alias ``Gilder``): gradient ascent on explicit ϕ tensors.
* :class:`VWPR` (alias ``EnhancedVWPRWrapper``): ϕ per output feature/channel of a model's layers.
* :class:`GildedLoss` and :func:`group_dro`: ϕ per class, group or sample of the loss.
* :func:`sample_gilding`: ϕ per training example, without labels (re-fire by default).
* :class:`PhiHistory` and :mod:`kintsugi_optim.sigils`: ϕ over training, and pictures of it.
* :mod:`kintsugi_optim.functional`: the maths (fracture, gild, sculpt) as plain functions.
"""

from kintsugi_optim.gilder import Gilder, GilderOptimizer
from kintsugi_optim.sculptor import KintsugiOptimizer, Sculptor
from kintsugi_optim.history import PhiHistory
from kintsugi_optim.loss import GildedLoss, group_dro
from kintsugi_optim.vwpr import VWPR, EnhancedVWPRWrapper
from kintsugi_optim import sigils
from kintsugi_optim.sample import (IndexedDataset, SampleGilder, SampleGildedLoss, sample_gilding,
                                   with_indices)

__version__ = "0.1.0"

__all__ = [
    "EnhancedVWPRWrapper",
    "Gilder",
    "GildedLoss",
    "GilderOptimizer",
    "KintsugiOptimizer",
    "PhiHistory",
    "Sculptor",
    "VWPR",
    "__version__",
    "group_dro",
    "sigils",
    "IndexedDataset",
    "SampleGilder",
    "SampleGildedLoss",
    "sample_gilding",
    "with_indices",
]

"""kintsugi_optim: Kintsugi Optimization (Value-Weighted Pathway Reinforcement) for PyTorch.

Every pathway of a network (a weight, a neuron, a tensor, an activation channel, a class or group
of samples) carries a positive gilding weight ϕ that rises with that pathway's error (its
fracture signal) and scales the ordinary descent step.

* :class:`KintsugiOptimizer` (alias ``Sculptor``): SGD/Adam/AdamW with ϕ in the optimizer state.
* :class:`GilderOptimizer` (alias ``Gilder``): gradient ascent on explicit ϕ tensors.
* :mod:`kintsugi_optim.functional`: the maths (fracture, gild, sculpt) as plain functions.
"""

from kintsugi_optim.gilder import Gilder, GilderOptimizer
from kintsugi_optim.sculptor import KintsugiOptimizer, Sculptor

__version__ = "0.1.0"

__all__ = [
    "Gilder",
    "GilderOptimizer",
    "KintsugiOptimizer",
    "Sculptor",
    "__version__",
]

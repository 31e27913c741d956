"""Per-group gilding: every Kintsugi hyperparameter may differ per param group, as lr does.

    python examples/per_group_gilding.py
"""

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import KintsugiOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
x, y = torch.randn(512, 20), torch.randint(0, 3, (512,))

optimizer = KintsugiOptimizer(
    [
        # the encoder: ϕ per weight, gilded fast, damped near 1/γ = 2 instead of the default cap
        {"params": model[0].named_parameters(), "name": "encoder", "pathway": "element",
         "beta": 0.1, "gamma": 0.5, "phi_max": None},
        # the hidden layer: the defaults, one ϕ per neuron (row) at a slow gilding rate
        {"params": model[2].named_parameters(), "name": "hidden"},
        # the head: plain AdamW (β = 0 turns gilding off)
        {"params": model[4].named_parameters(), "name": "head", "base": "adamw", "beta": 0.0},
    ],
    lr=3e-3,
)

for step in range(200):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

for group, phis in optimizer.gilding().items():
    for name, phi in phis.items():
        print(f"{group:>7} {name:<6} ϕ shape {tuple(phi.shape)}: "
              f"min {phi.min():.3f}, max {phi.max():.3f}")

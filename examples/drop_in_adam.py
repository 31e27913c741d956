"""Replace torch.optim.Adam with the Sculptor in an existing training loop: one line changes.

    python examples/drop_in_adam.py
"""

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import KintsugiOptimizer

torch.manual_seed(0)
x = torch.randn(1024, 20)
y = (x[:, 0] * x[:, 1] > 0).long()  # an XOR-like rule
model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))

# optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
optimizer = KintsugiOptimizer(model.parameters(), lr=3e-3)  # base="adam", pathway="row"

for step in range(300):
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()  # the θ step scaled by ϕ, and ϕ gilded by the fracture |g|

accuracy = (model(x).argmax(1) == y).float().mean().item()
phi = optimizer.gilding()[0][0]  # group 0, parameter 0: the first layer's weight
print(f"loss {loss.item():.3f}, train accuracy {accuracy:.3f}")
print(f"ϕ of the first weight: mean {phi.mean():.3f}, min {phi.min():.3f}, max {phi.max():.3f}")

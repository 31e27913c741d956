"""Group DRO as a Kintsugi setting: ϕ over groups of samples, gilded multiplicatively.

    python examples/group_dro.py

`group_dro(G, step_size)` returns GildedLoss(G, "mean") and a GilderOptimizer with
beta = step_size·G, ascent="multiplicative", phi_norm="mean": ϕ/G is Group DRO's adversarial
distribution q over groups (q ← q·exp(η·l̄_g), then q ← q/Σq).
"""

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import group_dro

torch.manual_seed(0)
n, groups_count = 2000, 4
y = torch.randint(0, 2, (n,))
attribute = torch.where(torch.rand(n) < 0.9, y, 1 - y)  # spurious attribute, 90% agreement
x = torch.randn(n, 10)
x[:, 0] += 2 * y - 1  # core feature (noisy)
x[:, 1] = 2 * attribute - 1 + 0.1 * torch.randn(n)  # spurious feature (clean)
groups = 2 * y + attribute

model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
criterion, gilder = group_dro(groups_count, step_size=0.1)

for step in range(300):
    optimizer.zero_grad()
    gilder.zero_grad()
    loss = criterion(F.cross_entropy(model(x), y, reduction="none"), groups)
    loss.backward()
    optimizer.step()
    gilder.step()

q = criterion.phi.detach() / groups_count
correct = model(x).argmax(1) == y
for g in range(groups_count):
    print(f"group y={g // 2}, a={g % 2}: {int((groups == g).sum()):4d} samples, "
          f"q = {q[g]:.3f}, train accuracy {correct[groups == g].float().mean():.3f}")

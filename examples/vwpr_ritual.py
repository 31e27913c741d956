"""The source's VWPR usage ritual, verbatim: ϕ on every activation channel of a model.

    python examples/vwpr_ritual.py

VWPR gates each Linear/Conv output channel with a gilding weight ϕ (a buffer): in backward the
gradient leaving channel i is scaled by ϕ_i, and the channel's fracture mean |∂L/∂a_i| lands in
ϕ_i.grad for the Gilder. With SGD (as here) ϕ acts in full; under Adam a steady ϕ mostly
cancels in the layer's own step (Adam normalises each weight's gradient).
"""

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import EnhancedVWPRWrapper, GilderOptimizer

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                      nn.Linear(8 * 8 * 8, 10))
images, labels = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))

vwpr = EnhancedVWPRWrapper(model)
optimizer_theta = torch.optim.SGD(vwpr.theta_parameters(), lr=0.05, momentum=0.9)
optimizer_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.05, fracture="relative",
                                phi_norm="mean")

for epoch in range(20):
    batch = images
    output = vwpr(batch)
    base_loss = F.cross_entropy(output, labels)
    l_map, phi_vals = vwpr.apply_vwpr_step(base_loss, optimizer_theta, optimizer_phi)

for layer, phi in phi_vals.items():
    print(f"layer {layer}: {phi.numel()} pathways, ϕ in [{phi.min():.3f}, {phi.max():.3f}], "
          f"fracture mean {l_map[layer].mean():.2e}")
try:
    vwpr.visualize_phi_distribution(epoch, path="vwpr-sigils.png")  # needs the viz extra
    print("wrote vwpr-sigils.png")
except ImportError as error:
    print(error)

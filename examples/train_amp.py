"""Mixed precision with Kintsugi: autocast + torch.amp.GradScaler, both streams.

    python examples/train_amp.py

The model's activation pathways are gated by VWPR (ϕ in buffers, gilded by a GilderOptimizer);
its weights are trained by the Sculptor (KintsugiOptimizer), whose own element ϕ sit in its
state. One GradScaler serves both optimizers: it unscales θ's gradients for clipping, skips
any step whose gradients overflowed, and hands the Gilder the scale so VWPR's fracture (taken
from scaled gradients) is unscaled before gilding. float16 on CUDA when there is one, else on
the CPU (GradScaler works there too).
"""

import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import GilderOptimizer, KintsugiOptimizer, VWPR


def main(steps: int = 60) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(512, 20, device=device)
    y = (x[:, :5].sum(1) > 0).long()  # a simple rule to learn

    vwpr = VWPR(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)).to(device),
                history=False)  # build the optimizers after moving the model
    opt_theta = KintsugiOptimizer(vwpr.theta_parameters(), lr=3e-3, beta=0.01)
    opt_phi = GilderOptimizer(vwpr.phi_parameters(), beta=0.01, fracture="relative")
    scaler = torch.amp.GradScaler(device)

    for step in range(steps):
        opt_theta.zero_grad()
        opt_phi.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            loss = F.cross_entropy(vwpr(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt_theta)  # clip the true gradients
        nn.utils.clip_grad_norm_(vwpr.theta_parameters(), max_norm=1.0)
        scaler.step(opt_theta)  # skipped if any gradient is inf/nan
        scaler.step(opt_phi)
        scaler.update()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}  scale {scaler.get_scale():.0f}")

    accuracy = (vwpr(x).argmax(1) == y).float().mean().item()
    print(f"accuracy {accuracy:.3f}")
    for layer, phi in vwpr.phi().items():
        print(f"VWPR ϕ[{layer}]  min {phi.min():.3f}  max {phi.max():.3f}  ({phi.dtype})")


if __name__ == "__main__":
    main()

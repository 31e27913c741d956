"""Lightning, manual optimization: the Sculptor on θ and a Gilder on VWPR's ϕ, in one module.

    pip install lightning
    python examples/lightning_manual.py

Only the Sculptor is returned from configure_optimizers: Lightning counts every configured
optimizer's step in global_step, so a configured Gilder would make max_steps stop after half
the θ steps. The Gilder steps by hand after θ, and ϕ (VWPR buffers) is saved with the module's
checkpoint. In automatic optimization, kintsugi_optim.integrations.lightning.GilderCallback does
the same. See docs/frameworks.md.
"""

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kintsugi_optim import VWPR, GilderOptimizer, KintsugiOptimizer, gilding


class GildedClassifier(LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.vwpr = VWPR(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)))
        # Not an attribute Lightning manages: a plain optimizer over ϕ (the VWPR buffers).
        self.gilder = GilderOptimizer(self.vwpr.phi_parameters(), beta=0.05, fracture="relative",
                                      phi_norm="mean")

    def training_step(self, batch, batch_idx):
        x, y = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.gilder.zero_grad()
        loss = F.cross_entropy(self.vwpr(x), y)
        self.manual_backward(loss)
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        optimizer.step()  # counted in global_step
        self.gilder.step()  # not counted
        self.vwpr.record(self.global_step)
        self.log("train_loss", loss)

    def configure_optimizers(self):
        return KintsugiOptimizer(self.vwpr.theta_parameters(), lr=0.05, base="sgd", momentum=0.9)


def main():
    seed_everything(0)
    x = torch.randn(512, 20)
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = GildedClassifier()
    trainer = Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    trainer.fit(model, loader)
    assert trainer.global_step == 20, trainer.global_step  # θ steps only
    print(f"global_step {trainer.global_step} (= θ steps), "
          f"loss {trainer.callback_metrics['train_loss']:.3f}")
    for layer, phi in gilding(model.vwpr).items():
        print(f"VWPR ϕ of layer {layer}: {phi.numel()} channels in [{phi.min():.3f}, {phi.max():.3f}]")
    print(f"history: {model.vwpr.history}")


if __name__ == "__main__":
    main()

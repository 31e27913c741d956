"""The Sculptor in Lightning, automatic optimization: an ordinary optimizer, ϕ to TensorBoard.

    pip install lightning tensorboard
    python examples/lightning_sculptor.py

configure_optimizers returns the Sculptor and a scheduler like any torch optimizer; Lightning's
gradient clipping, precision and checkpoints work unchanged. Every 10 steps ϕ goes to
TensorBoard (histograms and mean/min/max per layer, named after the parameters). Pitfalls
(clipping with fused=True, exact resume) are in docs/frameworks.md.
"""

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kintsugi_optim import KintsugiOptimizer, gilding
from kintsugi_optim.integrations.tensorboard import log_gilding


class Classifier(LightningModule):
    def __init__(self, lr: float = 3e-3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        if self.global_step % 10 == 0 and self.global_step > 0:
            # ϕ is created at the Sculptor's first step; named after self.named_parameters().
            log_gilding(self.logger.experiment, self.optimizers(), self.global_step, model=self)
        return loss

    def configure_optimizers(self):
        optimizer = KintsugiOptimizer(self.parameters(), lr=self.lr, base="adamw", beta=0.02)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=30)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def main():
    seed_everything(0)
    x = torch.randn(512, 20)
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    model = Classifier()
    trainer = Trainer(max_steps=30, accelerator="cpu", devices=1, precision="bf16-mixed",
                      gradient_clip_val=1.0, logger=TensorBoardLogger("lightning-logs"),
                      enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=10)
    trainer.fit(model, loader)
    phis = gilding(trainer.optimizers[0], model=model)
    print(f"global_step {trainer.global_step}, loss {trainer.callback_metrics['train_loss']:.3f}")
    for name, phi in phis.items():
        print(f"ϕ of {name}: mean {phi.mean():.3f}, min {phi.min():.3f}, max {phi.max():.3f}")
    print(f"TensorBoard logs in {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()

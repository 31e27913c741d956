"""The Sculptor with Hugging Face accelerate: prepare, backward, clip, save and load state.

    pip install accelerate
    python examples/accelerate_sculptor.py

accelerator.prepare wraps the Sculptor in an AcceleratedOptimizer; kintsugi_optim.gilding reads
ϕ through it (and through any wrapper with the optimizer as .optimizer). save_state/load_state
keep ϕ, which lives in the optimizer's state: the resumed run continues exactly.
"""

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from kintsugi_optim import KintsugiOptimizer, gilding


def build(seed=0):
    set_seed(seed)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = KintsugiOptimizer(model.parameters(), lr=3e-3, base="adamw", beta=0.02,
                                  pathway="row")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    x = torch.randn(512, 20, generator=torch.Generator().manual_seed(0))  # the same data always
    y = (x[:, 0] * x[:, 1] > 0).long()
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=False)
    return accelerator, *accelerator.prepare(model, optimizer, loader, scheduler)


def train(accelerator, model, optimizer, loader, scheduler, epochs):
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
    return loss


def main():
    accelerator, model, optimizer, loader, scheduler = build()
    loss = train(accelerator, model, optimizer, loader, scheduler, epochs=2)
    accelerator.save_state("accelerate-state")
    print(f"loss {loss.item():.3f}; optimizer is a {type(optimizer).__name__}")
    for name, phi in gilding(optimizer, model=model).items():
        print(f"ϕ of {name}: {phi.numel()} rows in [{phi.min():.3f}, {phi.max():.3f}]")
    train(accelerator, model, optimizer, loader, scheduler, epochs=1)
    expected = [p.detach().clone() for p in model.parameters()]

    accelerator, model, optimizer, loader, scheduler = build(seed=1)  # a fresh start...
    accelerator.load_state("accelerate-state")  # ...resumed from the saved state
    train(accelerator, model, optimizer, loader, scheduler, epochs=1)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), expected))
    print("resumed from accelerate-state: the same parameters as the uninterrupted run")


if __name__ == "__main__":
    main()

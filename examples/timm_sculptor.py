"""Kintsugi in timm's optimizer factory: create_optimizer_v2(model, "kintsugi", ...).

    pip install timm   # and a torchvision built for your torch: see docs/frameworks.md
    python examples/timm_sculptor.py

register_timm() adds "kintsugi" (over AdamW), "kintsugiadamw", "kintsugiadam", "kintsugisgd"
and "kintsugimomentum" to timm's registry (names without "_": timm reads "a_b" as modifier a
of optimizer b). timm's own options (weight decay skipped on 1-d parameters, layer decay,
lookahead_ prefix) and every Sculptor option (beta=..., pathway=...) pass through; so does
timm's train.py: --opt kintsugi --opt-kwargs beta=0.02, once register_timm() has run.
"""

import timm
import timm.optim
import timm.scheduler
import torch
from torch.nn import functional as F

from kintsugi_optim import KintsugiOptimizer, gilding
from kintsugi_optim.integrations.timm import register_timm


def main():
    torch.manual_seed(0)
    print("registered:", register_timm())
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)  # built, not downloaded
    optimizer = timm.optim.create_optimizer_v2(model, "kintsugi", lr=1e-3, weight_decay=0.05,
                                               beta=0.02, pathway="row")
    assert isinstance(optimizer, KintsugiOptimizer) and optimizer.defaults["base"] == "adamw"
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, "cosine", num_epochs=2,
                                                      warmup_epochs=0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 3, (8,))
    for epoch in range(2):
        for _ in range(3):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        scheduler.step(epoch + 1)
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    phis = gilding(optimizer, model=model)
    print(f"loss {loss.item():.3f}; weight decay per group {decays}; {len(phis)} ϕ tensors")
    name = next(iter(phis))
    print(f"ϕ of {name}: {phis[name].numel()} rows in [{phis[name].min():.3f}, {phis[name].max():.3f}]")


if __name__ == "__main__":
    main()

"""VWPR and a GildedLoss in the Hugging Face Trainer: a tiny GPT-2 classifier, built from a config.

    pip install transformers accelerate
    python examples/hf_trainer_vwpr.py

VWPR gates GPT-2's Conv1D projections and its classifier head (vwpr.gated_layers() lists them,
vwpr.skipped_layers() says why the embeddings are not). The wrapper carries the model's forward
signature and config, so the Trainer keeps the batch columns and finds the labels, and
evaluate() reports eval_loss. Group DRO over the classes is a GildedLoss passed as
compute_loss_func. The Trainer steps one optimizer (θ: the Sculptor); GilderCallback steps each
Gilder after it. VWPRTrainer (a Trainer) saves the wrapped model as from_pretrained reads it,
with ϕ beside it, and restores both on resume; the plain Trainer would save a bare state dict.
"""

import torch
from torch.nn import functional as F
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2ForSequenceClassification, TrainingArguments

from kintsugi_optim import VWPR, GilderOptimizer, KintsugiOptimizer, gilding, group_dro
from kintsugi_optim.integrations.hf import GilderCallback, VWPRTrainer


class Imbalanced(Dataset):
    """Label 1 (a tenth of the sequences) when token 7 appears in the sequence."""

    def __init__(self, n, length=12, vocab=32, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(8, vocab, (n, length), generator=g)
        positive = torch.rand(n, generator=g) < 0.1
        self.ids[positive, torch.randint(0, length, (int(positive.sum()),), generator=g)] = 7
        self.labels = positive.long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def main():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=32, n_positions=12,
                        num_labels=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    vwpr = VWPR(GPT2ForSequenceClassification(config))
    print("gated:", vwpr.gated_layers())
    print("skipped:", vwpr.skipped_layers())

    criterion, class_gilder = group_dro(num_groups=2, step_size=0.05)  # ϕ per class

    def compute_loss(outputs, labels, num_items_in_batch=None):
        return criterion(F.cross_entropy(outputs.logits, labels, reduction="none"), labels)

    phi_gilder = GilderOptimizer(vwpr.phi_parameters(), beta=0.02, fracture="relative",
                                 phi_norm="mean")
    sculptor = KintsugiOptimizer(vwpr.theta_parameters(), lr=3e-3, base="adamw", beta=0.02)
    args = TrainingArguments(output_dir="hf-vwpr", max_steps=12, per_device_train_batch_size=32,
                             logging_steps=4, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True)
    trainer = VWPRTrainer(model=vwpr, args=args, train_dataset=Imbalanced(512),
                         eval_dataset=Imbalanced(64, seed=1), optimizers=(sculptor, None),
                         compute_loss_func=compute_loss,
                         callbacks=[GilderCallback(phi_gilder, class_gilder)])
    assert trainer.label_names == ["labels"]
    trainer.train()
    metrics = trainer.evaluate()
    print(f"eval_loss {metrics['eval_loss']:.3f}")
    print(f"class ϕ (Group DRO weights × 2): {criterion.phi.detach().numpy().round(3)}")
    for layer, phi in list(gilding(vwpr).items())[:3]:
        print(f"VWPR ϕ of {layer}: {phi.numel()} pathways in [{phi.min():.3f}, {phi.max():.3f}]")

    trainer.save_model("hf-vwpr/final")  # = vwpr.save_pretrained: the model, and ϕ beside it
    reloaded = GPT2ForSequenceClassification.from_pretrained("hf-vwpr/final")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                  vwpr.model.state_dict().values()))
    phis = torch.load("hf-vwpr/final/gilding_weights.pt")
    assert all(torch.equal(phis[k], v) for k, v in vwpr.gilding_weights.state_dict().items())
    print("saved with trainer.save_model and reloaded with from_pretrained")


if __name__ == "__main__":
    main()

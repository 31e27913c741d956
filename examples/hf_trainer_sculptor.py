"""The Sculptor in the Hugging Face Trainer: a tiny GPT-2 language model, built from a config.

    pip install transformers accelerate
    python examples/hf_trainer_sculptor.py

The Trainer takes the Sculptor like any torch optimizer (optimizer_cls_and_kwargs, or
optimizers=(optimizer, scheduler)); its scheduler, clipping, accumulation and checkpoints work
unchanged, and ϕ is saved in the optimizer's state (optimizer.pt of each checkpoint).
"""

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from kintsugi_optim import KintsugiOptimizer, gilding


class Patterns(Dataset):
    """Token sequences that repeat a short random pattern: learnable, generated in-process."""

    def __init__(self, n, length=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, vocab, (n, 4), generator=g)
        self.ids = starts.repeat(1, length // 4)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.ids[i]}


def main():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(output_dir="hf-sculptor", max_steps=12, per_device_train_batch_size=16,
                             gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=1e-2,
                             lr_scheduler_type="cosine", warmup_steps=2, logging_steps=4,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=Patterns(512),
                      eval_dataset=Patterns(32, seed=1),
                      optimizer_cls_and_kwargs=(KintsugiOptimizer, {"base": "adamw", "beta": 0.02}))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    print(f"eval_loss {before:.3f} -> {after:.3f}")
    assert after < before
    # Through the Trainer's AcceleratedOptimizer wrapper, named after the model's parameters.
    phis = gilding(trainer.optimizer, model=model)
    name = "transformer.h.0.attn.c_attn.weight"
    print(f"{len(phis)} ϕ tensors; {name}: mean {phis[name].mean():.3f}, max {phis[name].max():.3f}")
    trainer.save_model("hf-sculptor/final")  # a PreTrainedModel: the usual config + weights
    reloaded = GPT2LMHeadModel.from_pretrained("hf-sculptor/final")
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(),
                                                  model.state_dict().values()))
    print("saved and reloaded with from_pretrained")


if __name__ == "__main__":
    main()

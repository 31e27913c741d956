"""Kintsugi inside Lightning, the Hugging Face Trainer, accelerate, timm and TensorBoard.

The examples run as scripts (tiny models built from configs, no downloads, a few steps) and
check their own claims (eval_loss present, from_pretrained round trip, bitwise resume,
global_step = θ steps). Each test skips when its framework is not installed; the ``test`` extra
installs all of them but timm, whose tests CI runs in a venv of their own (``timm`` extra; see
docs/frameworks.md and .ci/run).
"""

import functools
import importlib.util
import os
import pathlib
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from kintsugi_optim import (VWPR, GildedLoss, GilderOptimizer, KintsugiOptimizer, gilding,
                            group_dro)

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"

# Lightning 2.6's own CombinedLoader warns under torch 2.13 at every fit, with or without
# Kintsugi (docs/frameworks.md, "A warning that is not ours").
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.* is deprecated")


def needs(*modules):
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"needs {', '.join(missing)}")


def run_example(script, cwd, prelude=None):
    """Run examples/<script> as `python <script>` does, after the code ``prelude`` if given."""
    command = [sys.executable, str(EXAMPLES / script)]
    if prelude is not None:
        command[1:] = ["-c", f"{prelude}import runpy; runpy.run_path({command[1]!r}, "
                             "run_name='__main__')"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


_TORCHVISION_STAND_INS = []


def declare_missing_torchvision_ops():
    """Let timm import beside a torchvision whose compiled ops cannot load.

    timm imports torchvision, and uses only its Python (transforms, FrozenBatchNorm2d). The
    package index serves only CUDA builds of torchvision, whose ops library needs CUDA torch.
    Beside a CPU torch it fails to load, which torchvision tolerates, except that its Python
    registers fake kernels for two ops, nms and qnms, without checking: "operator
    torchvision::nms does not exist". Declaring those two schemas first lets it import; calling
    them would still fail. Where the ops library loads (a torchvision built for this torch),
    nothing is declared.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or _TORCHVISION_STAND_INS or hasattr(torch.ops.torchvision, "nms"):
        return
    library = next(pathlib.Path(spec.origin).parent.glob("_C*.so"), None)
    try:
        if library is not None:
            torch.ops.load_library(str(library))
            return
    except OSError:  # "libtorch_cuda.so: cannot open shared object file"
        pass
    stand_in = torch.library.Library("torchvision", "DEF")  # kept alive: it owns the schemas
    for op in ("nms", "qnms"):
        stand_in.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_STAND_INS.append(stand_in)


# Run first in a subprocess that imports timm.
TIMM_PRELUDE = (f"import sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
                "import test_frameworks; test_frameworks.declare_missing_torchvision_ops(); ")


@functools.cache
def timm_importable():
    """timm imports torchvision, which must at least import (see above)."""
    if importlib.util.find_spec("timm") is None:
        return False, "needs timm (the 'timm' extra; CI runs it in a venv of its own)"
    probe = subprocess.run([sys.executable, "-c", TIMM_PRELUDE + "import timm.optim"],
                           capture_output=True, text=True, timeout=300)
    last = (probe.stderr.strip().splitlines() or [""])[-1]
    return probe.returncode == 0, f"timm does not import here: {last}"


def require_timm():
    """Skip without an importable timm; fail instead where KINTSUGI_REQUIRE_TIMM is set (CI's
    timm venv), so that a broken install cannot pass as a skip."""
    ok, reason = timm_importable()
    if not ok:
        (pytest.fail if os.environ.get("KINTSUGI_REQUIRE_TIMM") else pytest.skip)(reason)


# -- gilding(obj): every ϕ holder, wrapped or not --------------------------------------------


class Wrapper:
    """What accelerate's AcceleratedOptimizer and Lightning's LightningOptimizer have in common:
    the real optimizer as ``.optimizer``."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


def stepped_sculptor(model, **options):
    sculptor = KintsugiOptimizer(model.parameters(), beta=0.3, **options)
    model(torch.randn(5, 3)).pow(2).sum().backward()
    sculptor.step()
    return sculptor


def test_gilding_unwraps_names_and_collects():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sculptor = stepped_sculptor(model, pathway="row")
    live = [sculptor.state[p]["phi"] for p in model.parameters()]
    by_index = gilding(sculptor)
    assert list(by_index) == ["0", "1", "2", "3"]
    assert all(a is b for a, b in zip(by_index.values(), live))  # live tensors, no copies
    named = gilding(Wrapper(Wrapper(sculptor)), model=model)
    assert list(named) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(a is b for a, b in zip(named.values(), live))
    # A model holding a VWPR and a GildedLoss: each holder's ϕ under its module path.
    holder = nn.Module()
    holder.vwpr = VWPR(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    holder.criterion = GildedLoss(3)
    assert list(gilding(holder)) == ["vwpr/0", "vwpr/2", "criterion/groups"]
    assert gilding(holder)["criterion/groups"] is holder.criterion.phi
    gilder = GilderOptimizer(holder.vwpr.phi_parameters())
    assert list(gilding(gilder, model=holder)) == ["vwpr.gilding_weights.0",
                                                   "vwpr.gilding_weights.2"]
    assert list(gilding([sculptor, holder.criterion])) == ["0/0", "0/1", "0/2", "0/3", "1/groups"]
    with pytest.raises(ValueError, match=r"Invalid source: 'Sequential'.*no VWPR or GildedLoss"):
        gilding(model)
    with pytest.raises(ValueError, match=r"Invalid source: 'Wrapper'"):
        gilding(Wrapper(None))
    with pytest.raises(ValueError, match=r"Invalid model: 'str'"):
        gilding(sculptor, model="net")


class RecordingWriter:
    """The SummaryWriter calls log_gilding makes, recorded."""

    def __init__(self):
        self.scalars, self.histograms = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = (value, step)

    def add_histogram(self, tag, values, step):
        self.histograms[tag] = (values, step)


def test_log_gilding_writes_a_histogram_and_mean_min_max_per_layer():
    from kintsugi_optim.integrations.tensorboard import log_gilding

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    sculptor = stepped_sculptor(model)
    writer = RecordingWriter()
    log_gilding(writer, Wrapper(sculptor), 7, model=model)
    assert set(writer.histograms) == {"gilding/0.weight", "gilding/0.bias", "gilding/2.weight",
                                      "gilding/2.bias"}
    phi = sculptor.state[model[0].weight]["phi"]
    values, step = writer.histograms["gilding/0.weight"]
    assert step == 7 and torch.equal(values, phi.flatten())
    assert writer.scalars["gilding/0.weight/mean"] == (phi.mean().item(), 7)
    assert writer.scalars["gilding/0.weight/min"] == (phi.min().item(), 7)
    assert writer.scalars["gilding/0.weight/max"] == (phi.max().item(), 7)
    assert not any(tag.endswith("nonfinite") for tag in writer.scalars)
    broken = RecordingWriter()
    log_gilding(broken, {"a": torch.tensor([1.0, float("nan"), 3.0, float("inf")]),
                         "b": torch.empty(0)}, 1, prefix="phi")
    assert torch.equal(broken.histograms["phi/a"][0], torch.tensor([1.0, 3.0]))
    assert broken.scalars["phi/a/mean"] == (2.0, 1) and broken.scalars["phi/a/nonfinite"] == (2, 1)
    assert not any(tag.startswith("phi/b") for tag in {**broken.scalars, **broken.histograms})


@needs("tensorboard")
def test_tensorboard_logger_writes_events_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kintsugi_optim.integrations.tensorboard import TensorBoardLogger

    vwpr = VWPR(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    with torch.no_grad():
        vwpr.phi()["0"].copy_(torch.tensor([0.5, 1.0, 1.5, 2.0]))
    logger = TensorBoardLogger(tmp_path, vwpr, prefix="vwpr")
    logger.log(3)
    if importlib.util.find_spec("matplotlib") is not None:
        logger.log_sigils(3)
    logger.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"histograms": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["histograms"]) == {"vwpr/0", "vwpr/2"}
    assert [(e.step, e.value) for e in events.Scalars("vwpr/0/mean")] == [(3, 1.25)]
    assert [e.value for e in events.Scalars("vwpr/0/max")] == [2.0]
    assert events.Histograms("vwpr/0")[0].histogram_value.num == 4
    if importlib.util.find_spec("matplotlib") is not None:
        assert tags["images"] == ["vwpr/sigils"]


# -- the examples ----------------------------------------------------------------------------


@needs("lightning", "tensorboard")
def test_lightning_automatic_example(tmp_path):
    out = run_example("lightning_sculptor.py", tmp_path)
    assert "global_step 30" in out and "ϕ of net.0.weight" in out
    assert list(tmp_path.glob("lightning-logs/**/events.out.tfevents.*"))


@needs("lightning")
def test_lightning_manual_example(tmp_path):
    assert "global_step 20 (= θ steps)" in run_example("lightning_manual.py", tmp_path)


@needs("transformers", "accelerate")
def test_hf_trainer_sculptor_example(tmp_path):
    out = run_example("hf_trainer_sculptor.py", tmp_path)
    assert "transformer.h.0.attn.c_attn.weight" in out and "reloaded with from_pretrained" in out


@needs("transformers", "accelerate")
def test_hf_trainer_vwpr_example(tmp_path):
    out = run_example("hf_trainer_vwpr.py", tmp_path)
    assert "'transformer.h.0.attn.c_attn': 96" in out  # GPT-2's Conv1D gated
    assert "'transformer.wte': 'Embedding has no out_features" in out
    assert "eval_loss" in out and "reloaded with from_pretrained" in out


@needs("accelerate")
def test_accelerate_example(tmp_path):
    out = run_example("accelerate_sculptor.py", tmp_path)
    assert "optimizer is a AcceleratedOptimizer" in out and "same parameters" in out


def test_timm_example(tmp_path):
    require_timm()
    out = run_example("timm_sculptor.py", tmp_path, prelude=TIMM_PRELUDE)
    assert "'kintsugi'" in out and "weight decay per group [0.0, 0.05]" in out


# -- framework behaviour the examples do not show ----------------------------------------------


@needs("lightning")
def test_lightning_gilder_callback_counts_theta_steps_and_resumes_phi(tmp_path):
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    from kintsugi_optim.integrations.lightning import GilderCallback

    torch.manual_seed(0)
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    class Module(LightningModule):
        def __init__(self, criterion):
            super().__init__()
            self.net = nn.Linear(6, 3)
            # Kept out of the module (and so out of its checkpoint), as a loss often is.
            object.__setattr__(self, "criterion", criterion)

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            return self.criterion(F.cross_entropy(self.net(inputs), labels, reduction="none"), labels)

        def configure_optimizers(self):
            return KintsugiOptimizer(self.net.parameters(), lr=0.1, base="sgd")

    def fit(max_steps, resume=None, callbacks=()):
        torch.manual_seed(0)
        criterion, gilder = group_dro(3, step_size=0.5)
        module = Module(criterion)
        trainer = Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          accumulate_grad_batches=2, default_root_dir=tmp_path,
                          callbacks=[GilderCallback(gilder), *callbacks],
                          enable_checkpointing=bool(callbacks))
        trainer.fit(module, loader, ckpt_path=resume)
        return trainer, module

    trainer, module = fit(5)
    assert trainer.global_step == 5  # θ steps only, each over two accumulated batches
    phi = module.criterion.phi.detach().clone()
    assert not torch.equal(phi, torch.ones(3)) and torch.isclose(phi.mean(), torch.tensor(1.0))
    # Stopped at step 3 (an epoch end: Lightning resumes a plain DataLoader exactly only there)
    # and resumed: ϕ of the GildedLoss, which is not in the model, comes back too.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    fit(3, callbacks=[checkpoint])
    resumed_trainer, resumed = fit(5, resume=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert resumed_trainer.global_step == 5
    torch.testing.assert_close(resumed.criterion.phi.detach(), phi, rtol=0, atol=0)
    torch.testing.assert_close(resumed.net.weight.detach(), module.net.weight.detach(), rtol=0, atol=0)
    # Under 16-mixed, ϕ.grad is scaled by the GradScaler (65536 at first): the callback steps the
    # Gilder through Lightning's scaler, so ϕ follows the fp32 run up to fp16 rounding.
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    criterion, gilder = group_dro(3, step_size=0.5)
    half = Module(criterion)
    scaler = torch.amp.GradScaler("cpu")  # given explicitly: Lightning picks bf16 on a CPU
    Trainer(max_steps=5, accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
            logger=False,
            enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=2,
            enable_checkpointing=False, callbacks=[GilderCallback(gilder)]).fit(half, loader)
    assert scaler.get_scale() == 65536.0  # no overflow: every step was taken
    torch.testing.assert_close(half.criterion.phi.detach(), phi, rtol=0, atol=2e-3)



class InfGradient(torch.autograd.Function):
    """Identity whose backward returns inf: overflows θ's gradient but not the loss."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("inf"))


@needs("lightning")
def test_lightning_gilder_callback_skips_phi_when_the_scaler_skips_theta():
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.plugins.precision import MixedPrecision

    from kintsugi_optim.integrations.lightning import GilderCallback

    # One batch repeated: a 16-mixed run whose first θ step the scaler skips (θ's gradient
    # overflows, the loss and so a GildedLoss's ϕ.grad do not) must end where a run one step
    # shorter does. Lightning picks bf16 on a CPU, so the scaler is given explicitly.
    x, y = torch.randn(16, 6, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    loader = torch.utils.data.DataLoader([(x, y)] * 8, batch_size=None)

    class Module(LightningModule):
        def __init__(self, criterion, poison):
            super().__init__()
            self.net = nn.Linear(6, 3)
            self.poison = poison
            object.__setattr__(self, "criterion", criterion)

        def training_step(self, batch, batch_idx):
            inputs, labels = batch
            weight = InfGradient.apply(self.net.weight) if self.poison else self.net.weight
            self.poison = False
            logits = F.linear(inputs, weight, self.net.bias)
            return self.criterion(F.cross_entropy(logits, labels, reduction="none"), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def fit(max_steps, poison):
        torch.manual_seed(0)
        criterion, gilder = group_dro(3, step_size=0.5)
        module = Module(criterion, poison)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_model_summary=False, enable_checkpointing=False,
                plugins=[MixedPrecision("16-mixed", "cpu", scaler)],
                callbacks=[GilderCallback(gilder)]).fit(module, loader)
        return module, scaler

    plain, plain_scaler = fit(3, poison=False)
    skipped, skipped_scaler = fit(4, poison=True)
    assert plain_scaler.get_scale() == 2.0**12 and skipped_scaler.get_scale() == 2.0**11
    assert not torch.equal(plain.criterion.phi, torch.ones(3))
    torch.testing.assert_close(skipped.criterion.phi, plain.criterion.phi, rtol=0, atol=0)
    torch.testing.assert_close(skipped.net.weight, plain.net.weight, rtol=0, atol=0)

@needs("transformers", "accelerate")
def test_hf_trainer_keeps_vwpr_batch_columns_and_finds_labels(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    vwpr = VWPR(BertForSequenceClassification(config))
    ids = torch.randint(1, 40, (32, 8))
    rows = [{"input_ids": i, "attention_mask": torch.ones(8, dtype=torch.long),
             "labels": torch.tensor(int(i[0] > 20)), "unused": "dropped"} for i in ids]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no")
    gilder = GilderOptimizer(vwpr.phi_parameters(), beta=0.1, fracture="relative")
    from kintsugi_optim.integrations.hf import GilderCallback

    trainer = Trainer(model=vwpr, args=args, train_dataset=rows, eval_dataset=rows,
                      optimizers=(torch.optim.SGD(vwpr.theta_parameters(), lr=0.1), None),
                      callbacks=[GilderCallback(gilder)])
    assert trainer.label_names == ["labels"]
    trainer.train()  # "The batch received was empty" when VWPR hid the signature
    assert "eval_loss" in trainer.evaluate()
    assert all(phi.grad is None for phi in vwpr.phi_parameters())  # cleared after its step
    assert not all(torch.equal(phi, torch.ones_like(phi)) for phi in vwpr.phi_parameters())
    assert "bert.encoder.layer.0.attention.self.query" in vwpr.gated_layers()



class PoisonableRegressor(nn.Module):
    """A model the Trainer can run (forward names its inputs and returns the loss) whose next
    loss can be made NaN, so that a gradient scaler skips that step."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.poison = False

    def forward(self, x, labels):
        loss = F.mse_loss(self.net(x).squeeze(-1), labels)
        if self.poison:
            self.poison = False
            loss = loss * float("nan")
        return {"loss": loss}


@needs("transformers", "accelerate")
def test_hf_gilder_callback_unscales_phi_and_skips_with_theta_under_a_grad_scaler(tmp_path):
    from transformers import Trainer, TrainingArguments

    from kintsugi_optim.integrations.hf import GilderCallback

    # Every batch is the same (one row holding 8 examples), so a run whose first step the scaler
    # skips must end where a run one step shorter does. accelerate makes no scaler on a CPU (fp16 is for GPUs): the test
    # gives the Trainer's accelerator a CPU GradScaler, which it then uses as on a GPU (loss
    # scaled in accelerator.backward, θ stepped by scaler.step and scaler.update()).
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    rows = [{"x": x, "labels": x.sum(1)}] * 8

    def train(max_steps, scaler=None):
        torch.manual_seed(0)
        model = PoisonableRegressor()
        vwpr = VWPR(model)
        gilder = GilderOptimizer(vwpr.phi_parameters(), beta=0.5)  # fracture="abs": scale-bound
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, max_grad_norm=0,
                                 per_device_train_batch_size=1, report_to=[], use_cpu=True,
                                 disable_tqdm=True, save_strategy="no", lr_scheduler_type="constant")
        trainer = Trainer(model=vwpr, args=args, train_dataset=rows,
                          optimizers=(torch.optim.SGD(vwpr.theta_parameters(), lr=0.1), None),
                          callbacks=[GilderCallback(gilder)])
        if scaler is not None:
            trainer.accelerator.scaler = scaler
            model.poison = True
        trainer.train()
        return trainer, vwpr

    _, plain = train(3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    scaled_trainer, scaled = train(4, scaler)
    assert scaled_trainer.optimizer.scaler is scaler and scaler.get_scale() == 2.0**11  # 1 skip
    assert not all(torch.equal(phi, torch.ones_like(phi)) for phi in plain.phi_parameters())
    for (name, a), b in zip(scaled.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)  # θ and ϕ

def test_timm_registers_names_timm_accepts():
    require_timm()
    declare_missing_torchvision_ops()
    import timm.optim

    from kintsugi_optim.integrations.timm import TIMM_NAMES, register_timm

    assert register_timm() == TIMM_NAMES and all("_" not in name for name in TIMM_NAMES)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    expected = {"kintsugi": ("adamw", None), "kintsugiadam": ("adam", None),
                "kintsugisgd": ("sgd", True), "kintsugimomentum": ("sgd", False)}
    for name, (base, nesterov) in expected.items():
        optimizer = timm.optim.create_optimizer_v2(model, name, lr=0.01, weight_decay=0.05,
                                                   beta=0.03)
        assert isinstance(optimizer, KintsugiOptimizer)
        group = optimizer.param_groups[0]
        assert group["base"] == base and group["beta"] == 0.03 and group["lr"] == 0.01
        if nesterov is not None:
            assert group["nesterov"] is nesterov and group["momentum"] == 0.9
        # timm's recipe: no weight decay on biases and norm weights (1-d), decay on the rest
        assert sorted(len(g["params"]) for g in optimizer.param_groups) == [2, 4]


@needs("transformers", "accelerate")
def test_vwpr_trainer_saves_for_from_pretrained_and_resumes_theta_and_phi(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    from kintsugi_optim.integrations.hf import GilderCallback, VWPRTrainer

    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    ids = torch.randint(1, 40, (48, 8), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "labels": torch.tensor(int(i[0] > 20))} for i in ids]

    def trainer(cls, out, max_steps=4):
        torch.manual_seed(0)
        vwpr = VWPR(BertForSequenceClassification(config))
        gilder = GilderOptimizer(vwpr.phi_parameters(), beta=0.2, fracture="relative")
        args = TrainingArguments(output_dir=str(tmp_path / out), max_steps=max_steps, save_steps=2,
                                 per_device_train_batch_size=8, report_to=[], use_cpu=True,
                                 disable_tqdm=True, seed=0)
        return cls(model=vwpr, args=args, train_dataset=rows, callbacks=[GilderCallback(gilder)],
                   optimizers=(KintsugiOptimizer(vwpr.theta_parameters(), lr=0.05, base="sgd",
                                                 momentum=0.9), None)), vwpr

    whole, vwpr = trainer(VWPRTrainer, "whole")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*from_pretrained cannot read it")
        whole.train()  # its checkpoints hold gilding_weights.pt: no warning
    whole.save_model(str(tmp_path / "final"))
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "final"))
    for (name, a), b in zip(reloaded.state_dict().items(), vwpr.model.state_dict().values()):
        assert torch.equal(a, b), name
    saved_phi = torch.load(tmp_path / "final" / "gilding_weights.pt")
    assert set(saved_phi) == set(vwpr.gilding_weights.state_dict())
    assert not all(torch.equal(p, torch.ones_like(p)) for p in saved_phi.values())

    resumed, resumed_vwpr = trainer(VWPRTrainer, "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    for a, b in zip(resumed_vwpr.state_dict().values(), vwpr.state_dict().values()):
        assert torch.equal(a, b)  # θ and ϕ: bitwise the uninterrupted run

    # The plain Trainer writes a bare state dict without config (what VWPRTrainer fixes), and
    # the GilderCallback says so at its first checkpoint; a VWPRTrainer refuses to resume from
    # it rather than restart ϕ at 1.
    plain, plain_vwpr = trainer(Trainer, "plain", max_steps=4)
    with pytest.warns(UserWarning, match=r"checkpoint-2 holds the VWPR as a bare state dict") as record:
        plain.train()
    assert sum("bare state dict" in str(w.message) for w in record) == 1  # once, not per save
    # What the plain Trainer does get right: its own resume reads the bare state dict back.
    again, again_vwpr = trainer(Trainer, "again", max_steps=4)
    with pytest.warns(UserWarning, match="bare state dict"):
        again.train(resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))
    for a, b in zip(again_vwpr.state_dict().values(), plain_vwpr.state_dict().values()):
        assert torch.equal(a, b)  # θ and ϕ
    assert not (tmp_path / "plain" / "checkpoint-2" / "config.json").exists()
    with pytest.raises(ValueError, match=r"Invalid resume_from_checkpoint: .*no gilding_weights.pt"):
        trainer(VWPRTrainer, "other")[0].train(
            resume_from_checkpoint=str(tmp_path / "plain" / "checkpoint-2"))

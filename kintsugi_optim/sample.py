r"""Sample-level gilding without labels: one gilding weight ϕ_i per training example
(docs/maths.md §2.6, the study behind the defaults in docs/sample-gilding.md).

ϕ_i is the example's memory of its cracks: each time example i is seen, its *fracture* (its
loss, or whether the model got it wrong) is recorded, and examples the model keeps failing
weigh more in the loss. No group or class labels are needed, only each example's index in the
data set (:func:`with_indices` makes any map-style ``Dataset`` yield it).

Two ways to use the memory, both here:

* **re-fire** (two passes, the default): a firing run, a quarter as long as the main run (but at
  least one epoch and at most four), records whether the model got each example wrong at its
  last visit; :meth:`SampleGildedLoss.refire` turns that record into fixed weights; training
  then starts again from a fresh model. This is JTT's idea (Liu et al., 2021) in Kintsugi's
  terms, with the errors read on the fly from the firing run's own forward passes (no extra pass
  over the data), and the up-weight chosen so the cracked examples together weigh as much as
  the uncracked ones ("even") instead of tuned per data set. The firing run trains on the
  generalised cross-entropy (Zhang & Sabuncu, 2018), as Learning from Failure's biased model
  does (Nam et al., 2020): it fits what the model finds easy and leaves the exceptions to the
  easy rule wrong, so they are what the record finds.
* **one pass** (``firing_fraction=None``): ϕ keeps rising during the one run, additively or
  multiplicatively, with damping, a cap and a warm-up.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from kintsugi_optim._validation import require, require_choice, require_nonnegative
from kintsugi_optim.options import ASCENTS
from kintsugi_optim.gilder import GilderOptimizer

__all__ = ["SampleGildedLoss", "SampleGilder", "sample_gilding", "with_indices", "IndexedDataset"]

FRACTURES = ("error", "relative", "loss")
FIRING_LOSSES = ("gce", "mean")
UPWEIGHTS = ("even", "balanced")
ACCUMULATE = ("mean", "last")
REDUCTIONS = ("dataset", "batch")
LN2 = math.log(2.0)
GCE_Q = 0.7  # generalised cross-entropy's q, as Learning from Failure's biased model uses it
MAX_UPWEIGHT = 1e3  # a handful of cracked examples would otherwise take the whole loss


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class SampleGildedLoss(nn.Module):
    r"""The loss of a batch weighted by each example's gilding weight ϕ_i (a buffer ``[N]``).

    ``forward(losses, indices)`` takes per-example losses ``[B]`` (``reduction="none"``) and the
    examples' int64 indices ``[B]`` in ``[0, N)``, and returns

        "dataset" (default):  (1/B)·Σ_i w_i·loss_i,   w_i = ϕ_i / mean(ϕ over the data set)
        "batch":              Σ_i ϕ_i·loss_i / Σ_i ϕ_i

    (ϕ ≡ 1 gives the ordinary mean loss). "dataset" is an unbiased estimate of the weighted risk
    and, under DDP, averaging the ranks' gradients gives the gradient of the global batch.

    In training mode with autograd on, it also records the batch (indices and detached losses)
    for the :class:`SampleGilder`, which updates ϕ at its ``step()``. Under ``torch.no_grad()``
    or ``.eval()`` nothing is recorded. ϕ is a buffer, never an ``nn.Parameter``: a model holding
    this criterion does not hand ϕ to θ's optimizer; ``state_dict()`` saves it (with the phase
    and the visit count, so a run resumes exactly) and ``.to()`` moves it. 4 bytes per example:
    10⁸ examples take 400 MB.

    The fracture l_i of a visit is ``"error"`` (default: 1 when the example's probability
    p_y = exp(−loss) is below 1/2, so for cross-entropy a misclassification in two classes and
    "not confidently right" in more), ``"relative"`` (loss / the batch's mean loss) or
    ``"loss"``.

    **Re-fire** (``firing_fraction`` f in (0, 1), default 0.25): during the firing run the loss
    is the mean generalised cross-entropy (1 − p_y^q)/q, q = 0.7, with p_y = exp(−loss)
    (``firing_loss="gce"``, default; its gradient is p_y^q times the loss's, so examples the
    model finds hard barely pull on it) or the plain mean (``"mean"``; for a loss that is not a
    negative log-likelihood), and ϕ_i − 1 keeps the l_i of example i's last visit before
    ``firing_epochs`` epochs (default 4; ``None``: to the end of the firing run)
    (``accumulate="last"``, default: the firing model's final verdict, after it has learnt the
    easy rule and before it memorises the exceptions) or sums l_i over the visits after the
    first ``warmup`` epochs and before ``firing_epochs``, read as the mean per visit
    (``"mean"``; it also counts examples the model merely learnt late). The firing
    run lasts ``firing_steps(T, B)`` = min(max(f·T, min(E, T)), firing_epochs·E) steps, with
    E = ⌈N / B⌉ steps to an epoch: at least one epoch, so that every example has a verdict
    when the main run is short in epochs, and no longer than the record (a loop that runs
    f·T steps when that is longer gets the same ϕ: the later steps record nothing).
    :meth:`refire` turns the record e_i into ϕ_i = 1 + λ·e_i, with E = Σe,

        "even" (default):  λ = max(balance·(N − E)/E − 1, 0)   the cracked examples together
                           weigh ``balance`` times as much as the uncracked ones (1: as much)
        "balanced":        λ = balance·N/E                      they weigh as much as all N
                                                                examples at weight 1
        a number:          that λ

    (λ capped at 1000), normalised to mean 1, and freezes it. "Even" hands the cracked examples
    half the loss whatever their share ε = E/N; "balanced" hands them (1 + ε)/2, more the more
    examples crack, which is backwards: a large share is a sign that the record holds noise or
    examples not yet learnt rather than a minority. "Even" needs the 0/1 record
    (``fracture="error"``); ``balance=0.5`` halves the cracked examples' weight, for noisy
    labels, whose errors the record cannot tell from a minority's. Then train a fresh model
    for the full run with this criterion: each step costs a gather of ϕ[indices] and a dot
    product.

    **One pass** (``firing_fraction=None``): ϕ is gilded at every step (after ``warmup``
    epochs' worth of examples, default 1): u = β·l·max(0, 1 − γϕ); ϕ ← ϕ + u ("additive") or
    ϕ·exp(u) ("multiplicative"), clamped to [1e-3, phi_max].

    Use :func:`sample_gilding` to build it with its Gilder.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        fracture: str = "error",
        firing_fraction: float | None = 0.25,
        upweight: float | str = "even",
        accumulate: str = "last",
        reduction: str = "dataset",
        warmup: float = 1.0,
        firing_epochs: float | None = 4.0,
        firing_loss: str = "gce",
        balance: float = 1.0,
    ) -> None:
        super().__init__()
        require(_is_count(num_samples) and num_samples >= 1, "num_samples", num_samples,
                "must be an int >= 1")
        require_choice("fracture", fracture, FRACTURES)
        require_choice("firing_loss", firing_loss, FIRING_LOSSES)
        require(firing_fraction is None or (isinstance(firing_fraction, (int, float))
                                            and not isinstance(firing_fraction, bool)
                                            and 0 < firing_fraction < 1),
                "firing_fraction", firing_fraction, "must be None or a number in (0, 1)")
        if isinstance(upweight, str):
            require_choice("upweight", upweight, UPWEIGHTS)
            require(upweight != "even" or fracture == "error" or firing_fraction is None,
                    "upweight", upweight,
                    f"'even' needs the 0/1 record fracture='error' (got fracture={fracture!r}); "
                    "pass upweight='balanced' or a number")
        else:
            require_nonnegative("upweight", upweight)
        require(require_nonnegative("balance", balance) > 0, "balance", balance,
                "must be a finite number > 0")
        require_choice("accumulate", accumulate, ACCUMULATE)
        require_choice("reduction", reduction, REDUCTIONS)
        require_nonnegative("warmup", warmup)
        if firing_epochs is not None:
            require_nonnegative("firing_epochs", firing_epochs)
            require(firing_fraction is None or firing_epochs > warmup, "firing_epochs",
                    firing_epochs,
                    f"must exceed warmup={warmup}: the record covers the epochs between them")
        self.num_samples = num_samples
        self.fracture = fracture
        self.firing_fraction = None if firing_fraction is None else float(firing_fraction)
        self.upweight = upweight
        self.accumulate = accumulate
        self.reduction = reduction
        self.warmup = float(warmup)
        self.firing_epochs = None if firing_epochs is None else float(firing_epochs)
        self.firing_loss = firing_loss
        self.balance = float(balance)
        self.register_buffer("phi", torch.ones(num_samples))
        # Host-side, saved through get_extra_state: reading them never syncs with the device.
        self.visits = 0  # examples seen by the Gilder, all ranks together
        self.recorded = 0  # of which recorded into ϕ (after the warm-up)
        self.fired = False  # refire() has frozen ϕ
        self._pending: list[tuple[Tensor, Tensor]] = []

    @property
    def firing(self) -> bool:
        """True during a re-fire criterion's firing run (ϕ records the cracks)."""
        return self.firing_fraction is not None and not self.fired

    def firing_steps(self, total_steps: int, batch_size: int) -> int:
        """Steps of the firing run for a main run of ``total_steps`` batches of ``batch_size``
        examples (all ranks together under DDP): ``firing_fraction``·T, but at least one
        epoch (at most T), so that the record holds a verdict on every example, and at most
        ``firing_epochs`` epochs (steps after that record nothing, so a loop that runs the
        full fraction gets the same ϕ, only later). 0 for a one-pass criterion."""
        require(_is_count(total_steps) and total_steps >= 0, "total_steps", total_steps,
                "must be an int >= 0")
        require(_is_count(batch_size) and batch_size >= 1, "batch_size", batch_size,
                "must be an int >= 1")
        if self.firing_fraction is None:
            return 0
        epoch = math.ceil(self.num_samples / batch_size)
        steps = max(int(self.firing_fraction * total_steps), min(epoch, total_steps))
        if self.firing_epochs is not None:
            steps = min(steps, math.ceil(self.firing_epochs * self.num_samples / batch_size))
        return steps

    def get_extra_state(self) -> dict[str, Any]:
        return {"visits": self.visits, "recorded": self.recorded, "fired": self.fired}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        require(isinstance(state, dict) and {"visits", "fired"} <= set(state), "state_dict",
                state, "the '_extra_state' entry must hold 'visits' and 'fired'")
        self.visits, self.fired = int(state["visits"]), bool(state["fired"])
        self.recorded = int(state.get("recorded", self.visits))
        self._pending.clear()

    def forward(self, losses: Tensor, indices: Tensor) -> Tensor:
        """Weighted loss of a batch: ``losses`` [B] floating and finite, ``indices`` [B] int64."""
        # After refire(), ϕ frozen at mean 1, a step is a gather and one dot product (one autograd
        # node). On the CPU the gather checks the indices' range itself, and ϕ cannot change
        # before it, so the range check is left to it.
        fast = (self.fired and self.reduction == "dataset" and isinstance(losses, Tensor)
                and losses.dtype == self.phi.dtype and losses.numel() > 0
                and isinstance(indices, Tensor) and indices.is_cpu and self.phi.is_cpu)
        self._check(losses, indices, check_range=not fast)
        if fast:
            try:
                weights = self.phi.index_select(0, indices)
            except IndexError:
                self._check(losses, indices)  # the ValueError naming the indices
                raise
            return torch.dot(losses, weights.mul_(1.0 / losses.numel()))
        if not self.fired and self.training and torch.is_grad_enabled():
            self._pending.append((indices.detach(), losses.detach()))
        if self.firing:
            if self.firing_loss == "gce":  # (1 − p_y^q)/q with p_y = exp(−loss)
                return torch.expm1(losses * -GCE_Q).mean() / -GCE_Q
            return losses.mean()
        phi = self.phi[indices]
        if phi.dtype != losses.dtype:  # weigh and sum in the wider dtype (float32 for 16-bit)
            phi, losses = phi.to(torch.promote_types(losses.dtype, phi.dtype)), losses.to(
                torch.promote_types(losses.dtype, phi.dtype))
        if self.reduction == "batch":
            return (phi * losses).sum() / phi.sum()
        if self.fired:  # refire() normalised ϕ to mean 1
            return (phi * losses).mean()
        # one pass: a read of all N per step (negligible next to a forward pass below ~10⁷)
        return (phi * losses).mean() / self.phi.mean(dtype=torch.float64).to(phi.dtype)

    def refire(self) -> None:
        """End the firing run: ϕ ← 1 + λ·e (e: each example's recorded cracks), normalised to
        mean 1, frozen.

        Afterwards the Gilder leaves ϕ unchanged; re-initialise the model and its optimizer and
        train again with this criterion. Raises ``RuntimeError`` for a one-pass criterion or
        a second call; warns when the firing run saw less than one epoch of examples (those it
        never visited count as uncracked)."""
        if self.firing_fraction is None:
            raise RuntimeError("refire() is for a two-pass criterion (firing_fraction is None)")
        if self.fired:
            raise RuntimeError("refire() was already called: ϕ is frozen")
        self._pending.clear()
        if self.accumulate == "mean" and self.recorded == 0:
            warnings.warn(f"refire(): nothing was recorded: the firing run saw {self.visits} "
                          f"examples, fewer than warmup={self.warmup} epochs of "
                          f"{self.num_samples}; ϕ stays 1 (lengthen the firing run)")
        elif self.visits < self.num_samples:
            warnings.warn(f"refire(): the firing run saw {self.visits} examples, less than one "
                          f"epoch of {self.num_samples}: the examples it never visited count "
                          f"as uncracked (run criterion.firing_steps(T, batch_size) steps)")
        N = self.num_samples
        with torch.no_grad():
            crack = self.phi.double().clamp(max=torch.finfo(self.phi.dtype).max) - 1
            if self.accumulate == "mean":  # sum over visits → mean per visit
                crack /= max(self.recorded, 1) / N
            total = float(crack.sum())
            if total <= 0:
                lam = 0.0
            elif self.upweight == "even":
                lam = max(self.balance * (N - total) / total - 1, 0.0)
            elif self.upweight == "balanced":
                lam = self.balance * N / total
            else:
                lam = float(self.upweight)
            phi = crack.mul_(min(lam, MAX_UPWEIGHT)).add_(1)
            self.phi.copy_(phi.mul_(N / phi.sum()))
        self.fired = True

    def _check(self, losses: Tensor, indices: Tensor, *, check_range: bool = True) -> None:
        if not (isinstance(losses, Tensor) and losses.dim() == 1 and losses.is_floating_point()):
            _invalid("losses", losses, "expected per-example losses, a 1-d floating tensor [B]: "
                     "compute the base loss with reduction='none'")
        if not (isinstance(indices, Tensor) and indices.dtype in (torch.int64, torch.int32)):
            _invalid("indices", indices, "expected an int64 or int32 tensor of example indices")
        if indices.shape != losses.shape:
            _invalid("indices", indices, f"must have the shape of losses, {tuple(losses.shape)}")
        if indices.numel() == 0:
            return
        # One reduction each: the indices' range, and the losses' sum, which is NaN or ±inf when
        # a loss is not finite (or when finite losses overflow it: then each one is checked).
        total = losses.detach().sum()
        if not check_range:
            low, high, total = 0, 0, float(total)
        elif indices.device.type == "cpu":  # reading a CPU scalar costs no sync
            low, high = torch.aminmax(indices)
            low, high, total = int(low), int(high), float(total)
        else:  # one host sync per batch for both: the price of a clear error before ϕ changes
            low, high = torch.aminmax(indices)
            low, high, total = torch.stack([low.double(), high.double(), total.double()]).tolist()
        if low < 0 or high >= self.num_samples:
            bad_index = (indices < 0) | (indices >= self.num_samples)
            bad = indices[bad_index].unique()[:8].tolist()
            require(False, "indices", bad, f"example indices must lie in [0, {self.num_samples})")
        if not math.isfinite(total):
            finite = losses.detach().isfinite()
            if not bool(finite.all()):
                bad = losses.detach()[~finite][:8].tolist()
                require(False, "losses", bad, "must be finite: a non-finite loss would corrupt ϕ")

    def gilding(self) -> dict[str, Tensor]:
        """``{"samples": ϕ}``, the live tensor of shape ``[num_samples]``."""
        return {"samples": self.phi}

    def extra_repr(self) -> str:
        mode = (f"firing_fraction={self.firing_fraction}, firing_epochs={self.firing_epochs}, "
                f"firing_loss={self.firing_loss!r}, upweight={self.upweight!r}, "
                f"balance={self.balance}"
                if self.firing_fraction is not None else f"one pass, warmup={self.warmup}")
        return (f"num_samples={self.num_samples}, fracture={self.fracture!r}, {mode}, "
                f"reduction={self.reduction!r}")

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.phi.dtype != torch.float32:  # .half()/.double(): ϕ stays float32, 4 B per example
            self.phi = self.phi.float()
        return self


class SampleGilder(GilderOptimizer):
    r"""The Gilder of a :class:`SampleGildedLoss`: ``step()`` gilds the examples recorded since
    the last step, and only those (no pass over all N).

    Param-group options are the Gilder's (``beta``, ``gamma``, ``phi_max``, ``ascent``, ``lr``
    multiplying β for schedulers); one-pass criteria use them, re-fire criteria accumulate the
    raw fracture. With ``process_group`` (default: the default group when ``torch.distributed``
    is initialised) every rank gathers every rank's recorded (index, loss) pairs, B per rank,
    and applies them all in rank order: ϕ stays identical across ranks and equals a single
    process's with the global batch.
    """

    def __init__(self, criterion: SampleGildedLoss, *, process_group: Any = None, **options):
        super().__init__([criterion.phi], **options)
        self.criterion = criterion
        self.exchange_group = process_group

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("exchange_group", None)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """ϕ is a buffer that autograd never writes to: nothing to clear, unless a caller set
        ``phi.grad`` itself."""
        if self.criterion.phi.grad is not None:
            super().zero_grad(set_to_none)

    def step(self, closure=None):
        """Gild the examples the criterion recorded since the last step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        crit = self.criterion
        pending, crit._pending = crit._pending, []
        if not crit.fired:  # once ϕ is frozen a step costs only torch's step wrapper
            with torch.no_grad():
                self._gild(pending)
        return loss

    def _gild(self, pending: list[tuple[Tensor, Tensor]]) -> None:
        crit = self.criterion
        group = self.exchange_group
        if group is None and dist.is_available() and dist.is_initialized():
            group = dist.group.WORLD
        if group is not None and dist.get_world_size(group) > 1:
            indices, losses = _gather(pending, crit.phi.device, group)
        elif not pending:
            return
        else:
            indices, losses = (pending[0] if len(pending) == 1 else
                               [torch.cat(parts) for parts in zip(*pending)])
            indices = indices.to(crit.phi.device, torch.int64)
            losses = losses.to(crit.phi.device, torch.float32)
        visits_before, count = crit.visits, indices.numel()
        crit.visits += count
        N, phi = crit.num_samples, crit.phi
        warm = visits_before >= crit.warmup * N
        if crit.firing:
            in_window = crit.firing_epochs is None or visits_before < crit.firing_epochs * N
            if crit.accumulate == "last" and in_window:
                # the last visit wins, in rank order
                phi.index_put_((indices,), _fracture(losses, crit.fracture).add_(1))
            elif crit.accumulate == "mean" and warm and count and in_window:
                phi.index_add_(0, indices, _fracture(losses, crit.fracture))
                crit.recorded += count
                if crit.fracture != "error":  # an unbounded sum may overflow: cap it
                    phi.index_put_((indices,), phi[indices].clamp_(max=torch.finfo(phi.dtype).max))
            return
        if not (count and warm):
            return
        l = _fracture(losses, crit.fracture)
        options = self.param_groups[0]
        unique, inverse = torch.unique(indices, return_inverse=True)
        old = phi[unique]
        rate = float(options["beta"]) * float(options["lr"])
        damp = (1 - options["gamma"] * old).clamp_min(0)
        u = torch.zeros_like(old).index_add_(0, inverse, l) * damp * rate
        new = old + u if options["ascent"] == "additive" else old * torch.exp(u)
        cap = options["phi_max"] if options["phi_max"] is not None else torch.finfo(phi.dtype).max
        # 0·inf (a damped ϕ, an overflowing fracture) is NaN: that example keeps its ϕ
        phi[unique] = torch.where(new.isnan(), old, new).clamp(options["phi_min"], cap)


def _fracture(losses: Tensor, kind: str) -> Tensor:
    if kind == "error":  # NaN > ln 2 is False: no fracture
        return (losses > LN2).to(losses.dtype)
    losses = losses.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)  # a fracture never corrupts ϕ
    if kind == "relative":
        return losses / losses.mean().clamp_min(torch.finfo(losses.dtype).tiny)
    return losses


def _gather(pending, device, group) -> tuple[Tensor, Tensor]:
    """Every rank's recorded (indices, losses), concatenated in rank order."""
    if pending:
        indices = torch.cat([i for i, _ in pending]).to(device, torch.float64)
        losses = torch.cat([l for _, l in pending]).to(device, torch.float64)
    else:
        indices = losses = torch.zeros(0, dtype=torch.float64, device=device)
    # float64 holds indices exactly up to 2⁵³: one message per rank for both
    mine = torch.stack([indices, losses])
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([mine.shape[1]], device=device), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(2, longest, dtype=torch.float64, device=device)
    padded[:, :mine.shape[1]] = mine
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    both = torch.cat([g[:, :int(n)] for g, n in zip(gathered, sizes)], 1)
    return both[0].to(torch.int64), both[1].float()


def sample_gilding(
    num_samples: int,
    *,
    beta: float = 1.0,
    ascent: str = "additive",
    gamma: float = 0.0,
    phi_max: float | None = 1e3,
    process_group: Any = None,
    **criterion_options: Any,
) -> tuple[SampleGildedLoss, SampleGilder]:
    r"""Label-free sample-level gilding: ``(criterion, gilder)`` for a data set of ``num_samples``.

    The defaults are the study's choice (docs/sample-gilding.md) and need no per-task tuning:
    re-fire with a firing run of a quarter of the training steps (but at least one epoch and at
    most four), trained on the generalised cross-entropy, each example's error at its last visit,
    and the even up-weight. ``criterion.firing_fraction`` tells a training loop which protocol
    to follow, ``criterion.firing_steps`` how long the firing run needs to be::

        criterion, gilder = sample_gilding(len(train_set))
        loader = DataLoader(with_indices(train_set), batch_size=256, shuffle=True)

        def train(steps):
            model, opt = make_model(), make_optimizer()
            for x, y, idx in batches(loader, steps):
                loss = criterion(F.cross_entropy(model(x), y, reduction="none"), idx)
                opt.zero_grad(); gilder.zero_grad(); loss.backward(); opt.step(); gilder.step()
            return model

        if criterion.firing_fraction is not None:
            train(criterion.firing_steps(T, 256))       # the firing run
            criterion.refire()                          # ϕ frozen from here on
        model = train(T)

    ``criterion_options`` go to :class:`SampleGildedLoss` (``fracture``, ``firing_fraction``,
    ``upweight``, ``balance``, ``accumulate``, ``reduction``, ``warmup``, ``firing_epochs``,
    ``firing_loss``; its defaults are the study's); e.g. ``firing_epochs`` (default 4): the
    record ends after that many epochs. One-pass options (``firing_fraction=None``):
    ``beta``, ``ascent`` ("additive" or "multiplicative"), ``gamma`` (damping), ``phi_max``
    (cap, default 1000). See :class:`SampleGildedLoss` and :class:`SampleGilder`.
    """
    require_choice("ascent", ascent, ASCENTS)
    criterion = SampleGildedLoss(num_samples, **criterion_options)
    gilder = SampleGilder(criterion, process_group=process_group, beta=beta, ascent=ascent,
                          gamma=gamma, phi_max=phi_max)
    return criterion, gilder


class IndexedDataset(Dataset):
    """A map-style dataset whose items carry their index last: ``(*item, index)`` for a tuple
    item, ``(item, index)`` otherwise. ``len()`` is the wrapped dataset's."""

    def __init__(self, dataset: Dataset) -> None:
        require(hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"), "dataset",
                type(dataset).__name__,
                "must be a map-style Dataset (with __getitem__ and __len__)")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


def with_indices(dataset: Dataset) -> IndexedDataset:
    """``dataset`` yielding each example's index as its last field, for :func:`sample_gilding`
    (a ``DataLoader`` collates the indices into an int64 tensor)."""
    return IndexedDataset(dataset)


def _invalid(name: str, value: object, rule: str) -> None:
    what = (f"tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
            if isinstance(value, Tensor) else type(value).__name__)
    raise ValueError(f"Invalid {name}: {what} ({rule})")

"""ϕ to TensorBoard: a histogram and mean/min/max scalars per layer, and sigils on demand.

Works with any ``torch.utils.tensorboard.SummaryWriter``: your own, Lightning's
(``trainer.logger.experiment`` of its ``TensorBoardLogger``), or one made from a log folder.
Needs the ``tensorboard`` extra (``pip install 'kintsugi-optim[tensorboard]'``); the sigil
figure also needs ``viz`` (matplotlib).

Tags are ``<prefix>/<layer>`` for the histogram and ``<prefix>/<layer>/mean|min|max`` for the
scalars (TensorBoard groups every tag under ``<prefix>``), where ``<layer>`` is a name from
:func:`kintsugi_optim.gilding`: a layer of a VWPR, a parameter name of a Sculptor (pass
``model=`` when it was built from ``model.parameters()``), ``groups`` of a GildedLoss.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from kintsugi_optim._validation import require
from kintsugi_optim.integrations import gilding

__all__ = ["TensorBoardLogger", "log_gilding"]


def _summary_writer(log_dir: str | os.PathLike):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:  # torch raises this when the tensorboard package is missing
        raise ImportError(
            "kintsugi_optim.integrations.tensorboard writes with tensorboard, the optional "
            "'tensorboard' extra: pip install 'kintsugi-optim[tensorboard]'") from error
    return SummaryWriter(log_dir=os.fspath(log_dir))


def log_gilding(
    writer: Any,
    source: Any,
    step: int,
    *,
    model: nn.Module | None = None,
    prefix: str = "gilding",
    histograms: bool = True,
) -> dict[str, torch.Tensor]:
    """Write every ϕ of ``source`` at ``step``: per layer a histogram and mean/min/max scalars.

    Args:
        writer: a ``SummaryWriter`` (anything with ``add_histogram`` and ``add_scalar``).
        source: whatever :func:`kintsugi_optim.gilding` takes.
        step (int): the global step.
        model (nn.Module, optional): names a Sculptor's ϕ by parameter name.
        prefix (str): the tags' first part (default: "gilding").
        histograms (bool): also write histograms (default: True; scalars only when False).

    Returns:
        the ``{layer: ϕ}`` that were written. NaN and inf ϕ (a diverged run) are left out of
        the histogram and statistics and counted under ``<layer>/nonfinite`` when there are
        any; a layer with no finite ϕ (or no pathways) writes only that count.
    """
    require(isinstance(step, int) and not isinstance(step, bool), "step", step, "must be an int")
    phis = gilding(source, model)
    for name, phi in phis.items():
        values = phi.detach().flatten().float().cpu()
        finite = values[torch.isfinite(values)]
        if finite.numel() < values.numel():
            writer.add_scalar(f"{prefix}/{name}/nonfinite", values.numel() - finite.numel(), step)
        if finite.numel() == 0:
            continue
        if histograms:
            writer.add_histogram(f"{prefix}/{name}", finite, step)
        writer.add_scalar(f"{prefix}/{name}/mean", finite.mean().item(), step)
        writer.add_scalar(f"{prefix}/{name}/min", finite.min().item(), step)
        writer.add_scalar(f"{prefix}/{name}/max", finite.max().item(), step)
    return phis


class TensorBoardLogger:
    """Logs the ϕ of one source to TensorBoard.

    Args:
        writer: a ``SummaryWriter``, or a log folder to open one in.
        source: whatever :func:`kintsugi_optim.gilding` takes (an optimizer, a VWPR, a model...).
        model (nn.Module, optional): names a Sculptor's ϕ by parameter name.
        prefix (str): the tags' first part (default: "gilding").

    Example::

        logger = TensorBoardLogger("runs/kintsugi", optimizer, model=model)
        for step in range(steps):
            ...
            optimizer.step()
            if step % 100 == 0:
                logger.log(step)
        logger.log_sigils(step)   # one figure of every layer's ϕ distribution (needs matplotlib)
        logger.close()
    """

    def __init__(self, writer: Any, source: Any, *, model: nn.Module | None = None,
                 prefix: str = "gilding") -> None:
        require(isinstance(prefix, str) and bool(prefix), "prefix", prefix, "must be a non-empty str")
        self._owns_writer = isinstance(writer, (str, os.PathLike))
        self.writer = _summary_writer(writer) if self._owns_writer else writer
        self.source = source
        self.model = model
        self.prefix = prefix

    def log(self, step: int, *, histograms: bool = True) -> None:
        """Histograms and mean/min/max scalars of every layer's ϕ at ``step``."""
        log_gilding(self.writer, self.source, step, model=self.model, prefix=self.prefix,
                    histograms=histograms)

    def log_sigils(self, step: int, *, epoch: int | None = None) -> None:
        """The sigil figure (:func:`kintsugi_optim.sigils.plot_phi_distribution`) as an image
        under the tag ``<prefix>/sigils``. Needs matplotlib (the ``viz`` extra)."""
        from kintsugi_optim.sigils import plot_phi_distribution

        figure = plot_phi_distribution(gilding(self.source, self.model), epoch=epoch)
        self.writer.add_figure(f"{self.prefix}/sigils", figure, step)

    def close(self) -> None:
        """Flush; close the writer when this logger opened it."""
        if self._owns_writer:
            self.writer.close()
        else:
            self.writer.flush()

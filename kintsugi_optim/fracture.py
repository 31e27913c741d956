"""The fracture signal l: a pathway's local error, from the gradient (docs/maths.md §2.1).

``fracture`` reduces |g| to the pathway (element, row, tensor); ``relative_fracture_`` makes it
scale-free (``fracture="relative"``); ``foreach_fracture`` is the multi-tensor form the foreach
step uses, writing into a dead temporary of the θ step where it can.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kintsugi_optim._kernels import host
from kintsugi_optim.pathways import _rows

__all__ = ["foreach_fracture", "fracture", "relative_fracture_"]


def fracture(grad: Tensor, pathway: str, dtype: torch.dtype | None = None) -> Tensor:
    """Raw fracture signal of one parameter: |grad| reduced to ``pathway``.

    Args:
        grad: gradient (already negated under ``maximize``; before any weight decay). Complex
            gradients are taken as their real view.
        pathway: "element" (shape of grad), "row" (``[grad.shape[0]]``, mean over the rest of the
            row; 0-d falls back to a single value) or "tensor" (0-d mean).
        dtype: dtype of the result (ϕ's dtype); defaults to grad's real dtype.

    Returns:
        A new tensor of ``phi_shape(grad, pathway)``. The scale-free ``fracture="relative"``
        variant divides it by its mean over the scope (see :func:`relative_fracture_`).
    """
    rows = pathway == "row" and grad.dim() > 0  # rows of grad itself, even when complex
    if grad.is_sparse:
        return _sparse_fracture(grad, pathway, dtype)
    if grad.is_complex():
        grad = torch.view_as_real(grad)
    a = grad.abs()
    if dtype is not None:
        a = a.to(dtype)
    if pathway == "element":
        return a
    if rows:
        return _rows(a).mean(1)
    return a.mean()


def _sparse_fracture(grad: Tensor, pathway: str, dtype: torch.dtype | None) -> Tensor:
    """:func:`fracture` of a sparse COO gradient, equal to that of its dense form (rows it does
    not touch have fracture 0) without forming the dense gradient, except for element ϕ."""
    grad = grad.coalesce()  # |a + b| of repeated indices, not |a| + |b|
    if pathway == "element":
        a = grad.abs().to_dense()
        return a if dtype is None else a.to(dtype)
    indices, values = grad._indices(), grad._values().abs()
    if dtype is not None:
        values = values.to(dtype)
    if pathway == "row" and grad.dim() > 0:
        sums = values.reshape(values.shape[0], -1).sum(1)
        out = torch.zeros(grad.shape[0], dtype=values.dtype, device=values.device)
        return out.index_add_(0, indices[0], sums).div_(max(math.prod(grad.shape[1:]), 1))
    return values.sum() / max(grad.numel(), 1)


def relative_fracture_(fractures: list[Tensor], *, foreach: bool = False) -> None:
    """Divide each fracture tensor in place by max(mean |l|, tiny) over that tensor.

    This is ``fracture="relative"``: it makes the gilding rate β scale-free, the same for a
    layer whose gradients are 1e-6 as for one whose gradients are 1. (|l| rather than l keeps a
    signed Gilder fracture from dividing by a mean cancelled to ~0; for the Sculptor l ≥ 0.)
    """
    if not fractures:
        return
    if foreach:
        for (device_fractures,), _ in host._grouped([fractures]):
            # Out of place on the norms: the norm of a sharded DTensor (FSDP2) is a pending
            # reduction, which an in-place op may not resolve. Here and below.
            means = torch._foreach_norm(device_fractures, 1)
            means = torch._foreach_div(means, [max(f.numel(), 1) for f in device_fractures])
            means = torch._foreach_clamp_min(means, torch.finfo(device_fractures[0].dtype).tiny)
            torch._foreach_div_(device_fractures, means)
        return
    for l in fractures:
        l.div_(l.abs().mean().clamp_min(torch.finfo(l.dtype).tiny))


def foreach_fracture(
    grads: list[Tensor], phis: list[Tensor], pathway: str, scratch: list[Tensor] | None = None
) -> list[Tensor]:
    """Raw fractures of ``grads`` in ϕ's dtype. On the CPU |g| goes into ``scratch`` (a dead
    temporary of the θ step, of the gradients' shapes) when it has ϕ's dtype, saving an
    allocation; elsewhere one _foreach_abs launch beats a launch per tensor."""
    dtype = phis[0].dtype
    if scratch is not None and scratch[0].dtype == dtype and host._cpu_eager(grads):
        for g, out in zip(grads, scratch):
            torch.abs(g, out=out)
        a = scratch
    else:
        a = [t.to(dtype) for t in torch._foreach_abs(grads)]
    if pathway == "element":
        return a
    if pathway == "tensor":
        if host._cpu_eager(a):
            return [t.mean() for t in a]  # sum's kernel is ~4× faster than _foreach_norm's
        means = torch._foreach_norm(a, 1)  # out-of-place division: see relative_fracture_
        return list(torch._foreach_div(means, [max(t.numel(), 1) for t in a]))
    # torch has no foreach reduction along a dim: the row means are one op per tensor.
    # A 0-d row ϕ (0-d θ, complex too) takes the tensor mean.
    return [_rows(t).mean(1) if phi.dim() > 0 else t.mean()
            for t, phi in zip(a, phis)]

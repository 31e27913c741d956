"""ϕ and its pathways: the shape, dtype and placement of a gilding weight (docs/maths.md §2.1,
§3.1, §4).

A *pathway* is what one ϕ weighs: an element of a parameter, a row (a neuron or output
channel: ``θ[i]``), or the whole tensor. This module answers, for a parameter and a pathway, what
ϕ looks like (:func:`phi_shape`, :func:`phi_dtype`), creates it (:func:`new_phi`, a DTensor
placed like its parameter under FSDP2), and broadcasts it over the step it scales.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor

__all__ = ["new_phi", "phi_dtype", "phi_shape"]


def phi_shape(param: Tensor, pathway: str) -> torch.Size:
    """Shape of the gilding weight ϕ of ``param`` for ``pathway``.

    element: the shape of ``param`` (of its real view for complex parameters, so every real
    component is a pathway, as torch's optimizers treat complex numbers); row: ``[param.shape[0]]``
    (0-d parameters fall back to a single ϕ); tensor: ``[]``.
    """
    if pathway == "element":
        return torch.view_as_real(param).shape if param.is_complex() else param.shape
    # Rows are those of the parameter itself: a complex vector's real view is 2-d, but a 0-d
    # complex parameter still has a single ϕ.
    if pathway == "row" and param.dim() > 0:
        return param.shape[:1]
    return torch.Size([])


def phi_dtype(param: Tensor) -> torch.dtype:
    """dtype ϕ is kept in: float32 for bf16/fp16 parameters (a bf16 ϕ near 1 cannot register
    a 0.01 increment), the parameter's real dtype otherwise."""
    if param.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return param.real.dtype if param.is_complex() else param.dtype


def new_phi(param: Tensor, pathway: str, value: float) -> Tensor:
    """A fresh ϕ for ``param``: :func:`phi_shape`, :func:`phi_dtype`, on its device, filled with
    ``value`` (element ϕ keep the parameter's memory format, as torch's optimizer state does).

    For a DTensor parameter (FSDP2's ``fully_shard``, tensor parallelism) ϕ is a DTensor on the
    same mesh, split like the pathways it weighs: element ϕ exactly like the parameter; row ϕ
    ``Shard(0)`` where the parameter's rows are (replicated where the parameter is replicated or
    split along another dim); the tensor pathway's single ϕ replicated. Then every reduction of
    the maths (row means, the scope means of ``fracture="relative"`` and ``phi_norm="mean"``) is
    taken over the whole tensor, and a sharded run follows the unsharded one.
    """
    dtype = phi_dtype(param)
    if pathway == "element":
        real = torch.view_as_real(param) if param.is_complex() else param
        return torch.full_like(real, value, dtype=dtype, requires_grad=False)
    shape = phi_shape(param, pathway)
    if _is_dtensor(param):
        return _dtensor_phi(param, shape, value, dtype)
    return torch.full(shape, value, dtype=dtype, device=param.device)


def _is_dtensor(tensor: Tensor) -> bool:
    # A DTensor exists only once torch.distributed.tensor is imported: no import needed here.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


def _dtensor_phi(param: Tensor, shape: torch.Size, value: float, dtype: torch.dtype) -> Tensor:
    from torch.distributed.tensor import Replicate, Shard, full

    placements = []
    for placement in param.placements:
        if isinstance(placement, Shard) and placement.dim == 0 and len(shape) == 1:
            placements.append(Shard(0))  # each rank gilds the rows it holds
        elif placement.is_replicate() or isinstance(placement, Shard):
            placements.append(Replicate())
        else:
            raise NotImplementedError(
                f"KintsugiOptimizer: no row/tensor ϕ for a parameter placed {param.placements} "
                "(supported: Shard(d) and Replicate())"
            )
    return full(shape, value, dtype=dtype, device_mesh=param.device_mesh, placements=placements)


def _like_param(real_view: Tensor, param: Tensor) -> Tensor:
    """State created from a real view is stored complex when its parameter is complex."""
    return torch.view_as_complex(real_view) if param.is_complex() else real_view


def _broadcast(phi: Tensor, param: Tensor) -> Tensor:
    # A row ϕ of shape [rows] scales every element of its row; trailing singleton dims make it
    # broadcast. Element ϕ already has the parameter's shape and a tensor ϕ is 0-d.
    if phi.dim() == 0 or phi.dim() == param.dim():
        return phi
    return phi.view(phi.shape + (1,) * (param.dim() - phi.dim()))


def _rows(t: Tensor) -> Tensor:
    # An explicit row length: reshape(rows, -1) is ambiguous for a tensor with no elements.
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _scale_sparse(grad: Tensor, phi: Tensor, dtype: torch.dtype) -> Tensor:
    """ϕ·g for a sparse COO gradient: each stored value times the ϕ of its pathway, rounded to
    ``dtype``; the indices (repeats and order included) are kept, so ϕ ≡ 1 gives back g."""
    indices, values = grad._indices(), grad._values()
    k = min(phi.dim(), indices.shape[0])
    factor = phi[tuple(indices[:k])] if k else phi
    factor = factor.view(factor.shape + (1,) * (values.dim() - factor.dim()))
    return torch.sparse_coo_tensor(indices, (values * factor).to(dtype), grad.shape,
                                   is_coalesced=grad.is_coalesced(), check_invariants=False)

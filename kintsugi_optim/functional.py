r"""The maths of Kintsugi optimization as plain functions (docs/maths.md §2).

Three pieces, each used by every level of the package:

* :func:`fracture` — the *fracture signal* l: a pathway's local error, here the gradient
  magnitude of a parameter reduced to its pathway (element, row or tensor), §2.1.
* :func:`gild` — the one shared *gilding* kernel: ϕ rises with l, damped by γ, tempered by the
  L1 force λ, kept positive, optionally normalised to mean 1, §2.2. The Sculptor, the Gilder,
  the VWPR wrapper and :class:`~kintsugi_optim.GildedLoss` all go through it.
* :func:`sculpt` — one step of the *Sculptor*: the base rule's descent step (SGD, Adam or AdamW
  exactly as ``torch.optim`` computes it) scaled per pathway by ϕ, then ϕ gilded with the
  fracture of the same gradient, §2.3.

Like ``torch/optim/adam.py``, each has a single-tensor implementation (the readable reference),
a ``_multi_tensor_`` one built from ``torch._foreach_*`` ops (no host sync on an accelerator, so
it runs unchanged on CUDA and under CUDA graphs; on the CPU it steps cache-sized runs of tensors
and reads a few sums to skip passes, see :func:`_runs` and :func:`_cpu_eager`), and
:func:`sculpt` also dispatches to a fused kernel (:mod:`kintsugi_optim._fused`).
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Callable, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.adam import adam as _torch_adam
from torch.optim.adamw import adamw as _torch_adamw
from torch.optim.sgd import sgd as _torch_sgd

from kintsugi_optim._compat import (
    _default_to_fused_or_foreach,
    _disable_dynamo_if_unsupported,
    _get_capturable_supported_devices,
    _get_value,
    _group_tensors_by_device_and_dtype,
    _stack_if_compiling,
    _to_scalar,
)

__all__ = [
    "fracture", "gild", "gild_pathways", "gilder_step", "new_phi", "phi_dtype", "phi_shape",
    "relative_fracture_", "sculpt", "softplus_inverse", "torch_step",
]

BASES = ("sgd", "adam", "adamw")
PATHWAYS = ("element", "row", "tensor")
FRACTURES = ("relative", "abs")
PHI_NORMS = ("mean", None)
ASCENTS = ("additive", "multiplicative")
POSITIVITIES = ("clamp", "softplus")


# ---------------------------------------------------------------------------------------------
# Shapes and dtypes of ϕ
# ---------------------------------------------------------------------------------------------


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


def softplus_inverse(phi: Tensor) -> Tensor:
    """The resilience score ρ with softplus(ρ) = ϕ, computed stably: log(expm1(ϕ)) =
    ϕ + log(−expm1(−ϕ)) neither overflows for large ϕ nor loses precision for small ϕ."""
    return phi + torch.log(-torch.expm1(-phi))


def _like_param(real_view: Tensor, param: Tensor) -> Tensor:
    """State created from a real view is stored complex when its parameter is complex."""
    return torch.view_as_complex(real_view) if param.is_complex() else real_view


def _broadcast(phi: Tensor, param: Tensor) -> Tensor:
    # A row ϕ of shape [rows] scales every element of its row; trailing singleton dims make it
    # broadcast. Element ϕ already has the parameter's shape and a tensor ϕ is 0-d.
    if phi.dim() == 0 or phi.dim() == param.dim():
        return phi
    return phi.view(phi.shape + (1,) * (param.dim() - phi.dim()))


# ---------------------------------------------------------------------------------------------
# Fracture (§2.1)
# ---------------------------------------------------------------------------------------------


def _rows(t: Tensor) -> Tensor:
    # An explicit row length: reshape(rows, -1) is ambiguous for a tensor with no elements.
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


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


def _scale_sparse(grad: Tensor, phi: Tensor, dtype: torch.dtype) -> Tensor:
    """ϕ·g for a sparse COO gradient: each stored value times the ϕ of its pathway, rounded to
    ``dtype``; the indices (repeats and order included) are kept, so ϕ ≡ 1 gives back g."""
    indices, values = grad._indices(), grad._values()
    k = min(phi.dim(), indices.shape[0])
    factor = phi[tuple(indices[:k])] if k else phi
    factor = factor.view(factor.shape + (1,) * (values.dim() - factor.dim()))
    return torch.sparse_coo_tensor(indices, (values * factor).to(dtype), grad.shape,
                                   is_coalesced=grad.is_coalesced(), check_invariants=False)


def relative_fracture_(fractures: list[Tensor], *, foreach: bool = False) -> None:
    """Divide each fracture tensor in place by max(mean |l|, tiny) over that tensor.

    This is ``fracture="relative"``: it makes the gilding rate β scale-free, the same for a
    layer whose gradients are 1e-6 as for one whose gradients are 1. (|l| rather than l keeps a
    signed Gilder fracture from dividing by a mean cancelled to ~0; for the Sculptor l ≥ 0.)
    """
    if not fractures:
        return
    if foreach:
        for (device_fractures,), _ in _grouped([fractures]):
            # Out of place on the norms: the norm of a sharded DTensor (FSDP2) is a pending
            # reduction, which an in-place op may not resolve. Here and below.
            means = torch._foreach_norm(device_fractures, 1)
            means = torch._foreach_div(means, [max(f.numel(), 1) for f in device_fractures])
            means = torch._foreach_clamp_min(means, torch.finfo(device_fractures[0].dtype).tiny)
            torch._foreach_div_(device_fractures, means)
        return
    for l in fractures:
        l.div_(l.abs().mean().clamp_min(torch.finfo(l.dtype).tiny))


# ---------------------------------------------------------------------------------------------
# Gilding (§2.2): the one shared kernel
# ---------------------------------------------------------------------------------------------


def _phi_caps(phis: list[Tensor], phi_max: float | None, phi_norm: str | None) -> list[float]:
    """The upper clamp of each ϕ (one dtype): phi_max, at most the dtype's max."""
    finfo_max = torch.finfo(phis[0].dtype).max
    cap = finfo_max if phi_max is None else min(phi_max, finfo_max)
    if phi_norm != "mean":
        return [cap] * len(phis)
    # Capping at max/n keeps Σϕ over the scope finite, so normalising never overflows.
    return [min(cap, finfo_max / max(phi.numel(), 1)) for phi in phis]


def gild(
    phis: list[Tensor],
    fractures: list[Tensor],
    rhos: list[Tensor] | None = None,
    *,
    beta: float,
    gamma: float = 0.0,
    l1: float = 0.0,
    phi_min: float = 1e-3,
    phi_max: float | None = None,
    phi_norm: str | None = None,
    ascent: str = "additive",
    positivity: str = "clamp",
    relative: bool = False,
    assume_nonnegative: bool = False,
    foreach: bool = False,
) -> None:
    r"""Gild each ϕ in place with its fracture signal l (docs/maths.md §2.2).

    .. math::
        s = l \cdot \max(0, 1 - \gamma\phi), \quad u = s - \lambda \ (\text{non-finite } u \to 0)

        \phi' = \phi + \beta u \ (\text{additive}) \quad\text{or}\quad
        \phi' = \phi\, e^{\beta u} \ (\text{multiplicative})

    then ``clamp(phi_min, phi_max)`` (or, with ``positivity="softplus"``, ρ' = ρ + βuσ(ρ),
    ϕ' = softplus(ρ')), and with ``phi_norm="mean"`` rescaled to mean 1 over each tensor.

    Args:
        phis: gilding weights ϕ, each any shape, positive, floating. Updated in place.
        fractures: fracture signals l, one per ϕ and of its shape. Used as scratch space:
            their contents are undefined afterwards.
        rhos: resilience scores ρ = softplus⁻¹(ϕ), one per ϕ, required with
            ``positivity="softplus"`` (updated in place), else ignored.
        beta: gilding rate β ≥ 0. gamma: damping γ ≥ 0 (ϕ stops rising near 1/γ).
        l1: tempering λ ≥ 0. phi_min, phi_max: bounds (``phi_max=None``: the dtype's largest
            finite value). phi_norm: "mean" or None. ascent: "additive" or "multiplicative".
        positivity: "clamp" or "softplus".
        relative: first divide each l by max(mean |l|, tiny) over its tensor (``fracture=
            "relative"``, §2.1; see :func:`relative_fracture_`).
        assume_nonnegative: the caller promises every l ≥ 0 (the Sculptor's |g|), so that
            Σ|l| may be taken as the plain sum Σl.
        foreach: use the ``torch._foreach_*`` implementation.

    Whatever the fracture (0, ±1e30, inf, nan), every ϕ stays finite and ≥ the dtype's smallest
    normal number; ``phi_norm="mean"`` caps ϕ' at ``finfo.max / n`` before normalising so that
    the sum over the scope cannot overflow.
    """
    if not phis:
        return
    if positivity == "softplus" and rhos is None:
        raise ValueError("gild: positivity='softplus' needs the resilience scores rhos")
    func = _multi_tensor_gild if foreach else _single_tensor_gild
    func(
        phis,
        fractures,
        rhos if positivity == "softplus" else None,
        beta=beta,
        gamma=gamma,
        l1=l1,
        phi_min=phi_min,
        phi_max=phi_max,
        phi_norm=phi_norm,
        ascent=ascent,
        relative=relative,
        assume_nonnegative=assume_nonnegative,
    )


def _single_tensor_gild(
    phis, fractures, rhos, *, beta, gamma, l1, phi_min, phi_max, phi_norm, ascent, relative,
    assume_nonnegative,
) -> None:
    if relative:
        relative_fracture_(fractures)
    for i, phi in enumerate(phis):
        u = fractures[i]
        if gamma != 0:
            u.mul_((1 - gamma * phi).clamp_(min=0))
        if l1 != 0:
            u.sub_(l1)
        u.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        rate = _fold_tensor_rate_(u, beta)
        if rhos is not None:
            rho = rhos[i]
            rho.addcmul_(u, torch.sigmoid(rho), value=rate)
            phi.copy_(F.softplus(rho))
        elif ascent == "additive":
            phi.add_(u, alpha=rate)  # β = 0 leaves ϕ bitwise unchanged: u is finite
        else:
            phi.mul_(u.mul_(rate).exp_())
        phi.clamp_(phi_min, _phi_caps([phi], phi_max, phi_norm)[0])
        if phi_norm == "mean":
            phi.div_(phi.sum() / phi.numel())  # one rounding: ϕ ≡ 1 stays exactly 1
            phi.clamp_(min=torch.finfo(phi.dtype).tiny)
        if rhos is not None:
            rhos[i].copy_(softplus_inverse(phi))


def _fold_tensor_rate_(u: Tensor | list[Tensor], beta: float | Tensor) -> float:
    """The rate to apply as a scalar. A tensor β (the Gilder's β·lr with a tensor lr) is
    multiplied into u here instead, since a tensor ``alpha`` would cost a host sync."""
    tensors = [u] if isinstance(u, Tensor) else u
    if not isinstance(beta, Tensor):
        if not tensors or abs(beta) <= torch.finfo(tensors[0].dtype).max:
            return beta
        # β·lr beyond ϕ's dtype (float16: 65504) cannot be an `alpha`, and as a foreach scalar it
        # would round to inf, making 0·inf = NaN; a per-tensor multiply takes it in float, so
        # 0 stays 0 and the rest saturates to ±inf, which the clamp to the cap then handles.
        for t in tensors:
            t.mul_(beta)
        return 1.0
    if isinstance(u, Tensor):
        u.mul_(beta)
    else:
        torch._foreach_mul_(u, beta)
    return 1.0


def _zero_nonfinite_(tensors: list[Tensor]) -> None:
    # torch has no foreach isfinite/where/nan_to_num, and every emulation from foreach ops
    # (nan survives any arithmetic, so it takes sign, pow and lerp) costs three passes over
    # memory; one in-place pass per tensor is the cheapest exact way.
    for t in tensors:
        t.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _foreach_softplus(xs: list[Tensor]) -> list[Tensor]:
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)): no overflow for large |x|.
    out = torch._foreach_abs(xs)
    torch._foreach_neg_(out)
    torch._foreach_exp_(out)
    torch._foreach_log1p_(out)
    torch._foreach_add_(out, torch._foreach_clamp_min(xs, 0.0))
    return out


def _cpu_eager(tensors: list[Tensor]) -> bool:
    """Whether a foreach step over ``tensors`` runs on the CPU, eagerly, on plain tensors.

    There a _foreach_ op is a loop of per-tensor ops, so one op per tensor costs no launch more,
    and a reduction's result already lies in host memory, so reading it costs nothing: the step
    reads a few sums to skip the passes that only matter for non-finite or overflowing values.
    On an accelerator a read would stall the stream, under torch.compile it would break the
    graph, and a sharded DTensor's reduction is a collective: there every pass runs, one launch
    per op.
    """
    return (
        tensors[0].device.type == "cpu"
        and not torch.compiler.is_compiling()
        and not _is_dtensor(tensors[0])
    )


def _fast_scalars(tensors: list[Tensor]) -> bool:
    """Whether a foreach step over ``tensors`` may pass its scalars as 0-d tensors.

    A CPU _foreach_ op is a loop of per-tensor ops, and each of those takes a 0-d tensor operand
    ~3× faster than a Python number. Only for float32/float64: in half precision a 0-d tensor
    of the tensors' dtype would round the scalar, and there torch's exact order of operations
    is kept too, so that β = 0 gives torch's bits.
    """
    return tensors[0].dtype in (torch.float32, torch.float64) and _cpu_eager(tensors)


def _cpu_scalars(values: list[float], dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Per-tensor scalars for a CPU _foreach_ op, as 0-d tensors: each per-tensor op of the
    loop takes a 0-d tensor operand ~3× faster than a Python number."""
    return torch.tensor(values, dtype=dtype).unbind()


def _multi_tensor_gild(
    phis, fractures, rhos, *, beta, gamma, l1, phi_min, phi_max, phi_norm, ascent, relative,
    assume_nonnegative,
) -> None:
    for (device_phis, u, device_rhos), _ in _grouped([phis, fractures, rhos or []]):
        on_host = _cpu_eager(device_phis)
        dtype = device_phis[0].dtype
        acc = torch.promote_types(dtype, torch.float32)  # sums and means of a bf16 ϕ in fp32
        tiny = torch.finfo(dtype).tiny
        numels = [max(p.numel(), 1) for p in device_phis]
        finite = False  # whether every u is known to be finite
        rates = None  # per tensor, for the plain additive ascent: β / mean|l|
        if on_host:
            # Σ|l| per tensor, read as Python floats (sum() runs ~4× faster than
            # _foreach_norm's kernel on the CPU; a few list operations cost less per run than
            # the same arithmetic as small tensor ops).
            l_sums = torch.stack(
                [(t if assume_nonnegative else t.abs()).sum(dtype=acc) for t in u]).tolist()
            # A finite Σ|l| means every l is finite. The relative l/mean is then at most the
            # tensor's size (which can exceed float16's range), and damping and tempering keep
            # it finite.
            finite = all(map(math.isfinite, l_sums)) and (
                not relative or max(numels) <= torch.finfo(dtype).max)
            if relative:
                scales = [1 / max(s / n, tiny) for s, n in zip(l_sums, numels)]
                plain = (finite and gamma == 0 and l1 == 0 and not rhos and ascent == "additive"
                         and not isinstance(beta, Tensor))
                folded = [beta * scale for scale in scales] if plain else []
                # 1/mean reaches 1/tiny for a zero gradient: β/mean may overflow, and 0·inf is NaN
                if plain and max(folded) <= torch.finfo(acc).max:
                    rates = _cpu_scalars(folded, acc)  # ϕ += (β/mean)·l in one pass
                else:
                    torch._foreach_mul_(u, _cpu_scalars(scales, acc))
        elif relative:
            relative_fracture_(u, foreach=True)
        if gamma != 0:
            damping = torch._foreach_mul(device_phis, -gamma)
            torch._foreach_add_(damping, 1.0)
            torch._foreach_clamp_min_(damping, 0.0)
            torch._foreach_mul_(u, damping)
            del damping
        if l1 != 0:
            torch._foreach_sub_(u, l1)
        if not finite:
            _zero_nonfinite_(u)
        rate = _fold_tensor_rate_(u, beta)
        if rhos:
            torch._foreach_addcmul_(device_rhos, u, torch._foreach_sigmoid(device_rhos), rate)
            torch._foreach_copy_(device_phis, _foreach_softplus(device_rhos))
        elif rates is not None:
            torch._foreach_addcmul_(device_phis, u, rates)
        elif ascent == "additive":
            torch._foreach_add_(device_phis, u, alpha=rate)
        else:
            torch._foreach_mul_(u, rate)
            torch._foreach_exp_(u)
            torch._foreach_mul_(device_phis, u)
        del u
        torch._foreach_clamp_min_(device_phis, phi_min)
        caps = _phi_caps(device_phis, phi_max, phi_norm)
        if phi_norm != "mean":
            torch._foreach_clamp_max_(device_phis, caps)
        elif on_host:
            def phi_sums() -> list[float]:
                return torch.stack([p.sum(dtype=acc) for p in device_phis]).tolist()  # ϕ > 0

            sums = phi_sums()
            # Σϕ within half its cap (_phi_caps) means no ϕ reaches the cap: the clamp would
            # be the identity, and its pass is skipped.
            if not all(s <= 0.5 * cap for s, cap in zip(sums, caps)):
                torch._foreach_clamp_max_(device_phis, caps)
                sums = phi_sums()
            # ϕ / mean(ϕ), the mean rounded once to ϕ's dtype, so ϕ ≡ 1 stays exactly 1.
            means = [s / n for s, n in zip(sums, numels)]
            torch._foreach_div_(device_phis, _cpu_scalars(means, acc))
            if max(means) > 0.5 * phi_min / tiny:  # else ϕ/mean ≥ phi_min/mean > tiny
                torch._foreach_clamp_min_(device_phis, tiny)
        else:
            torch._foreach_clamp_max_(device_phis, caps)
            means = torch._foreach_norm(device_phis, 1)  # ϕ > 0: Σϕ
            means = torch._foreach_div(means, [float(n) for n in numels])
            torch._foreach_div_(device_phis, means)
            torch._foreach_clamp_min_(device_phis, tiny)
        if rhos:
            neg = torch._foreach_neg(device_phis)
            torch._foreach_expm1_(neg)
            torch._foreach_neg_(neg)
            torch._foreach_log_(neg)
            torch._foreach_add_(neg, device_phis)
            torch._foreach_copy_(device_rhos, neg)


def _grouped(tensorlists):
    """torch's grouping of tensor lists by device and dtype: (lists, indices) per group."""
    return _group_tensors_by_device_and_dtype(tensorlists).values()


def gild_pathways(
    phis: list[Tensor],
    fractures: list[Tensor],
    rhos: list[Tensor] | None,
    *,
    pathway: str,
    fracture: str,
    foreach: bool,
    **options,
) -> None:
    """Apply ``fracture`` ("relative"/"abs") and :func:`gild` over the scope of ``pathway``.

    Element and row pathways are scoped per tensor. The tensor pathway has one 0-d ϕ per
    parameter and is scoped over the whole param group: its ϕ are gilded as one stacked vector.
    """
    if not phis:
        return
    if pathway == "tensor":

        # One vector for the group's scope, in the widest dtype present (an fp64 ϕ beside fp32
        # ones keeps its precision) and on the first ϕ's device.
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in phis))

        def stacked(tensors):
            return [torch.stack([t.to(phis[0].device, dtype) for t in tensors])]

        scope_phis, scope_fractures = stacked(phis), stacked(fractures)
        scope_rhos = stacked(rhos) if rhos else None
        foreach = False
    else:
        scope_phis, scope_fractures, scope_rhos = phis, fractures, rhos
    gild(scope_phis, scope_fractures, scope_rhos, relative=fracture == "relative",
         assume_nonnegative=True, foreach=foreach, **options)
    if pathway == "tensor":
        for k, (phi, new) in enumerate(zip(phis, scope_phis[0].unbind())):
            # A ϕ narrower than the stack stays finite and normal in its own dtype.
            finfo = torch.finfo(phi.dtype)
            phi.copy_(new.clamp(finfo.tiny, finfo.max))
            if rhos:
                rhos[k].copy_(softplus_inverse(phi))


# ---------------------------------------------------------------------------------------------
# Sculptor step (§2.3)
# ---------------------------------------------------------------------------------------------


def _single_tensor_sculpt(
    params: list[Tensor],
    grads: list[Tensor],
    phis: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    base: str,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    pathway: str,
    gild_run: Callable[[list[Tensor], list[Tensor]], None],
    **_,
) -> None:
    """θ ← θ − lr·ϕ·d per parameter.

    After each parameter's θ step, ``gild_run([phi], [fracture])`` receives its ϕ and raw
    fracture, as :func:`_multi_tensor_sculpt` hands over a run's.
    """
    if not torch.jit.is_scripting():
        lr = _to_scalar(lr)
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        phi = phis[i]
        raw_fracture = fracture(grad, pathway, phi.dtype)
        if torch.is_complex(param):
            grad = torch.view_as_real(grad)
            param = torch.view_as_real(param)
        phi_b = _broadcast(phi, param)

        if base == "sgd":
            if weight_decay != 0:
                grad = grad.add(param, alpha=weight_decay)
            if momentum != 0:
                buf = momentum_buffers[i]
                if buf is None:
                    buf = grad.detach().clone()
                    momentum_buffers[i] = _like_param(buf, params[i])
                else:
                    buf = torch.view_as_real(buf) if buf.is_complex() else buf
                    buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                grad = grad.add(buf, alpha=momentum) if nesterov else buf
            # ϕ·d is formed in ϕ's precision and rounded once to θ's dtype, so a bf16/fp16 θ takes
            # the step in its own arithmetic, exactly torch's SGD when ϕ = 1.
            if grad.is_sparse:  # nn.Embedding(sparse=True): only the rows it looked up
                scaled = _scale_sparse(grad, phi, param.dtype)
            else:
                scaled = (grad * phi_b).to(param.dtype)
            if capturable and isinstance(lr, Tensor):
                # alpha=-lr would read a tensor lr back to the host: not inside a CUDA graph
                param.addcmul_(scaled, lr, value=-1)
            else:
                param.add_(scaled, alpha=-lr)
            gild_run([phi], [raw_fracture])
            continue

        exp_avg, exp_avg_sq, step_t = exp_avgs[i], exp_avg_sqs[i], state_steps[i]
        if torch.is_complex(exp_avg):
            exp_avg = torch.view_as_real(exp_avg)
            exp_avg_sq = torch.view_as_real(exp_avg_sq)
            if amsgrad:
                max_exp_avg_sqs[i] = torch.view_as_real(max_exp_avg_sqs[i])
        if not torch.compiler.is_compiling() and capturable:
            supported = _get_capturable_supported_devices()
            if not (param.device.type == step_t.device.type and param.device.type in supported):
                raise AssertionError(
                    f"If capturable=True, params and state_steps must be on supported devices: {supported}."
                )
        step_t += 1
        if weight_decay != 0:
            if base == "adamw":
                param.mul_(1 - lr * weight_decay)
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)

        if capturable or differentiable:
            step = step_t
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size_neg = (lr / bias_correction1).neg()
            bias_correction2_sqrt = bias_correction2.sqrt()
            if amsgrad:
                max_sq = max_exp_avg_sqs[i].clone() if differentiable else max_exp_avg_sqs[i]
                max_exp_avg_sqs[i].copy_(torch.maximum(max_sq, exp_avg_sq))
                second = max_exp_avg_sqs[i]
            else:
                second = exp_avg_sq
            denom = (second.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(
                eps / step_size_neg
            )
            # θ moves by ϕ·d: dividing the denominator by ϕ is exact when ϕ = 1.
            denom = denom / phi_b if differentiable else denom.div_(phi_b)
            param.addcdiv_(exp_avg.clone() if differentiable else exp_avg, denom)
        else:
            step = _get_value(step_t)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            if amsgrad:
                torch.maximum(max_exp_avg_sqs[i], exp_avg_sq, out=max_exp_avg_sqs[i])
                denom = (max_exp_avg_sqs[i].sqrt() / bias_correction2_sqrt).add_(eps)
            else:
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            denom.div_(phi_b)
            param.addcdiv_(exp_avg, denom, value=-step_size)
        if amsgrad and torch.is_complex(params[i]):
            max_exp_avg_sqs[i] = torch.view_as_complex(max_exp_avg_sqs[i])
        gild_run([phi], [raw_fracture])


# On the CPU a _foreach_ op is a loop over its tensors, so a step made of ~15 of them streams
# every buffer through memory ~15 times, and frees its temporaries (tens of MB) all at once,
# which glibc hands back to the OS to fault in again next step. Stepped a run of tensors at a
# time, every pass after a run's first finds its buffers in cache and the temporaries stay
# small. The bytes are those of the parameters in a run; its working set is ~6× that, in L2/L3.
# 1 MiB measured best on a 2-core AMD EPYC (Zen 5: 1 MiB L2 a core, 32 MiB L3): 256 KiB
# costs more in per-run overhead, 4 MiB and more in cache misses (benchmarks/README.md).
_CPU_RUN_BYTES = 1 << 20


def _runs(params: list[Tensor]) -> list[slice]:
    """Consecutive runs of ``params`` for one pass of the foreach step each (see above)."""
    if not _cpu_eager(params):
        return [slice(0, len(params))]  # one launch per op is what foreach is for
    runs, start, size = [], 0, 0
    for k, p in enumerate(params):
        size += p.numel() * p.element_size()
        if size >= _CPU_RUN_BYTES or k == len(params) - 1:
            runs.append(slice(start, k + 1))
            start, size = k + 1, 0
    return runs


def _multi_tensor_sculpt(
    params: list[Tensor],
    grads: list[Tensor],
    phis: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    base: str,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    pathway: str,
    gild_run: Callable[[list[Tensor], list[Tensor]], None],
    **_,
) -> None:
    """The foreach Sculptor step, over each device/dtype group in runs of tensors.

    After a run's θ step, ``gild_run(phis, fractures)`` receives its ϕ and raw fractures
    (while they are in cache; the fractures are scratch the callee may overwrite).
    """
    if len(params) == 0:  # a group none of whose parameters has a gradient this step
        return
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")
    if isinstance(lr, Tensor) and not capturable and base != "sgd":  # torch's SGD takes it
        raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if not torch.compiler.is_compiling() and capturable and base != "sgd":
        supported = _get_capturable_supported_devices(supports_xla=False)
        if not all(
            p.device.type == s.device.type and p.device.type in supported
            for p, s in zip(params, state_steps)
        ):
            raise AssertionError(
                f"If capturable=True, params and state_steps must be on supported devices: {supported}."
            )
    lr = _to_scalar(lr)
    is_sgd = base == "sgd"
    lists = [params, grads, phis, momentum_buffers] if is_sgd else [
        params, grads, phis, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
    ]
    for device_lists, device_indices in _group_tensors_by_device_and_dtype(
        lists, with_indices=True
    ).values():
        for run in _runs(cast(list[Tensor], device_lists[0])):
            run_lists = [tensors[run] for tensors in device_lists]
            indices = device_indices[run]
            run_params = cast(list[Tensor], run_lists[0])
            run_grads = cast(list[Tensor], run_lists[1])
            run_phis = cast(list[Tensor], run_lists[2])
            if any(p.is_complex() for p in run_params):
                run_params = [torch.view_as_real(p) if p.is_complex() else p for p in run_params]
                run_grads = [torch.view_as_real(g) if g.is_complex() else g for g in run_grads]
                for k in range(3, len(run_lists)):
                    run_lists[k] = [
                        torch.view_as_real(t) if t is not None and t.is_complex() else t
                        for t in run_lists[k]
                    ]
            phis_b = [_broadcast(phi, p) for phi, p in zip(run_phis, run_params)]
            raw_grads = run_grads  # never written below: the fracture is taken from them
            if maximize:
                run_grads = torch._foreach_neg(run_grads)
            if is_sgd:
                scratch = _multi_tensor_sgd_direction_step(
                    run_params, run_grads, phis_b, cast(list, run_lists[3]),
                    [params[k] for k in indices], momentum_buffers, indices, lr=lr,
                    momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=weight_decay, maximize=maximize,
                )
            else:
                scratch = _multi_tensor_adam_direction_step(
                    run_params, run_grads, phis_b, *run_lists[3:], base=base, lr=lr,
                    beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
                    weight_decay=weight_decay, maximize=maximize, capturable=capturable,
                )
            del run_grads, phis_b
            gild_run(run_phis, _foreach_fracture(raw_grads, run_phis, pathway, scratch))


def _foreach_fracture(
    grads: list[Tensor], phis: list[Tensor], pathway: str, scratch: list[Tensor] | None = None
) -> list[Tensor]:
    """Raw fractures of ``grads`` in ϕ's dtype. On the CPU |g| goes into ``scratch`` (a dead
    temporary of the θ step, of the gradients' shapes) when it has ϕ's dtype, saving an
    allocation; elsewhere one _foreach_abs launch beats a launch per tensor."""
    dtype = phis[0].dtype
    if scratch is not None and scratch[0].dtype == dtype and _cpu_eager(grads):
        for g, out in zip(grads, scratch):
            torch.abs(g, out=out)
        a = scratch
    else:
        a = [t.to(dtype) for t in torch._foreach_abs(grads)]
    if pathway == "element":
        return a
    if pathway == "tensor":
        if _cpu_eager(a):
            return [t.mean() for t in a]  # sum's kernel is ~4× faster than _foreach_norm's
        means = torch._foreach_norm(a, 1)  # out-of-place division: see relative_fracture_
        return list(torch._foreach_div(means, [max(t.numel(), 1) for t in a]))
    # torch has no foreach reduction along a dim: the row means are one op per tensor.
    # A 0-d row ϕ (0-d θ, complex too) takes the tensor mean.
    return [_rows(t).mean(1) if phi.dim() > 0 else t.mean()
            for t, phi in zip(a, phis)]


def _multi_tensor_sgd_direction_step(
    params, grads, phis_b, bufs, original_params, all_bufs, indices, *, lr, momentum, dampening, nesterov,
    weight_decay, maximize,
) -> list[Tensor]:
    """θ ← θ − lr·ϕ·d for SGD; returns a dead parameter-shaped temporary (ϕ·d)."""
    if weight_decay != 0:
        # Reuse the intermediate memory (grads) already allocated for maximize
        if maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        if all(b is not None for b in bufs):
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads, alpha=1 - dampening)
        else:
            for k, b in enumerate(bufs):
                if b is None:
                    bufs[k] = grads[k].detach().clone()
                    all_bufs[indices[k]] = _like_param(bufs[k], original_params[k])
                else:
                    b.mul_(momentum).add_(grads[k], alpha=1 - dampening)
        if nesterov:
            grads = torch._foreach_add(grads, bufs, alpha=momentum)
        else:
            grads = bufs
    # ϕ·d first, then torch's own update θ += (−lr)·(ϕ·d): with ϕ = 1 it rounds as torch's
    # foreach SGD does (an addcmul would round θ + (−lr·d)·ϕ differently by an ulp).
    scaled = torch._foreach_mul(grads, phis_b)
    if scaled[0].dtype != params[0].dtype:  # float32 ϕ, bf16/fp16 θ: as single-tensor
        scaled = [s.to(p.dtype) for s, p in zip(scaled, params)]
    if isinstance(lr, Tensor):
        torch._foreach_mul_(scaled, -lr)
        torch._foreach_add_(params, scaled)
    else:
        torch._foreach_add_(params, scaled, alpha=-lr)
    return scaled


def _multi_tensor_adam_direction_step(
    params, grads, phis_b, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, base, lr,
    beta1, beta2, eps, amsgrad, weight_decay, maximize, capturable,
) -> list[Tensor]:
    """θ ← θ − lr·ϕ·d for Adam/AdamW; returns the dead denominators (scratch for the caller).

    Mirrors torch.optim.adam._multi_tensor_adam, with ϕ folded into the denominator.
    """
    if not torch.compiler.is_compiling() and state_steps[0].is_cpu:
        torch._foreach_add_(state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(state_steps, 1)
    if weight_decay != 0:
        if base == "adamw":
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        elif maximize:
            torch._foreach_add_(grads, params, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    fast = _fast_scalars(params)
    torch._foreach_mul_(exp_avg_sqs, torch.tensor(beta2, dtype=params[0].dtype) if fast else beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    del grads

    if capturable:
        bias_correction1 = torch._foreach_pow(beta1, state_steps)
        bias_correction2 = torch._foreach_pow(beta2, state_steps)
        torch._foreach_sub_(bias_correction1, 1)
        torch._foreach_sub_(bias_correction2, 1)
        torch._foreach_neg_(bias_correction2)
        torch._foreach_div_(bias_correction1, lr)
        torch._foreach_reciprocal_(bias_correction1)
        torch._foreach_sqrt_(bias_correction2)
        step_size, bias_correction2_sqrt = bias_correction1, bias_correction2
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_exp_avg_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, step_size)
        torch._foreach_div_(denom, phis_b)
        torch._foreach_addcdiv_(params, exp_avgs, denom)
    else:
        if _cpu_eager(state_steps):  # one read of all counts instead of an .item() each
            steps = torch.stack(state_steps).tolist()
        else:
            steps = [_get_value(s) for s in state_steps]
        bias_correction1 = [1 - beta1**s for s in steps]
        bias_correction2_sqrt = [(1 - beta2**s) ** 0.5 for s in steps]
        if amsgrad:
            torch._foreach_maximum_(max_exp_avg_sqs, exp_avg_sqs)
            denom = torch._foreach_sqrt(max_exp_avg_sqs)
        else:
            denom = torch._foreach_sqrt(exp_avg_sqs)
        if fast:
            # lr/bc1 · m / (√v/√bc2 + ε) = (lr·√bc2/bc1) · m / (√v + ε·√bc2): torch's step
            # with its division by √bc2 folded into two scalars, so that the division by ϕ
            # costs no pass more than torch's own.
            step_size = [-lr * bc2 / bc1 for bc1, bc2 in zip(bias_correction1, bias_correction2_sqrt)]
            eps_scaled = [eps * bc2 for bc2 in bias_correction2_sqrt]
            torch._foreach_add_(denom, _cpu_scalars(eps_scaled, denom[0].dtype))
        else:
            step_size = [(lr / bc) * -1 for bc in bias_correction1]
            torch._foreach_div_(denom, bias_correction2_sqrt)
            torch._foreach_add_(denom, eps)
        torch._foreach_div_(denom, phis_b)
        torch._foreach_addcdiv_(params, exp_avgs, denom, _stack_if_compiling(step_size))
    return denom


def torch_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    state_steps: list[Tensor],
    *,
    base: str,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    has_complex: bool,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
) -> None:
    """The base rule's step alone, by torch's own functional ``sgd``/``adam`` (same state lists,
    same implementation choice): the Sculptor's step when β = 0 and every ϕ is 1, at torch's
    cost and with torch's bits on every path."""
    if base == "sgd":
        _torch_sgd(
            params, grads, momentum_buffers, has_sparse_grad=any(g.is_sparse for g in grads),
            foreach=foreach, fused=fused,
            grad_scale=grad_scale, found_inf=found_inf, weight_decay=weight_decay,
            momentum=momentum, lr=lr, dampening=dampening, nesterov=nesterov, maximize=maximize,
        )
        return
    rule = _torch_adamw if base == "adamw" else _torch_adam
    rule(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, foreach=foreach,
        capturable=capturable, differentiable=differentiable, fused=fused,
        grad_scale=grad_scale, found_inf=found_inf, has_complex=has_complex, amsgrad=amsgrad,
        beta1=beta1, beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _default_impl(params: list[Tensor], differentiable: bool) -> str | None:
    """The implementation of a step given neither ``foreach`` nor ``fused``: "fused", "foreach",
    or None for torch's own choice.

    On the CPU the fused kernel wherever it applies (eager, plain float tensors): it costs
    0.4-1.3× torch's default step, where the single-tensor and foreach steps cost 1.4-4× on
    small models (benchmarks/README.md). It is built on first use; should the build fail, the
    step warns once and takes the foreach path, the faster of the other two. torch.compile,
    DTensors and complex parameters keep torch's choice, and so does CUDA: the Triton kernels
    have not run on a GPU yet.
    """
    if differentiable or not params or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return None
    from kintsugi_optim import _fused

    dtypes = _fused._FUSED_DTYPES
    for p in params:  # a plain loop: this runs every step, and small models' steps are short
        if not p.is_cpu or p.dtype not in dtypes or type(p) not in _PLAIN_TENSORS:
            return None
    return "fused" if _fused.cpu_kernel_available() else "foreach"


@_disable_dynamo_if_unsupported(single_tensor_fn=_single_tensor_sculpt)
def sculpt(
    params: list[Tensor],
    grads: list[Tensor],
    phis: list[Tensor],
    rhos: list[Tensor] | None,
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    momentum_buffers: list[Tensor | None],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    base: str,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad: bool,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    pathway: str,
    fracture: str,
    beta: float,
    gamma: float,
    l1: float,
    phi_min: float,
    phi_max: float | None,
    phi_norm: str | None,
    ascent: str,
    positivity: str,
) -> None:
    """Functional Sculptor step over one param group (see :class:`KintsugiOptimizer`).

    Per parameter, with ϕ from *before* this step's gilding (the two streams are simultaneous):
    fracture l from the gradient, θ ← θ − lr·ϕ·d with d the base rule's direction exactly as
    torch computes it, then ϕ ← gild(ϕ, l) over the pathway's scope. State lists are those of
    ``torch.optim.adam.adam`` / ``sgd`` (empty where the base rule has no such state);
    ``momentum_buffers`` entries that are None are created. ``rhos`` (the resilience scores ρ) is
    needed with ``positivity="softplus"`` only.
    """
    if fused is None and foreach is None:
        impl = _default_impl(params, differentiable)
        fused = impl == "fused"
        if impl == "foreach":
            foreach = True
        elif impl is None:
            _, foreach = _default_to_fused_or_foreach(params, differentiable, use_fused=False)
        if foreach and isinstance(lr, Tensor) and not capturable:
            foreach = False
    if foreach and fused:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    hyper = dict(
        base=base, lr=lr, beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad,
        momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay,
        maximize=maximize, capturable=capturable, differentiable=differentiable, pathway=pathway,
    )
    gilding = dict(
        fracture=fracture, beta=beta, gamma=gamma, l1=l1, phi_min=phi_min, phi_max=phi_max,
        phi_norm=phi_norm, ascent=ascent, positivity=positivity,
    )
    state = (params, grads, phis, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, momentum_buffers,
             state_steps)
    if fused and not torch.jit.is_scripting():
        from kintsugi_optim._fused import fused_sculpt

        fused_sculpt(*state, rhos, grad_scale, found_inf, **hyper, **gilding)
        return
    if grad_scale is not None or found_inf is not None:
        raise AssertionError("Expected grad_scale and found_inf to be None")
    foreach = bool(foreach) and not torch.jit.is_scripting()
    step = _multi_tensor_sculpt if foreach else _single_tensor_sculpt
    rho_of = {id(p): r for p, r in zip(phis, rhos)} if rhos is not None else None

    def gild_run(run_phis: list[Tensor], fractures: list[Tensor]) -> None:
        run_rhos = [rho_of[id(p)] for p in run_phis] if rho_of is not None else None
        gild_pathways(run_phis, fractures, run_rhos, pathway=pathway, foreach=foreach, **gilding)

    if pathway != "tensor":  # each tensor is its own scope: gild it while it is in cache
        step(*state, **hyper, gild_run=gild_run)
        return
    # The tensor pathway's scope is the whole group: gild once, after every θ step.
    scope_phis: list[Tensor] = []
    scope_fractures: list[Tensor] = []

    def collect(run_phis: list[Tensor], fractures: list[Tensor]) -> None:
        scope_phis.extend(run_phis)
        scope_fractures.extend(fractures)

    step(*state, **hyper, gild_run=collect)
    gild_run(scope_phis, scope_fractures)


def gilder_step(
    phis: list[Tensor],
    grads: list[Tensor],
    rhos: list[Tensor] | None,
    *,
    lr: float | Tensor,
    beta: float,
    fracture: str,
    foreach: bool | None = None,
    found_inf: Tensor | None = None,
    **options,
) -> None:
    """Functional Gilder step (docs/maths.md §2.4): ϕ ← gild(ϕ, l) with l = ϕ.grad (relative: scaled by
    its mean |l|) and effective rate β·lr, each ϕ tensor its own scope.

    ``found_inf`` (from ``torch.amp.GradScaler``): where it is > 0 the step is skipped, every ϕ
    and ρ left bitwise as it was; the choice is made on the device, without a host sync.
    """
    if not phis:
        return
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(phis, False, use_fused=False)
    if isinstance(lr, Tensor):
        lr = _to_scalar(lr)
    fractures = torch._foreach_mul(grads, 1.0) if foreach else [g.clone() for g in grads]
    updated = phis + (rhos or [])
    before = [t.clone() for t in updated] if found_inf is not None else []
    gild(phis, fractures, rhos, beta=beta * lr, relative=fracture == "relative",
         foreach=foreach, **options)
    if found_inf is not None:
        skip = found_inf > 0
        for t, old in zip(updated, before):
            t.copy_(torch.where(skip.to(t.device), old, t))

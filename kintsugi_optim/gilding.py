r"""Gilding (docs/maths.md §2.2): the one kernel through which every ϕ of the package rises.

:func:`gild` is the rule itself, in a single-tensor form (the readable reference) and a
``torch._foreach_*`` form; :func:`gild_pathways` applies it over a pathway's scope (per tensor,
or across the param group for the tensor pathway) with a :class:`GildingOptions`;
:func:`gilder_step` is the Gilder's step (docs/maths.md §2.4). The Sculptor, ``Gilded``, the
Gilder, VWPR and the loss level all end here.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kintsugi_optim._compat import _default_to_fused_or_foreach, _to_scalar
from kintsugi_optim._kernels import host
from kintsugi_optim.fracture import relative_fracture_
from kintsugi_optim.options import GildingOptions

__all__ = ["gild", "gild_pathways", "gilder_step", "softplus_inverse"]


def softplus_inverse(phi: Tensor) -> Tensor:
    """The resilience score ρ with softplus(ρ) = ϕ, computed stably: log(expm1(ϕ)) =
    ϕ + log(−expm1(−ϕ)) neither overflows for large ϕ nor loses precision for small ϕ."""
    return phi + torch.log(-torch.expm1(-phi))


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


def _multi_tensor_gild(
    phis, fractures, rhos, *, beta, gamma, l1, phi_min, phi_max, phi_norm, ascent, relative,
    assume_nonnegative,
) -> None:
    for (device_phis, u, device_rhos), _ in host._grouped([phis, fractures, rhos or []]):
        on_host = host._cpu_eager(device_phis)
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
                    rates = host._cpu_scalars(folded, acc)  # ϕ += (β/mean)·l in one pass
                else:
                    torch._foreach_mul_(u, host._cpu_scalars(scales, acc))
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
            torch._foreach_div_(device_phis, host._cpu_scalars(means, acc))
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


def gild_pathways(
    phis: list[Tensor],
    fractures: list[Tensor],
    rhos: list[Tensor] | None,
    options: GildingOptions,
    *,
    foreach: bool,
) -> None:
    """Apply ``options.fracture`` ("relative"/"abs") and :func:`gild` over the scope of
    ``options.pathway``.

    Element and row pathways are scoped per tensor. The tensor pathway has one 0-d ϕ per
    parameter and is scoped over the whole param group: its ϕ are gilded as one stacked vector.
    ``fractures`` are raw (|g| reduced to the pathway, l ≥ 0) and used as scratch.
    """
    if not phis:
        return
    pathway = options.pathway
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
    gild(scope_phis, scope_fractures, scope_rhos, relative=options.fracture == "relative",
         assume_nonnegative=True, foreach=foreach, **options.rule_keywords())
    if pathway == "tensor":
        for k, (phi, new) in enumerate(zip(phis, scope_phis[0].unbind())):
            # A ϕ narrower than the stack stays finite and normal in its own dtype.
            finfo = torch.finfo(phi.dtype)
            phi.copy_(new.clamp(finfo.tiny, finfo.max))
            if rhos:
                rhos[k].copy_(softplus_inverse(phi))


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
    gamma: float = 0.0,
    l1: float = 0.0,
    phi_min: float = 1e-3,
    phi_max: float | None = None,
    phi_norm: str | None = None,
    ascent: str = "additive",
    positivity: str = "clamp",
) -> None:
    """Functional Gilder step (docs/maths.md §2.4): ϕ ← gild(ϕ, l) with l = ϕ.grad (relative:
    scaled by its mean |l|) and effective rate β·lr, each ϕ tensor its own scope.

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
    gild(phis, fractures, rhos, beta=beta * lr, gamma=gamma, l1=l1, phi_min=phi_min,
         phi_max=phi_max, phi_norm=phi_norm, ascent=ascent, positivity=positivity,
         relative=fracture == "relative", foreach=foreach)
    if found_inf is not None:
        skip = found_inf > 0
        for t, old in zip(updated, before):
            t.copy_(torch.where(skip.to(t.device), old, t))

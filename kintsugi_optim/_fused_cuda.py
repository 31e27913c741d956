"""The fused Sculptor step on CUDA, in Triton (imported by :mod:`kintsugi_optim._fused` only when a
CUDA tensor is stepped, so CPU-only installs need no triton).

Each pass is one launch over every tensor of a dtype, as torch's ``multi_tensor_apply`` does: a
device table holds each tensor's buffer addresses and sizes, a block table lists the slices the
programs take. Both are built on the host and cached by the buffers' addresses, which change
only when a buffer is reallocated, so a training loop builds them once and a step does no host
work per element and no host sync.

    element: [_abs_sum_kernel: Σ|g| if fracture="relative"] → _flat_step_kernel: θ step + gilding,
             Σϕ → [_normalise_kernel if phi_norm="mean": where mean ϕ is off 1 by over 4 eps]
    row:     _row_step_kernel: θ step + each row's Σ|g| → _gild_scopes_kernel, a program per tensor
    tensor:  _flat_step_kernel: θ step + Σ|g| → _gild_scopes_kernel, one program for the group

Unlike the CPU kernel, which makes these passes per tensor while it is in cache, a launch streams
all tensors before the next begins: the relative fracture costs one more read of g (40 instead
of 36 bytes per fp32 parameter). The normalisation would cost a read and write of ϕ more, but
its factor is foreseen and applied in the step's pass (FORESEE, as in the CPU kernel), so its
launch reads ϕ only for tensors whose mean ϕ ended more than 4 eps from 1.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from itertools import accumulate

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

__all__ = ["fused_sculpt_cuda"]

# Columns of the tensor table (int64, one row per tensor).
_PARAM = tl.constexpr(0)
_GRAD = tl.constexpr(1)
_EXP_AVG = tl.constexpr(2)
_EXP_AVG_SQ = tl.constexpr(3)
_MAX_EXP_AVG_SQ = tl.constexpr(4)
_MOMENTUM = tl.constexpr(5)
_PHI = tl.constexpr(6)
_RHO = tl.constexpr(7)
_STEP = tl.constexpr(8)
_NUMEL = tl.constexpr(9)
_ROW_LEN = tl.constexpr(10)
_ROW_OFFSET = tl.constexpr(11)  # where its rows' Σ|g| start in the row scratch
_FRESH = tl.constexpr(12)  # SGD momentum buffer created this step
_COLUMNS = tl.constexpr(16)

_SGD = tl.constexpr(0)
_ADAM = tl.constexpr(1)
_ADAMW = tl.constexpr(2)

_BLOCK = 2048  # elements per program of the flat kernels
_NUM_WARPS = 8
_ROW_TILE = 2048  # elements per program of the row kernel: [TILE // C rows, C columns]
_SCOPE_CHUNK = 1024  # ϕ per iteration of a scope program
# Multiply-adds fused (FMA), as nvcc compiles torch's own fused kernels; said explicitly since
# Triton 3.10 stops fusing by default.
_COMPILE = dict(enable_fp_fusion=True)


@triton.jit
def _address(tensors, row, column: tl.constexpr, dtype: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer to the buffer in column `column` of table row `row`."""
    address = tl.load(row + column)
    if ALIGNED:
        # Triton knows nothing of an address cast from an integer, so its loads stay 4 bytes
        # wide. Addressed relative to the table argument (16-byte aligned, and known to be) by an
        # offset that is a multiple of 16 bytes (the host checked every buffer), they become
        # 16-byte accesses: 4 fp32 per instruction.
        base = tensors.to(tl.pointer_type(dtype), bitcast=True)
        return base + (address - tensors.to(tl.int64)) // 16 * (128 // dtype.primitive_bitwidth)
    return address.to(tl.pointer_type(dtype))


@triton.jit
def _softplus(x):
    # F.softplus with beta=1, threshold=20
    return tl.where(x > 20, x, libdevice.log1p(tl.exp(x)))


@triton.jit
def _softplus_inverse(phi):
    return phi + tl.log(-libdevice.expm1(-phi))


@triton.jit
def _div_rn(a, b, CT: tl.constexpr):
    # Correctly rounded, as nvcc compiles torch's kernels: Triton's float32 division is
    # approximate by default (its float64 one is not, and div_rn takes float32 only).
    if CT == tl.float32:
        return tl.div_rn(a, b)
    return a / b


@triton.jit
def _sqrt_rn(x, CT: tl.constexpr):
    if CT == tl.float32:  # as _div_rn
        return tl.sqrt_rn(x)
    return tl.sqrt(x)


@triton.jit
def _scalar(value, CT: tl.constexpr):
    return tl.full([], value, CT)


@triton.jit
def _base_step(
    tensors, row, offs, mask, phi, lr, grad_scale, lerp_weight, beta2, one_minus_beta2, log_beta1,
    log_beta2, eps, weight_decay, momentum, dampening_keep,
    DTYPE: tl.constexpr, CT: tl.constexpr, BASE: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    UNSCALE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """θ ← θ − lr·ϕ·d for the lanes `offs` (any shape) of the tensor in table row `row`, with
    SGD/Adam/AdamW's d as torch computes it; returns |g| (unscaled, before weight decay).

    The scalars come in float64 (the kernels' arguments) and are rounded to CT where they meet
    the data, as torch's fused kernels do with their double arguments; lr·wd and lr / (1 − β1^t)
    are formed in float64 first, as torch forms them in Python floats."""
    weight_decay_ct = weight_decay.to(CT)
    grad_ptr = _address(tensors, row, _GRAD, DTYPE, ALIGNED) + offs
    g = tl.load(grad_ptr, mask=mask).to(CT)
    if UNSCALE:  # GradScaler: unscale, and store the grads unscaled as torch's fused Adam does
        g = g / grad_scale
        tl.store(grad_ptr, g.to(DTYPE), mask=mask)
    if MAXIMIZE:
        g = -g
    fracture = tl.abs(g)
    param_ptr = _address(tensors, row, _PARAM, DTYPE, ALIGNED) + offs
    p = tl.load(param_ptr, mask=mask).to(CT)
    if BASE == _SGD:
        if weight_decay != 0:
            g = g + p * weight_decay_ct
        d = g
        if HAS_MOMENTUM:
            momentum_ct = momentum.to(CT)
            buf_ptr = _address(tensors, row, _MOMENTUM, DTYPE, ALIGNED) + offs
            if tl.load(row + _FRESH) != 0:
                buf = g
            else:
                buf = tl.load(buf_ptr, mask=mask).to(CT) * momentum_ct + g * dampening_keep.to(CT)
            tl.store(buf_ptr, buf.to(DTYPE), mask=mask)
            if NESTEROV:
                d = g + buf * momentum_ct
            else:
                d = buf
        p = p - lr.to(CT) * (d * phi)
    else:
        # Bias corrections in float64, as torch's fused Adam computes them.
        step = tl.load(_address(tensors, row, _STEP, tl.float32, False)).to(tl.float64)
        bias_correction1 = 1.0 - tl.exp(step * log_beta1)
        bias_correction2 = 1.0 - tl.exp(step * log_beta2)
        step_size = (lr / bias_correction1).to(CT)
        inv_bias_correction2_sqrt = (1.0 / tl.sqrt(bias_correction2)).to(CT)
        if BASE == _ADAMW:
            p = p * (1 - lr * weight_decay).to(CT)
        elif weight_decay != 0:
            g = g + p * weight_decay_ct
        m_ptr = _address(tensors, row, _EXP_AVG, DTYPE, ALIGNED) + offs
        v_ptr = _address(tensors, row, _EXP_AVG_SQ, DTYPE, ALIGNED) + offs
        m = tl.load(m_ptr, mask=mask).to(CT)
        weight = lerp_weight.to(CT)
        if weight < 0.5:  # torch's lerp, whose formula depends on the weight as rounded
            m = m + weight * (g - m)
        else:
            m = g - (g - m) * (1 - weight)
        v = tl.load(v_ptr, mask=mask).to(CT) * beta2.to(CT) + one_minus_beta2.to(CT) * g * g
        tl.store(m_ptr, m.to(DTYPE), mask=mask)
        tl.store(v_ptr, v.to(DTYPE), mask=mask)
        second = v
        if AMSGRAD:
            max_ptr = _address(tensors, row, _MAX_EXP_AVG_SQ, DTYPE, ALIGNED) + offs
            second = tl.maximum(tl.load(max_ptr, mask=mask).to(CT), v, propagate_nan=tl.PropagateNan.ALL)
            tl.store(max_ptr, second.to(DTYPE), mask=mask)
        denom = _sqrt_rn(second, CT) * inv_bias_correction2_sqrt + eps.to(CT)
        p = p - step_size * _div_rn(m * phi, denom, CT)
    tl.store(param_ptr, p.to(DTYPE), mask=mask)
    return fracture


@triton.jit
def _gild(phi, l, rho, beta, gamma, l1, phi_min, cap, MULTIPLICATIVE: tl.constexpr,
          SOFTPLUS: tl.constexpr):
    """ϕ' (clamped, before normalisation) and ρ' for fracture l (docs/maths.md §2.2); the scalars in
    float64, rounded to ϕ's compute type here."""
    ct = phi.dtype
    beta, gamma, l1, phi_min = beta.to(ct), gamma.to(ct), l1.to(ct), phi_min.to(ct)
    u = l
    if gamma != 0:
        u = u * tl.maximum(1 - gamma * phi, 0)
    if l1 != 0:
        u = u - l1
    u = tl.where(tl.abs(u) < float("inf"), u, 0)  # non-finite u (NaN, ±inf) → 0
    u = u * beta
    if SOFTPLUS:
        rho = rho + u * tl.sigmoid(rho)
        out = _softplus(rho)
    elif MULTIPLICATIVE:
        out = phi * tl.exp(u)
    else:
        out = phi + u
    return tl.minimum(tl.maximum(out, phi_min), cap), rho


@triton.jit
def _cap(n, phi_max, CT: tl.constexpr, FMAX: tl.constexpr, HAS_PHI_MAX: tl.constexpr,
         NORM: tl.constexpr):
    # phi_max, at most the dtype's max, ÷ n under phi_norm="mean" so Σϕ cannot overflow
    cap = _scalar(FMAX, CT)
    if NORM:
        cap = cap / tl.cast(tl.maximum(n, 1), CT)
    if HAS_PHI_MAX:
        cap = tl.minimum(cap, tl.cast(phi_max, CT))
    return cap


@triton.jit
def _foreseen(sums, t, numel, inv_mean, beta, l1, phi_min, cap, FMAX: tl.constexpr,
              TINY: tl.constexpr):
    """The phi_norm="mean" factor n/Σϕ' of tensor t foreseen from its Σ|g| (float64; 0 where it
    cannot be), as the CPU kernel's foreseen_factor: with additive ascent, clamp positivity, no
    damping and the relative fracture, Σϕ' = n + β·Σ(l − λ) while no pathway clamps."""
    n = numel.to(tl.float64)
    u_total = tl.load(sums + 2 * t) * inv_mean.to(tl.float64) - n * l1
    factor = n / (n + beta * u_total)
    # ϕ'·factor must neither overflow nor underflow, or a rescaling could not recover ϕ'.
    lossless = (factor * phi_min >= TINY) & (factor * cap.to(tl.float64) <= FMAX)
    return tl.where(lossless, factor, 0.0)


@triton.jit
def _live(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """False when GradScaler found inf/NaN grads: ANDed into every mask, it skips the step."""
    if HAS_FOUND_INF:
        return tl.load(found_inf_ptr) == 0
    return tl.full([], 1, tl.int1)


@triton.jit
def _flat_block(blocks, tensors, BLOCK: tl.constexpr):
    """(tensor, table row, offsets, numel, whole) of this program's block of a flat launch; `whole`
    blocks need no bounds mask, and a uniform mask lets accesses vectorise."""
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid)
    row = tensors + t * _COLUMNS
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), BLOCK)
    numel = tl.load(row + _NUMEL)
    return t, row, start + tl.arange(0, BLOCK), numel, start + BLOCK <= numel


@triton.jit
def _abs_sum_block(tensors, row, t, offs, mask, sums, grad_scale_ptr, DTYPE: tl.constexpr,
                   CT: tl.constexpr, UNSCALE: tl.constexpr, ALIGNED: tl.constexpr):
    g = tl.load(_address(tensors, row, _GRAD, DTYPE, ALIGNED) + offs, mask=mask, other=0).to(CT)
    if UNSCALE:
        g = g / tl.load(grad_scale_ptr).to(CT)
    tl.atomic_add(sums + 2 * t, tl.sum(tl.abs(g), axis=0).to(tl.float64))


@triton.jit
def _abs_sum_kernel(
    blocks, tensors, sums, grad_scale_ptr, found_inf_ptr,
    DTYPE: tl.constexpr, CT: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """sums[t, 0] += Σ|g| over each block: the relative fracture's denominator."""
    t, row, offs, numel, whole = _flat_block(blocks, tensors, BLOCK)
    live = _live(found_inf_ptr, HAS_FOUND_INF)
    if whole:
        _abs_sum_block(tensors, row, t, offs, live, sums, grad_scale_ptr, DTYPE, CT, UNSCALE, ALIGNED)
    else:
        _abs_sum_block(tensors, row, t, offs, (offs < numel) & live, sums, grad_scale_ptr, DTYPE, CT,
                       UNSCALE, ALIGNED)


@triton.jit
def _flat_step_block(
    tensors, row, t, offs, mask, numel, sums, lr, grad_scale, lerp_weight, beta2, one_minus_beta2,
    log_beta1, log_beta2, eps, weight_decay, momentum, dampening_keep, beta, gamma, l1, phi_min,
    phi_max,
    DTYPE: tl.constexpr, PHI_DTYPE: tl.constexpr, CT: tl.constexpr, FMAX: tl.constexpr,
    TINY: tl.constexpr, BASE: tl.constexpr, AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, UNSCALE: tl.constexpr,
    ELEMENT: tl.constexpr, RELATIVE: tl.constexpr, NORM: tl.constexpr,
    HAS_PHI_MAX: tl.constexpr, MULTIPLICATIVE: tl.constexpr, SOFTPLUS: tl.constexpr,
    FORESEE: tl.constexpr, ALIGNED: tl.constexpr,
):
    phi_ptr = _address(tensors, row, _PHI, PHI_DTYPE, ALIGNED)
    if ELEMENT:
        phi = tl.load(phi_ptr + offs, mask=mask, other=1).to(CT)
    else:
        phi = tl.load(phi_ptr).to(CT)
    fracture = _base_step(
        tensors, row, offs, mask, phi, lr, grad_scale, lerp_weight, beta2, one_minus_beta2, log_beta1,
        log_beta2, eps, weight_decay, momentum, dampening_keep, DTYPE, CT, BASE, AMSGRAD,
        HAS_MOMENTUM, NESTEROV, MAXIMIZE, UNSCALE, ALIGNED,
    )
    if ELEMENT:
        l = fracture
        if RELATIVE:
            mean = tl.load(sums + 2 * t) / numel
            mean = tl.where(mean != mean, mean, tl.maximum(mean, _scalar(TINY, tl.float64)))
            inv_mean = (1.0 / mean).to(CT)
            l = l * inv_mean
        rho_ptr = _address(tensors, row, _RHO, PHI_DTYPE, ALIGNED) + offs
        rho = tl.load(rho_ptr, mask=mask).to(CT) if SOFTPLUS else phi
        cap = _cap(numel, phi_max, CT, FMAX, HAS_PHI_MAX, NORM)
        out, rho = _gild(phi, l, rho, beta, gamma, l1, phi_min, cap, MULTIPLICATIVE, SOFTPLUS)
        stored = out
        if FORESEE:  # stored normalised; _normalise_kernel rescales where the foresight missed
            foreseen = _foreseen(sums, t, numel, inv_mean, beta, l1, phi_min, cap, FMAX, TINY)
            stored = out * tl.where(foreseen != 0, foreseen, 1.0).to(CT)
        if NORM:  # the normalisation's floor, in case no rescaling follows
            stored = tl.maximum(stored, _scalar(TINY, CT))
        tl.store(phi_ptr + offs, stored.to(PHI_DTYPE), mask=mask)
        if NORM:
            tl.atomic_add(sums + 2 * t + 1, tl.sum(tl.where(mask, stored, 0), axis=0).to(tl.float64))
        elif SOFTPLUS:
            tl.store(rho_ptr, _softplus_inverse(out).to(PHI_DTYPE), mask=mask)
    else:
        tl.atomic_add(sums + 2 * t, tl.sum(fracture, axis=0).to(tl.float64))


@triton.jit
def _flat_step_kernel(
    blocks, tensors, sums, lr_ptr, lr_value: tl.float64, grad_scale_ptr, found_inf_ptr,
    lerp_weight: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
    log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    momentum: tl.float64, dampening_keep: tl.float64, beta: tl.float64, gamma: tl.float64,
    l1: tl.float64, phi_min: tl.float64, phi_max: tl.float64,
    DTYPE: tl.constexpr, PHI_DTYPE: tl.constexpr, CT: tl.constexpr, FMAX: tl.constexpr,
    TINY: tl.constexpr, BASE: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr, UNSCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    ELEMENT: tl.constexpr, RELATIVE: tl.constexpr, NORM: tl.constexpr,
    HAS_PHI_MAX: tl.constexpr, MULTIPLICATIVE: tl.constexpr, SOFTPLUS: tl.constexpr,
    FORESEE: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """θ step of one block. Element pathway: each lane gilds its own ϕ (sums[t, 1] += Σϕ' for
    the normalisation); tensor pathway: one ϕ for the tensor, sums[t, 0] += Σ|g|."""
    t, row, offs, numel, whole = _flat_block(blocks, tensors, BLOCK)
    live = _live(found_inf_ptr, HAS_FOUND_INF)
    lr = tl.load(lr_ptr).to(tl.float64) if LR_IS_TENSOR else lr_value
    grad_scale = tl.load(grad_scale_ptr).to(CT) if UNSCALE else 1.0
    if whole:
        _flat_step_block(
            tensors, row, t, offs, live, numel, sums, lr, grad_scale, lerp_weight, beta2,
            one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, momentum, dampening_keep,
            beta, gamma, l1, phi_min, phi_max, DTYPE, PHI_DTYPE, CT, FMAX, TINY, BASE, AMSGRAD,
            HAS_MOMENTUM, NESTEROV, MAXIMIZE, UNSCALE, ELEMENT, RELATIVE, NORM, HAS_PHI_MAX,
            MULTIPLICATIVE, SOFTPLUS, FORESEE, ALIGNED,
        )
    else:
        _flat_step_block(
            tensors, row, t, offs, (offs < numel) & live, numel, sums, lr, grad_scale, lerp_weight, beta2,
            one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, momentum, dampening_keep,
            beta, gamma, l1, phi_min, phi_max, DTYPE, PHI_DTYPE, CT, FMAX, TINY, BASE, AMSGRAD,
            HAS_MOMENTUM, NESTEROV, MAXIMIZE, UNSCALE, ELEMENT, RELATIVE, NORM, HAS_PHI_MAX,
            MULTIPLICATIVE, SOFTPLUS, FORESEE, ALIGNED,
        )


@triton.jit
def _row_step_kernel(
    blocks, tensors, row_sums, lr_ptr, lr_value: tl.float64, grad_scale_ptr, found_inf_ptr,
    lerp_weight: tl.float64, beta2: tl.float64, one_minus_beta2: tl.float64,
    log_beta1: tl.float64, log_beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    momentum: tl.float64, dampening_keep: tl.float64,
    DTYPE: tl.constexpr, PHI_DTYPE: tl.constexpr, CT: tl.constexpr, BASE: tl.constexpr,
    AMSGRAD: tl.constexpr, HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr, LR_IS_TENSOR: tl.constexpr, UNSCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
):
    """θ step of a [ROWS, COLS] tile of a row-pathway tensor (each row θ[i] a contiguous run
    of row_len elements), adding each row's Σ|g| into row_sums. ALIGNED: buffers 16-byte
    aligned and rows a multiple of 16 bytes long, so every row starts aligned."""
    pid = tl.program_id(0)
    t = tl.load(blocks + 3 * pid)
    row = tensors + t * _COLUMNS
    row_len = tl.load(row + _ROW_LEN)
    if ALIGNED:
        row_len = tl.multiple_of(row_len, 128 // DTYPE.primitive_bitwidth)
    n_rows = tl.load(row + _NUMEL) // row_len
    rows = tl.load(blocks + 3 * pid + 1) + tl.arange(0, ROWS)
    cols = tl.multiple_of(tl.load(blocks + 3 * pid + 2), COLS) + tl.arange(0, COLS)
    row_mask = (rows < n_rows) & _live(found_inf_ptr, HAS_FOUND_INF)
    mask = row_mask[:, None] & (cols < row_len)[None, :]
    offs = rows[:, None] * row_len + cols[None, :]
    lr = tl.load(lr_ptr).to(tl.float64) if LR_IS_TENSOR else lr_value
    grad_scale = tl.load(grad_scale_ptr).to(CT) if UNSCALE else 1.0
    phi = tl.load(_address(tensors, row, _PHI, PHI_DTYPE, False) + rows, mask=row_mask).to(CT)
    fracture = _base_step(
        tensors, row, offs, mask, phi[:, None], lr, grad_scale, lerp_weight, beta2,
        one_minus_beta2, log_beta1, log_beta2, eps, weight_decay, momentum, dampening_keep, DTYPE,
        CT, BASE, AMSGRAD, HAS_MOMENTUM, NESTEROV, MAXIMIZE, UNSCALE, ALIGNED,
    )
    row_sum = tl.sum(tl.where(mask, fracture, 0), axis=1)
    tl.atomic_add(row_sums + tl.load(row + _ROW_OFFSET) + rows, row_sum.to(tl.float64), mask=row_mask)


@triton.jit
def _normalise_block(tensors, row, t, offs, mask, numel, sums, PHI_DTYPE: tl.constexpr,
                     CT: tl.constexpr, TINY: tl.constexpr, SOFTPLUS: tl.constexpr,
                     FORESIGHT: tl.constexpr, ALIGNED: tl.constexpr):
    phi_sum = tl.load(sums + 2 * t + 1)  # of ϕ as stored
    if not SOFTPLUS:  # (under softplus this pass also derives ρ)
        # Leave ϕ where its mean is within FORESIGHT of 1: where the step's foreseen factor
        # held (it misses on the first step, for a clamped pathway, ϕ set by hand, rounding drift).
        mask = mask & (tl.abs(phi_sum / numel - 1) > FORESIGHT)
    factor = _div_rn(numel.to(CT), phi_sum.to(CT), CT)  # ϕ ≡ 1 stays 1
    phi_ptr = _address(tensors, row, _PHI, PHI_DTYPE, ALIGNED) + offs
    out = tl.maximum(tl.load(phi_ptr, mask=mask).to(CT) * factor, _scalar(TINY, CT))
    tl.store(phi_ptr, out.to(PHI_DTYPE), mask=mask)
    if SOFTPLUS:
        tl.store(_address(tensors, row, _RHO, PHI_DTYPE, ALIGNED) + offs,
                 _softplus_inverse(out).to(PHI_DTYPE), mask=mask)


@triton.jit
def _normalise_kernel(
    blocks, tensors, sums, found_inf_ptr,
    PHI_DTYPE: tl.constexpr, CT: tl.constexpr, TINY: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    SOFTPLUS: tl.constexpr, FORESIGHT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """Element pathway, phi_norm="mean": ϕ ← max(ϕ·n/Σϕ, tiny), and ρ re-derived, for tensors
    whose mean ϕ as stored is more than FORESIGHT from 1 (all of them under softplus)."""
    t, row, offs, numel, whole = _flat_block(blocks, tensors, BLOCK)
    live = _live(found_inf_ptr, HAS_FOUND_INF)
    if whole:
        _normalise_block(tensors, row, t, offs, live, numel, sums, PHI_DTYPE, CT, TINY, SOFTPLUS,
                         FORESIGHT, ALIGNED)
    else:
        _normalise_block(tensors, row, t, offs, (offs < numel) & live, numel, sums, PHI_DTYPE, CT,
                         TINY, SOFTPLUS, FORESIGHT, ALIGNED)


@triton.jit
def _scope_lanes(tensors, row, sums, row_sums, row_len, idx, mask, PHI_DTYPE: tl.constexpr,
                 GROUP: tl.constexpr):
    """Fracture l and the ϕ and ρ pointers of lanes `idx` of a scope (see _gild_scopes_kernel)."""
    if GROUP:
        entry = tensors + idx * _COLUMNS
        l = tl.load(sums + 2 * idx, mask=mask, other=0) / tl.load(entry + _NUMEL, mask=mask, other=1)
        phi_ptr = tl.load(entry + _PHI, mask=mask, other=0).to(tl.pointer_type(PHI_DTYPE))
        rho_ptr = tl.load(entry + _RHO, mask=mask, other=0).to(tl.pointer_type(PHI_DTYPE))
    else:
        l = tl.load(row_sums + tl.load(row + _ROW_OFFSET) + idx, mask=mask, other=0) / row_len
        phi_ptr = _address(tensors, row, _PHI, PHI_DTYPE, False) + idx
        rho_ptr = _address(tensors, row, _RHO, PHI_DTYPE, False) + idx
    return l, phi_ptr, rho_ptr


@triton.jit
def _gild_scopes_kernel(
    scopes, tensors, sums, row_sums, found_inf_ptr, n_group, beta: tl.float64, gamma: tl.float64,
    l1: tl.float64, phi_min: tl.float64, phi_max: tl.float64,
    PHI_DTYPE: tl.constexpr, CT: tl.constexpr, FMAX: tl.constexpr, TINY: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, GROUP: tl.constexpr, RELATIVE: tl.constexpr,
    NORM: tl.constexpr, HAS_PHI_MAX: tl.constexpr, MULTIPLICATIVE: tl.constexpr,
    SOFTPLUS: tl.constexpr, CHUNK: tl.constexpr,
):
    """Gilds one scope per program, as the reference gilds a vector: relative fracture, gilding
    with Σϕ', normalisation. GROUP=False: the row ϕ of tensor scopes[pid] (l = row mean |g|);
    GROUP=True: the 0-d ϕ of the group's n_group tensors (l = tensor mean |g|)."""
    if GROUP:
        row, row_len, n = tensors, 1, n_group
    else:
        row = tensors + tl.load(scopes + tl.program_id(0)) * _COLUMNS
        row_len = tl.load(row + _ROW_LEN)
        n = tl.load(row + _NUMEL) // row_len
    live = _live(found_inf_ptr, HAS_FOUND_INF)
    lanes = tl.arange(0, CHUNK)

    inv_mean = 1.0
    if RELATIVE:
        total = tl.zeros([CHUNK], tl.float64)
        for start in range(0, n, CHUNK):
            idx = start + lanes
            mask = (idx < n) & live
            l, _, _ = _scope_lanes(tensors, row, sums, row_sums, row_len, idx, mask, PHI_DTYPE, GROUP)
            total += tl.where(mask, tl.abs(l), 0)
        mean = tl.sum(total, axis=0) / n
        mean = tl.where(mean != mean, mean, tl.maximum(mean, _scalar(TINY, tl.float64)))
        inv_mean = 1.0 / mean
    cap = _cap(n, phi_max, CT, FMAX, HAS_PHI_MAX, NORM)
    phi_total = tl.zeros([CHUNK], CT)
    for start in range(0, n, CHUNK):
        idx = start + lanes
        mask = (idx < n) & live
        l, phi_ptr, rho_ptr = _scope_lanes(tensors, row, sums, row_sums, row_len, idx, mask,
                                           PHI_DTYPE, GROUP)
        phi = tl.load(phi_ptr, mask=mask, other=1).to(CT)
        rho = tl.load(rho_ptr, mask=mask).to(CT) if SOFTPLUS else phi
        out, rho = _gild(phi, (l * inv_mean).to(CT), rho, beta, gamma, l1, phi_min, cap,
                         MULTIPLICATIVE, SOFTPLUS)
        tl.store(phi_ptr, out.to(PHI_DTYPE), mask=mask)
        if SOFTPLUS and not NORM:
            tl.store(rho_ptr, _softplus_inverse(out).to(PHI_DTYPE), mask=mask)
        phi_total += tl.where(mask, out, 0)
    if NORM:
        # The normalisation reads ϕ' that other threads of this program wrote.
        tl.debug_barrier()
        factor = _div_rn(tl.cast(n, CT), tl.sum(phi_total, axis=0), CT)  # ϕ ≡ 1 stays 1
        for start in range(0, n, CHUNK):
            idx = start + lanes
            mask = (idx < n) & live
            _, phi_ptr, rho_ptr = _scope_lanes(tensors, row, sums, row_sums, row_len, idx, mask,
                                               PHI_DTYPE, GROUP)
            out = tl.maximum(tl.load(phi_ptr, mask=mask).to(CT) * factor, _scalar(TINY, CT))
            tl.store(phi_ptr, out.to(PHI_DTYPE), mask=mask)
            if SOFTPLUS:
                tl.store(rho_ptr, _softplus_inverse(out).to(PHI_DTYPE), mask=mask)


# ---------------------------------------------------------------------------------------------
# Host side: launch tables, cached by the buffers' addresses
# ---------------------------------------------------------------------------------------------

_TRITON_DTYPES = {
    torch.float32: tl.float32, torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
}


def _to_device(rows: list, device: torch.device) -> Tensor:
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cpu":  # only in the tests (see _launch_context)
        return table
    # Pinned and non-blocking: building a plan never waits for the GPU.
    return table.pin_memory().to(device, non_blocking=True)


def _launch_context(device: torch.device):
    """The context the kernels launch in. CPU tensors come here only from the tests, which
    check the kernels without a GPU: run in Triton's interpreter (``TRITON_INTERPRET=1``), or
    compiled for a GPU they never launch on (tests/triton_interpreter.py)."""
    return contextlib.nullcontext() if device.type == "cpu" else torch.cuda.device(device)


class _Launches:
    """The launches of one dtype's tensors: flat blocks (element/tensor pathway, and row-pathway
    tensors whose rows are single elements) and [rows, cols] tiles of row-pathway tensors,
    grouped by tile width and by whether their rows start 16-byte aligned."""

    def __init__(self, dtype, phi_dtype, indices, numels, row_lens, aligned, device, pathway):
        self.dtype, self.phi_dtype, self.aligned = dtype, phi_dtype, aligned
        item = torch.empty((), dtype=dtype).element_size()
        flat, tiles, row_scopes = [], {}, []
        for t in indices:
            if pathway == "row" and row_lens[t] > 1:
                cols = min(max(triton.next_power_of_2(row_lens[t]), 16), 256)
                rows = _ROW_TILE // cols
                rows_aligned = aligned and row_lens[t] * item % 16 == 0
                tiles.setdefault((cols, rows_aligned), []).extend(
                    (t, r, c)
                    for r in range(0, numels[t] // row_lens[t], rows)
                    for c in range(0, row_lens[t], cols)
                )
                row_scopes.append(t)
            else:
                flat.extend((t, start) for start in range(0, numels[t], _BLOCK))
        self.flat = _to_device(flat, device) if flat else None
        self.n_flat = len(flat)
        self.tiles = [(cols, rows_aligned, _to_device(blocks, device), len(blocks))
                      for (cols, rows_aligned), blocks in tiles.items()]
        self.row_scopes = _to_device(row_scopes, device) if row_scopes else None


class _Plan:
    """Device tables for one group's tensors on one device."""

    def __init__(self, pathway, params, grads, phis, rhos, exp_avgs, exp_avg_sqs,
                 max_exp_avg_sqs, buffers, state_steps, fresh_momentum):
        device, n = params[0].device, len(params)
        buffer_lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers, phis, rhos]

        def column(tensors):
            return [t.data_ptr() for t in tensors] if tensors else [0] * n

        numels = [p.numel() for p in params]
        # Rows of one element (1-D params) and 0-d params make the row pathway the element one.
        row_lens = [p.numel() // p.shape[0] if p.dim() > 0 and p.shape[0] > 0 else 1 for p in params]
        n_rows = [numels[t] // row_lens[t] if pathway == "row" and row_lens[t] > 1 else 0
                  for t in range(n)]
        table = zip(
            *map(column, buffer_lists), column(state_steps), numels, row_lens,
            accumulate(n_rows, initial=0), [int(f) for f in fresh_momentum] or [0] * n,
        )
        self.tensors = _to_device([[*r, *[0] * (_COLUMNS - len(r))] for r in table], device)
        self.n = n
        # Σ|g| and Σϕ' per tensor, then each row's Σ|g|: float64, so atomics in any block order
        # sum as exactly as the reference.
        self.scratch = torch.zeros(2 * n + sum(n_rows), dtype=torch.float64, device=device)
        self.sums = self.scratch[: 2 * n]
        self.row_sums = self.scratch[2 * n:]
        self.launches = []
        for dtype in dict.fromkeys(p.dtype for p in params):
            indices = [t for t in range(n) if params[t].dtype == dtype]
            aligned = all(
                tensors[t].data_ptr() % 16 == 0 for tensors in buffer_lists if tensors for t in indices
            )
            self.launches.append(_Launches(
                dtype, phis[indices[0]].dtype, indices, numels, row_lens, aligned, device, pathway,
            ))


_PLANS: OrderedDict[tuple, _Plan] = OrderedDict()
_MAX_PLANS = 8  # (group, address set) pairs kept; a miss only rebuilds the tables


def _walkable(pathway: str, param: Tensor, phi: Tensor, buffers: list[Tensor]) -> bool:
    """The kernels walk a parameter's buffers in one flat storage order: they must be laid out
    alike and densely (contiguous or channels_last), and under the row pathway each θ[i] must be
    one contiguous run, with a contiguous row ϕ."""
    dense = param.is_contiguous() or (
        param.dim() in (4, 5) and param.is_contiguous(
            memory_format=torch.channels_last if param.dim() == 4 else torch.channels_last_3d)
    )
    alike = all(t.stride() == param.stride() for t in buffers)
    if pathway == "row" and param.dim() > 0 and param.shape[0] > 0:
        return dense and alike and param.stride(0) * param.shape[0] == param.numel() and phi.is_contiguous()
    return dense and alike


def _plan(pathway, *lists) -> _Plan | None:
    """The cached plan for these tensors; None when some parameter's buffers are not walkable."""
    *tensor_lists, fresh_momentum = lists
    key = (pathway, tuple(fresh_momentum), tuple(p.shape for p in lists[0]),
           *(tuple(map(Tensor.data_ptr, tensors)) for tensors in tensor_lists))
    plan = _PLANS.get(key)
    if plan is not None:
        _PLANS.move_to_end(key)
        return plan
    params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers = lists[:8]
    for t, param in enumerate(params):
        element_phi = [phis[t], *(rhos[t:t + 1] if rhos else [])] if pathway == "element" else []
        state = [x[t] for x in (grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers) if x]
        if not _walkable(pathway, param, phis[t], state + element_phi):
            return None
    plan = _PLANS[key] = _Plan(pathway, *lists)
    if len(_PLANS) > _MAX_PLANS:
        _PLANS.popitem(last=False)
    return plan


def fused_sculpt_cuda(
    params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers, fresh_momentum,
    state_steps, grad_scale, found_inf, *, base, lr, beta1, beta2, eps, amsgrad, momentum,
    dampening, nesterov, weight_decay, maximize, pathway, relative, beta, gamma, l1, phi_min,
    phi_max, norm_mean, multiplicative, softplus,
) -> None:
    """The fused step of one group's CUDA tensors, arguments as the CPU kernel's
    (``torch.ops.kintsugi.fused_sculpt_``); ``lr`` may be a float or a tensor."""
    device = params[0].device
    if pathway == "tensor" and len({phi.dtype for phi in phis}) > 1:
        raise RuntimeError(
            "KintsugiOptimizer(fused=True, pathway='tensor') on CUDA needs one ϕ dtype per param "
            "group: put float64 and lower-precision parameters in separate groups"
        )
    plan = _plan(pathway, params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                 buffers, state_steps, fresh_momentum)
    if plan is None:
        # Rare (a sliced view with a contiguous grad, say): step contiguous copies, copy back.
        lists = [params, grads, phis, rhos, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, buffers]
        copies = [[t.contiguous() for t in tensors] for tensors in lists]
        fused_sculpt_cuda(
            *copies, fresh_momentum, state_steps, grad_scale, found_inf, base=base, lr=lr,
            beta1=beta1, beta2=beta2, eps=eps, amsgrad=amsgrad, momentum=momentum,
            dampening=dampening, nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
            pathway=pathway, relative=relative, beta=beta, gamma=gamma, l1=l1, phi_min=phi_min,
            phi_max=phi_max, norm_mean=norm_mean, multiplicative=multiplicative,
            softplus=softplus,
        )
        for tensors, dense in zip(lists, copies):
            for t, c in zip(tensors, dense):
                if c.data_ptr() != t.data_ptr():
                    t.copy_(c)
        return

    def on_device(t):
        return t.to(device, non_blocking=True) if t is not None and t.device != device else t

    grad_scale, found_inf = on_device(grad_scale), on_device(found_inf)
    lr_is_tensor = isinstance(lr, Tensor) and lr.device.type != "cpu"
    lr_value = 0.0 if lr_is_tensor else float(lr)
    dummy = plan.scratch  # stands in for absent pointer arguments (never read)
    pointers = dict(
        lr_ptr=on_device(lr) if lr_is_tensor else dummy,
        grad_scale_ptr=dummy if grad_scale is None else grad_scale,
        found_inf_ptr=dummy if found_inf is None else found_inf,
    )
    base_args = dict(
        lerp_weight=1 - beta1, beta2=beta2, one_minus_beta2=1 - beta2,
        log_beta1=math.log(beta1) if beta1 > 0 else -math.inf,
        log_beta2=math.log(beta2) if beta2 > 0 else -math.inf,
        eps=eps, weight_decay=weight_decay, momentum=momentum, dampening_keep=1 - dampening,
        BASE={"sgd": 0, "adam": 1, "adamw": 2}[base], AMSGRAD=amsgrad,
        HAS_MOMENTUM=base == "sgd" and momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize,
        LR_IS_TENSOR=lr_is_tensor, UNSCALE=grad_scale is not None,
    )
    gild_args = dict(
        beta=beta, gamma=gamma, l1=l1, phi_min=phi_min, phi_max=0.0 if phi_max is None else phi_max,
        HAS_PHI_MAX=phi_max is not None, MULTIPLICATIVE=multiplicative, SOFTPLUS=softplus,
        NORM=norm_mean,
    )
    has_found_inf = found_inf is not None
    # The normalising factor foreseen in the step's pass (see _foreseen), so that the pass after
    # it rescales only where the foresight missed.
    foresee = norm_mean and relative and gamma == 0 and not softplus and not multiplicative

    with _launch_context(device):
        if state_steps:  # as torch's fused Adam: count, and uncount below if found_inf
            torch._foreach_add_(state_steps, 1)
        plan.scratch.zero_()
        for launch in plan.launches:
            dtype = _TRITON_DTYPES[launch.dtype]
            phi_dtype = _TRITON_DTYPES[launch.phi_dtype]
            ct = tl.float64 if launch.dtype == torch.float64 else tl.float32
            finfo = torch.finfo(launch.phi_dtype)
            element = pathway != "tensor"
            if launch.flat is not None:
                grid = (launch.n_flat,)
                if element and relative:
                    _abs_sum_kernel[grid](
                        launch.flat, plan.tensors, plan.sums, pointers["grad_scale_ptr"],
                        pointers["found_inf_ptr"], DTYPE=dtype, CT=ct,
                        UNSCALE=grad_scale is not None, HAS_FOUND_INF=has_found_inf,
                        ALIGNED=launch.aligned, BLOCK=_BLOCK, num_warps=_NUM_WARPS, **_COMPILE,
                    )
                _flat_step_kernel[grid](
                    launch.flat, plan.tensors, plan.sums, lr_value=lr_value, **pointers,
                    **base_args, **gild_args, DTYPE=dtype, PHI_DTYPE=phi_dtype, CT=ct,
                    FMAX=finfo.max, TINY=finfo.tiny, HAS_FOUND_INF=has_found_inf,
                    ELEMENT=element, RELATIVE=relative, FORESEE=element and foresee,
                    ALIGNED=launch.aligned, BLOCK=_BLOCK, num_warps=_NUM_WARPS, **_COMPILE,
                )
                if element and norm_mean:
                    _normalise_kernel[grid](
                        launch.flat, plan.tensors, plan.sums, pointers["found_inf_ptr"],
                        PHI_DTYPE=phi_dtype, CT=ct, TINY=finfo.tiny, HAS_FOUND_INF=has_found_inf,
                        SOFTPLUS=softplus, FORESIGHT=4 * finfo.eps, ALIGNED=launch.aligned,
                        BLOCK=_BLOCK, num_warps=_NUM_WARPS, **_COMPILE,
                    )
            for cols, rows_aligned, blocks, n_blocks in launch.tiles:
                _row_step_kernel[(n_blocks,)](
                    blocks, plan.tensors, plan.row_sums, lr_value=lr_value, **pointers, **base_args,
                    DTYPE=dtype, PHI_DTYPE=phi_dtype, CT=ct, HAS_FOUND_INF=has_found_inf,
                    ALIGNED=rows_aligned, ROWS=_ROW_TILE // cols, COLS=cols, num_warps=_NUM_WARPS,
                    **_COMPILE,
                )
            if launch.row_scopes is not None:
                _gild_scopes_kernel[(launch.row_scopes.numel(),)](
                    launch.row_scopes, plan.tensors, plan.sums, plan.row_sums,
                    pointers["found_inf_ptr"], n_group=0, **gild_args, PHI_DTYPE=phi_dtype, CT=ct,
                    FMAX=finfo.max, TINY=finfo.tiny, HAS_FOUND_INF=has_found_inf, GROUP=False,
                    RELATIVE=relative, CHUNK=_SCOPE_CHUNK, num_warps=4, **_COMPILE,
                )
        if pathway == "tensor":
            phi_dtype = phis[0].dtype
            finfo = torch.finfo(phi_dtype)
            _gild_scopes_kernel[(1,)](
                plan.tensors, plan.tensors, plan.sums, plan.row_sums, pointers["found_inf_ptr"],
                n_group=plan.n, **gild_args, PHI_DTYPE=_TRITON_DTYPES[phi_dtype],
                CT=tl.float64 if phi_dtype == torch.float64 else tl.float32, FMAX=finfo.max,
                TINY=finfo.tiny, HAS_FOUND_INF=has_found_inf, GROUP=True, RELATIVE=relative,
                CHUNK=_SCOPE_CHUNK, num_warps=4, **_COMPILE,
            )
        if state_steps and found_inf is not None:
            torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))

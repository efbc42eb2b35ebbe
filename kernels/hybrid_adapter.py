"""The Hybrid Adapter (Eq. 14-15) with its block's residual and internal prompt, in Triton:

    out = residual + up(dropout(gelu(HO(down(SFT(x)))))) + extra        (B, N, C) tokens
    HO(h) = y + pw2(relu(bn(pw1(y)))),  y = h + concat(dwconv3x3(h[:, :cp]) + bias, h[:, cp:])

A tile of BLOCK_M tokens carries its d2-wide hidden vector through the chain in registers; only
the C-wide ends touch memory, BLOCK_C channels a step (`tile_sizes`). extra: None, tokens, or a
`LowRankExtra` made in registers. Inference (`hybrid_adapter_eval_triton`): `_sft_down_kernel`,
`_ho_up_kernel`. Training (`HybridAdapterTrainFunction`: batch-statistics BatchNorm, a dropout
mask given or drawn from torch's generator): forward `_sft_down_kernel` (which also keeps the
normalised input for the backward, instead of x), `_bn_partial_kernel`, `_bn_finalize_kernel`,
`_ho_up_kernel`; backward `_up_backward_kernel`, `_ho_backward_kernel`, `_down_backward_kernel`,
`_ln_down_grads_kernel` (and `_low_rank_backward_kernel`) with library matmuls for g Wu, dWu and
dWd. Tokens need contiguous channels only (views are read in place). Arithmetic in float32
(float64 for float64 tokens). Design notes and figures: docs/kernels.md.
"""
from contextlib import contextmanager
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from .reference import HybridAdapterWeights, LowRankExtra, NextNorm
from .utils import accumulator_dtype, destination

# Tokens per tile and channels per step over C, and the multiprocessor count the tiles and the
# backward's program counts are chosen for: None chooses per launch (`tile_sizes`) from the
# device; an int fixes it (`fixed_tile_sizes`, `assume_multiprocessors`).
BLOCK_M = None
BLOCK_C = None
MULTIPROCESSORS = None
PARTIAL_FLOATS = 1 << 21   # the most floats of per-program partial sums the backward kernels keep
BACKWARD_WARPS = 8         # warps of the three tile-loop backward kernels (4 spill registers)
SFT_DOWN_WARPS = 8         # warps of `_sft_down_kernel` (4 spill registers in float32)
BN_MERGE_CHANNELS = 16     # `_bn_finalize_kernel`: channels a program,
BN_MERGE_TILES = 128       # and tiles' statistics merged a step
PROGRAMS_PER_SM = 1        # 8-warp programs a multiprocessor holds (> 128 registers a thread)


# -- tile helpers ---------------------------------------------------------------------------------
@triton.jit
def _token_offsets(rows, N, stride_b, stride_n):
    """Offsets of tokens `rows` (flat index b * N + n) in a (B, N, C) tensor."""
    return (rows // N) * stride_b + (rows % N) * stride_n


@triton.jit
def _tile(t, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, M, D):
    """Token rows of tile t, their mask, the hidden channels and theirs."""
    rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    return rows, rows < M, d, d < D


@triton.jit
def _neighbour(rows, row_ok, N, H, W, di, dj):
    """Flat index of each token's neighbour at (i + di, j + dj) on its image's grid, and whether
    it lies inside (padding 1)."""
    n = rows % N
    i, j = n // W + di, n % W + dj
    return rows - n + i * W + j, row_ok & (i >= 0) & (i < H) & (j >= 0) & (j < W)


@triton.jit
def _partial_conv(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr,
                  TRANSPOSE: tl.constexpr):
    """Fig. 3 step 1 on a tile of the (M, D) map at h_ptr: h + (dwconv3x3(h) + bias for c < cp,
    h otherwise); with TRANSPOSE the input gradient of that map for the gradient at h_ptr."""
    h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    is_conv = d < cp
    conv = tl.zeros(h.shape, dtype=h.dtype)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            if TRANSPOSE:
                nb, inside = _neighbour(rows, row_ok, N, H, W, 1 - i, 1 - j)
            else:
                nb, inside = _neighbour(rows, row_ok, N, H, W, i - 1, j - 1)
            tap = tl.load(h_ptr + nb[:, None] * D + d[None, :],
                          mask=inside[:, None] & is_conv[None, :], other=0.0)
            conv += tap * tl.load(dww_ptr + d * 9 + i * 3 + j, mask=is_conv, other=0.0)[None, :]
    if not TRANSPOSE:
        conv += tl.load(dwb_ptr + d, mask=is_conv, other=0.0)[None, :]
    return h + tl.where(is_conv[None, :], conv, h)


@triton.jit
def _lead_rows(src_ptr, src_b, src_n, dst_ptr, dst_b, dst_n, lead, B, C, COPY: tl.constexpr,
               BLOCK_C: tl.constexpr):
    """The first `lead` tokens of each image (EVA02's cls token), which the adapter leaves as
    they are: dst's rows of them := src's (COPY) or zero, images b = program_id(0) + k *
    num_programs(0), both (B, lead + N, C) tensors with contiguous channels."""
    for b in range(tl.program_id(0), B, tl.num_programs(0)):
        for j in range(lead):
            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                value = tl.zeros([BLOCK_C], dtype=dst_ptr.dtype.element_ty)
                if COPY:
                    value = tl.load(src_ptr + b * src_b + j * src_n + c, mask=c < C,
                                    other=0.0).to(value.dtype)
                tl.store(dst_ptr + b * dst_b + j * dst_n + c, value, mask=c < C)


@triton.jit
def _linear_dd(a, w_ptr, b_ptr, d, d_ok, D):
    """a @ W^T + b for a (D, D) weight W: the hidden-to-hidden pw1 and pw2."""
    w_t = tl.load(w_ptr + d[None, :] * D + d[:, None], mask=d_ok[:, None] & d_ok[None, :],
                  other=0.0)
    return tl.dot(a, w_t.to(a.dtype)) + tl.load(b_ptr + d, mask=d_ok, other=0.0)[None, :]


@triton.jit
def _gelu(o):
    return 0.5 * o * (1.0 + tl.math.erf(o * 0.7071067811865476))


@triton.jit
def _normalised(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr, w1_ptr, b1_ptr,
                mean_ptr, scale_ptr, bn_eps, SCALE_FROM_VAR: tl.constexpr):
    """The Hybrid Operation on a tile up to its BatchNorm: y (partial conv) and x_hat, pw1(y)
    normalised by the statistics at mean_ptr and scale_ptr (1/std, or with SCALE_FROM_VAR the
    variance, as the running statistics are stored)."""
    y = _partial_conv(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr, False)
    q = _linear_dd(y, w1_ptr, b1_ptr, d, d_ok, D)
    if SCALE_FROM_VAR:
        scale = 1.0 / tl.sqrt(tl.load(scale_ptr + d, mask=d_ok, other=1.0) + bn_eps)
    else:
        scale = tl.load(scale_ptr + d, mask=d_ok, other=0.0)
    return y, (q - tl.load(mean_ptr + d, mask=d_ok, other=0.0)[None, :]) * scale[None, :]


@triton.jit
def _hidden_out(y, x_hat, d, d_ok, bnw_ptr, bnb_ptr, w2_ptr, b2_ptr, D):
    """From y and x_hat: the ReLU's input bn and o = y + pw2(relu(bn)) (Fig. 3 step 2)."""
    bn = x_hat * tl.load(bnw_ptr + d, mask=d_ok, other=0.0)[None, :] \
        + tl.load(bnb_ptr + d, mask=d_ok, other=0.0)[None, :]
    return bn, y + _linear_dd(tl.maximum(bn, 0.0), w2_ptr, b2_ptr, d, d_ok, D)


# -- forward ---------------------------------------------------------------------------------------
@triton.jit
def _sft_down_kernel(x_ptr, x_b, x_n, lnw_ptr, lnb_ptr, gamma_ptr, beta_ptr, wd_ptr, bd_ptr,
                     h_ptr, rstd_ptr, nhat_ptr, fold_ptr, M, N, C, D, eps,
                     FOR_BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """h = down(LN(x) * gamma + beta) for tile program_id(0), in one pass over x; h is (M, D)
    contiguous. With w' = lnw * gamma and b' = lnb * gamma + beta (Eq. 14 folded into the
    LayerNorm's affine), and any per-row shift K,
        h = rstd * ((x - K) Wd'^T - (mean - K) v) + hb,   Wd' = Wd diag(w'),
        v = Wd w',  hb = Wd b' + bd,  mean - K = sum(x - K) / C,
        var = sum((x - K)^2) / C - (mean - K)^2,
    so the row statistics and the matmul accumulate in the same loop. K is the row's mean over
    the first channel step: |mean - K| stays of the order of the row's standard deviation, so
    the two differences lose nothing to cancellation. With FOR_BACKWARD (training) the rows'
    1/std go to rstd (M,), the normalised input n_hat = (x - mean) / std (M, C) to nhat in its
    dtype (a second pass over the tile's rows, still in cache: the backward needs n_hat, not x,
    and holds it in the dtype of the matmul that reads it), and program 0 stores [v, hb] to
    fold (2, D)."""
    rows, row_ok, d, d_ok = _tile(tl.program_id(0), BLOCK_M, BLOCK_D, M, D)
    x_rows = x_ptr + _token_offsets(rows, N, x_b, x_n)
    acc_t = h_ptr.dtype.element_ty
    c = tl.arange(0, BLOCK_C)
    first = tl.load(x_rows[:, None] + c[None, :], mask=row_ok[:, None] & (c < C)[None, :],
                    other=0.0).to(acc_t)
    shift = tl.sum(first, axis=1) / tl.minimum(C, BLOCK_C)             # K, (BLOCK_M,)
    total = tl.zeros([BLOCK_M], dtype=acc_t)                            # sum of x - K
    squares = tl.zeros([BLOCK_M], dtype=acc_t)                          # sum of (x - K)^2
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=acc_t)                     # (x - K) Wd'^T
    # v and hb as one more tile matmul on the same weight tile: rows 0 and 1 of `folds` are
    # w'^T Wd^T and b'^T Wd^T (a matmul tile has at least 16 rows; the others stay zero)
    r = tl.arange(0, 16)[:, None]
    folds = tl.zeros([16, BLOCK_D], dtype=acc_t)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = row_ok[:, None] & c_ok[None, :]
        xk = tl.where(mask, tl.load(x_rows[:, None] + c[None, :], mask=mask, other=0.0)
                      .to(acc_t) - shift[:, None], 0.0)
        total += tl.sum(xk, axis=1)
        squares += tl.sum(xk * xk, axis=1)
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0)
        scale = tl.load(lnw_ptr + c, mask=c_ok, other=0.0) * gamma      # w'
        bias = tl.load(lnb_ptr + c, mask=c_ok, other=0.0) * gamma + tl.load(
            beta_ptr + c, mask=c_ok, other=0.0)                         # b'
        wd_t = tl.load(wd_ptr + d[None, :] * C + c[:, None],                # (BLOCK_C, BLOCK_D)
                       mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(acc_t)
        acc += tl.dot(xk * scale[None, :], wd_t)
        coefficients = tl.where(r == 0, scale[None, :], tl.where(r == 1, bias[None, :], 0.0))
        folds += tl.dot(coefficients.to(acc_t), wd_t)
    v = tl.sum(tl.where(r == 0, folds, 0.0), axis=0)
    hb = tl.sum(tl.where(r == 1, folds, 0.0), axis=0) + tl.load(bd_ptr + d, mask=d_ok, other=0.0)
    centre = total / C                                                  # mean - K
    rstd = 1.0 / tl.sqrt(tl.maximum(squares / C - centre * centre, 0.0) + eps)  # biased var
    if FOR_BACKWARD:
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)
        if tl.program_id(0) == 0:
            tl.store(fold_ptr + d, v, mask=d_ok)
            tl.store(fold_ptr + D + d, hb, mask=d_ok)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = row_ok[:, None] & (c < C)[None, :]
            xk = tl.load(x_rows[:, None] + c[None, :], mask=mask, other=0.0).to(acc_t) \
                - shift[:, None]
            tl.store(nhat_ptr + rows[:, None] * C + c[None, :],
                     ((xk - centre[:, None]) * rstd[:, None]).to(nhat_ptr.dtype.element_ty),
                     mask=mask)
    h = rstd[:, None] * (acc - centre[:, None] * v[None, :]) + hb[None, :]
    tl.store(h_ptr + rows[:, None] * D + d[None, :], h, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _bn_partial_kernel(h_ptr, dww_ptr, dwb_ptr, w1_ptr, b1_ptr, part_ptr, M, N, H, W, D, cp,
                       BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per tile: the mean and the sum of squared deviations (M2) of pw1's output per channel,
    part (tiles, 2, D)."""
    t = tl.program_id(0)
    rows, row_ok, d, d_ok = _tile(t, BLOCK_M, BLOCK_D, M, D)
    y = _partial_conv(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr, False)
    q = _linear_dd(y, w1_ptr, b1_ptr, d, d_ok, D)
    count = tl.minimum(M - t * BLOCK_M, BLOCK_M)
    mean = tl.sum(tl.where(row_ok[:, None], q, 0.0), axis=0) / count
    dev = tl.where(row_ok[:, None], q - mean[None, :], 0.0)
    tl.store(part_ptr + t * 2 * D + d, mean, mask=d_ok)
    tl.store(part_ptr + t * 2 * D + D + d, tl.sum(dev * dev, axis=0), mask=d_ok)


@triton.jit
def _bn_finalize_kernel(part_ptr, stats_ptr, running_mean_ptr, running_var_ptr, batches_ptr,
                        n_tiles, M, D, eps, momentum, UPDATE: tl.constexpr, COUNT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the tiles' (mean, M2) into the batch mean and 1/std, stats (2, D), for the BLOCK_D
    channels of program program_id(0), BLOCK_T tiles at a time (each group exactly, then into
    the running total: Chan et al.'s parallel variance); with UPDATE also the running
    statistics (unbiased variance), as BatchNorm does, and with COUNT (program 0) its count of
    batches (num_batches_tracked, one int64) + 1."""
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < D
    mean = tl.zeros([BLOCK_D], dtype=stats_ptr.dtype.element_ty)
    m2 = tl.zeros([BLOCK_D], dtype=stats_ptr.dtype.element_ty)
    count = tl.zeros([BLOCK_D], dtype=stats_ptr.dtype.element_ty)
    for t0 in range(0, n_tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        t_ok = t < n_tiles
        n_t = tl.where(t_ok, tl.minimum(M - t * BLOCK_M, BLOCK_M), 0).to(mean.dtype)[:, None]
        mask = t_ok[:, None] & d_ok[None, :]
        mean_t = tl.load(part_ptr + t[:, None] * 2 * D + d[None, :], mask=mask, other=0.0)
        m2_t = tl.load(part_ptr + t[:, None] * 2 * D + D + d[None, :], mask=mask, other=0.0)
        n_group = tl.sum(n_t, axis=0)
        mean_group = tl.sum(n_t * mean_t, axis=0) / n_group
        dev = mean_t - mean_group[None, :]
        m2_group = tl.sum(m2_t + n_t * dev * dev, axis=0)
        delta = mean_group - mean
        total = count + n_group
        mean += delta * (n_group / total)
        m2 += m2_group + delta * delta * (count * n_group / total)
        count = total
    var = m2 / M
    tl.store(stats_ptr + d, mean, mask=d_ok)
    tl.store(stats_ptr + D + d, 1.0 / tl.sqrt(var + eps), mask=d_ok)
    if UPDATE:
        running_mean = tl.load(running_mean_ptr + d, mask=d_ok, other=0.0)
        running_var = tl.load(running_var_ptr + d, mask=d_ok, other=0.0)
        unbiased = m2 / tl.maximum(M - 1, 1)
        tl.store(running_mean_ptr + d, running_mean + momentum * (mean - running_mean),
                 mask=d_ok)
        tl.store(running_var_ptr + d, running_var + momentum * (unbiased - running_var),
                 mask=d_ok)
        if COUNT:
            if tl.program_id(0) == 0:
                tl.store(batches_ptr, tl.load(batches_ptr) + 1)


@triton.jit
def _ho_up_kernel(h_ptr, dww_ptr, dwb_ptr, w1_ptr, b1_ptr, mean_ptr, scale_ptr, bn_eps, bnw_ptr,
                  bnb_ptr, w2_ptr, b2_ptr, mask_ptr, keep_scale, wu_ptr, bu_ptr,
                  res_ptr, res_b, res_n, ext_ptr, ext_b, ext_n, lr_h_ptr, lr_h_stride, lr_w_ptr,
                  lr_b_ptr, R, out_ptr, out_b, out_n, nw_ptr, nb_ptr, n_eps, normed_ptr,
                  normed_b, normed_n, lead_src, lead_dst, lead, M, N, H, W, C, D, cp,
                  SCALE_FROM_VAR: tl.constexpr, HAS_MASK: tl.constexpr,
                  HAS_EXTRA: tl.constexpr, LOW_RANK: tl.constexpr, NORM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """out = residual + up(dropout(gelu(HO(h)))) (+ extra) for tile program_id(0): extra read
    as tokens (HAS_EXTRA), or with LOW_RANK made here, chunk by chunk of C, from its factors
    (`LowRankExtra`): gelu(h_e w_e + b_e), h_e (M, R) at lr_h (row stride lr_h_stride), w_e (R, C),
    b_e (C). With NORM also normed = LayerNorm(out) (weight nw, bias nb; tokens addressed like
    out's, in normed's dtype), the next sub-layer's input (`NextNorm`): the rows' mean and
    variance are merged chunk by chunk (Chan et al.: each chunk's own mean and squared
    deviations, so nothing cancels), then a second pass over this tile's output, just written
    and still in cache, writes the normalised rows. With lead > 0, residual and out are the
    token rows after the first `lead` of (B, lead + N, C) tensors lead_src and lead_dst (strides
    those of residual and out), whose first `lead` rows are copied over (`_lead_rows`)."""
    if lead > 0:
        _lead_rows(lead_src, res_b, res_n, lead_dst, out_b, out_n, lead, M // N, C, True,
                   BLOCK_C)
    rows, row_ok, d, d_ok = _tile(tl.program_id(0), BLOCK_M, BLOCK_D, M, D)
    y, x_hat = _normalised(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr,
                           w1_ptr, b1_ptr, mean_ptr, scale_ptr, bn_eps, SCALE_FROM_VAR)
    bn, o = _hidden_out(y, x_hat, d, d_ok, bnw_ptr, bnb_ptr, w2_ptr, b2_ptr, D)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    a = tl.where(tile_ok, _gelu(o), 0.0)
    if HAS_MASK:
        keep = tl.load(mask_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0)
        a = a * keep.to(a.dtype) * keep_scale
    res_rows = res_ptr + _token_offsets(rows, N, res_b, res_n)
    out_rows = out_ptr + _token_offsets(rows, N, out_b, out_n)
    normed_rows = normed_ptr + _token_offsets(rows, N, normed_b, normed_n)
    if LOW_RANK:
        r = tl.arange(0, BLOCK_R)
        lr_h = tl.load(lr_h_ptr + rows[:, None] * lr_h_stride + r[None, :],     # (BLOCK_M, BLOCK_R)
                       mask=row_ok[:, None] & (r < R)[None, :], other=0.0).to(a.dtype)
    row_mean = tl.zeros([BLOCK_M], dtype=a.dtype)       # of out's first c0 channels (NORM)
    row_m2 = tl.zeros([BLOCK_M], dtype=a.dtype)         # their squared deviations from it
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = row_ok[:, None] & c_ok[None, :]
        wu_t = tl.load(wu_ptr + c[None, :] * D + d[:, None],                # (BLOCK_D, BLOCK_C)
                       mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        u = tl.dot(a, wu_t.to(a.dtype)) + tl.load(bu_ptr + c, mask=c_ok, other=0.0)[None, :]
        u += tl.load(res_rows[:, None] + c[None, :], mask=mask, other=0.0).to(u.dtype)
        if HAS_EXTRA:
            ext_rows = ext_ptr + _token_offsets(rows, N, ext_b, ext_n)
            u += tl.load(ext_rows[:, None] + c[None, :], mask=mask, other=0.0).to(u.dtype)
        if LOW_RANK:
            lr_w = tl.load(lr_w_ptr + r[:, None] * C + c[None, :],          # (BLOCK_R, BLOCK_C)
                           mask=(r < R)[:, None] & c_ok[None, :], other=0.0).to(a.dtype)
            u += _gelu(tl.dot(lr_h, lr_w) + tl.load(lr_b_ptr + c, mask=c_ok, other=0.0)
                       .to(a.dtype)[None, :])
        u = u.to(out_ptr.dtype.element_ty)
        tl.store(out_rows[:, None] + c[None, :], u, mask=mask)
        if NORM:                                         # merge this chunk's statistics
            n_c = tl.minimum(C - c0, BLOCK_C).to(a.dtype)
            u = u.to(a.dtype)
            chunk_mean = tl.sum(tl.where(mask, u, 0.0), axis=1) / n_c
            dev = tl.where(mask, u - chunk_mean[:, None], 0.0)
            delta = chunk_mean - row_mean
            total = c0 + n_c
            row_mean += delta * (n_c / total)
            row_m2 += tl.sum(dev * dev, axis=1) + delta * delta * (c0 * n_c / total)
    if NORM:
        rstd = 1.0 / tl.sqrt(row_m2 / C + n_eps)                        # biased variance
        tl.debug_barrier()                               # this tile's output stores are visible
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = row_ok[:, None] & c_ok[None, :]
            u = tl.load(out_rows[:, None] + c[None, :], mask=mask, other=0.0).to(a.dtype)
            normed = (u - row_mean[:, None]) * rstd[:, None] \
                * tl.load(nw_ptr + c, mask=c_ok, other=0.0)[None, :] \
                + tl.load(nb_ptr + c, mask=c_ok, other=0.0)[None, :]
            tl.store(normed_rows[:, None] + c[None, :],
                     normed.to(normed_ptr.dtype.element_ty), mask=mask)


# -- backward --------------------------------------------------------------------------------------
@triton.jit
def _gelu_grad(o):
    """d gelu(o) / do = Phi(o) + o phi(o)."""
    return 0.5 * (1.0 + tl.math.erf(o * 0.7071067811865476)) \
        + o * 0.3989422804014327 * tl.exp(-0.5 * o * o)


@triton.jit
def _column_sums(ptr, stride, n_rows, d, d_ok):
    """The sum over rows r < n_rows of the D-vectors at ptr + r * stride + d."""
    total = tl.zeros(d.shape, dtype=ptr.dtype.element_ty)
    for r0 in range(0, n_rows, 16):                   # 16 rows a step
        r = r0 + tl.arange(0, 16)
        total += tl.sum(tl.load(ptr + r[:, None] * stride + d[None, :],
                                mask=(r < n_rows)[:, None] & d_ok[None, :], other=0.0), axis=0)
    return total


@triton.jit
def _zeros(ptr, n, BLOCK: tl.constexpr):
    """Zero the n values at ptr, a program's partial sums that its tiles then add to in memory
    (the barrier: the first tile may read them in another layout, other threads)."""
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        tl.store(ptr + i, tl.zeros([BLOCK], dtype=ptr.dtype.element_ty), mask=i < n)
    tl.debug_barrier()


@triton.jit
def _up_backward_kernel(da_ptr, h_ptr, dww_ptr, dwb_ptr, w1_ptr, b1_ptr, bn_ptr,
                        bnw_ptr, bnb_ptr, w2_ptr, b2_ptr, mask_ptr, keep_scale,
                        do_ptr, dbn_ptr, dropped_ptr, part_ptr, part_stride, n_tiles, M, N, H,
                        W, D, cp, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    """From da = g Wu (M, D, in the matmul's dtype), the gradient of the up-projection's
    input: the gradients of dropout, GELU, pw2 and ReLU. Writes do = dL/do (pw2's residual sum
    o), dbn = dL/d(BatchNorm output) and, in dropped's dtype, the up-projection's input
    dropout(gelu(o)) (for its weight gradient, one matmul on the host), all (M, D), and this
    program's partial sums at part_ptr + pid * part_stride: [dW2 (D*D), db2, dbnw, dbnb (D)]."""
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    part = part_ptr + pid * part_stride
    dw2 = tl.zeros([BLOCK_D, BLOCK_D], dtype=do_ptr.dtype.element_ty)
    db2 = tl.zeros([BLOCK_D], dtype=do_ptr.dtype.element_ty)
    dbnw = tl.zeros([BLOCK_D], dtype=do_ptr.dtype.element_ty)
    dbnb = tl.zeros([BLOCK_D], dtype=do_ptr.dtype.element_ty)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows, row_ok, d, d_ok = _tile(t, BLOCK_M, BLOCK_D, M, D)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        y, x_hat = _normalised(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr,
                               w1_ptr, b1_ptr, bn_ptr, bn_ptr + D, 0.0, False)
        bn, o = _hidden_out(y, x_hat, d, d_ok, bnw_ptr, bnb_ptr, w2_ptr, b2_ptr, D)
        a = tl.where(tile_ok, _gelu(o), 0.0)
        keep = tl.full(a.shape, 1.0, a.dtype)
        if HAS_MASK:
            keep = tl.load(mask_ptr + rows[:, None] * D + d[None, :], mask=tile_ok,
                           other=0).to(a.dtype) * keep_scale
        tl.store(dropped_ptr + rows[:, None] * D + d[None, :],
                 (a * keep).to(dropped_ptr.dtype.element_ty), mask=tile_ok)
        da = tl.load(da_ptr + rows[:, None] * D + d[None, :], mask=tile_ok,
                     other=0.0).to(a.dtype)
        do = da * keep * _gelu_grad(o)
        dw2 += tl.dot(tl.trans(do), tl.maximum(bn, 0.0))
        db2 += tl.sum(do, axis=0)
        w2 = tl.load(w2_ptr + d[:, None] * D + d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                     other=0.0).to(a.dtype)
        dbn = tl.where(bn > 0.0, tl.dot(do, w2), 0.0)
        dbnw += tl.sum(dbn * x_hat, axis=0)
        dbnb += tl.sum(dbn, axis=0)
        tl.store(do_ptr + rows[:, None] * D + d[None, :], do, mask=tile_ok)
        tl.store(dbn_ptr + rows[:, None] * D + d[None, :], dbn, mask=tile_ok)
    square = d_ok[:, None] & d_ok[None, :]
    tl.store(part + d[:, None] * D + d[None, :], dw2, mask=square)
    tl.store(part + D * D + d, db2, mask=d_ok)
    tl.store(part + D * D + D + d, dbnw, mask=d_ok)
    tl.store(part + D * D + 2 * D + d, dbnb, mask=d_ok)


@triton.jit
def _ho_backward_kernel(h_ptr, dww_ptr, dwb_ptr, w1_ptr, b1_ptr, bn_ptr, bnw_ptr, sums_ptr,
                        do_ptr, dbn_ptr, dy_ptr, part_ptr, part_stride, n_tiles, M, N, H, W, D,
                        cp, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """BatchNorm backward (batch statistics) and pw1 backward: dy = do + dq W1, (M, D); this
    program's partial sums [dW1 (D*D), db1 (D)] at part_ptr + pid * part_stride. The
    BatchNorm backward needs the totals over all tokens of dbnw and dbnb: this program sums
    them from the first kernel's partials, at sums_ptr + q * part_stride (dbnw, D) and D further
    on (dbnb), for every program q < num_programs (all three kernels run as many)."""
    pid = tl.program_id(0)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    dw1 = tl.zeros([BLOCK_D, BLOCK_D], dtype=dy_ptr.dtype.element_ty)
    db1 = tl.zeros([BLOCK_D], dtype=dy_ptr.dtype.element_ty)
    n_parts = tl.num_programs(0)
    sum_xhat = _column_sums(sums_ptr, part_stride, n_parts, d, d_ok) / M      # mean of dbn x_hat
    sum_one = _column_sums(sums_ptr + D, part_stride, n_parts, d, d_ok) / M   # mean of dbn
    gain = tl.load(bnw_ptr + d, mask=d_ok, other=0.0) * tl.load(bn_ptr + D + d, mask=d_ok,
                                                                 other=0.0)
    w1 = tl.load(w1_ptr + d[:, None] * D + d[None, :], mask=d_ok[:, None] & d_ok[None, :],
                 other=0.0)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows, row_ok, d, d_ok = _tile(t, BLOCK_M, BLOCK_D, M, D)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        y, x_hat = _normalised(h_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dwb_ptr,
                               w1_ptr, b1_ptr, bn_ptr, bn_ptr + D, 0.0, False)
        dbn = tl.load(dbn_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0.0)
        dq = tl.where(tile_ok, gain[None, :] * (dbn - sum_one[None, :]
                                                 - x_hat * sum_xhat[None, :]), 0.0)
        dw1 += tl.dot(tl.trans(dq), y)
        db1 += tl.sum(dq, axis=0)
        dy = tl.load(do_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0.0) \
            + tl.dot(dq, w1.to(dq.dtype))
        tl.store(dy_ptr + rows[:, None] * D + d[None, :], dy, mask=tile_ok)
    part = part_ptr + pid * part_stride
    tl.store(part + d[:, None] * D + d[None, :], dw1, mask=d_ok[:, None] & d_ok[None, :])
    tl.store(part + D * D + d, db1, mask=d_ok)


@triton.jit
def _down_backward_kernel(nhat_ptr, rstd_ptr, lnw_ptr, gamma_ptr, wd_ptr, fold_ptr, h_ptr,
                          dww_ptr, dy_ptr, g_ptr, g_b, g_n, dx_ptr, dx_b, dx_n, dh_ptr,
                          part_ptr, part_stride, lead_g, lead_dx, lead, n_tiles, M, N, H, W, C,
                          D, cp, ADD_G: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial conv backward (dh from dy at the 3x3 neighbours), then the down-projection's and
    LayerNorm + SFT's input gradient: dx (B, N, C), plus g when ADD_G (x is the residual); with
    lead > 0, dx and g are the rows after the first `lead` of (B, lead + N, C) tensors lead_dx
    and lead_g (strides those of dx and g), whose first rows get g's when ADD_G, else zeros
    (`_lead_rows`: the adapter leaves those tokens as they are). Reads the forward's n_hat
    (M, C) and 1/std (M,); also writes dh (M, D), from which the host makes the
    down-projection's and the LayerNorm/SFT parameters' gradients with one matmul
    (`_ln_down_grads_kernel`), and this program's partial sums at part_ptr + pid * part_stride:
    [dconv_w (cp*9), dconv_b (cp), dbd (D), dbu (C)], the last the up-projection's bias
    gradient, the sum of g, added up in memory (from zero) tile after tile.

    LayerNorm backward, with ds = dh Wd the gradient of s = n_hat w' + b' (w', b' as in
    `_sft_down_kernel`): dx = rstd (ds w' - (sum_c ds w' + n_hat sum_c ds w' n_hat) / C). Its two
    row sums over C are D-wide dot products, from the forward's fold = [v, hb] (2, D) and h:
        sum_c ds w' = dh . v,   sum_c ds w' n_hat = dh . (Wd (n_hat w')) = dh . (h - hb),
    so one pass over C makes dx."""
    if lead > 0:
        _lead_rows(lead_g, g_b, g_n, lead_dx, dx_b, dx_n, lead, M // N, C, ADD_G, BLOCK_C)
    pid = tl.program_id(0)
    part = part_ptr + pid * part_stride
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    is_conv = d < cp
    taps = tl.arange(0, 16)                          # the 9 taps of the 3x3 kernel, padded
    dconv_w = tl.zeros([BLOCK_D, 16], dtype=dy_ptr.dtype.element_ty)
    dconv_b = tl.zeros([BLOCK_D], dtype=dy_ptr.dtype.element_ty)
    dbd = tl.zeros([BLOCK_D], dtype=dy_ptr.dtype.element_ty)
    v = tl.load(fold_ptr + d, mask=d_ok, other=0.0)
    hb = tl.load(fold_ptr + D + d, mask=d_ok, other=0.0)
    _zeros(part + cp * 10 + D, C, BLOCK_C)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows, row_ok, d, d_ok = _tile(t, BLOCK_M, BLOCK_D, M, D)
        tile_ok = row_ok[:, None] & d_ok[None, :]
        dh = _partial_conv(dy_ptr, rows, row_ok, d, d_ok, N, H, W, D, cp, dww_ptr, dww_ptr, True)
        tl.store(dh_ptr + rows[:, None] * D + d[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=tile_ok)
        dy = tl.load(dy_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0.0)
        for i in tl.static_range(3):                 # grad of the conv weight: dy * shifted h
            for j in tl.static_range(3):
                nb, inside = _neighbour(rows, row_ok, N, H, W, i - 1, j - 1)
                tap = tl.load(h_ptr + nb[:, None] * D + d[None, :],
                              mask=inside[:, None] & is_conv[None, :], other=0.0)
                dconv_w += tl.where(taps[None, :] == i * 3 + j,
                                    tl.sum(dy * tap, axis=0)[:, None], 0.0)
        dconv_b += tl.sum(dy, axis=0)
        dbd += tl.sum(dh, axis=0)
        h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0.0)
        dot_w = tl.sum(dh * v[None, :], axis=1)                 # sum over C of ds * w'
        dot_wn = tl.sum(dh * (h - hb[None, :]), axis=1)         # sum over C of ds * w' * n_hat
        g_rows = g_ptr + _token_offsets(rows, N, g_b, g_n)
        dx_rows = dx_ptr + _token_offsets(rows, N, dx_b, dx_n)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = row_ok[:, None] & c_ok[None, :]
            n_hat = tl.load(nhat_ptr + rows[:, None] * C + c[None, :], mask=mask,
                            other=0.0).to(dh.dtype)
            wd = tl.load(wd_ptr + d[:, None] * C + c[None, :],              # (BLOCK_D, BLOCK_C)
                         mask=d_ok[:, None] & c_ok[None, :], other=0.0).to(dh.dtype)
            w_fold = tl.load(lnw_ptr + c, mask=c_ok, other=0.0) * tl.load(gamma_ptr + c,
                                                                           mask=c_ok, other=0.0)
            dx = rstd[:, None] * (tl.dot(dh, wd) * w_fold[None, :]
                                  - (dot_w[:, None] + n_hat * dot_wn[:, None]) / C)
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(dx.dtype)
            if ADD_G:
                dx += g
            tl.store(dx_rows[:, None] + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dbu = part + cp * 10 + D + c
            tl.store(dbu, tl.load(dbu, mask=c_ok) + tl.sum(g, axis=0), mask=c_ok)
        tl.debug_barrier()                 # the next tile reads these sums in another layout
    tl.store(part + d[:, None] * 9 + taps[None, :], dconv_w,
             mask=is_conv[:, None] & (taps < 9)[None, :])
    tl.store(part + cp * 9 + d, dconv_b, mask=is_conv)
    tl.store(part + cp * 10 + d, dbd, mask=d_ok)


@triton.jit
def _ln_down_grads_kernel(p_ptr, sum_dh_ptr, wd_ptr, lnw_ptr, lnb_ptr, gamma_ptr, beta_ptr,
                          out_ptr, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """The down-projection's and LayerNorm/SFT parameters' gradients for channels c of program
    program_id(0), from P = dh^T n_hat (D, C) and sum_dh = sum over tokens of dh (D). With
    s = n_hat w' + b' (w' = lnw gamma, b' = lnb gamma + beta: Eq. 14 folded) and ds = dh Wd:
      dWd = dh^T s = P w' + sum_dh b'^T,
      sum_m ds n_hat = sum_d Wd * P,   sum_m ds = sum_dh Wd,
    out = [dWd (D*C), dlnw, dlnb, dgamma, dbeta (C each)]."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    square = d_ok[:, None] & c_ok[None, :]
    p = tl.load(p_ptr + d[:, None] * C + c[None, :], mask=square,
                other=0.0).to(out_ptr.dtype.element_ty)
    wd = tl.load(wd_ptr + d[:, None] * C + c[None, :], mask=square, other=0.0).to(p.dtype)
    sum_dh = tl.load(sum_dh_ptr + d, mask=d_ok, other=0.0)
    lnw = tl.load(lnw_ptr + c, mask=c_ok, other=0.0)
    lnb = tl.load(lnb_ptr + c, mask=c_ok, other=0.0)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0)
    shift = lnb * gamma + tl.load(beta_ptr + c, mask=c_ok, other=0.0)
    tl.store(out_ptr + d[:, None] * C + c[None, :],
             p * (lnw * gamma)[None, :] + sum_dh[:, None] * shift[None, :], mask=square)
    ds_nhat = tl.sum(wd * p, axis=0)
    ds = tl.sum(wd * sum_dh[:, None], axis=0)
    tail = out_ptr + D * C
    tl.store(tail + c, ds_nhat * gamma, mask=c_ok)
    tl.store(tail + C + c, ds * gamma, mask=c_ok)
    tl.store(tail + 2 * C + c, ds_nhat * lnw + ds * lnb, mask=c_ok)
    tl.store(tail + 3 * C + c, ds, mask=c_ok)


@triton.jit
def _low_rank_backward_kernel(g_ptr, g_b, g_n, lr_h_ptr, lr_h_stride, lr_w_ptr, lr_b_ptr, R,
                              dh_ptr, part_ptr, part_stride, n_tiles, M, N, C,
                              BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_R: tl.constexpr):
    """The backward of an extra given as its factors (`LowRankExtra`), e = gelu(z) with
    z = h_e w_e + b_e: e is added to the output, so its gradient is g. Per tile of this
    program's: z again chunk by chunk of C in registers (R = 8 products a value),
    dz = g gelu'(z), and from dz, without storing it, dh_e = dz w_e^T (M, R), summed over C in
    registers and stored in dh's dtype (h_e's), and the weight's and bias's gradients
    dw_e = h_e^T dz (R, C) and db_e = the sum of dz (C), this program's partial sums, added up
    in memory tile after tile (from zero) at part_ptr + pid * part_stride: [dw_e (R*C),
    db_e (C)]."""
    pid = tl.program_id(0)
    part = part_ptr + pid * part_stride
    acc_t = part_ptr.dtype.element_ty
    _zeros(part, (R + 1) * C, BLOCK_C)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows, row_ok, r, r_ok = _tile(t, BLOCK_M, BLOCK_R, M, R)
        h = tl.load(lr_h_ptr + rows[:, None] * lr_h_stride + r[None, :],   # (BLOCK_M, BLOCK_R)
                    mask=row_ok[:, None] & r_ok[None, :], other=0.0).to(acc_t)
        dh = tl.zeros(h.shape, dtype=acc_t)
        g_rows = g_ptr + _token_offsets(rows, N, g_b, g_n)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            mask = row_ok[:, None] & c_ok[None, :]
            w = tl.load(lr_w_ptr + r[:, None] * C + c[None, :],             # (BLOCK_R, BLOCK_C)
                        mask=r_ok[:, None] & c_ok[None, :], other=0.0).to(acc_t)
            z = tl.dot(h, w) + tl.load(lr_b_ptr + c, mask=c_ok, other=0.0).to(acc_t)[None, :]
            g = tl.load(g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(acc_t)
            dz = g * _gelu_grad(z)                              # 0 on rows past M (g is)
            dh += tl.dot(dz, tl.trans(w))
            dw_at = part + r[:, None] * C + c[None, :]
            dw_ok = r_ok[:, None] & c_ok[None, :]
            tl.store(dw_at, tl.load(dw_at, mask=dw_ok) + tl.dot(tl.trans(h), dz), mask=dw_ok)
            db_at = part + R * C + c
            tl.store(db_at, tl.load(db_at, mask=c_ok) + tl.sum(dz, axis=0), mask=c_ok)
        tl.store(dh_ptr + rows[:, None] * R + r[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & r_ok[None, :])
        tl.debug_barrier()                 # the next tile reads these sums in another layout


# -- host side -------------------------------------------------------------------------------------
def _token_strides(t: torch.Tensor):
    """(t, stride_b, stride_n) with channels contiguous (copying only when they are not)."""
    if t.stride(2) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def _parameters(w: HybridAdapterWeights, dtype: torch.dtype):
    """The 18 tensors of `w` detached, contiguous, in the arithmetic's dtype."""
    return [t.detach().to(dtype).contiguous() for t in w[:18]]


def tile_sizes(M: int, C: int, device: torch.device) -> Tuple[int, int]:
    """(tokens per tile, channels per step over C) for M tokens of C channels, unless BLOCK_M /
    BLOCK_C fix them: channel steps of 64 where 64 divides C, else 32; tiles of 16 tokens on a
    GPU where all of them run in one wave (at most `PROGRAMS_PER_SM` a multiprocessor), else 32.
    Why these: docs/kernels.md."""
    block_c = BLOCK_C or (64 if C % 64 == 0 else 32)
    block_m = BLOCK_M
    if block_m is None:
        sms = _multiprocessors(device)
        block_m = 16 if sms is not None and triton.cdiv(M, 16) <= PROGRAMS_PER_SM * sms else 32
    return block_m, block_c


@contextmanager
def fixed_tile_sizes(block_m: int, block_c: int):
    """Within it, every launch uses tiles of block_m tokens and channel steps of block_c (the
    module's BLOCK_M / BLOCK_C, read at each launch), restored afterwards."""
    global BLOCK_M, BLOCK_C
    saved = BLOCK_M, BLOCK_C
    BLOCK_M, BLOCK_C = block_m, block_c
    try:
        yield
    finally:
        BLOCK_M, BLOCK_C = saved


@contextmanager
def assume_multiprocessors(count: int):
    """Within it, every launch is sized as on a GPU of `count` streaming multiprocessors,
    whatever the tensors' device (the module's MULTIPROCESSORS, restored afterwards): what
    `bench/compile_check.py` uses to record on CPU tensors the launches such a GPU makes."""
    global MULTIPROCESSORS
    saved = MULTIPROCESSORS
    MULTIPROCESSORS = count
    try:
        yield
    finally:
        MULTIPROCESSORS = saved


def _multiprocessors(device: torch.device) -> Optional[int]:
    """MULTIPROCESSORS if set, else the GPU's streaming multiprocessors, None off a GPU."""
    if MULTIPROCESSORS is not None:
        return MULTIPROCESSORS
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).multi_processor_count


def _programs(n_tiles: int, floats_per_program: int, device: torch.device) -> int:
    """Programs of a backward kernel, each looping over its share of the tiles: at most one per
    tile, their partial sums within PARTIAL_FLOATS and, on a GPU, no more than its
    multiprocessors hold at once (a program beyond those waits for a whole first-wave one)."""
    sms = _multiprocessors(device)
    held = n_tiles if sms is None else PROGRAMS_PER_SM * sms
    return max(1, min(n_tiles, held, PARTIAL_FLOATS // floats_per_program))


class _Sizes(NamedTuple):
    B: int
    N: int
    C: int
    D: int                 # the adapter's hidden width d2
    M: int                 # tokens, B * N
    block_d: int           # D rounded up to a power of two (at least 16, for tl.dot)
    acc: torch.dtype       # the arithmetic's dtype
    block_m: int
    block_c: int
    n_tiles: int


def _sizes(x: torch.Tensor, w: HybridAdapterWeights, hw: Tuple[int, int]) -> _Sizes:
    B, N, C = x.shape
    if hw[0] * hw[1] != N:            # the 3x3 partial conv reads neighbours on the (H, W) grid
        raise ValueError(f"hw {tuple(hw)} holds {hw[0] * hw[1]} tokens, x has {N}")
    D = w.down_weight.shape[0]
    block_m, block_c = tile_sizes(B * N, C, x.device)
    return _Sizes(B, N, C, D, B * N, max(16, triton.next_power_of_2(D)),
                  accumulator_dtype(x.dtype), block_m, block_c, triton.cdiv(B * N, block_m))


def _matmul_dtype(tokens: torch.dtype, acc: torch.dtype) -> torch.dtype:
    """The dtype of a weight gradient's matmul over tokens: the tokens' own when they are of
    lower precision (bfloat16/float16 under autocast, as autocast runs a Linear's), else acc."""
    return tokens if tokens.itemsize < torch.finfo(acc).bits // 8 else acc


def _held_dtype(x: torch.Tensor, acc: torch.dtype) -> torch.dtype:
    """The dtype the training forward holds the normalised input n_hat in for the backward, and
    the backward's dh and P = dh^T n_hat are in: autocast's lower dtype where autocast is on
    for x's device (the reference's down-projection Linear then holds its input in it), else
    `_matmul_dtype` of x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        lower = torch.get_autocast_dtype(device)
        if lower.itemsize < acc.itemsize:
            return lower
    return _matmul_dtype(x.dtype, acc)


def _matmul(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, to_acc: bool = True
            ) -> torch.Tensor:
    """a b, (M, P) (P, Q) -> (M, Q) in acc (to_acc=False: in the matmul's dtype, for a kernel
    that reads it in acc): one library matmul in the lower precision of the two operands'
    dtypes (see `_matmul_dtype`)."""
    dtype = _matmul_dtype(min(a.dtype, b.dtype, key=lambda t: t.itemsize), acc)
    with torch.autocast(a.device.type, enabled=False):
        out = torch.mm(a.to(dtype), b.to(dtype))
    return out.to(acc) if to_acc else out


def _matmul_t(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, to_acc: bool = True
              ) -> torch.Tensor:
    """a^T b over the token dimension, (M, P)^T (M, Q) -> (P, Q) (see `_matmul`)."""
    return _matmul(a.t(), b, acc, to_acc)


def _sft_down(x, s: _Sizes, w, params, h, rstd=None, n_hat=None, fold=None):
    """Launch `_sft_down_kernel` into h (M, D) and, for the backward (rstd, n_hat and fold
    given), the rows' 1/std (M,), the normalised input (M, C) and the folded
    down-projection's [v, hb] (2, D)."""
    x, x_b, x_n = _token_strides(x)
    lnw, lnb, gamma, beta, wd, bd = params[:6]
    _sft_down_kernel[(s.n_tiles,)](x, x_b, x_n, lnw, lnb, gamma, beta, wd, bd, h,
                                   h if rstd is None else rstd, h if n_hat is None else n_hat,
                                   h if fold is None else fold, s.M, s.N, s.C, s.D, w.ln_eps,
                                   FOR_BACKWARD=rstd is not None, BLOCK_M=s.block_m,
                                   BLOCK_C=s.block_c, BLOCK_D=s.block_d,
                                   num_warps=SFT_DOWN_WARPS)


def _ho_up(h, s: _Sizes, residual, extra, hw, w, params, mean, scale, scale_from_var, mask,
           keep_scale, norm: Optional[NextNorm] = None, out: Optional[torch.Tensor] = None,
           lead: int = 0):
    """Launch `_ho_up_kernel`: residual + up(dropout(gelu(HO(h)))) (+ extra), (B, N, C), into
    `out` if given; extra None, tokens or a `LowRankExtra`; with `norm`, (that, its LayerNorm
    in norm.dtype, into norm.out if given). With lead > 0, residual and out are
    (B, lead + N, C): the adapter's tokens are those after the first `lead` of each image, whose
    rows the kernel copies from residual to out (norm not supported)."""
    residual, res_b, res_n = _token_strides(residual)
    low_rank = isinstance(extra, LowRankExtra)
    has_extra = extra is not None and not low_rank
    shape, dtype = (s.B, s.N, s.C), residual.dtype         # the stream keeps its dtype
    full = (s.B, lead + s.N, s.C)
    out = (torch.empty(full, device=h.device, dtype=dtype) if out is None
           else destination(out, full, dtype, "out"))
    result, lead_src, lead_dst = out, h, h
    if lead:
        lead_src, lead_dst = residual, out
        residual, out = residual[:, lead:], out[:, lead:]
    extra_tokens, ext_b, ext_n = _token_strides(extra) if has_extra else (residual, 0, 0)
    lr_h, lr_w, lr_b = (h, h, h)
    if low_rank:
        lr_h, lr_w, lr_b = extra                  # in the kernels' layout (`_kernel_layout`)
    R = lr_w.shape[0] if low_rank else 0
    dww, dwb, w1, b1, bn_mean, bn_var, bnw, bnb, w2, b2, wu, bu = params[6:]
    nw, nb, normed = (h, h, h)
    if norm is not None:
        nw, nb = (t.detach().to(s.acc).contiguous() for t in (norm.weight, norm.bias))
        normed = (torch.empty(shape, device=h.device, dtype=norm.dtype) if norm.out is None
                  else destination(norm.out, shape, norm.dtype, "norm.out"))
    _ho_up_kernel[(s.n_tiles,)](h, dww, dwb, w1, b1, mean, scale, w.bn_eps, bnw, bnb, w2, b2,
                                h if mask is None else mask, keep_scale, wu, bu, residual, res_b,
                                res_n, extra_tokens, ext_b, ext_n, lr_h, lr_h.stride(0), lr_w,
                                lr_b, R, out, out.stride(0), out.stride(1), nw, nb,
                                0.0 if norm is None else norm.eps, normed, normed.stride(0),
                                normed.stride(1), lead_src, lead_dst, lead, s.M, s.N, hw[0],
                                hw[1], s.C, s.D, w.cp, SCALE_FROM_VAR=scale_from_var,
                                HAS_MASK=mask is not None, HAS_EXTRA=has_extra,
                                LOW_RANK=low_rank, NORM=norm is not None,
                                BLOCK_M=s.block_m, BLOCK_C=s.block_c, BLOCK_D=s.block_d,
                                BLOCK_R=max(16, triton.next_power_of_2(R)))
    return result if norm is None else (result, normed)


def _kernel_layout(extra):
    """An extra's factors as the kernels index them: h (M, R) rows of unit stride (a strided
    view of rows is read in place), w (R, C) and b (C,) contiguous, copied where not; tokens or
    None as they are. Made at the entry points, where autograd takes the copies' gradients back
    to the tensors given."""
    if not isinstance(extra, LowRankExtra):
        return extra
    return LowRankExtra(extra.h if extra.h.stride(1) == 1 else extra.h.contiguous(),
                        extra.w.contiguous(), extra.b.contiguous())


def hybrid_adapter_eval_triton(x: torch.Tensor, residual: torch.Tensor, extra, hw,
                               w: HybridAdapterWeights, norm: Optional[NextNorm] = None,
                               out: Optional[torch.Tensor] = None):
    """residual + HA branch(x) (+ extra) at inference, (B, N, C) tokens, extra None, tokens or a
    `LowRankExtra` (made in the second kernel): two launches. With `norm`, (that, its
    LayerNorm), the second made by the second kernel too. `out` and `norm.out`: where to write
    them (views with channels contiguous), else new tensors; `out` may be x or residual: the
    first kernel reads all of x before the second runs, and the second reads each token's
    residual in the program that then writes it."""
    s = _sizes(x, w, hw)
    params = _parameters(w, s.acc)
    h = torch.empty((s.M, s.D), device=x.device, dtype=s.acc)
    _sft_down(x, s, w, params, h)
    return _ho_up(h, s, residual, _kernel_layout(extra), hw, w, params, params[10], params[11],
                  True, None, 1.0, norm, out)


def _carved(pieces, device, unit: torch.dtype):
    """One torch.empty in `unit` (a floating dtype, for tests that poison torch.empty) carved
    into a view per (numel, dtype) piece, each starting at a 16-byte boundary: an allocation,
    one operator, whatever the pieces' dtypes."""
    starts, total = [], 0
    for numel, dtype in pieces:
        starts.append(total)
        total += -(-numel * dtype.itemsize // 16) * 16
    memory = torch.empty(total // unit.itemsize, device=device, dtype=unit).view(torch.uint8)
    return [memory[start:start + numel * dtype.itemsize].view(dtype)
            for start, (numel, dtype) in zip(starts, pieces)]


def _train_backward(g, n_hat, h, rstd, bn_stats, fold, keep, params, low_rank, s: _Sizes, hw,
                    cp: int, keep_scale: float, x_is_residual: bool, x_dtype: torch.dtype,
                    lead: int = 0):
    """The training forward's backward for the output gradient g: (dx, in x_dtype, the 18
    parameters' gradients in s.acc, None for the running statistics, then, for a
    `LowRankExtra`, its factors'). n_hat and rstd: the forward's normalised input (M, C) and
    1/std (M,). With lead > 0, g and dx are (B, lead + N, C) and the adapter's rows those after
    the first `lead` (the forward's `lead`)."""
    lnw, lnb, gamma, beta, wd, bd, dww, dwb, w1, b1, _, _, bnw, bnb, w2, b2, wu, bu = params
    (H, W), device = hw, g.device
    B, N, C, D, M, acc, n_tiles = s.B, s.N, s.C, s.D, s.M, s.acc, s.n_tiles
    tiles = dict(BLOCK_M=s.block_m, BLOCK_D=s.block_d)
    g, g_b, g_n = _token_strides(g)
    lead_g = g
    if lead:
        g = g[:, lead:]
    R = 0 if low_rank is None else low_rank.w.shape[0]
    # each program's partial sums: the three tile-loop kernels' (up, HO, down), then the extra's
    size1, size2, size3 = D * D + 3 * D, D * D + D, cp * 10 + D + C
    size4 = (R + 1) * C if low_rank is not None else 0
    row = size1 + size2 + size3 + size4
    n_parts = _programs(n_tiles, row, device)
    # one allocation: the partial sums, three (M, D) maps (do, dbn, dy), and two in the dtype
    # of the matmul that reads them: the up-projection's input `dropped` (g's, bf16 under
    # autocast where the block stream is bf16), and dh (the forward's n_hat's)
    tokens = g.reshape(M, C)                                            # (M, C)
    parts, maps, dropped, dh = _carved([(n_parts * row, acc), (3 * M * D, acc),
                                        (M * D, _matmul_dtype(g.dtype, acc)),
                                        (M * D, n_hat.dtype)], device, acc)
    parts = parts.view(n_parts, row)
    do, dbn, dy = maps.view(3, M, D).unbind(0)
    dropped, dh = dropped.view(M, D), dh.view(M, D)
    # 1. from da = g Wu (a library matmul, left in its dtype: the kernel reads it in acc):
    # dropout, GELU, pw2, ReLU -> do, dbn, and `dropped` for dWu = g^T dropped (unpipelined:
    # 3 stages need more shared memory than sm_80 has)
    da = _matmul(tokens, wu, acc, to_acc=False)                         # (M, D)
    _up_backward_kernel[(n_parts,)](da, h, dww, dwb, w1, b1, bn_stats, bnw, bnb, w2, b2,
                                    h if keep is None else keep, keep_scale, do, dbn,
                                    dropped, parts, row, n_tiles, M, N, H, W, D, cp,
                                    HAS_MASK=keep is not None, **tiles, num_stages=1,
                                    num_warps=BACKWARD_WARPS)
    d_wu = _matmul_t(tokens, dropped, acc)                              # (C, D)
    # 2. BatchNorm and pw1 -> dy (unpipelined: 3 stages need more shared memory than sm_90 has)
    _ho_backward_kernel[(n_parts,)](h, dww, dwb, w1, b1, bn_stats, bnw,
                                    parts[:, D * D + D:], do, dbn, dy, parts[:, size1:], row,
                                    n_tiles, M, N, H, W, D, cp, **tiles, num_stages=1,
                                    num_warps=BACKWARD_WARPS)
    # 3. partial conv, down-projection, LayerNorm and SFT -> dx, dh; dbu = the sum of g
    dx_full = torch.empty((B, lead + N, C), device=device, dtype=x_dtype)
    dx = dx_full[:, lead:] if lead else dx_full
    _down_backward_kernel[(n_parts,)](n_hat, rstd, lnw, gamma, wd, fold, h, dww, dy, g, g_b,
                                      g_n, dx, dx.stride(0), dx.stride(1), dh,
                                      parts[:, size1 + size2:], row, lead_g, dx_full, lead,
                                      n_tiles, M, N, H, W, C, D, cp, ADD_G=x_is_residual,
                                      BLOCK_C=s.block_c, **tiles, num_warps=BACKWARD_WARPS)
    # 4. the down-projection's and LayerNorm/SFT's gradients (made from P = dh^T n_hat, left in
    # the matmul's dtype, read in acc) in one allocation with an extra's dh_e (M, R), in h_e's
    # dtype
    grads_c, d_lr_h = _carved([(D * C + 4 * C, acc),
                               (M * R, acc if low_rank is None else low_rank.h.dtype)],
                              device, acc)
    if low_rank is not None:
        # 5. the extra's factors: dh_e and the partial sums of [dw_e, db_e] in one kernel
        lr_h, lr_w, lr_b = low_rank
        _low_rank_backward_kernel[(n_parts,)](
            g, g_b, g_n, lr_h, lr_h.stride(0), lr_w, lr_b, R, d_lr_h,
            parts[:, size1 + size2 + size3:], row, n_tiles, M, N, C, BLOCK_M=s.block_m,
            BLOCK_C=s.block_c, BLOCK_R=max(16, triton.next_power_of_2(R)))
    sums = parts.sum(0).split([D * D, D, D, D, D * D, D, cp * 9, cp, D, C, R * C, C][
        :12 if low_rank is not None else 10])
    d_w2, d_b2, d_bnw, d_bnb, d_w1, d_b1, d_dww, d_dwb, d_bd, d_bu, *d_lr = sums
    _ln_down_grads_kernel[(triton.cdiv(C, s.block_c),)](
        _matmul_t(dh, n_hat, acc, to_acc=False), d_bd, wd, lnw, lnb, gamma, beta, grads_c, C, D,
        BLOCK_C=s.block_c, BLOCK_D=s.block_d)
    d_wd, d_lnw, d_lnb, d_gamma, d_beta = grads_c.split([D * C, C, C, C, C])
    grads = [d_lnw, d_lnb, d_gamma, d_beta, d_wd.view(D, C), d_bd, d_dww.view(cp, 1, 3, 3),
             d_dwb, d_w1.view(D, D), d_b1, None, None, d_bnw, d_bnb, d_w2.view(D, D), d_b2,
             d_wu, d_bu]
    if low_rank is not None:
        grads += [d_lr_h.view(M, R), d_lr[0].view(R, C), d_lr[1]]
    return dx_full, grads


class HybridAdapterTrainFunction(torch.autograd.Function):
    """residual + HA branch(x) (+ extra) in training mode; see the module docstring.

    forward(x, residual, extra, hw, w, keep, p, momentum, update, batches, lead, *tensors):
    `extra` None or tokens, `keep` the dropout mask (M, d2) of kept units (None: drawn here when
    p > 0), `update` whether the BatchNorm running statistics (w.bn_mean, w.bn_var, updated in
    place) take this batch, and then the count `batches` (None or an int64 tensor) too; with
    lead > 0, x, residual and the output are (B, lead + N, C), the adapter's tokens the rows
    after the first `lead`; `tensors` are the 18 tensors of `w`, then, for an extra given as its
    factors, the three of its `LowRankExtra`: listed so that autograd returns their gradients."""

    @staticmethod
    def forward(ctx, x, residual, extra, hw, w, keep, p, momentum, update, batches, lead,
                *tensors):
        low_rank = LowRankExtra(*tensors[18:]) if len(tensors) > 18 else None
        ctx.x_is_residual = x is residual
        if lead:
            x = x[:, lead:]                                   # the adapter's tokens (B, N, C)
        s = _sizes(x, w, hw)
        M, D, n_tiles = s.M, s.D, s.n_tiles
        params = _parameters(w, s.acc)
        # one allocation: where it is drawn here, the dropout mask (M * D bools), h, the per-tile
        # BN partials, and for the backward the LayerNorm's 1/std, the BatchNorm statistics, the
        # folded down-projection's [v, hb] and the normalised input n_hat (M, C), held instead
        # of x in the dtype of the backward's matmul over it (`_held_dtype`)
        draw = keep is None and p > 0
        held = _held_dtype(x, s.acc)
        acc = s.acc
        mask, h, partial, rstd, bn_stats, fold, n_hat = _carved(
            [(M * D if draw else 0, torch.bool), (M * D, acc), (n_tiles * 2 * D, acc), (M, acc),
             (2 * D, acc), (2 * D, acc), (M * s.C, held)], x.device, acc)
        h, bn_stats, n_hat = h.view(M, D), bn_stats.view(2, D), n_hat.view(M, s.C)
        if draw:                              # as `torch.empty(M, D, dtype=bool).bernoulli_(1 - p)`
            keep = mask.view(M, D).bernoulli_(1 - p)
        _sft_down(x, s, w, params, h, rstd, n_hat, fold)
        dww, dwb, w1, b1 = params[6:10]
        _bn_partial_kernel[(n_tiles,)](h, dww, dwb, w1, b1, partial, M, s.N, hw[0], hw[1], D,
                                       w.cp, BLOCK_M=s.block_m, BLOCK_D=s.block_d)
        _bn_finalize_kernel[(triton.cdiv(D, BN_MERGE_CHANNELS),)](
            partial, bn_stats, w.bn_mean, w.bn_var, w.bn_mean if batches is None else batches,
            n_tiles, M, D, w.bn_eps, momentum, UPDATE=update, COUNT=batches is not None,
            BLOCK_M=s.block_m, BLOCK_T=BN_MERGE_TILES, BLOCK_D=BN_MERGE_CHANNELS)
        keep_scale = 1.0 / (1.0 - p) if keep is not None else 1.0
        out = _ho_up(h, s, residual, extra if low_rank is None else low_rank, hw, w, params,
                     bn_stats[0], bn_stats[1], False, keep, keep_scale, lead=lead)
        # not the running statistics (params[10:12]): unused by the backward, and updated in
        # place by any later forward (saving them would make that an error)
        ctx.save_for_backward(n_hat, h, rstd, bn_stats, fold, keep, *params[:10],
                              *params[12:], *(low_rank or ()))
        ctx.sizes, ctx.hw, ctx.w, ctx.keep_scale, ctx.lead = s, hw, w, keep_scale, lead
        ctx.x_dtype = x.dtype
        ctx.has_extra = extra is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        n_hat, h, rstd, bn_stats, fold, keep, *params = ctx.saved_tensors
        params[10:10] = [None, None]                   # the running statistics, not saved
        low_rank = LowRankExtra(*params[18:]) if len(params) > 18 else None
        g = _token_strides(g)[0]
        dx, grads = _train_backward(g, n_hat, h, rstd, bn_stats, fold, keep, params[:18],
                                    low_rank, ctx.sizes, ctx.hw, ctx.w.cp, ctx.keep_scale,
                                    ctx.x_is_residual, ctx.x_dtype, ctx.lead)
        tensors = list(ctx.w[:18]) + list(low_rank or ())
        grads = [None if gr is None or not need else gr.to(t.dtype)
                 for gr, t, need in zip(grads, tensors, ctx.needs_input_grad[11:])]
        d_residual = None if ctx.x_is_residual else g
        d_extra = (g[:, ctx.lead:] if ctx.lead else g) if ctx.has_extra else None
        return (dx, d_residual, d_extra, *[None] * 8, *grads)


def hybrid_adapter_train_triton(x: torch.Tensor, residual: torch.Tensor, extra, hw,
                                w: HybridAdapterWeights, keep, p: float, momentum: float,
                                update: bool, batches: Optional[torch.Tensor] = None,
                                lead: int = 0) -> torch.Tensor:
    """residual + HA branch(x) (+ extra) in training mode, differentiable in x, residual, extra
    (None, tokens or a `LowRankExtra`: then in its factors) and the adapter's parameters; `keep`
    (M, d2) the dropout mask of kept units, or None to draw it from torch's generator as
    `hybrid_adapter_train_reference` does, p the drop probability; BatchNorm's running statistics
    take this batch (momentum) when `update`, and its count of batches `batches`
    (num_batches_tracked, if given) goes up by one, in the kernel that updates them. With
    lead > 0, x and residual are (B, lead + N, C) and so is the result, whose first `lead` rows
    of each image are residual's (see `hybrid_adapter_train_reference`)."""
    batches = batches if update else None
    # the kernels index the mask as row-major (M, d2), the extra's factors as `_kernel_layout`
    keep = None if keep is None else keep.contiguous()
    extra = _kernel_layout(extra)
    if isinstance(extra, LowRankExtra):
        return HybridAdapterTrainFunction.apply(x, residual, None, tuple(hw), w, keep, p,
                                                momentum, update, batches, lead, *w[:18], *extra)
    return HybridAdapterTrainFunction.apply(x, residual, extra, tuple(hw), w, keep, p, momentum,
                                            update, batches, lead, *w[:18])

"""A Hybrid Adapter at inference (Eq. 15, BatchNorm on running statistics, dropout off) as two
Triton kernels, with the block's residual and the internal prompt added in the second:

    out = residual + up(gelu(HO(down(SFT(x))))) + extra              (B, N, C) tokens
    HO(h) = y + pw2(relu(bn(pw1(y)))),  y = h + concat(dwconv3x3(h[:, :cp]) + bias, h[:, cp:])

Written plainly that is about 13 kernels (LayerNorm, four Linear layers, the partial conv, the
BatchNorm, ReLU, GELU and three residual adds); the adapter's hidden width d2 (64) is small, so
each row of tokens can carry its whole hidden vector through the chain in registers:

1. `_sft_down_kernel`: per tile of BLOCK_M tokens, the LayerNorm statistics of x (two passes
   over C), then SFT (Eq. 14, its two affines applied on the fly) and the down-projection as one
   tile matmul accumulated over C: h (M, d2) in float32.
2. `_ho_up_kernel`: per tile of tokens, the partial depthwise conv reads h at the tile's 3x3
   neighbours on the (H, W) grid, then pw1, BatchNorm (running statistics), ReLU, pw2 and its
   residual, GELU, and the up-projection in chunks of C with `residual + extra` added before the
   store.

Tokens are addressed as base + b * stride_b + n * stride_n + c (channels contiguous), so the
patch tokens of EVA02 (a view that skips the cls token) are read in place. Matmuls accumulate in
float32 (TF32 on GPUs that have it: this is an inference path). The float32 reference is
`kernels.reference.hybrid_adapter_eval_reference`; the training path keeps autograd's modules.
"""
import torch
import triton
import triton.language as tl

from .reference import HybridAdapterWeights

BLOCK_M = 32   # tokens per program
BLOCK_C = 32   # channels per step of the loops over C


@triton.jit
def _token_offsets(rows, N, stride_b, stride_n):
    """Offsets of tokens `rows` (flat index b * N + n) in a (B, N, C) tensor."""
    return (rows // N) * stride_b + (rows % N) * stride_n


@triton.jit
def _sft_down_kernel(x_ptr, x_b, x_n, lnw_ptr, lnb_ptr, gamma_ptr, beta_ptr, wd_ptr, bd_ptr,
                     h_ptr, M, N, C, D, eps,
                     BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """h = down(LN(x) * gamma + beta) for one tile of tokens; h is (M, D) contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    x_rows = x_ptr + _token_offsets(rows, N, x_b, x_n)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c < C)[None, :]
        total += tl.sum(tl.load(x_rows[:, None] + c[None, :], mask=mask, other=0.0)
                        .to(tl.float32), axis=1)
    mean = total / C
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        mask = row_ok[:, None] & (c < C)[None, :]
        x = tl.load(x_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        diff = tl.where(mask, x - mean[:, None], 0.0)
        squares += tl.sum(diff * diff, axis=1)
    rstd = 1.0 / tl.sqrt(squares / C + eps)                            # LayerNorm: biased var
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = row_ok[:, None] & c_ok[None, :]
        x = tl.load(x_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0)
        scale = tl.load(lnw_ptr + c, mask=c_ok, other=0.0) * gamma      # Eq. 14, folded
        shift = tl.load(lnb_ptr + c, mask=c_ok, other=0.0) * gamma + tl.load(
            beta_ptr + c, mask=c_ok, other=0.0)
        s = (x - mean[:, None]) * rstd[:, None] * scale[None, :] + shift[None, :]
        s = tl.where(mask, s, 0.0)
        wd_t = tl.load(wd_ptr + d[None, :] * C + c[:, None],                # (BLOCK_C, BLOCK_D)
                       mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(s, wd_t)
    acc += tl.load(bd_ptr + d, mask=d_ok, other=0.0)[None, :]
    tl.store(h_ptr + rows[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _ho_up_kernel(h_ptr, dww_ptr, dwb_ptr, w1_ptr, b1_ptr, mean_ptr, var_ptr, bnw_ptr, bnb_ptr,
                  w2_ptr, b2_ptr, wu_ptr, bu_ptr, res_ptr, res_b, res_n, ext_ptr, ext_b, ext_n,
                  out_ptr, out_b, out_n, M, N, H, W, C, D, cp, bn_eps,
                  HAS_EXTRA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """out = residual + up(gelu(HO(h))) (+ extra) for one tile of tokens."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    h = tl.load(h_ptr + rows[:, None] * D + d[None, :], mask=tile_ok, other=0.0)
    # Fig. 3 step 1: the depthwise 3x3 conv (padding 1) on channels c < cp, from the neighbours
    n = rows % N
    first = rows - n                                                     # the image's token 0
    gi, gj = n // W, n % W
    is_conv = d < cp
    conv = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            ni, nj = gi + i - 1, gj + j - 1
            inside = row_ok & (ni >= 0) & (ni < H) & (nj >= 0) & (nj < W)
            tap = tl.load(h_ptr + (first + ni * W + nj)[:, None] * D + d[None, :],
                          mask=inside[:, None] & is_conv[None, :], other=0.0)
            weight = tl.load(dww_ptr + d * 9 + i * 3 + j, mask=is_conv, other=0.0)
            conv += tap * weight[None, :]
    conv += tl.load(dwb_ptr + d, mask=is_conv, other=0.0)[None, :]
    y = h + tl.where(is_conv[None, :], conv, h)
    # step 2: y + pw2(relu(bn(pw1(y)))), BatchNorm on its running statistics
    square = d_ok[:, None] & d_ok[None, :]
    w1_t = tl.load(w1_ptr + d[None, :] * D + d[:, None], mask=square, other=0.0)
    p = tl.dot(y, w1_t) + tl.load(b1_ptr + d, mask=d_ok, other=0.0)[None, :]
    bn_scale = tl.load(bnw_ptr + d, mask=d_ok, other=0.0) / tl.sqrt(
        tl.load(var_ptr + d, mask=d_ok, other=1.0) + bn_eps)
    p = (p - tl.load(mean_ptr + d, mask=d_ok, other=0.0)[None, :]) * bn_scale[None, :] \
        + tl.load(bnb_ptr + d, mask=d_ok, other=0.0)[None, :]
    w2_t = tl.load(w2_ptr + d[None, :] * D + d[:, None], mask=square, other=0.0)
    o = y + tl.dot(tl.maximum(p, 0.0), w2_t) + tl.load(b2_ptr + d, mask=d_ok, other=0.0)[None, :]
    g = 0.5 * o * (1.0 + tl.math.erf(o * 0.7071067811865476))           # exact GELU
    g = tl.where(tile_ok, g, 0.0)
    # the up-projection, residual and internal prompt, BLOCK_C output channels at a time
    res_rows = res_ptr + _token_offsets(rows, N, res_b, res_n)
    out_rows = out_ptr + _token_offsets(rows, N, out_b, out_n)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        mask = row_ok[:, None] & c_ok[None, :]
        wu_t = tl.load(wu_ptr + c[None, :] * D + d[:, None],                # (BLOCK_D, BLOCK_C)
                       mask=d_ok[:, None] & c_ok[None, :], other=0.0)
        u = tl.dot(g, wu_t) + tl.load(bu_ptr + c, mask=c_ok, other=0.0)[None, :]
        u += tl.load(res_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_EXTRA:
            ext_rows = ext_ptr + _token_offsets(rows, N, ext_b, ext_n)
            u += tl.load(ext_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_rows[:, None] + c[None, :], u.to(out_ptr.dtype.element_ty), mask=mask)


def _token_strides(t: torch.Tensor):
    """(t, stride_b, stride_n) with channels contiguous (copying only when they are not)."""
    if t.stride(2) != 1:
        t = t.contiguous()
    return t, t.stride(0), t.stride(1)


def hybrid_adapter_eval_triton(x: torch.Tensor, residual: torch.Tensor,
                               extra: torch.Tensor, hw, w: HybridAdapterWeights
                               ) -> torch.Tensor:
    """residual + HA branch(x) (+ extra), x/residual/extra (B, N, C); see the module docstring."""
    B, N, C = x.shape
    H, W = hw
    D = w.down_weight.shape[0]
    M = B * N
    block_d = max(16, triton.next_power_of_2(D))            # tl.dot needs 16 or more
    x, x_b, x_n = _token_strides(x)
    residual, res_b, res_n = _token_strides(residual)
    has_extra = extra is not None
    out_dtype = (torch.promote_types(residual.dtype, extra.dtype) if has_extra
                 else residual.dtype)
    extra, ext_b, ext_n = _token_strides(extra) if has_extra else (residual, 0, 0)  # unread
    params = [p.detach() for p in w[:-3]]
    if any(not p.is_contiguous() or p.dtype != torch.float32 for p in params):
        params = [p.float().contiguous() for p in params]
    (lnw, lnb, gamma, beta, wd, bd, dww, dwb, w1, b1, mean, var, bnw, bnb, w2, b2, wu, bu) = params
    h = torch.empty((M, D), device=x.device, dtype=torch.float32)
    out = torch.empty((B, N, C), device=x.device, dtype=out_dtype)
    grid = (triton.cdiv(M, BLOCK_M),)
    _sft_down_kernel[grid](x, x_b, x_n, lnw, lnb, gamma, beta, wd, bd, h, M, N, C, D,
                           w.ln_eps, BLOCK_M=BLOCK_M, BLOCK_C=BLOCK_C, BLOCK_D=block_d)
    _ho_up_kernel[grid](h, dww, dwb, w1, b1, mean, var, bnw, bnb, w2, b2, wu, bu,
                        residual, res_b, res_n, extra, ext_b, ext_n, out, out.stride(0),
                        out.stride(1), M, N, H, W, C, D, w.cp, w.bn_eps,
                        HAS_EXTRA=has_extra, BLOCK_M=BLOCK_M,
                        BLOCK_C=BLOCK_C, BLOCK_D=block_d)
    return out

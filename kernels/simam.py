"""SimAM (Eq. 11-12) in Triton: forward and analytic backward, as `SimAMFunction`.

Per row (b, c) of a (B, C, H, W) map, with N = H*W and n = max(N - 1, 1):
    mu = mean(x),  v = sum((x - mu)^2) / n,  k = 1 / (4 (v + lam)),
    y = x * s,  s = sigmoid((x - mu)^2 k + 0.5).
Rows of at most ROW_TILE elements take one launch a direction, each program holding whole rows
(`_simam_row_forward_kernel`, `_simam_row_backward_kernel`). Longer rows take two launches a
direction over (b, channel block, chunk of H*W) programs: partial sums, then the finish
(`_simam_stats_partial_kernel` -> `_simam_forward_kernel`, `_simam_backward_partial_kernel` ->
`_simam_backward_kernel`). Autograd saves x and (mu, k) per row. Contiguous and channels-last
maps are read in place (`kernels.utils.merged_hw_stride`). Design notes: docs/kernels.md.
"""
import torch
import triton
import triton.language as tl

from .utils import accumulator_dtype, merged_hw_stride, with_merged_hw

MAX_CHUNKS = 32  # chunks per row: enough programs to fill a GPU, few partials to finish
TILE = 2048  # elements a program holds per tile, BLOCK_C * BLOCK_HW
ROW_TILE = 8192  # the most elements a one-pass program holds (whole rows, BLOCK_C * BLOCK_HW)


@triton.jit
def _program_rows(C, BLOCK_C: tl.constexpr):
    """This program's batch index and its BLOCK_C channel indices (axis 0 of the grid)."""
    n_cblocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    return pid // n_cblocks, (pid % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)


@triton.jit
def _sum_chunks(part_ptr, rows, row_mask, n_chunks, CHUNKS: tl.constexpr):
    """Sum the per-chunk partials part[rows, :n_chunks] of a (rows, n_chunks) buffer."""
    chunk = tl.arange(0, CHUNKS)
    mask = row_mask[:, None] & (chunk < n_chunks)[None, :]
    return tl.sum(tl.load(part_ptr + rows[:, None] * n_chunks + chunk[None, :], mask=mask,
                          other=0.0), axis=1)


@triton.jit
def _simam_stats_partial_kernel(x_ptr, part_ptr, C, HW, n_rows, n_chunks,
                                stride_b, stride_c, stride_hw,
                                CHUNK_TILES: tl.constexpr, BLOCK_C: tl.constexpr,
                                BLOCK_HW: tl.constexpr):
    """part[0, row, chunk] = sum(x - shift), part[1, row, chunk] = sum((x - shift)^2)."""
    acc_dtype = part_ptr.dtype.element_ty
    b, c = _program_rows(C, BLOCK_C)
    chunk = tl.program_id(1)
    c_mask = c < C
    # sums around x[b, c, 0, 0], so that sum((x - shift)^2) does not cancel when |mu| >> std
    shift = tl.load(x_ptr + b * stride_b + c * stride_c, mask=c_mask, other=0.0).to(acc_dtype)
    base = x_ptr + b * stride_b + c[:, None] * stride_c  # (BLOCK_C, 1)
    s1 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    s2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    for t in range(CHUNK_TILES):
        hw = (chunk * CHUNK_TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = tl.load(base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(acc_dtype)
        xs = tl.where(mask, x - shift[:, None], 0.0)
        s1 += tl.sum(xs, axis=1)
        s2 += tl.sum(xs * xs, axis=1)
    rows = b * C + c
    tl.store(part_ptr + rows * n_chunks + chunk, s1, mask=c_mask)
    tl.store(part_ptr + (n_rows + rows) * n_chunks + chunk, s2, mask=c_mask)


@triton.jit
def _simam_forward_kernel(x_ptr, part_ptr, stats_ptr, y_ptr, lam, C, HW, n, n_rows, n_chunks,
                          stride_b, stride_c, stride_hw, out_b, out_c, out_hw,
                          CHUNK_TILES: tl.constexpr, CHUNKS: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Finish (mu, k) from the partials, write y = x * sigmoid((x - mu)^2 k + 0.5)."""
    acc_dtype = part_ptr.dtype.element_ty
    b, c = _program_rows(C, BLOCK_C)
    chunk = tl.program_id(1)
    c_mask = c < C
    rows = b * C + c
    shift = tl.load(x_ptr + b * stride_b + c * stride_c, mask=c_mask, other=0.0).to(acc_dtype)
    s1 = _sum_chunks(part_ptr, rows, c_mask, n_chunks, CHUNKS)
    s2 = _sum_chunks(part_ptr + n_rows * n_chunks, rows, c_mask, n_chunks, CHUNKS)
    mean_shifted = s1 / HW
    mu = shift + mean_shifted
    v = (s2 - s1 * mean_shifted) / n  # Eq. 12's delta^2 = sum((x - mu)^2) / n
    k = 1.0 / (4.0 * (v + lam))
    if chunk == 0:
        tl.store(stats_ptr + rows, mu, mask=c_mask)
        tl.store(stats_ptr + n_rows + rows, k, mask=c_mask)
    base = x_ptr + b * stride_b + c[:, None] * stride_c
    out = y_ptr + b * out_b + c[:, None] * out_c
    for t in range(CHUNK_TILES):
        hw = (chunk * CHUNK_TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        x = tl.load(base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(acc_dtype)
        xc = x - mu[:, None]
        s = 1.0 / (1.0 + tl.exp(-(xc * xc * k[:, None] + 0.5)))  # Eq. 11: sigmoid(1 / e*)
        tl.store(out + hw[None, :] * out_hw, (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _simam_row_forward_kernel(x_ptr, stats_ptr, y_ptr, lam, C, HW, n, n_rows,
                              stride_b, stride_c, stride_hw, out_b, out_c, out_hw,
                              BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Whole rows in one program: (mu, k) and y = x * sigmoid((x - mu)^2 k + 0.5), x read once."""
    acc_dtype = stats_ptr.dtype.element_ty
    b, c = _program_rows(C, BLOCK_C)
    c_mask = c < C
    hw = tl.arange(0, BLOCK_HW)
    mask = c_mask[:, None] & (hw < HW)[None, :]
    x = tl.load(x_ptr + b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw,
                mask=mask, other=0.0).to(acc_dtype)
    mu = tl.sum(x, axis=1) / HW
    xc = tl.where(mask, x - mu[:, None], 0.0)
    k = 1.0 / (4.0 * (tl.sum(xc * xc, axis=1) / n + lam))     # Eq. 12: 1 / (4 (delta^2 + lam))
    rows = b * C + c
    tl.store(stats_ptr + rows, mu, mask=c_mask)
    tl.store(stats_ptr + n_rows + rows, k, mask=c_mask)
    s = 1.0 / (1.0 + tl.exp(-(xc * xc * k[:, None] + 0.5)))     # Eq. 11: sigmoid(1 / e*)
    tl.store(y_ptr + b * out_b + c[:, None] * out_c + hw[None, :] * out_hw,
             (x * s).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _simam_backward_tile(x_ptr, g_ptr, b, c, hw, mask, mu, k,
                         stride_b, stride_c, stride_hw, g_b, g_c, g_hw):
    """(x - mu, s, g, q) of one tile, with q = dL/de = g x s (1 - s)."""
    acc_dtype = mu.dtype
    x = tl.load(x_ptr + b * stride_b + c[:, None] * stride_c + hw[None, :] * stride_hw,
                mask=mask, other=0.0).to(acc_dtype)
    g = tl.load(g_ptr + b * g_b + c[:, None] * g_c + hw[None, :] * g_hw,
                mask=mask, other=0.0).to(acc_dtype)
    xc = x - mu[:, None]
    s = 1.0 / (1.0 + tl.exp(-(xc * xc * k[:, None] + 0.5)))
    return xc, s, g, g * x * s * (1.0 - s)


@triton.jit
def _backward_program(stats_ptr, C, n_rows, BLOCK_C: tl.constexpr):
    """This backward program's batch index, channel block, chunk, channel mask, (b, c) row
    indices, and the rows' saved statistics mu and k = 1 / (4 (v + lam))."""
    b, c = _program_rows(C, BLOCK_C)
    c_mask = c < C
    rows = b * C + c
    mu = tl.load(stats_ptr + rows, mask=c_mask, other=0.0)
    k = tl.load(stats_ptr + n_rows + rows, mask=c_mask, other=0.0)
    return b, c, tl.program_id(1), c_mask, rows, mu, k


@triton.jit
def _simam_backward_partial_kernel(x_ptr, g_ptr, stats_ptr, part_ptr, C, HW, n_rows, n_chunks,
                                   stride_b, stride_c, stride_hw, g_b, g_c, g_hw,
                                   CHUNK_TILES: tl.constexpr, BLOCK_C: tl.constexpr,
                                   BLOCK_HW: tl.constexpr):
    """part[0, row, chunk] = sum(q (x - mu)), part[1, row, chunk] = sum(q (x - mu)^2)."""
    b, c, chunk, c_mask, rows, mu, k = _backward_program(stats_ptr, C, n_rows, BLOCK_C)
    sum_qx = tl.zeros([BLOCK_C], dtype=mu.dtype)
    sum_qd = tl.zeros([BLOCK_C], dtype=mu.dtype)
    for t in range(CHUNK_TILES):
        hw = (chunk * CHUNK_TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        xc, s, g, q = _simam_backward_tile(x_ptr, g_ptr, b, c, hw, mask, mu, k,
                                           stride_b, stride_c, stride_hw, g_b, g_c, g_hw)
        sum_qx += tl.sum(q * xc, axis=1)
        sum_qd += tl.sum(q * xc * xc, axis=1)
    tl.store(part_ptr + rows * n_chunks + chunk, sum_qx, mask=c_mask)
    tl.store(part_ptr + (n_rows + rows) * n_chunks + chunk, sum_qd, mask=c_mask)


@triton.jit
def _simam_backward_kernel(x_ptr, g_ptr, stats_ptr, part_ptr, dx_ptr, C, HW, n, n_rows, n_chunks,
                           stride_b, stride_c, stride_hw, g_b, g_c, g_hw, dx_b, dx_c, dx_hw,
                           CHUNK_TILES: tl.constexpr, CHUNKS: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """grad_x = g s + 2 (x - mu) (q k - 4 k^2 sum(q d) / n) - 2 k sum(q (x - mu)) / N.

    With d = (x - mu)^2 and e = d k + 0.5: dL/dd = q k directly plus dL/dv / n through
    v = sum(d) / n, where dL/dv = dL/dk dk/dv = sum(q d) (-4 k^2). d depends on x and on mu;
    the path through mu adds -sum(2 (x - mu) dL/dd) / N to every element, and sum(x - mu) = 0
    leaves only the sum(q (x - mu)) term.
    """
    b, c, chunk, c_mask, rows, mu, k = _backward_program(stats_ptr, C, n_rows, BLOCK_C)
    sum_qx = _sum_chunks(part_ptr, rows, c_mask, n_chunks, CHUNKS)
    sum_qd = _sum_chunks(part_ptr + n_rows * n_chunks, rows, c_mask, n_chunks, CHUNKS)
    dv = -4.0 * k * k * sum_qd / n  # dL/dv / n
    dmu = -2.0 * k * sum_qx / HW  # the path through mu, per element
    out = dx_ptr + b * dx_b + c[:, None] * dx_c
    for t in range(CHUNK_TILES):
        hw = (chunk * CHUNK_TILES + t) * BLOCK_HW + tl.arange(0, BLOCK_HW)
        mask = c_mask[:, None] & (hw < HW)[None, :]
        xc, s, g, q = _simam_backward_tile(x_ptr, g_ptr, b, c, hw, mask, mu, k,
                                           stride_b, stride_c, stride_hw, g_b, g_c, g_hw)
        dx = g * s + 2.0 * xc * (q * k[:, None] + dv[:, None]) + dmu[:, None]
        tl.store(out + hw[None, :] * dx_hw, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _simam_row_backward_kernel(x_ptr, g_ptr, stats_ptr, dx_ptr, C, HW, n, n_rows,
                               stride_b, stride_c, stride_hw, g_b, g_c, g_hw, dx_b, dx_c, dx_hw,
                               BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """Whole rows in one program: both reductions and grad_x (formula of
    `_simam_backward_kernel`) from one read of x and of the gradient."""
    b, c, _, c_mask, rows, mu, k = _backward_program(stats_ptr, C, n_rows, BLOCK_C)
    hw = tl.arange(0, BLOCK_HW)
    mask = c_mask[:, None] & (hw < HW)[None, :]
    xc, s, g, q = _simam_backward_tile(x_ptr, g_ptr, b, c, hw, mask, mu, k,
                                       stride_b, stride_c, stride_hw, g_b, g_c, g_hw)
    xc = tl.where(mask, xc, 0.0)
    dv = -4.0 * k * k * tl.sum(q * xc * xc, axis=1) / n      # dL/dv / n
    dmu = -2.0 * k * tl.sum(q * xc, axis=1) / HW              # the path through mu
    dx = g * s + 2.0 * xc * (q * k[:, None] + dv[:, None]) + dmu[:, None]
    tl.store(dx_ptr + b * dx_b + c[:, None] * dx_c + hw[None, :] * dx_hw,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -- host side ------------------------------------------------------------------------------------
def num_programs_target(device: torch.device) -> int:
    """Programs worth launching: 4 per SM (132 SMs, an H100's count, under the interpreter)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" \
        else 132
    return 4 * sms


def row_grid(x: torch.Tensor):
    """Block sizes and grid shared by the four SimAM kernels.

    Returns (BLOCK_C, BLOCK_HW, CHUNK_TILES, n_chunks): the (B * ceil(C / BLOCK_C), n_chunks) grid
    splits each row into n_chunks <= MAX_CHUNKS chunks of CHUNK_TILES tiles of BLOCK_HW elements.
    """
    B, C, H, W = x.shape
    block_c = min(triton.next_power_of_2(C), 16)
    block_hw = TILE // block_c
    n_tiles = triton.cdiv(H * W, block_hw)
    row_blocks = B * triton.cdiv(C, block_c)
    wanted = min(n_tiles, MAX_CHUNKS, triton.cdiv(num_programs_target(x.device), row_blocks))
    chunk_tiles = triton.cdiv(n_tiles, wanted)
    return block_c, block_hw, chunk_tiles, triton.cdiv(n_tiles, chunk_tiles)


def one_pass_blocks(x: torch.Tensor):
    """(BLOCK_C, BLOCK_HW, num_warps) when whole rows fit one program, else None."""
    B, C, H, W = x.shape
    block_hw = triton.next_power_of_2(H * W)
    if block_hw > ROW_TILE:
        return None
    block_c = min(triton.next_power_of_2(C), 16, max(ROW_TILE // block_hw, 1))
    return block_c, block_hw, min(16, max(4, block_c * block_hw // 512))


def simam_forward(x: torch.Tensor, lam: float):
    """Launch the forward pass: returns (y in x's memory format, stats (2, B*C): mu and k)."""
    x, stride_hw = with_merged_hw(x)
    B, C, H, W = x.shape
    acc_dtype = accumulator_dtype(x.dtype)
    stats = torch.empty(2, B * C, device=x.device, dtype=acc_dtype)
    y = torch.empty_like(x)
    y_stride_hw = merged_hw_stride(y)
    one_pass = one_pass_blocks(x)
    if one_pass is not None:
        block_c, block_hw, warps = one_pass
        _simam_row_forward_kernel[(B * triton.cdiv(C, block_c),)](
            x, stats, y, lam, C, H * W, max(H * W - 1, 1), B * C, x.stride(0), x.stride(1),
            stride_hw, y.stride(0), y.stride(1), y_stride_hw, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=warps)
        return y, stats
    block_c, block_hw, chunk_tiles, n_chunks = row_grid(x)
    grid = (B * triton.cdiv(C, block_c), n_chunks)
    part = torch.empty(2, B * C, n_chunks, device=x.device, dtype=acc_dtype)
    _simam_stats_partial_kernel[grid](x, part, C, H * W, B * C, n_chunks,
                                      x.stride(0), x.stride(1), stride_hw,
                                      CHUNK_TILES=chunk_tiles, BLOCK_C=block_c, BLOCK_HW=block_hw)
    _simam_forward_kernel[grid](x, part, stats, y, lam, C, H * W, max(H * W - 1, 1), B * C,
                                n_chunks, x.stride(0), x.stride(1), stride_hw,
                                y.stride(0), y.stride(1), y_stride_hw,
                                CHUNK_TILES=chunk_tiles, CHUNKS=triton.next_power_of_2(n_chunks),
                                BLOCK_C=block_c, BLOCK_HW=block_hw)
    return y, stats


def simam_backward(x: torch.Tensor, stats: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Launch the backward pass: grad_x in x's memory format."""
    x, stride_hw = with_merged_hw(x)
    grad, g_stride_hw = with_merged_hw(grad)
    B, C, H, W = x.shape
    dx = torch.empty_like(x)
    strides = (x.stride(0), x.stride(1), stride_hw, grad.stride(0), grad.stride(1), g_stride_hw)
    one_pass = one_pass_blocks(x)
    if one_pass is not None:
        block_c, block_hw, warps = one_pass
        _simam_row_backward_kernel[(B * triton.cdiv(C, block_c),)](
            x, grad, stats, dx, C, H * W, max(H * W - 1, 1), B * C, *strides, dx.stride(0),
            dx.stride(1), merged_hw_stride(dx), BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=warps)
        return dx
    block_c, block_hw, chunk_tiles, n_chunks = row_grid(x)
    grid = (B * triton.cdiv(C, block_c), n_chunks)
    part = torch.empty(2, B * C, n_chunks, device=x.device, dtype=stats.dtype)
    _simam_backward_partial_kernel[grid](x, grad, stats, part, C, H * W, B * C, n_chunks, *strides,
                                         CHUNK_TILES=chunk_tiles, BLOCK_C=block_c,
                                         BLOCK_HW=block_hw)
    _simam_backward_kernel[grid](x, grad, stats, part, dx, C, H * W, max(H * W - 1, 1), B * C,
                                 n_chunks, *strides, dx.stride(0), dx.stride(1),
                                 merged_hw_stride(dx), CHUNK_TILES=chunk_tiles,
                                 CHUNKS=triton.next_power_of_2(n_chunks), BLOCK_C=block_c,
                                 BLOCK_HW=block_hw)
    return dx


class SimAMFunction(torch.autograd.Function):
    """SimAM with the Triton kernels; saves x and the per-row (mu, k) only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        y, stats = simam_forward(x, lam)
        ctx.save_for_backward(x, stats)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, stats = ctx.saved_tensors
        return simam_backward(x, stats, grad), None


def simam_triton(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM of a (B, C, H, W) map (contiguous or channels-last) with the Triton kernels."""
    return SimAMFunction.apply(x, lam)

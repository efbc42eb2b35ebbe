"""The Hybrid Operation's partial conv (Fig. 3, step 1) in Triton, as
`PartialConvResidualFunction`: one kernel a direction.

    y = x + concat(dwconv3x3(x[:, :cp], weight, bias, padding=1), x[:, cp:])

A program handles one (b, block of BLOCK_C channels, tile of BLOCK_HW pixels); blocks with no
channel below cp skip the stencil. Backward, with g = dL/dy:
    grad_x[c]      = g[c] + conv_transpose3x3(g[c], weight[c])   for c < cp,   2 g[c] otherwise;
    grad_weight[c] = sum over (b, h, w) of g[c] * x[c] shifted by the tap's offset;
    grad_bias[c]   = sum over (b, h, w) of g[c];
each program writes its tile's weight and bias partial sums, and one sum over programs finishes
them. Autograd saves x and the weight.
"""
import torch
import triton
import triton.language as tl

from .utils import accumulator_dtype, merged_hw_stride, with_merged_hw

TILE = 2048  # elements a program holds, BLOCK_C * BLOCK_HW


@triton.jit
def _program_tile(C, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """This program's batch index, channel indices, pixel indices (h * W + w) and first channel."""
    n_cblocks = tl.cdiv(C, BLOCK_C)
    pid = tl.program_id(0)
    c_start = (pid % n_cblocks) * BLOCK_C
    hw = tl.program_id(1) * BLOCK_HW + tl.arange(0, BLOCK_HW)
    return pid // n_cblocks, c_start + tl.arange(0, BLOCK_C), hw, c_start


@triton.jit
def _shifted(base, stride_hw, hw, mask, H, W, dh, dw):
    """The (BLOCK_C, BLOCK_HW) tile of a map at pixel (h + dh, w + dw), zero outside (padding 1)."""
    h = hw // W
    w = hw % W
    inside = (h + dh >= 0) & (h + dh < H) & (w + dw >= 0) & (w + dw < W)
    return tl.load(base + (hw + dh * W + dw)[None, :] * stride_hw, mask=mask & inside[None, :],
                   other=0.0)


@triton.jit
def _depthwise3x3(base, stride_hw, w_ptr, c, is_conv, hw, mask, H, W, TRANSPOSE: tl.constexpr):
    """sum_ij weight[c, i, j] * map(h + i - 1, w + j - 1), or at (h - i + 1, w - j + 1) when
    TRANSPOSE (the convolution's gradient with respect to its input)."""
    acc = tl.zeros(mask.shape, dtype=w_ptr.dtype.element_ty)
    for i in tl.static_range(3):
        for j in tl.static_range(3):
            weight = tl.load(w_ptr + c * 9 + i * 3 + j, mask=is_conv, other=0.0)
            if TRANSPOSE:
                tap = _shifted(base, stride_hw, hw, mask, H, W, 1 - i, 1 - j)
            else:
                tap = _shifted(base, stride_hw, hw, mask, H, W, i - 1, j - 1)
            acc += weight[:, None] * tap.to(acc.dtype)
    return acc


@triton.jit
def _partial_conv_forward_kernel(x_ptr, w_ptr, b_ptr, y_ptr, C, H, W, cp,
                                 stride_b, stride_c, stride_hw, out_b, out_c, out_hw,
                                 BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """y = x + (conv(x) + bias for c < cp, x otherwise)."""
    b, c, hw, c_start = _program_tile(C, BLOCK_C, BLOCK_HW)
    mask = (c < C)[:, None] & (hw < H * W)[None, :]
    base = x_ptr + b * stride_b + c[:, None] * stride_c
    x = tl.load(base + hw[None, :] * stride_hw, mask=mask, other=0.0).to(w_ptr.dtype.element_ty)
    y = x + x
    if c_start < cp:
        is_conv = c < cp
        conv = _depthwise3x3(base, stride_hw, w_ptr, c, is_conv, hw, mask, H, W, TRANSPOSE=False)
        conv += tl.load(b_ptr + c, mask=is_conv, other=0.0)[:, None]
        y = tl.where(is_conv[:, None], x + conv, y)
    tl.store(y_ptr + b * out_b + c[:, None] * out_c + hw[None, :] * out_hw,
             y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _partial_conv_backward_kernel(x_ptr, g_ptr, w_ptr, dx_ptr, part_ptr, C, H, W, cp,
                                  stride_b, stride_c, stride_hw, g_b, g_c, g_hw,
                                  dx_b, dx_c, dx_hw,
                                  BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
    """grad_x of the tile; for conv channels also part[program, c, :] = this tile's
    (grad_weight[c, 0..8], grad_bias[c]) partial sums."""
    b, c, hw, c_start = _program_tile(C, BLOCK_C, BLOCK_HW)
    mask = (c < C)[:, None] & (hw < H * W)[None, :]
    g_base = g_ptr + b * g_b + c[:, None] * g_c
    g = tl.load(g_base + hw[None, :] * g_hw, mask=mask, other=0.0).to(w_ptr.dtype.element_ty)
    dx = g + g
    if c_start < cp:
        is_conv = c < cp
        conv_t = _depthwise3x3(g_base, g_hw, w_ptr, c, is_conv, hw, mask, H, W, TRANSPOSE=True)
        dx = tl.where(is_conv[:, None], g + conv_t, dx)
        part = part_ptr + ((b * tl.num_programs(1) + tl.program_id(1)) * cp + c) * 10
        x_base = x_ptr + b * stride_b + c[:, None] * stride_c
        conv_mask = mask & is_conv[:, None]
        for i in tl.static_range(3):
            for j in tl.static_range(3):
                tap = _shifted(x_base, stride_hw, hw, conv_mask, H, W, i - 1, j - 1)
                tl.store(part + i * 3 + j, tl.sum(g * tap.to(g.dtype), axis=1), mask=is_conv)
        tl.store(part + 9, tl.sum(g, axis=1), mask=is_conv)
    tl.store(dx_ptr + b * dx_b + c[:, None] * dx_c + hw[None, :] * dx_hw,
             dx.to(dx_ptr.dtype.element_ty), mask=mask)


# -- host side ------------------------------------------------------------------------------------
def tile_grid(x: torch.Tensor):
    """(BLOCK_C, BLOCK_HW, n_tiles): the grid is (B * ceil(C / BLOCK_C), n_tiles)."""
    B, C, H, W = x.shape
    block_c = min(triton.next_power_of_2(C), 16)
    block_hw = TILE // block_c
    return block_c, block_hw, triton.cdiv(H * W, block_hw)


def partial_conv_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         cp: int) -> torch.Tensor:
    """Launch the forward pass; y comes back in x's memory format."""
    x, stride_hw = with_merged_hw(x)
    B, C, H, W = x.shape
    acc_dtype = accumulator_dtype(x.dtype)
    w = weight.detach().reshape(cp, 9).to(acc_dtype).contiguous()
    bias = bias.detach().to(acc_dtype).contiguous()
    y = torch.empty_like(x)
    block_c, block_hw, n_tiles = tile_grid(x)
    grid = (B * triton.cdiv(C, block_c), n_tiles)
    _partial_conv_forward_kernel[grid](x, w, bias, y, C, H, W, cp,
                                       x.stride(0), x.stride(1), stride_hw,
                                       y.stride(0), y.stride(1), merged_hw_stride(y),
                                       BLOCK_C=block_c, BLOCK_HW=block_hw)
    return y


def partial_conv_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, cp: int):
    """Launch the backward pass: (grad_x in x's memory format, grad_weight, grad_bias)."""
    x, stride_hw = with_merged_hw(x)
    grad, g_stride_hw = with_merged_hw(grad)
    B, C, H, W = x.shape
    acc_dtype = accumulator_dtype(x.dtype)
    w = weight.reshape(cp, 9).to(acc_dtype).contiguous()
    dx = torch.empty_like(x)
    block_c, block_hw, n_tiles = tile_grid(x)
    grid = (B * triton.cdiv(C, block_c), n_tiles)
    part = torch.empty(B * n_tiles, cp, 10, device=x.device, dtype=acc_dtype)
    _partial_conv_backward_kernel[grid](x, grad, w, dx, part, C, H, W, cp,
                                        x.stride(0), x.stride(1), stride_hw,
                                        grad.stride(0), grad.stride(1), g_stride_hw,
                                        dx.stride(0), dx.stride(1), merged_hw_stride(dx),
                                        BLOCK_C=block_c, BLOCK_HW=block_hw,
                                        num_warps=8)  # 4 warps spill registers (docs/kernels.md)
    part = part.sum(dim=0)  # finish the reductions over (b, tile)
    grad_weight = part[:, :9].reshape(weight.shape).to(weight.dtype)
    return dx, grad_weight, part[:, 9].to(weight.dtype)


class PartialConvResidualFunction(torch.autograd.Function):
    """x + concat(dwconv3x3(x[:, :cp]), x[:, cp:]) with the Triton kernels; saves x and weight."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                cp: int) -> torch.Tensor:
        ctx.cp = cp
        ctx.save_for_backward(x, weight)
        return partial_conv_forward(x, weight, bias, cp)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = partial_conv_backward(x, weight, grad, ctx.cp)
        return grad_x, grad_weight, grad_bias, None


def partial_conv_residual_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                 cp: int) -> torch.Tensor:
    """The partial conv residual of a (B, C, H, W) map (contiguous or channels-last) in Triton.

    weight: (cp, 1, 3, 3); bias: (cp,); 0 <= cp <= C.
    """
    return PartialConvResidualFunction.apply(x, weight, bias, cp)

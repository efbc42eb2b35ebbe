"""Host-side helpers shared by the kernel files: map strides, accumulator dtype, output checks."""
import torch


def merged_hw_stride(t: torch.Tensor):
    """The stride s with t[b, c, h, w] at offset h*W*s + w*s, or None if H and W do not merge.

    Contiguous maps give s = 1, channels-last maps s = C; any (B, C, H, W) view of token-layout
    data (B, H*W, C) merges.
    """
    H, W = t.shape[2], t.shape[3]
    if W == 1:
        return t.stride(2)
    if H == 1 or t.stride(2) == W * t.stride(3):
        return t.stride(3)
    return None


def with_merged_hw(t: torch.Tensor):
    """(t, its merged H*W stride), copying t to contiguous only when H and W do not merge."""
    stride = merged_hw_stride(t)
    if stride is None:
        t = t.contiguous()
        stride = merged_hw_stride(t)
    return t, stride


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def destination(out: torch.Tensor, shape, dtype: torch.dtype, name: str) -> torch.Tensor:
    """`out`, a tensor given for a kernel's result (such as a view of the patch rows of EVA02's
    (B, 1 + N, C) tokens), checked: the result's shape and dtype, channels contiguous."""
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"{name}: expected a {tuple(shape)} {dtype} tensor with contiguous "
                         f"channels, got {tuple(out.shape)} {out.dtype} with strides "
                         f"{out.stride()}")
    return out

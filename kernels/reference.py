"""Pure-PyTorch references for the two memory-bound IV-tuning operations.

These are the ground truth the Triton kernels are tested against, and the path the product takes
wherever Triton or a GPU is missing. Both accept contiguous or channels-last (B, C, H, W) maps.
"""
import torch
import torch.nn.functional as F


def simam_reference(x: torch.Tensor, lam: float = 1e-4) -> torch.Tensor:
    """SimAM (Eq. 11-12): parameter-free attention, per sample and channel.

    x: (B, C, H, W). With mu = mean_hw(x), d = (x - mu)^2, v = sum_hw(d) / n, n = H*W - 1,
    e = d / (4 (v + lam)) + 0.5 (this e is 1/e* of Eq. 12), returns x * sigmoid(e).
    Edge case H*W == 1: n is taken as 1 (not 0), so d = v = 0, e = 0.5 and the output is
    x * sigmoid(0.5) instead of NaN.
    """
    n = max(x.shape[2] * x.shape[3] - 1, 1)
    d = (x - x.mean(dim=(2, 3), keepdim=True)).pow(2)
    v = d.sum(dim=(2, 3), keepdim=True) / n
    e = d / (4 * (v + lam)) + 0.5
    return x * torch.sigmoid(e)


def partial_conv_residual_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                                    cp: int) -> torch.Tensor:
    """First step of the Hybrid Operation (Fig. 3): x + concat(dwconv3x3(x[:, :cp]), x[:, cp:]).

    x: (B, C, H, W); weight: (cp, 1, 3, 3); bias: (cp,). The depthwise 3x3 convolution (padding 1)
    touches only the first cp channels; the other C - cp channels pass through, so after the outer
    residual they come out doubled. cp == 0 (no conv channels) returns 2x.
    """
    if cp == 0:
        return x + x
    conv = F.conv2d(x[:, :cp], weight, bias, padding=1, groups=cp)
    return x + torch.cat([conv, x[:, cp:]], dim=1)

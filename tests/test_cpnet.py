"""The CPNet decoder and the saliency model: shapes on Swin and EVA02 backbones (non-square and
odd sizes), the loss against a float64 formula, gradients, and the parameter count from the
spec's layer list (method.md sec. 6)."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.heads import CPNetDecoder
from ivt.models.heads.cpnet import ConvNeXtBlock, upsample
from ivt.models.ivtuning import IVTConfig
from ivt.models.saliency import SaliencyModel, build_saliency_model, sod_loss


def inputs(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g), torch.randn(b, 3, h, w, generator=g)


@pytest.mark.parametrize("size", [(64, 96), (70, 100)])
def test_swin_nano_outputs_at_input_size(size):
    torch.manual_seed(0)
    model = build_saliency_model("swin_nano", tuning="ivt")
    outs = model(*inputs(2, *size))
    assert len(outs) == 4
    for o in outs:
        assert o.shape == (2, 1, *size) and torch.isfinite(o).all()
    model.eval()
    prob = model.predict(*inputs(2, *size))
    assert prob.shape == (2, 1, *size) and 0 <= prob.min() and prob.max() <= 1
    assert torch.allclose(prob, torch.sigmoid(model(*inputs(2, *size))[0]))


def test_tiny_eva02_outputs_at_input_size():
    torch.manual_seed(0)
    cfg = EVA02Config(embed_dim=64, depth=4, num_heads=2, mlp_hidden=170, img_size=(48, 80))
    backbone = EVA02Backbone("tiny", cfg, "ivt", IVTConfig())
    assert backbone.out_channels == [64] * 4
    model = SaliencyModel(backbone, CPNetDecoder(backbone.out_channels))
    outs = model(*inputs(1, 48, 80))
    assert [tuple(o.shape) for o in outs] == [(1, 1, 48, 80)] * 4


def test_decoder_level_sizes_follow_the_features():
    """Odd feature grids (an input that is not a multiple of 32): each level is upsampled to the
    next level's size; the 4 outputs are resized to out_size."""
    dec = CPNetDecoder([8, 16, 24, 32]).eval()
    feats = [torch.randn(1, c, h, w) for c, (h, w) in
             zip([8, 16, 24, 32], [(18, 25), (9, 13), (5, 7), (3, 4)])]
    seen = {}
    for name in ("block2", "block3", "block4", "predict_out"):
        getattr(dec, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape[2:])))
    outs = dec(feats, (70, 100))
    assert seen == {"block2": (9, 13), "block3": (18, 25), "block4": (36, 50),
                    "predict_out": (72, 100)}
    assert all(o.shape == (1, 1, 70, 100) for o in outs)


def test_upsample_equals_the_release_x2_upsampling():
    x = torch.randn(2, 3, 5, 7)
    release = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
    assert torch.equal(upsample(x, (10, 14)), release(x))


def test_convnext_block_against_functional_formula():
    torch.manual_seed(0)
    blk = ConvNeXtBlock(8).double()
    with torch.no_grad():
        blk.gamma.normal_()                                   # away from the 1e-6 init
    assert torch.all(ConvNeXtBlock(8).gamma == 1e-6)
    x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
    y = F.conv2d(x, blk.dwconv.weight, blk.dwconv.bias, padding=3, groups=8)
    t = y.permute(0, 2, 3, 1)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-6)
    t = t * blk.norm.weight + blk.norm.bias
    t = F.gelu(t @ blk.pwconv1.weight.T + blk.pwconv1.bias)
    t = t @ blk.pwconv2.weight.T + blk.pwconv2.bias
    want = x + (blk.gamma * t).permute(0, 3, 1, 2)
    assert torch.allclose(blk(x), want, atol=1e-12)


def reference_loss(logits_list, mask):
    """float64 numpy: per output mean BCE over all pixels + mean over images of the IoU loss."""
    g = mask.numpy().astype(np.float64).reshape(mask.shape[0], -1)
    total = 0.0
    for logits in logits_list:
        z = logits.detach().numpy().astype(np.float64).reshape(g.shape)
        p = 1.0 / (1.0 + np.exp(-z))
        bce = np.mean(-(g * np.log(p) + (1 - g) * np.log(1 - p)))
        inter = (p * g).sum(1)
        iou = 1 - (inter + 1) / (p.sum(1) + g.sum(1) - inter + 1)
        total += bce + iou.mean()
    return total


def test_loss_against_float64_formula():
    g = torch.Generator().manual_seed(3)
    logits = [torch.randn(3, 1, 9, 11, generator=g) * s for s in (0.5, 1.0, 2.0, 4.0)]
    mask = (torch.rand(3, 1, 9, 11, generator=g) < 0.3).float()
    mask[2] = 0                                                # an image with no object
    want = reference_loss(logits, mask)
    assert sod_loss([l.double() for l in logits], mask).item() == pytest.approx(want, rel=1e-12)
    assert sod_loss(logits, mask).item() == pytest.approx(want, rel=1e-5)
    assert sod_loss(logits, mask[:, 0]).item() == pytest.approx(want, rel=1e-5)  # (B, H, W)
    with pytest.raises(ValueError, match="output 1"):
        sod_loss([logits[0], logits[1][:, :, :8]], mask)


@pytest.mark.parametrize("tuning", ["ivt", "freeze", "full"])
def test_only_trainable_parameters_get_gradients(tuning):
    torch.manual_seed(0)
    model = build_saliency_model("swin_nano", tuning=tuning)
    assert all(p.requires_grad for p in model.decoder.parameters())
    bb_trainable = [p.requires_grad for p in model.backbone.parameters()]
    assert {"ivt": 0 < sum(bb_trainable) < len(bb_trainable),
            "freeze": not any(bb_trainable), "full": all(bb_trainable)}[tuning]
    vis, ir = inputs(2, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) < 0.4).float()
    sod_loss(model(vis, ir), mask).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert p.grad is None, name


def hand_count(c1, c2, c3, c4):
    """The spec's layer list, layer by layer (conv weights k*k*in*out; BN 2C; LN 2C)."""
    def conv_bn(cin, cout):
        return 9 * cin * cout + 2 * cout                      # conv3x3 without bias + BN

    def convnext(c):
        dw, ln, fc1, fc2, gamma = 49 * c + c, 2 * c, c * 4 * c + 4 * c, 4 * c * c + c, c
        return dw + ln + fc1 + fc2 + gamma

    n = conv_bn(c4, 768)                                      # deconv1
    n += conv_bn(768 + c3, 384) + convnext(384)               # level 3
    n += conv_bn(384 + c2, 192) + convnext(192)               # level 2
    n += conv_bn(192 + c1, 96) + convnext(96)                 # level 1
    n += conv_bn(96, 48) + (9 * 48 + 1)                       # prediction
    n += (9 * 192 + 1) + (9 * 384 + 1) + (9 * 768 + 1)        # side outputs
    return n


@pytest.mark.parametrize("channels", [(32, 64, 128, 256), (192, 384, 768, 1536), (1024,) * 4])
def test_decoder_parameter_count(channels):
    with torch.device("meta"):
        dec = CPNetDecoder(channels)
    assert sum(p.numel() for p in dec.parameters()) == hand_count(*channels)


def test_decoder_rejects_mismatched_features():
    dec = CPNetDecoder([8, 16, 24, 32])
    feats = [torch.randn(1, c, s, s) for c, s in zip([8, 16, 24, 31], [8, 4, 2, 1])]
    with pytest.raises(ValueError, match=r"\[8, 16, 24, 31\]"):
        dec(feats, (32, 32))
    with pytest.raises(ValueError, match="4 feature maps"):
        dec(feats[:3], (32, 32))
    with pytest.raises(ValueError, match="4 positive"):
        CPNetDecoder([8, 16, 24])

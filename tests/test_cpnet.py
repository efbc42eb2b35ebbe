"""The CPNet decoder and the saliency model: shapes on Swin and EVA02 backbones (non-square and
odd sizes), the loss against a float64 formula (binary and soft targets), gradients, the
parameter count from the decoder's layer list (`ivt.models.heads.cpnet`), and the feature taps: the
stage outputs, or the release's (Z0 and the inputs of stages 2-4) computed by running the modules by
hand."""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivt.models import build_backbone
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


def test_decoder_against_written_out_formula():
    """The decoder of the module docstring written out (float64, eval, random BN statistics and
    layer scales away from 1e-6): conv3x3-BN-GELU, concat [upsampled deeper level, skip feature]
    in the release's order, the release's x2 `nn.Upsample(bilinear, align_corners=True)`, and
    the side outputs resized to out_size bilinearly with align_corners=False (as the release
    resizes them). The ConvNeXt blocks are checked on their own above."""
    torch.manual_seed(0)
    ch = (8, 12, 16, 20)
    dec = CPNetDecoder(ch).double().eval()
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
            elif isinstance(m, ConvNeXtBlock):
                m.gamma.fill_(0.5)
    h, w = 2, 3                                       # strides 4..32 of a (64, 96) input
    feats = [torch.randn(2, c, h * 2 ** (3 - i), w * 2 ** (3 - i), dtype=torch.float64)
             for i, c in enumerate(ch)]
    out_size = (64, 96)
    up2 = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def cbg(seq, x):                                  # conv3x3 (no bias) - BN (eval) - exact GELU
        conv, bn = seq[0], seq[1]
        y = F.conv2d(x, conv.weight, None, padding=1)
        std = torch.sqrt(bn.running_var[:, None, None] + bn.eps)
        y = (y - bn.running_mean[:, None, None]) / std
        return F.gelu(y * bn.weight[:, None, None] + bn.bias[:, None, None])

    def conv3x3(layer, x):
        return F.conv2d(x, layer.weight, layer.bias, padding=1)

    f1, f2, f3, f4 = feats
    with torch.no_grad():
        x16 = up2(cbg(dec.deconv1, f4))
        x8 = dec.block2(up2(cbg(dec.deconv2, torch.cat([x16, f3], 1))))
        x4 = dec.block3(up2(cbg(dec.deconv3, torch.cat([x8, f2], 1))))
        x2 = dec.block4(up2(cbg(dec.deconv4, torch.cat([x4, f1], 1))))
        main = conv3x3(dec.predict_out, up2(cbg(dec.predict, x2)))
        sides = [F.interpolate(conv3x3(layer, x), size=out_size, mode="bilinear",
                               align_corners=False)
                 for layer, x in ((dec.side1, x4), (dec.side2, x8), (dec.side3, x16))]
        got = dec(feats, out_size)
    assert main.shape[2:] == out_size
    for name, g, r in zip(("main", "side1", "side2", "side3"), got, [main] + sides):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9, msg=lambda m, n=name: f"{n}: {m}")


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


def test_loss_with_soft_targets_against_float64_formula():
    """The release's augmentation gives soft GTs in [0, 1]: BCE against the soft target and the
    IoU's sums with g's values, as the formula reads."""
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(2, 1, 7, 10, generator=g) * s for s in (0.5, 1.0, 2.0, 4.0)]
    mask = torch.rand(2, 1, 7, 10, generator=g)
    mask[0, 0, :3] = 0.0
    mask[1, 0, 4:] = 1.0
    want = reference_loss(logits, mask)
    assert sod_loss([l.double() for l in logits], mask).item() == pytest.approx(want, rel=1e-12)
    assert sod_loss(logits, mask).item() == pytest.approx(want, rel=1e-5)


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
    """The decoder's layer list, layer by layer (conv weights k*k*in*out; BN 2C; LN 2C)."""
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


def to_map(z, hw):
    """(B, N, C) tokens -> (B, C, H, W)."""
    return z.transpose(1, 2).reshape(z.shape[0], z.shape[2], *hw)


def swin_maps_by_hand(bb, vis, ir):
    """Run an IV-tuning Swin's modules one by one: Z0 = PE_vis(vis) + EMPG(...) (Eq. 2) as a
    map, each stage's input after patch merging (stages 2-4) and each stage's output."""
    z, hw = bb.patch_embed(vis)
    prompt = bb.empg(z, bb.ir_patch_embed(ir)[0], hw)
    z = z + prompt
    z0, inputs, outputs = to_map(z, hw), [], []
    for stage in bb.layers:
        if stage.downsample is not None:
            z, hw = stage.downsample(z, hw)
            prompt = z
            inputs.append(to_map(z, hw))
        for block in stage.blocks:
            z, prompt = block(z, hw, prompt)
        outputs.append(to_map(z, hw))
    return z0, inputs, outputs


def test_release_taps_are_z0_and_the_inputs_of_stages_2_to_4():
    """taps='release' (SOD-IV-tuning/models/SwinTransformers_ivt.py, forward_features) returns
    [Z0, stage 2's input, stage 3's input, stage 4's input], on the reference, fast and fused
    paths; taps='stages' the four stage outputs. Same weights, float64, eval mode."""
    torch.manual_seed(0)
    stages = build_saliency_model("swin_nano", d2=16).double().eval()
    assert stages.backbone.taps == "stages"
    with torch.no_grad():
        for p in stages.parameters():                      # away from the identity inits
            p.add_(torch.randn_like(p) * 0.05)
    vis, ir = (x.double() for x in inputs(2, 44, 60))
    with torch.no_grad():
        z0, stage_inputs, stage_outputs = swin_maps_by_hand(stages.backbone, vis, ir)
        maps = stages.backbone(vis, ir)
        assert len(maps) == len(stage_outputs)
        for got, want in zip(maps, stage_outputs):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        release = [z0] + stage_inputs
        assert [m.shape[1] for m in release] == [32, 64, 128, 256]
        assert [m.shape[2:] for m in release] == [(11, 15), (6, 8), (3, 4), (2, 2)]
        from ivt.fast import make_fast
        for impl in ("reference", "fast", "fused"):
            bb = make_fast(build_backbone("swin_nano", "ivt", d2=16, taps="release"),
                           impl).double().eval()
            bb.load_state_dict(stages.backbone.state_dict())
            maps = bb(vis, ir)
            assert len(maps) == len(release)
            for got, want in zip(maps, release):
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        model = build_saliency_model("swin_nano", d2=16, taps="release").double().eval()
        model.load_state_dict(stages.state_dict())
        torch.testing.assert_close(model(vis, ir)[0], stages.decoder(release, (44, 60))[0])


@pytest.mark.parametrize("tuning", ["ivt", "full", "rein"])
def test_release_taps_leave_stage_4_without_gradient(tuning):
    """Stage 4 feeds no release tap: its adapters (or weights, or Rein tokens) get no gradient
    and are frozen, everything else trainable gets one; the state dict keeps every key."""
    torch.manual_seed(0)
    model = build_saliency_model("swin_nano", tuning=tuning, taps="release")
    stages = build_saliency_model("swin_nano", tuning=tuning)
    assert model.state_dict().keys() == stages.state_dict().keys()
    stage4 = {n for n, _ in model.backbone.named_parameters()
              if n.startswith(("layers.3.blocks.", "rein.3."))}
    trained = {"ivt": ".adapters.", "full": ".attn.", "rein": "rein.3."}[tuning]
    assert any(trained in n for n in stage4)
    vis, ir = inputs(2, 64, 64)
    mask = (torch.rand(2, 1, 64, 64) < 0.4).float()
    sod_loss(model(vis, ir), mask).backward()
    for name, p in model.backbone.named_parameters():
        if name in stage4:
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.requires_grad == stages.backbone.get_parameter(name).requires_grad, name
            assert (p.grad is not None) == p.requires_grad, name
    if tuning == "ivt":       # every stage's adapters train with the stage taps
        assert all(p.requires_grad for n, p in stages.backbone.named_parameters()
                   if ".adapters." in n)


def test_taps_option():
    with pytest.raises(ValueError, match="taps='blocks'"):
        build_saliency_model("swin_nano", taps="blocks")
    with torch.device("meta"):            # EVA02: the release taps blocks 8/12/16/24, as we do
        release = build_saliency_model("eva02_b", taps="release")
        stages = build_saliency_model("eva02_b")
    assert type(release.backbone) is type(stages.backbone)
    assert release.state_dict().keys() == stages.state_dict().keys()

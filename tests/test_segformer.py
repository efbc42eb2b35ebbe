"""The Segformer head and the segmentation model (backbone + head), on tiny CPU configurations."""
import pytest
import torch
import torch.nn.functional as F

from ivt.models import count_parameters
from ivt.models.heads import SegformerHead
from ivt.models.segmentor import Segmentor, build_segmentor
from ivt.tasks.seg import build_model


@pytest.mark.parametrize("size", [(32, 32), (40, 56), (37, 45)])
def test_head_output_at_stride_4(size):
    torch.manual_seed(0)
    h, w = size
    chans = (8, 16, 24, 32)
    feats = [torch.randn(2, c, -(-h // 2 ** (i + 2)), -(-w // 2 ** (i + 2)))
             for i, c in enumerate(chans)]
    head = SegformerHead(chans, num_classes=9, embed_dim=16)
    out = head(feats)
    assert out.shape == (2, 9, feats[0].shape[2], feats[0].shape[3])
    out.sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_head_structure_and_width():
    """mmseg's SegformerHead: per level a 1x1 conv WITHOUT bias + BN (+ ReLU) to the width, a
    1x1 fusion conv without bias + BN from 4 widths, Dropout2d 0.1, a 1x1 classifier with bias."""
    head = SegformerHead((32, 64, 128, 256), num_classes=9)
    assert head.embed_dim == 256                                   # default width
    assert len(head.convs) == 4
    for unit, c in zip(list(head.convs) + [head.fusion_conv], (32, 64, 128, 256, 4 * 256)):
        assert isinstance(unit.conv, torch.nn.Conv2d) and unit.conv.kernel_size == (1, 1)
        assert unit.conv.in_channels == c and unit.conv.out_channels == 256
        assert unit.conv.bias is None                              # the BN carries the shift
        assert isinstance(unit.bn, torch.nn.BatchNorm2d) and unit.bn.num_features == 256
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert head.conv_seg.kernel_size == (1, 1) and head.conv_seg.out_channels == 9
    assert head.conv_seg.bias is not None
    assert SegformerHead((4, 4, 4, 4), 3, embed_dim=768).fusion_conv.conv.in_channels == 4 * 768
    with pytest.raises(ValueError, match="4 levels"):
        SegformerHead((4, 4, 4), 3)


def reference_head(head, feats, order=(0, 1, 2, 3)):
    """mmseg's SegformerHead.forward in eval mode, written with functional ops on the head's
    weights: per level relu(bn(conv1x1(x))) resized to stride 4, concatenated in `order`, the
    fusion conv + BN + ReLU, the classifier conv (Dropout2d is the identity in eval mode)."""
    def conv_bn_relu(x, unit):
        y = F.conv2d(x, unit.conv.weight)                          # no bias
        y = F.batch_norm(y, unit.bn.running_mean, unit.bn.running_var, unit.bn.weight,
                         unit.bn.bias, training=False, eps=1e-5)
        return torch.relu(y)

    size = feats[0].shape[2:]
    maps = [F.interpolate(conv_bn_relu(f, unit), size=size, mode="bilinear", align_corners=False)
            for f, unit in zip(feats, head.convs)]
    x = conv_bn_relu(torch.cat([maps[i] for i in order], dim=1), head.fusion_conv)
    return F.conv2d(x, head.conv_seg.weight, head.conv_seg.bias)


def test_head_forward_matches_mmseg_reference_shallow_level_first():
    """float64, BN in eval mode with random running statistics and affine; odd sizes so the
    bilinear resizing is not a plain repeat."""
    torch.manual_seed(0)
    chans = (4, 6, 8, 10)
    feats = [torch.randn(2, c, s, s + 2, dtype=torch.float64)
             for c, s in zip(chans, (15, 8, 4, 2))]
    head = SegformerHead(chans, num_classes=5, embed_dim=7).double().eval()
    with torch.no_grad():
        for unit in list(head.convs) + [head.fusion_conv]:
            unit.bn.running_mean.normal_()
            unit.bn.running_var.uniform_(0.5, 2.0)
            unit.bn.weight.normal_()
            unit.bn.bias.normal_()
        head.conv_seg.weight.normal_()                             # not the tiny init scale
        out = head(feats)
    ref = reference_head(head, feats)
    assert out.shape == (2, 5, 15, 17)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    deepest_first = reference_head(head, feats, order=(3, 2, 1, 0))
    assert (out - deepest_first).abs().max() > 1e-2                # the order matters


def test_head_init_as_mmseg():
    """ConvModule convs: kaiming-normal, fan_out, relu gain (std sqrt(2 / out_channels)), BN
    weight 1 and bias 0; the classifier: normal std 0.01, bias 0."""
    torch.manual_seed(0)
    width = 128
    head = SegformerHead((96, 192, 384, 768), num_classes=9, embed_dim=width)
    want = (2.0 / width) ** 0.5                   # fan_out = width * 1 * 1 for every such conv
    for unit in list(head.convs) + [head.fusion_conv]:
        w = unit.conv.weight.detach().double().flatten()
        assert w.numel() >= 96 * width
        assert abs(w.mean().item()) < 0.05 * want
        assert w.std().item() == pytest.approx(want, rel=0.05)     # fan_in would differ 2-6x
        z = (w - w.mean()) / w.std()
        assert (z ** 4).mean().item() == pytest.approx(3.0, abs=0.3)   # normal (uniform: 1.8)
        assert torch.equal(unit.bn.weight, torch.ones(width))
        assert torch.equal(unit.bn.bias, torch.zeros(width))
    w = head.conv_seg.weight.detach().double().flatten()
    assert w.std().item() == pytest.approx(0.01, rel=0.1) and abs(w.mean().item()) < 1e-3
    assert torch.equal(head.conv_seg.bias, torch.zeros(9))


@pytest.fixture(scope="module")
def nano():
    torch.manual_seed(0)
    return build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=32)


def test_segmentor_forward_and_predict(nano):
    model = nano.eval()
    vis, ir = torch.randn(2, 3, 40, 56), torch.randn(2, 1, 40, 56)
    logits = model(vis, ir)
    assert logits.shape == (2, 9, 10, 14)                          # stride 4
    pred = model.predict(vis, ir)
    assert pred.shape == (2, 40, 56) and pred.dtype == torch.int64
    up = F.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
    assert torch.equal(pred, up.argmax(1))                         # upsample, then argmax


def test_tuning_decides_backbone_head_always_trains():
    for tuning, backbone_trains in (("ivt", "some"), ("freeze", "none"), ("full", "all")):
        m = build_segmentor("swin_nano", 9, tuning=tuning, head_dim=16)
        assert all(p.requires_grad for p in m.head.parameters())
        flags = [p.requires_grad for p in m.backbone.parameters()]
        assert {"some": any(flags) and not all(flags), "none": not any(flags),
                "all": all(flags)}[backbone_trains], tuning
    assert isinstance(m, Segmentor) and m.num_classes == 9


def test_options_pass_through():
    small = build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=16)
    large = build_segmentor("swin_nano", 9, tuning="ivt", d2=32, head_dim=16)
    assert count_parameters(large.backbone, True) > count_parameters(small.backbone, True)
    assert count_parameters(small.head) == count_parameters(large.head)
    with pytest.raises(ValueError, match="only apply to tuning='ivt'"):
        build_segmentor("swin_nano", 9, tuning="full", d2=8)
    cfg = {"backbone": "swin_nano", "tuning": "ivt", "size": 32, "head_dim": 16, "d1": 8,
           "d2": 8, "d3": 8, "variant": "empg_only", "layers": None}
    m = build_model(cfg, pretrained=None)
    assert m.backbone.ivt_cfg.variant == "empg_only" and m.head.embed_dim == 16


def test_training_drops_whole_channels_of_the_fused_map_before_the_classifier():
    """mmseg's `cls_seg`: Dropout2d(dropout_ratio) on the fused map, then `conv_seg`. In training
    every (sample, channel) plane the classifier reads is either all zero or the fused map's
    plane times 1 / (1 - p); both kinds occur (none dropped among 64 planes at p = 0.5: 2^-64)."""
    torch.manual_seed(0)
    head = SegformerHead([4] * 4, 3, embed_dim=8, dropout=0.5).train()
    seen = {}
    head.fusion_conv.register_forward_hook(lambda m, i, o: seen.update(x=o.detach().clone()))
    head.conv_seg.register_forward_pre_hook(lambda m, i: seen.update(y=i[0].detach().clone()))
    head([torch.randn(8, 4, 8 // 2 ** i, 8 // 2 ** i) for i in range(4)])
    x, y = seen["x"], seen["y"]
    assert (x.abs().sum((2, 3)) > 0).all()                  # no plane of the fused map is zero
    dropped = (y == 0).all(3).all(2)                        # (8, 8) planes
    kept = torch.isclose(y, 2 * x, rtol=1e-6, atol=0).all(3).all(2)
    assert (dropped ^ kept).all()
    assert dropped.any() and kept.any()

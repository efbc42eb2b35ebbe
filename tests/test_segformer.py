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
    head = SegformerHead((32, 64, 128, 256), num_classes=9)
    assert head.embed_dim == 256                                   # default width
    assert [p.proj.in_features for p in head.projections] == [32, 64, 128, 256]
    assert all(p.proj.out_features == 256 for p in head.projections)
    conv, bn, _ = head.fuse
    assert conv.in_channels == 4 * 256 and conv.out_channels == 256 and conv.kernel_size == (1, 1)
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert head.dropout.p == 0.1
    assert head.classifier.kernel_size == (1, 1) and head.classifier.out_channels == 9
    assert SegformerHead((4, 4, 4, 4), 3, embed_dim=768).fuse[0].in_channels == 4 * 768
    with pytest.raises(ValueError, match="4 levels"):
        SegformerHead((4, 4, 4), 3)


def test_head_upsamples_bilinear_then_concats_deepest_first():
    """Equal to a direct re-implementation: 1x1 projections, bilinear upsampling, reversed concat."""
    torch.manual_seed(0)
    chans = (4, 6, 8, 10)
    feats = [torch.randn(1, c, 16 >> i, 16 >> i) for i, c in enumerate(chans)]
    head = SegformerHead(chans, num_classes=5, embed_dim=7).eval()
    maps = []
    for proj, f in zip(head.projections, feats):
        m = torch.einsum("bchw,ec->behw", f, proj.proj.weight) + proj.proj.bias.view(1, -1, 1, 1)
        maps.append(F.interpolate(m, size=(16, 16), mode="bilinear", align_corners=False))
    ref = head.classifier(head.fuse(torch.cat(maps[::-1], 1)))
    torch.testing.assert_close(head(feats), ref)


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

"""The detector's parts against independent references: box utilities against hand-computed
values, the Hungarian matcher against brute force over all assignments, the grid_sample
deformable attention against a float64 bilinear-sampling loop (also under bf16 autocast), the two
encoders (DINO's deformable one, RT-DETR's hybrid one: AIFI against a float64 attention written
out, RepVGG blocks against the formula); then a tiny detector end to end."""
import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from ivt.engine import describe_parameters
from ivt.models import count_parameters
from ivt.models.detr import DetectorConfig, HungarianMatcher, build_detector
from ivt.models.detr import deformable_attention
from ivt.models.detr.box_ops import (box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                     generalized_box_iou, normalize_boxes)
from ivt.models.detr.deformable_attention import (MultiScaleDeformableAttention,
                                                  multi_scale_deformable_attention)
from ivt.models.detr.decoder import build_decoder
from ivt.models.detr.denoising import Denoising, denoising_attention_mask
from ivt.models.detr.encoder import build_encoder
from ivt.models.detr.hybrid_encoder import AIFI, HybridEncoder, RepVGGBlock
from ivt.models.detr.neck import ChannelMapper
from ivt.models.detr.position_encoding import box_position_embedding
from ivt.models.detr.query_selection import QuerySelection, anchor_proposals

# -- box utilities ---------------------------------------------------------------------------


def test_box_conversions_round_trip():
    g = torch.Generator().manual_seed(0)
    cxcywh = torch.rand(50, 4, generator=g, dtype=torch.float64)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert torch.allclose(box_xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-12)
    assert torch.equal(box_cxcywh_to_xyxy(torch.tensor([[5.0, 4.0, 2.0, 6.0]])),
                       torch.tensor([[4.0, 1.0, 6.0, 7.0]]))
    # pixels of a 100 x 200 (H x W) image -> normalised cxcywh
    assert torch.allclose(normalize_boxes(torch.tensor([[20.0, 10.0, 60.0, 50.0]]), (100, 200)),
                          torch.tensor([[0.2, 0.3, 0.2, 0.4]]))


@pytest.mark.parametrize("a, b, iou, giou", [
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7, 1 / 7 - 2 / 9),      # overlap 1, union 7, hull 9
    ([0, 0, 1, 1], [2, 0, 3, 1], 0.0, -1 / 3),               # disjoint: union 2, hull 3
    ([0, 0, 4, 4], [1, 1, 2, 2], 1 / 16, 1 / 16),             # contained: hull = union
    ([0, 0, 2, 2], [0, 0, 2, 2], 1.0, 1.0),                   # identical
    ([1, 0, 1, 2], [0, 0, 2, 2], 0.0, 0.0),                   # zero width inside: union 4 = hull
    ([3, 3, 3, 3], [0, 0, 1, 1], 0.0, -8 / 9),                # a point outside: union 1, hull 9
])
def test_giou_hand_computed(a, b, iou, giou):
    a, b = torch.tensor([a], dtype=torch.float64), torch.tensor([b], dtype=torch.float64)
    assert box_iou(a, b)[0].item() == pytest.approx(iou, abs=1e-9)
    assert generalized_box_iou(a, b).item() == pytest.approx(giou, abs=1e-9)
    assert generalized_box_iou(b, a).item() == pytest.approx(giou, abs=1e-9)


def test_giou_degenerate_boxes():
    point = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    out = generalized_box_iou(point, point)                   # 0 / 0 everywhere: defined as 0
    assert torch.isfinite(out).all() and out.item() == 0.0
    with pytest.raises(ValueError, match="x1 < x0"):
        generalized_box_iou(torch.tensor([[2.0, 0.0, 1.0, 1.0]]), point)


# -- matcher ---------------------------------------------------------------------------------


def reference_cost(logits, boxes, labels, tgt_boxes, alpha=0.25, gamma=2.0, wc=2.0, wb=5.0, wg=2.0):
    """The DINO matching cost, written out per pair in float64 with plain Python loops."""
    p = torch.sigmoid(logits.double())
    C = torch.zeros(len(boxes), len(tgt_boxes), dtype=torch.float64)
    for i in range(len(boxes)):
        for j in range(len(tgt_boxes)):
            q = p[i, labels[j]].item()
            pos = alpha * (1 - q) ** gamma * -math.log(q + 1e-8)
            neg = (1 - alpha) * q ** gamma * -math.log(1 - q + 1e-8)
            l1 = (boxes[i].double() - tgt_boxes[j].double()).abs().sum().item()
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = [
                [c[0] - c[2] / 2, c[1] - c[3] / 2, c[0] + c[2] / 2, c[1] + c[3] / 2]
                for c in (boxes[i].double().tolist(), tgt_boxes[j].double().tolist())]
            inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
            union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
            hull = (max(ax1, bx1) - min(ax0, bx0)) * (max(ay1, by1) - min(ay0, by0))
            giou = inter / union - (hull - union) / hull
            C[i, j] = wc * (pos - neg) + wb * l1 - wg * giou
    return C


def brute_force_min(C):
    """Minimum total cost over all one-to-one assignments of min(Q, n) pairs."""
    Q, n = C.shape
    if Q >= n:
        return min(sum(C[q, j] for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(Q), n))
    return min(sum(C[i, t] for i, t in enumerate(perm))
               for perm in itertools.permutations(range(n), Q))


def random_boxes(n, g):
    c = 0.2 + 0.6 * torch.rand(n, 2, generator=g)
    return torch.cat([c, 0.05 + 0.3 * torch.rand(n, 2, generator=g)], dim=1)


@pytest.mark.parametrize("Q, sizes", [(5, [3, 0, 4]), (3, [5, 1, 0])])
def test_matcher_optimal_against_brute_force(Q, sizes):
    """Includes an image without targets and an image with more targets than queries."""
    g = torch.Generator().manual_seed(Q)
    B, K = len(sizes), 4
    outputs = {"pred_logits": torch.randn(B, Q, K, generator=g),
               "pred_boxes": random_boxes(B * Q, g).view(B, Q, 4)}
    targets = [{"labels": torch.randint(0, K, (n,), generator=g), "boxes": random_boxes(n, g)}
               for n in sizes]
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == B
    for b, ((q, t), tgt) in enumerate(zip(indices, targets)):
        n = len(tgt["labels"])
        assert len(q) == len(t) == min(Q, n)
        assert q.dtype == t.dtype == torch.int64
        if n == 0:
            continue
        assert len(set(q.tolist())) == len(q) and len(set(t.tolist())) == len(t)
        C = reference_cost(outputs["pred_logits"][b], outputs["pred_boxes"][b], tgt["labels"],
                           tgt["boxes"])
        assert C[q, t].sum().item() == pytest.approx(brute_force_min(C).item(), abs=1e-5)


def test_matcher_zero_targets():
    outputs = {"pred_logits": torch.randn(2, 4, 3), "pred_boxes": torch.rand(2, 4, 4) * 0.5 + 0.25}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for q, t in HungarianMatcher()(outputs, [empty, empty]):
        assert q.numel() == 0 and t.numel() == 0 and q.dtype == torch.int64


def test_matcher_ties():
    """Identical queries and identical targets: every assignment costs the same; the result must
    still be one-to-one and complete."""
    outputs = {"pred_logits": torch.zeros(1, 4, 2), "pred_boxes": torch.full((1, 4, 4), 0.5)}
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    targets = [{"labels": torch.tensor([1, 1, 1]), "boxes": box.repeat(3, 1)}]
    (q, t), = HungarianMatcher()(outputs, targets)
    assert len(q) == 3 and len(set(q.tolist())) == 3 and sorted(t.tolist()) == [0, 1, 2]


def test_matcher_rejects_nan():
    outputs = {"pred_logits": torch.full((1, 2, 2), float("nan")),
               "pred_boxes": torch.full((1, 2, 4), 0.5)}
    targets = [{"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    with pytest.raises(FloatingPointError, match="non-finite"):
        HungarianMatcher()(outputs, targets)


# -- deformable attention ----------------------------------------------------------------------


def bilinear_loop(value, shapes, locations, weights):
    """Direct float64 reference: for every (b, q, head, level, point) read the four neighbours of
    pixel position (x W - 0.5, y H - 0.5), zeros outside the map."""
    B, S, M, D = value.shape
    _, Q, _, L, P, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(B, Q, M, D, dtype=torch.float64)
    for b, q, m, l, p in itertools.product(range(B), range(Q), range(M), range(L), range(P)):
        h, w = shapes[l]
        x = locations[b, q, m, l, p, 0].item() * w - 0.5
        y = locations[b, q, m, l, p, 1].item() * h - 0.5
        x0, y0 = math.floor(x), math.floor(y)
        acc = torch.zeros(D, dtype=torch.float64)
        for yy, xx in ((y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1)):
            if 0 <= yy < h and 0 <= xx < w:
                acc += ((1 - abs(x - xx)) * (1 - abs(y - yy))
                        * value[b, starts[l] + yy * w + xx, m].double())
        out[b, q, m] += weights[b, q, m, l, p].item() * acc
    return out.view(B, Q, M * D)


def test_deformable_attention_matches_bilinear_loop():
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (2, 7), (4, 1)]                         # non-square, different aspects
    B, Q, M, D, P = 2, 3, 2, 3, 2
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, M, D, generator=g, dtype=torch.float64)
    locations = (torch.rand(B, Q, M, len(shapes), P, 2, generator=g, dtype=torch.float64) * 1.3
                 - 0.15)
    weights = torch.rand(B, Q, M, len(shapes), P, generator=g, dtype=torch.float64)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert torch.allclose(out, bilinear_loop(value, shapes, locations, weights), atol=1e-12)


def test_deformable_attention_offsets_count_in_pixels_of_each_level():
    """With offsets fixed at (+1, 0) pixel for every point and a reference at a pixel centre, the
    module reads exactly the right-hand neighbour on every level, whatever the level's aspect."""
    torch.manual_seed(0)
    shapes = [(4, 6), (3, 2)]
    attn = MultiScaleDeformableAttention(dim=4, num_heads=1, num_levels=2, num_points=1).double()
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        attn.value_proj.weight.copy_(torch.eye(4))
        attn.output_proj.weight.copy_(torch.eye(4))
    value = torch.randn(1, 24 + 6, 4, dtype=torch.float64)
    # reference = centre of pixel (row 1, col 0) on level 0 and (row 1, col 0) on level 1
    reference = torch.tensor([[[[0.5 / 6, 1.5 / 4], [0.5 / 2, 1.5 / 3]]]], dtype=torch.float64)
    out = attn(torch.randn(1, 1, 4, dtype=torch.float64), reference, value, shapes)
    expected = 0.5 * value[0, 1 * 6 + 1] + 0.5 * value[0, 24 + 1 * 2 + 1]
    assert torch.allclose(out[0, 0], expected, atol=1e-12)


def test_deformable_attention_samples_in_float32_under_bf16_autocast(monkeypatch):
    """Under bf16 autocast (--amp) grid_sample gets float32 values and a float32 grid: a bf16
    coordinate in [0.5, 1] is a multiple of 2^-8 (0.6 pixels of a 160-pixel level, 2.5 of a
    640-pixel one). On a 160 x 160 level, with sampling offsets that are not on the bf16 grid, the
    module stays within 2% of a float64 evaluation (a bf16 grid: 16% here)."""
    torch.manual_seed(0)
    shapes = [(160, 160), (20, 20)]
    attn = MultiScaleDeformableAttention(dim=32, num_heads=2, num_levels=2, num_points=4)
    with torch.no_grad():                       # offsets of several pixels, in every direction
        attn.sampling_offsets.weight.normal_(0, 0.5)
        attn.attention_weights.weight.normal_(0, 0.2)
    g = torch.Generator().manual_seed(1)
    value = torch.randn(1, sum(h * w for h, w in shapes), 32, generator=g)
    query = torch.randn(1, 50, 32, generator=g)
    reference = torch.rand(1, 50, 2, 2, generator=g) * 0.8 + 0.1
    expected = copy.deepcopy(attn).double()(query.double(), reference.double(), value.double(),
                                            shapes)

    seen, grid_sample = [], F.grid_sample

    def recording(inp, grid, **kw):
        seen.append((inp.dtype, grid.dtype))
        return grid_sample(inp, grid, **kw)

    monkeypatch.setattr(deformable_attention.F, "grid_sample", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(query, reference, value, shapes)
    assert seen == [(torch.float32, torch.float32)] * len(shapes)
    err = (out.double() - expected).abs().max().item()
    assert err < 0.02 * expected.abs().max().item(), err


def test_sampling_core_reads_bf16_values_at_exact_locations():
    """bf16 values, float32 locations where bf16 is coarsest ([0.5, 1)): the bf16 result is the
    float64 bilinear sampling of the same values, up to its own final rounding (2^-8 relative)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(160, 160)]
    value = torch.randn(1, 160 * 160, 1, 2, generator=g).bfloat16()
    locations = torch.rand(1, 40, 1, 1, 2, 2, generator=g) * 0.5 + 0.5
    weights = torch.rand(1, 40, 1, 1, 2, generator=g)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert out.dtype == torch.bfloat16
    expected = bilinear_loop(value.double(), shapes, locations.double(), weights.double())
    assert ((out.double() - expected).abs() <= 2 ** -8 * expected.abs() + 1e-6).all()


def test_detector_under_bf16_autocast_samples_with_float32_grids(monkeypatch):
    """Every grid_sample of a training forward (encoder and decoder) gets float32 values and
    grid."""
    seen, grid_sample = [], F.grid_sample

    def recording(inp, grid, **kw):
        seen.append((inp.dtype, grid.dtype))
        return grid_sample(inp, grid, **kw)

    monkeypatch.setattr(deformable_attention.F, "grid_sample", recording)
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(), tuning="ivt").train()
    vis, ir, targets = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(vis, ir, targets)
    levels, layers = model.cfg.num_feature_levels, model.cfg.enc_layers + model.cfg.dec_layers
    assert seen == [(torch.float32, torch.float32)] * (levels * layers)
    assert torch.isfinite(model.loss(out, targets)["loss"])


# -- neck ------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels, first, expected", [
    (4, 0, [(16, 24), (8, 12), (4, 6), (2, 3)]),            # the four backbone levels, strides 4-32
    (5, 0, [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]),    # DINO 5-scale: + a stride-64 level
    (4, 1, [(8, 12), (4, 6), (2, 3), (1, 2)]),              # DINO 4-scale: strides 8-64
    (2, 3, [(2, 3), (1, 2)]),
])
def test_neck_levels(levels, first, expected):
    feats = [torch.randn(2, c, 64 // s, 96 // s) for c, s in zip((8, 16, 24, 32), (4, 8, 16, 32))]
    neck = ChannelMapper([8, 16, 24, 32], dim=16, num_levels=levels, first_level=first, groups=4)
    outs = neck(feats)
    assert ([tuple(o.shape[-2:]) for o in outs] == expected
            and all(o.shape[:2] == (2, 16) for o in outs))


# -- encoders --------------------------------------------------------------------------------


def test_detector_config_defaults_are_dino():
    """DINO's config/DINO/DINO_4scale.py: 6 deformable encoder layers (with --encoder deformable;
    the default is RT-DETR's hybrid encoder), 6 decoder layers, FFN 2048, dropout 0, hidden 256,
    8 heads, 4 points; dn_number 100, label noise 0.5, box noise 0.4."""
    cfg = DetectorConfig(num_classes=6)
    assert (cfg.encoder, cfg.enc_layers, cfg.dec_layers, cfg.ffn_dim, cfg.dropout) == (
        "hybrid", 6, 6, 2048, 0.0)
    assert (cfg.hidden_dim, cfg.num_heads, cfg.num_points) == (256, 8, 4)
    assert (cfg.dn_number, cfg.label_noise_ratio, cfg.box_noise_scale) == (100, 0.5, 0.4)
    for bad, message in (({"encoder": "dense"}, "encoder must be one of"),
                         ({"dn_number": -1}, "dn_number must be >= 0"),
                         ({"box_noise_scale": -0.1}, "box noise"),
                         ({"label_noise_ratio": 1.5}, "label noise")):
        with pytest.raises(ValueError, match=message):
            DetectorConfig(num_classes=6, **bad)


def test_the_detectors_losses_and_matching_costs_are_dinos():
    """DINO's config/DINO/DINO_4scale.py: focal alpha 0.25 and gamma 2; loss weights cls 1, L1 5,
    GIoU 2 (Eq. 17); matching costs class 2, L1 5, GIoU 2 (set_cost_*), with the same focal
    alpha and gamma; as the criterion a detector of the default configuration builds holds them."""
    from ivt.models.detr.criterion import build_criterion
    criterion = build_criterion(DetectorConfig(num_classes=6))
    assert criterion.weights == {"cls": 1.0, "l1": 5.0, "giou": 2.0}
    assert (criterion.alpha, criterion.gamma) == (0.25, 2.0)
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou, m.alpha, m.gamma) == (2.0, 5.0, 2.0, 0.25, 2.0)


@pytest.mark.parametrize("encoder", ["deformable", "hybrid"])
def test_transformer_weights_start_xavier_uniform_as_dinos(encoder):
    """DINO's DeformableTransformer._reset_parameters (mmdet's DINO.init_weights): every weight
    matrix of the deformable encoder, the decoder layers, the query position MLP, the proposal
    projection and the content queries ~ U(-a, a), a = sqrt(6 / (fan_in + fan_out)); then the
    deformable attentions' own init (zero offset weights, the direction grid as bias, zero
    attention weights); the heads keep the focal prior and the zero last box layer."""
    torch.manual_seed(0)
    cfg = DetectorConfig(num_classes=6, hidden_dim=64, num_queries=20, enc_layers=2,
                         dec_layers=2, ffn_dim=256, encoder=encoder)
    model = build_detector("swin_nano", cfg)
    parts = {"decoder.layers": model.decoder.layers,
             "decoder.query_pos_head": model.decoder.query_pos_head,
             "query_selection.proj": model.query_selection.proj,
             "query_selection.content": model.query_selection.content}
    if encoder == "deformable":
        parts["encoder"] = model.encoder
    deformable = ("sampling_offsets.weight", "attention_weights.weight")
    checked = 0
    for prefix, part in parts.items():
        for name, p in part.named_parameters():
            if p.dim() < 2:
                continue
            if name.endswith(deformable):
                assert torch.count_nonzero(p) == 0, f"{prefix}.{name}"
                continue
            fan_out, fan_in = p.shape[0], p[0].numel()
            a = math.sqrt(6.0 / (fan_in + fan_out))
            w = p.detach().abs()
            assert w.max() <= a and w.max() > 0.95 * a, (f"{prefix}.{name}", w.max().item(), a)
            assert w.pow(2).mean().sqrt().item() == pytest.approx(a / math.sqrt(3), rel=0.1)
            checked += 1
    # per decoder layer: self-attention 2, cross-attention 2 (value, output), FFN 2; query
    # position MLP 2, projection 1, content 1; per deformable encoder layer 4
    assert checked == 2 * 6 + 4 + (2 * 4 if encoder == "deformable" else 0)
    for attn in (m for m in model.modules() if isinstance(m, MultiScaleDeformableAttention)):
        fresh = MultiScaleDeformableAttention(64, 8, cfg.num_feature_levels, cfg.num_points)
        assert torch.equal(attn.sampling_offsets.bias, fresh.sampling_offsets.bias)
    for head in (model.decoder, model.query_selection):
        assert torch.all(head.class_head.bias == -4.595)
        assert torch.count_nonzero(head.box_head.layers[-1].weight) == 0
    if encoder == "hybrid":           # RT-DETR's encoder keeps PyTorch's default Linear init
        second = model.encoder.aifi.ffn.net[3].weight                  # 256 -> 64
        assert second.abs().max() <= 1 / math.sqrt(256) < 0.95 * math.sqrt(6 / (256 + 64))


def test_deformable_encoder_runs_all_six_layers():
    """DINO's 6 layers, chained: each layer's output is the next one's input, the last one's is
    the memory, and every parameter of every layer gets a gradient."""
    torch.manual_seed(0)
    enc = build_encoder(DetectorConfig(num_classes=3, encoder="deformable", hidden_dim=16,
                                       num_heads=2, num_points=2, ffn_dim=32, num_feature_levels=2))
    assert len(enc.layers) == 6
    shapes = [(6, 8), (3, 4)]
    src, pos = torch.randn(2, 60, 16), torch.randn(1, 60, 16)
    calls = []
    for i, layer in enumerate(enc.layers):
        layer.register_forward_hook(lambda m, args, out, i=i: calls.append((i, args[0], out)))
    out = enc(src, pos, shapes)
    assert [c[0] for c in calls] == list(range(6))
    assert calls[0][1] is src and out is calls[-1][2]
    assert all(nxt[1] is prev[2] for prev, nxt in zip(calls[:-1], calls[1:]))
    (out * torch.randn_like(out)).sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


SWIN_LEVELS = {"64x96": [(16, 24), (8, 12), (4, 6), (2, 3)],
               # strides 4-32 of a 100 x 60 input: patch merging pads odd sizes (rounds up)
               "100x60": [(25, 15), (13, 8), (7, 4), (4, 2)]}


@pytest.mark.parametrize("size", list(SWIN_LEVELS))
def test_hybrid_encoder_shapes_gradients_and_cross_scale_fusion(size):
    """Four levels in, the same four out; AIFI runs on the stride-32 level only; every parameter
    gets a gradient; and every output level depends on every input level (top-down FPN, then
    bottom-up PAN). RT-DETR's module counts: 3 fusions each way, 3 RepVGG blocks per CSP block."""
    torch.manual_seed(0)
    shapes = SWIN_LEVELS[size]
    enc = HybridEncoder(num_levels=4, dim=16, num_heads=2, ffn_dim=32, dropout=0.0)
    assert len(enc.lateral) == len(enc.fpn) == len(enc.downsample) == len(enc.pan) == 3
    assert all(len(csp.blocks) == 3 for csp in list(enc.fpn) + list(enc.pan))
    with pytest.raises(ValueError, match="hidden_dim divisible by 4"):
        HybridEncoder(num_levels=4, dim=18, num_heads=2, ffn_dim=32, dropout=0.0)
    aifi_inputs = []
    enc.aifi.register_forward_hook(lambda m, args, out: aifi_inputs.append(tuple(args[0].shape)))
    feats = [torch.randn(2, 16, h, w, requires_grad=True) for h, w in shapes]
    outs = enc(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 16, h, w) for h, w in shapes]
    assert aifi_inputs == [(2, 16) + shapes[-1]]
    sum((o * torch.randn_like(o)).sum() for o in outs).backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    enc.eval()
    outs = enc(feats)
    for i, o in enumerate(outs):
        grads = torch.autograd.grad(o.sum(), feats, retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads), i


def test_aifi_matches_float64_attention_written_out():
    """AIFI = one post-norm transformer encoder layer with RT-DETR's 2-D sin-cos position
    ([sin x w_k, cos x w_k, sin y w_k, cos y w_k], w_k = 10000^(-k / (C/4)), x the column, y the
    row) added to queries and keys only, GELU FFN; written out token by token in float64."""
    torch.manual_seed(0)
    C, heads, H_, W_ = 8, 2, 3, 4
    aifi = AIFI(C, heads, ffn_dim=12, dropout=0.0).double()
    with torch.no_grad():                    # no zero biases or unit norms that hide a mix-up
        for p in aifi.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, C, H_, W_, dtype=torch.float64)
    out = aifi(x)

    attn, ffn = aifi.self_attn, aifi.ffn
    Wq, Wk, Wv = attn.in_proj_weight.detach().split(C)
    bq, bk, bv = attn.in_proj_bias.detach().split(C)
    W1, b1 = ffn.net[0].weight.detach(), ffn.net[0].bias.detach()
    W2, b2 = ffn.net[3].weight.detach(), ffn.net[3].bias.detach()

    def layer_norm(v, ln):
        mean = v.mean()
        return ((v - mean) / math.sqrt(((v - mean) ** 2).mean() + ln.eps) * ln.weight.detach()
                + ln.bias.detach())

    def gelu(v):
        return torch.tensor([u * 0.5 * (1 + math.erf(u / math.sqrt(2))) for u in v.tolist()],
                            dtype=torch.float64)

    tokens = [(i, j) for i in range(H_) for j in range(W_)]
    pos = [torch.tensor([f(c * 10000 ** (-k / (C // 4))) for f, c in
                         ((math.sin, j), (math.cos, j), (math.sin, i), (math.cos, i))
                         for k in range(C // 4)], dtype=torch.float64) for i, j in tokens]
    d = C // heads
    for b in range(2):
        xs = [x[b, :, i, j] for i, j in tokens]
        q = [Wq @ (t + p) + bq for t, p in zip(xs, pos)]
        k = [Wk @ (t + p) + bk for t, p in zip(xs, pos)]
        v = [Wv @ t + bv for t in xs]
        for n, (i, j) in enumerate(tokens):
            heads_out = []
            for h in range(heads):
                hs = slice(h * d, (h + 1) * d)
                scores = [float(q[n][hs] @ k[m][hs]) / math.sqrt(d) for m in range(len(tokens))]
                top = max(scores)
                e = [math.exp(s_ - top) for s_ in scores]
                heads_out.append(sum(e_ / sum(e) * v[m][hs] for m, e_ in enumerate(e)))
            a = attn.out_proj.weight.detach() @ torch.cat(heads_out) + attn.out_proj.bias.detach()
            y = layer_norm(xs[n] + a, aifi.norm)
            z = layer_norm(y + W2 @ gelu(W1 @ y + b1) + b2, ffn.norm)
            assert torch.allclose(out[b, :, i, j], z, atol=1e-10), (b, i, j)


def test_repvgg_block_formula():
    """SiLU(BN(conv3x3(x)) + BN(conv1x1(x))), convs without bias, BN with its running stats."""
    torch.manual_seed(0)
    block = RepVGGBlock(4).double().eval()
    with torch.no_grad():
        for bn in (block.conv3[1], block.conv1[1]):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    assert block.conv3[0].bias is None and block.conv1[0].bias is None

    def bn(y, m):
        r = lambda t: t.detach()[:, None, None]  # noqa: E731
        return ((y - r(m.running_mean)) / torch.sqrt(r(m.running_var) + m.eps) * r(m.weight)
                + r(m.bias))

    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    y = (bn(F.conv2d(x, block.conv3[0].weight.detach(), padding=1), block.conv3[1])
         + bn(F.conv2d(x, block.conv1[0].weight.detach()), block.conv1[1]))
    assert torch.allclose(block(x), y * torch.sigmoid(y), atol=1e-12)


# -- denoising -------------------------------------------------------------------------------


def test_denoising_attention_mask():
    m = denoising_attention_mask(num_groups=2, group_size=2, num_queries=3, device="cpu")
    T, F_ = True, False
    expected = torch.tensor([[F_, F_, T, T, F_, F_, F_],
                             [F_, F_, T, T, F_, F_, F_],
                             [T, T, F_, F_, F_, F_, F_],
                             [T, T, F_, F_, F_, F_, F_],
                             [T, T, T, T, F_, F_, F_],
                             [T, T, T, T, F_, F_, F_],
                             [T, T, T, T, F_, F_, F_]])
    assert torch.equal(m, expected)


@pytest.mark.parametrize("scale", [0.4, 1.0])              # DINO's config; its training scripts
def test_denoising_noise_bounds(scale):
    """Positive copies move each corner by less than `scale` half box sizes, negative ones by one
    to two times that (unless their corners crossed); labels are untouched without label noise;
    padding slots stay zero."""
    torch.manual_seed(0)
    dn = Denoising(num_classes=3, dim=8, dn_number=6, label_noise_ratio=0.0, box_noise_scale=scale)
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.1], [0.4, 0.6, 0.1, 0.2]])
    targets = [{"labels": torch.tensor([2, 0]), "boxes": gt},
               {"labels": torch.tensor([1]), "boxes": gt[:1]}]
    q = dn(targets, num_queries=5)
    assert q.meta == {"pad_size": 12, "num_groups": 3, "group_size": 4}
    boxes = box_cxcywh_to_xyxy(q.boxes_unact.sigmoid())
    half = gt[:, 2:].repeat(1, 2) / 2
    for g in range(3):
        for b, n in ((0, 2), (1, 1)):
            pos = slice(4 * g, 4 * g + n)
            neg = slice(4 * g + 2, 4 * g + 2 + n)
            dev_pos = (boxes[b, pos] - box_cxcywh_to_xyxy(gt[:n])).abs() / half[:n] / scale
            dev_neg = (boxes[b, neg] - box_cxcywh_to_xyxy(gt[:n])).abs() / half[:n] / scale
            # negative corners may cross (x0 past x1): the box then collapses to zero size
            wh = q.boxes_unact.sigmoid()[b, neg, 2:].repeat(1, 2)
            dev_neg = dev_neg[wh > 1e-3]
            assert ((dev_pos <= 1 + 1e-3).all() and (dev_neg >= 1 - 1e-3).all()
                    and (dev_neg <= 2 + 1e-3).all())
            assert torch.allclose(q.content[b, pos], dn.label_embed(targets[b]["labels"]))
    assert (q.content[1, 1] == 0).all() and (q.content[1, 3] == 0).all()   # image 1 pads slots 1, 3


def test_denoising_label_noise_flips_half_the_ratio():
    """DINO (models/dino/dn_components.py: `p < (label_noise_ratio * 0.5)`) flips a denoising
    query's label to a uniformly random class with probability label_noise_ratio / 2, so a label
    changes with probability ratio / 2 * (K - 1) / K (the random class may be the true one).
    The labels are read back from the content queries (nearest label embedding) over 4000
    queries; the standard error is about 0.007, the full ratio would give 0.45."""
    torch.manual_seed(0)
    K, n, ratio = 10, 500, 0.5
    dn = Denoising(K, 16, dn_number=2000, label_noise_ratio=ratio, box_noise_scale=0.0)
    labels = torch.randint(0, K, (n,))
    q = dn([{"labels": labels, "boxes": torch.rand(n, 4) * 0.5 + 0.25}], num_queries=10)
    assert q.meta["num_groups"] == 4
    got = torch.cdist(q.content[0], dn.label_embed.weight).argmin(-1)     # (pad,)
    rate = (got != labels.repeat(2 * q.meta["num_groups"])).double().mean().item()
    assert rate == pytest.approx(0.5 * ratio * (K - 1) / K, abs=0.03)


# -- the detector ------------------------------------------------------------------------------

H, W = 64, 96                                                  # non-square input


def tiny_config(**kw):
    base = dict(num_classes=3, hidden_dim=32, num_queries=12, encoder="deformable", enc_layers=1,
                dec_layers=2, num_heads=4, num_points=2, ffn_dim=64, dn_number=6)
    return DetectorConfig(**{**base, **kw})


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    vis, ir = torch.randn(2, 3, H, W, generator=g), torch.randn(2, 1, H, W, generator=g)
    targets = [{"boxes": torch.tensor([[10.0, 5.0, 40.0, 30.0], [50.0, 20.0, 90.0, 60.0]]),
                "labels": torch.tensor([0, 2])},
               {"boxes": torch.tensor([[30.0, 30.0, 70.0, 50.0]]), "labels": torch.tensor([1])}]
    return vis, ir, targets


@pytest.mark.parametrize("encoder, dn_number",
                         [("deformable", 6), ("deformable", 0), ("hybrid", 6)])
def test_detector_forward_backward_only_trainable_get_grads(encoder, dn_number):
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(encoder=encoder, dn_number=dn_number),
                           tuning="ivt")
    assert (model.level_embed is None) == (encoder == "hybrid")
    assert (model.denoising is None) == (dn_number == 0)
    model.train()
    vis, ir, targets = batch()
    out = model(vis, ir, targets)
    assert out["pred_logits"].shape == (2, 12, 3) and out["pred_boxes"].shape == (2, 12, 4)
    assert len(out["aux_outputs"]) == 1 and out["enc_outputs"]["pred_boxes"].shape == (2, 12, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert ("dn_outputs" in out) == (dn_number > 0)
    losses = model.loss(out, targets)
    assert torch.isfinite(losses["loss"])
    suffixes = ["", "_0", "_enc"] + (["_dn", "_dn_0"] if dn_number else [])
    assert ({f"loss_{n}{s}" for n in ("cls", "l1", "giou") for s in suffixes} | {"loss"}
            == set(losses))
    weight = {"cls": 1.0, "l1": 5.0, "giou": 2.0}                                      # DINO's
    expected = sum(weight[k.split("_")[1]] * v for k, v in losses.items() if k != "loss")
    assert losses["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    losses["loss"].backward()
    for name, p in model.named_parameters():
        frozen_backbone = (name.startswith("backbone.")
                           and not model.backbone.is_added_name(name[len("backbone."):]))
        assert p.requires_grad == (not frozen_backbone), name
        assert (p.grad is not None) == p.requires_grad, name
    assert 0 < count_parameters(model, trainable_only=True) < count_parameters(model)
    line = describe_parameters(model)
    assert line.startswith("parameters: ") and "; backbone " in line


def test_denoising_queries_do_not_leak_into_matching_queries():
    """The attention mask makes the matching queries' outputs independent of the denoising ones."""
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(num_feature_levels=2)).eval()
    memory, shapes = torch.randn(1, 6 * 4 + 3 * 2, 32), [(6, 4), (3, 2)]
    tgt, boxes = torch.randn(1, 5, 32), torch.randn(1, 5, 4)
    alone, _ = decoder(tgt, boxes, memory, shapes)
    mask = denoising_attention_mask(2, 3, 5, "cpu")
    with_dn, _ = decoder(torch.cat([torch.randn(1, 6, 32), tgt], 1),
                         torch.cat([torch.randn(1, 6, 4), boxes], 1), memory, shapes, mask)
    for a, b in zip(alone, with_dn):
        assert torch.allclose(a, b[:, 6:], atol=1e-5)
    unmasked, _ = decoder(torch.cat([torch.randn(1, 6, 32), tgt], 1),
                          torch.cat([torch.randn(1, 6, 4), boxes], 1), memory, shapes)
    assert not torch.allclose(alone[0], unmasked[0][:, 6:], atol=1e-5)   # the mask is what isolates


def inverse_sigmoid(b):
    """DINO's `inverse_sigmoid`: log(max(b, 1e-3) / max(1 - b, 1e-3)), b clamped to [0, 1]."""
    b = b.clamp(0, 1)
    return torch.log(b.clamp(min=1e-3) / (1 - b).clamp(min=1e-3))


def run_decoder_recording_layers():
    """A seeded one-level decoder (box head and norm drawn away from their init) run on random
    queries, boxes (as logits) and memory. Returns the decoder, the boxes, its (logits, boxes) per
    layer, and `seen`: layer 0's and 1's outputs (`out0`, `out1`) and the reference box and query
    position layer 1 was given (`ref1`, `pos1`)."""
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(num_feature_levels=1)).eval()
    for p in [*decoder.box_head.parameters(), *decoder.norm.parameters()]:
        torch.nn.init.normal_(p, std=0.2)
    memory, shapes = torch.randn(1, 6 * 4, 32), [(6, 4)]
    tgt, boxes_unact = torch.randn(1, 5, 32), torch.randn(1, 5, 4)
    seen = {}
    decoder.layers[0].register_forward_hook(lambda m, a, out: seen.update(out0=out))
    decoder.layers[1].register_forward_hook(
        lambda m, a, out: seen.update(out1=out, ref1=a[2], pos1=a[1]))
    return decoder, boxes_unact, decoder(tgt, boxes_unact, memory, shapes), seen


def test_decoder_predicts_from_its_layernorm_and_refines_from_the_layer_output():
    """DINO's decoder: class and box predictions read LayerNorm(output); the reference box the
    next layer attends around is refined from the output itself (its logit clamped at 1e-3)."""
    decoder, boxes_unact, (logits, boxes), seen = run_decoder_recording_layers()
    ref0 = boxes_unact.sigmoid()
    normed = F.layer_norm(seen["out0"], (32,), decoder.norm.weight, decoder.norm.bias)
    torch.testing.assert_close(logits[0], decoder.class_head(normed))
    torch.testing.assert_close(boxes[0],
                               (decoder.box_head(normed) + inverse_sigmoid(ref0)).sigmoid())
    torch.testing.assert_close(seen["ref1"],
                               (decoder.box_head(seen["out0"]) + inverse_sigmoid(ref0)).sigmoid())
    assert not torch.allclose(seen["ref1"], boxes[0], atol=1e-3)      # the two paths differ


def test_decoder_looks_forward_twice():
    """DINO's "look forward twice" (deformable_transformer.py: `new_reference_points =
    layer_delta_unsig + inverse_sigmoid(reference_points)` on the undetached reference, detached
    only as the next layer's input): layer 1's box is sigmoid(delta_1 + logit(b_0)) with b_0 layer
    0's refined box WITH its gradient, so layer 1's loss also trains layer 0's box prediction.
    The values do not tell a detached b_0 apart; the gradient into layer 0's output does."""
    decoder, boxes_unact, (_, boxes), seen = run_decoder_recording_layers()
    b0 = (decoder.box_head(seen["out0"]) + inverse_sigmoid(boxes_unact.sigmoid())).sigmoid()
    normed1 = F.layer_norm(seen["out1"], (32,), decoder.norm.weight, decoder.norm.bias)
    want = (decoder.box_head(normed1) + inverse_sigmoid(b0)).sigmoid()     # b0 not detached
    torch.testing.assert_close(boxes[1], want)
    g_got, = torch.autograd.grad(boxes[1].sum(), seen["out0"], retain_graph=True)
    g_want, = torch.autograd.grad(want.sum(), seen["out0"])
    torch.testing.assert_close(g_got, g_want)


def test_map_position_embedding_is_dinos_cumulative_count():
    """DINO's PositionEmbeddingSineHW(normalize=True): cumsum over a mask of ones divided by the
    last value, times 2 pi, temperature 20; y's half first."""
    from ivt.models.detr.position_encoding import map_position_embedding
    h, w, dim = 3, 5, 16
    ones = torch.ones(h, w, dtype=torch.float64)
    y, x = ones.cumsum(0), ones.cumsum(1)
    y, x = y / y[-1:, :] * 2 * math.pi, x / x[:, -1:] * 2 * math.pi
    t = 20.0 ** (2 * (torch.arange(dim // 2, dtype=torch.float64) // 2) / (dim // 2))
    py, px = y[..., None] / t, x[..., None] / t
    emb = [torch.stack((q[..., 0::2].sin(), q[..., 1::2].cos()), dim=-1).flatten(-2)
           for q in (py, px)]
    expected = torch.cat(emb, dim=-1).reshape(h * w, dim)
    torch.testing.assert_close(map_position_embedding((h, w), dim, "cpu").double(), expected,
                               atol=1e-5, rtol=0)


def test_box_position_embedding_is_dinos_gen_sineembed_for_position():
    """DINO's gen_sineembed_for_position (models/dino/utils.py) of a (cx, cy, w, h) box:
    cat(pos_y, pos_x, pos_w, pos_h), each coordinate u giving 2 pi u / 10000^(2 floor(i / 2) / F),
    sin on even i and cos on odd i, F = dim / 2; written out here in float64."""
    def dino(pos, d_model):
        f = d_model // 2
        t = 10000.0 ** (2 * (torch.arange(f, dtype=torch.float64) // 2) / f)
        parts = []
        for k in (1, 0, 2, 3):                                         # y, x, w, h
            p = pos[..., k, None] * 2 * math.pi / t
            parts.append(torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=-1).flatten(-2))
        return torch.cat(parts, dim=-1)

    torch.manual_seed(0)
    boxes = torch.rand(2, 7, 4)
    for d in (32, 256):
        torch.testing.assert_close(box_position_embedding(boxes, d).double(),
                                   dino(boxes.double(), d), rtol=1e-5, atol=1e-5)


# -- two-stage query selection -------------------------------------------------------------


def test_anchor_is_valid_only_if_all_four_coordinates_are_inside():
    """Deformable DETR / DINO two-stage proposals: `((output_proposals > 0.01) &
    (output_proposals < 0.99)).all(-1)`: an anchor (centre of its pixel, side 0.05 * 2^l) is
    valid only if each of cx, cy, w, h lies in (0.01, 0.99). Checked element by element on
    maps fine enough to put centres within 1% of the border."""
    shapes = [(64, 80), (32, 40), (16, 20), (8, 10)]
    _, valid = anchor_proposals(shapes, "cpu")
    want = []
    for lvl, (h, w) in enumerate(shapes):
        side = 0.05 * 2 ** lvl
        for i in range(h):
            for j in range(w):
                want.append(all(0.01 < v < 0.99
                                for v in ((j + 0.5) / w, (i + 0.5) / h, side, side)))
    want = torch.tensor(want)
    assert 0 < int((~want).sum()) < len(want)
    assert torch.equal(valid, want)


def test_query_selection_detaches_the_initial_reference_boxes():
    """DINO (`refpoint_embed_undetach` for the encoder loss, `.detach()` for the decoder) and
    Deformable DETR's two-stage: the decoder's initial reference boxes carry no gradient; only
    the proposals' own loss trains the encoder's box head. Same values either way."""
    torch.manual_seed(0)
    qs = QuerySelection(32, 3, 5)
    for p in qs.box_head.parameters():
        torch.nn.init.normal_(p, std=0.1)
    memory = torch.randn(2, 6 * 4 + 3 * 2, 32, requires_grad=True)
    _, boxes_unact, out = qs(memory, [(6, 4), (3, 2)])
    assert not boxes_unact.requires_grad and boxes_unact.grad_fn is None
    assert out["pred_boxes"].requires_grad
    torch.testing.assert_close(out["pred_boxes"], boxes_unact.sigmoid())


def test_detector_batch_without_objects_and_bad_targets():
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(), tuning="ivt").train()
    vis, ir, _ = batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = model(vis, ir, empty)
    assert "dn_outputs" not in out
    losses = model.loss(out, empty)
    assert torch.isfinite(losses["loss"]) and losses["loss_l1"].item() == 0.0
    losses["loss"].backward()
    assert model.denoising.label_embed.weight.grad is not None
    with pytest.raises(ValueError, match=r"targets\[1\].*labels must lie in \[0, 3\)"):
        model(vis, ir, [empty[0], {"boxes": torch.tensor([[0.0, 0, 5, 5]]),
                                   "labels": torch.tensor([3])}])
    with pytest.raises(ValueError, match="fewer than num_queries"):
        build_detector("swin_nano", tiny_config(num_queries=1000), tuning="ivt")(vis, ir)


def test_detector_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(), tuning="ivt").train()
    vis, ir, targets = batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(60):
        loss = model.loss(model(vis, ir, targets), targets)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert sum(history[-3:]) / 3 < 0.5 * sum(history[:3]) / 3, history


def test_predict_returns_boxes_in_original_pixels():
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(), tuning="ivt").eval()
    vis, ir, _ = batch()
    orig = [(768, 1024), (300, 200)]                            # aspect differs from the input's
    out = model(vis, ir)
    dets = model.predict(vis, ir, orig, max_dets=10)
    prob = out["pred_logits"].detach().sigmoid()
    for b, (h0, w0) in enumerate(orig):
        d = dets[b]
        assert d["boxes"].shape == (10, 4) and d["scores"].shape == d["labels"].shape == (10,)
        assert torch.all(d["scores"][:-1] >= d["scores"][1:])
        top = prob[b].flatten().sort(descending=True).values[:10]
        assert torch.allclose(d["scores"], top)
        # find each detection's query by its score and check the scaling by hand
        for box, score, label in zip(d["boxes"], d["scores"], d["labels"]):
            q = (prob[b, :, label] == score).nonzero()[0, 0]
            cx, cy, w, h = out["pred_boxes"][b, q].tolist()
            expect = [max(0.0, cx - w / 2) * w0, max(0.0, cy - h / 2) * h0,
                      min(1.0, cx + w / 2) * w0, min(1.0, cy + h / 2) * h0]
            assert box.tolist() == pytest.approx(expect, rel=1e-5, abs=1e-3)
    threshold = prob.median().item()
    few = model.predict(vis, ir, orig, score_threshold=threshold, max_dets=10)
    assert all((d["scores"] > threshold).all() for d in few)
    # "at least": a threshold equal to a detection's score keeps it (predict.py's --help)
    third = dets[0]["scores"][2].item()
    kept = model.predict(vis, ir, orig, score_threshold=third, max_dets=10)[0]
    assert kept["scores"].tolist() == dets[0]["scores"][:3].tolist()
    with pytest.raises(ValueError, match="orig_sizes"):
        model.predict(vis, ir, [(10, 10)])


# -- the loss (Eq. 17) against its definitions, in float64 --------------------------------------

def focal_by_hand(logit: float, target: float, alpha=0.25, gamma=2.0) -> float:
    """Lin et al. 2017: -alpha_t (1 - p_t)^gamma log(p_t); alpha_t = alpha for positives."""
    p = 1 / (1 + math.exp(-logit))
    p_t = p if target else 1 - p
    return -(alpha if target else 1 - alpha) * (1 - p_t) ** gamma * math.log(p_t)


def giou_by_hand(a, b) -> float:
    """Generalised IoU of two xyxy boxes (Rezatofighi et al. 2019)."""
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return inter / union - (hull - union) / hull


def test_sigmoid_focal_loss_is_the_published_formula():
    from ivt.models.detr.criterion import sigmoid_focal_loss
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=gen, dtype=torch.float64) * 3
    targets = (torch.rand(40, 3, generator=gen) < 0.3).double()
    ours = sigmoid_focal_loss(logits, targets, 0.25, 2.0)
    for (i, k), value in zip(itertools.product(range(40), range(3)), ours.flatten().tolist()):
        assert value == pytest.approx(focal_by_hand(logits[i, k].item(), targets[i, k].item()),
                                      rel=1e-12, abs=1e-15)


def test_set_losses_on_a_given_assignment():
    """Focal over every query and class (unmatched queries are background), L1 and 1 - GIoU on
    the matched (query, box) pairs, each summed and divided by the number of boxes."""
    from ivt.models.detr.criterion import SetCriterion
    gen = torch.Generator().manual_seed(1)
    B, Q, K = 2, 5, 3
    logits = torch.randn(B, Q, K, generator=gen, dtype=torch.float64) * 2
    centres = torch.rand(B, Q, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    sizes = torch.rand(B, Q, 2, generator=gen, dtype=torch.float64) * 0.3 + 0.1
    boxes = torch.cat([centres, sizes], -1)                               # cxcywh in [0, 1]
    corners = [torch.tensor([[.2, .3, .4, .6], [.5, .5, .9, .8]]), torch.tensor([[.1, .1, .7, .4]])]
    targets = [{"labels": torch.tensor([2, 0]), "boxes": box_xyxy_to_cxcywh(corners[0])},
               {"labels": torch.tensor([1]), "boxes": box_xyxy_to_cxcywh(corners[1])}]  # normalised
    indices = [(torch.tensor([3, 0]), torch.tensor([0, 1])), (torch.tensor([4]), torch.tensor([0]))]
    criterion = SetCriterion(K, HungarianMatcher(), {"cls": 1.0, "l1": 5.0, "giou": 2.0})
    got = criterion.set_losses({"pred_logits": logits, "pred_boxes": boxes}, targets, indices,
                               num_boxes=3.0, suffix="")
    matched = {(b, q.item()): (t["labels"][j].item(), corners[b][j].tolist())
               for b, ((qs, js), t) in enumerate(zip(indices, targets)) for q, j in zip(qs, js)}
    cls = sum(focal_by_hand(logits[b, q, k].item(), float(matched.get((b, q), (-1,))[0] == k))
              for b in range(B) for q in range(Q) for k in range(K))
    l1 = giou = 0.0
    for (b, q), (_, box) in matched.items():
        cx, cy, w, h = boxes[b, q].tolist()
        pred = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
        l1 += sum(abs(u - v) for u, v in zip(boxes[b, q].tolist(), [(box[0] + box[2]) / 2,
                                                                     (box[1] + box[3]) / 2,
                                                                     box[2] - box[0],
                                                                     box[3] - box[1]]))
        giou += 1 - giou_by_hand(pred, box)
    assert got["loss_cls"].item() == pytest.approx(cls / 3, rel=1e-6)
    assert got["loss_l1"].item() == pytest.approx(l1 / 3, rel=1e-6)
    assert got["loss_giou"].item() == pytest.approx(giou / 3, rel=1e-6)


def test_denoising_losses_are_divided_by_the_boxes_of_every_group():
    """DINO's criterion divides the denoising terms by num_boxes * the number of groups (each
    group holds every target once): with G = 3 groups whose positive queries predict the same
    box, the L1 and GIoU terms are one positive's, and the focal term is the sum over all
    3 * 2 denoising queries and classes divided by 3 (Lin et al.'s formula by hand)."""
    from ivt.models.detr.criterion import SetCriterion
    K, G = 3, 3
    gt = [8.0, 4.0, 24.0, 20.0]                                     # xyxy in a 32 x 40 image
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([gt])}]
    pos_box, pos_logits = [0.45, 0.35, 0.4, 0.5], [-1.0, 2.0, -0.5]
    neg_logits = [-3.0, 0.5, -2.0]
    dn_logits = torch.tensor([pos_logits, neg_logits] * G, dtype=torch.float64)[None]
    dn_boxes = torch.tensor([pos_box, [0.2, 0.8, 0.1, 0.1]] * G, dtype=torch.float64)[None]
    outputs = {"pred_logits": torch.zeros(1, 4, K, dtype=torch.float64),
               "pred_boxes": torch.full((1, 4, 4), 0.5, dtype=torch.float64),
               "image_size": (32, 40),
               "dn_outputs": {"pred_logits": dn_logits, "pred_boxes": dn_boxes,
                              "aux_outputs": []},
               "dn_meta": {"pad_size": 2 * G, "num_groups": G, "group_size": 2}}
    criterion = SetCriterion(K, HungarianMatcher(), {"cls": 1.0, "l1": 5.0, "giou": 2.0})
    losses = criterion(outputs, targets)
    box = [gt[0] / 40, gt[1] / 32, gt[2] / 40, gt[3] / 32]
    cx, cy, w, h = pos_box
    l1 = (abs(cx - (box[0] + box[2]) / 2) + abs(cy - (box[1] + box[3]) / 2)
          + abs(w - (box[2] - box[0])) + abs(h - (box[3] - box[1])))
    giou = 1 - giou_by_hand([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], box)
    cls = G * sum(focal_by_hand(pos_logits[k], float(k == 1)) + focal_by_hand(neg_logits[k], 0.0)
                  for k in range(K)) / G
    assert losses["loss_l1_dn"].item() == pytest.approx(l1, rel=1e-6)
    assert losses["loss_giou_dn"].item() == pytest.approx(giou, rel=1e-6)
    assert losses["loss_cls_dn"].item() == pytest.approx(cls, rel=1e-6)


def test_decoder_gives_the_next_layer_a_detached_reference():
    """DINO detaches the refined box as the next layer's reference (`reference_points =
    new_reference_points.detach()`): layer 1's output, whose sampling locations come from that
    reference, carries no gradient into layer 0's box head; only the box loss does (look forward
    twice)."""
    decoder, _, _, seen = run_decoder_recording_layers()
    assert not seen["ref1"].requires_grad
    grad, = torch.autograd.grad(seen["out1"].sum(), decoder.box_head.layers[-1].weight,
                                allow_unused=True)
    assert grad is None or not grad.any()


def test_deformable_attention_around_a_box_spreads_offsets_by_half_its_size():
    """Deformable DETR's box reference (cx, cy, w, h): a point reads at (cx, cy) + offset / P *
    (w, h) / 2. Offset (+1, 0) for both of P = 2 points, a box of width 0.4, on a map whose value
    is a ramp in x (exact under bilinear sampling away from the borders): every point reads the
    ramp at cx + 1/2 * 0.4 / 2 = cx + 0.1."""
    shapes = [(4, 10)]
    attn = MultiScaleDeformableAttention(dim=1, num_heads=1, num_levels=1, num_points=2).double()
    with torch.no_grad():
        attn.sampling_offsets.weight.zero_()
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0, 1.0, 0.0]))
        attn.value_proj.weight.fill_(1.0)
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.fill_(1.0)
        attn.output_proj.bias.zero_()
    xs = (torch.arange(10, dtype=torch.float64) + 0.5) / 10             # pixel centres in [0, 1]
    value = xs.repeat(4)[None, :, None]                                 # (1, 40, 1): x of the pixel
    cx, cy, w, h = 0.35, 0.5, 0.4, 0.3
    reference = torch.tensor([[[[cx, cy, w, h]]]], dtype=torch.float64)
    out = attn(torch.randn(1, 1, 1, dtype=torch.float64), reference, value, shapes)
    assert out.item() == pytest.approx(cx + 0.1, abs=1e-12)


# -- gaps found by mutation testing --------------------------------------------------------------


def test_inverse_sigmoid_clamps_at_dinos_eps():
    """`inverse_sigmoid(x, eps=1e-3)` as DINO writes it: log(max(x, 1e-3) / max(1 - x, 1e-3)),
    so a box on the border maps to -+log(1000) ~ -+6.9, not to an infinite logit, and values
    outside [0, 1] are clamped into it first."""
    from ivt.models.detr.box_ops import inverse_sigmoid as ours
    got = ours(torch.tensor([-0.5, 0.0, 1e-4, 0.25, 1.0, 1.5], dtype=torch.float64))
    want = [-math.log(1000.0), -math.log(1000.0), math.log(1e-3 / (1 - 1e-4)),
            math.log(0.25 / 0.75), math.log(1000.0), math.log(1000.0)]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_matcher_weighs_class_against_box_costs_as_dino(seed):
    """Queries of confident, varied classes whose boxes are all near the targets, so that the
    focal class cost (weight 2, alpha 0.25 on the positive term and 1 - alpha on the negative
    one) competes with the L1 (5) and GIoU (2) costs: the matcher's assignment must be optimal
    under DINO's cost written out in float64 (`reference_cost`), found by brute force."""
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(8):
        Q, n, K = 4, 3, 3
        tgt = random_boxes(n, g)
        pred = (tgt[torch.randint(0, n, (Q,), generator=g)]
                + 0.03 * torch.randn(Q, 4, generator=g)).clamp(0.05, 0.95)
        outputs = {"pred_logits": 4 * torch.randn(1, Q, K, generator=g),
                   "pred_boxes": pred[None]}
        labels = torch.randint(0, K, (n,), generator=g)
        (q, t), = HungarianMatcher()(outputs, [{"labels": labels, "boxes": tgt}])
        C = reference_cost(outputs["pred_logits"][0], pred, labels, tgt)
        assert C[q, t].sum().item() == pytest.approx(brute_force_min(C).item(), abs=1e-6)


def test_every_decoder_layer_and_the_proposals_get_their_own_matching():
    """DETR / DINO match each set of predictions (the last layer, each auxiliary layer, the
    encoder's proposals) to the targets separately: here the last layer and the auxiliary layer
    both predict the two targets exactly (boxes, and logit +2 for the right class, -2 for the
    other), in opposite query orders, and the proposals in a third order; each set's own optimal
    matching makes every L1 and GIoU term 0 and the focal term (2 positives at +2, 4 negatives at
    -2, over 2 boxes) the same for every set."""
    from ivt.models.detr.criterion import SetCriterion
    gt = torch.tensor([[8.0, 8.0, 40.0, 24.0], [48.0, 32.0, 88.0, 60.0]])   # xyxy in 64 x 96
    norm = normalize_boxes(gt, (64, 96)).double()
    far = torch.tensor([[0.1, 0.9, 0.05, 0.05]], dtype=torch.float64)
    right = torch.tensor([[2.0, -2.0], [-2.0, 2.0]], dtype=torch.float64)   # labels 0 and 1
    none = torch.full((1, 2), -2.0, dtype=torch.float64)

    def preds(order, far_first=False):
        parts = [(none, far), (right[order], norm[order])]
        parts = parts if far_first else parts[::-1]
        return {"pred_logits": torch.cat([p[0] for p in parts])[None],
                "pred_boxes": torch.cat([p[1] for p in parts])[None]}

    outputs = dict(preds([0, 1]), aux_outputs=[preds([1, 0])], image_size=(64, 96),
                   enc_outputs=preds([1, 0], far_first=True))
    criterion = SetCriterion(2, HungarianMatcher(), {"cls": 1.0, "l1": 5.0, "giou": 2.0})
    losses = criterion(outputs, [{"boxes": gt, "labels": torch.tensor([0, 1])}])
    cls = (2 * focal_by_hand(2.0, 1.0) + 4 * focal_by_hand(-2.0, 0.0)) / 2
    for suffix in ("", "_0", "_enc"):
        assert losses[f"loss_cls{suffix}"].item() == pytest.approx(cls, rel=1e-5), suffix
        assert losses[f"loss_l1{suffix}"].item() == pytest.approx(0.0, abs=1e-6), suffix
        assert losses[f"loss_giou{suffix}"].item() == pytest.approx(0.0, abs=1e-6), suffix


def test_denoising_boxes_are_clamped_to_the_image():
    """DINO (dn_components.py: `known_bbox_ = known_bbox_.clamp(min=0.0, max=1.0)`): the noised
    corners are clamped to [0, 1] before going back to cxcywh, so a noised box never leaves the
    image. A box touching the left and top borders, box noise 1.0: some corners are pushed
    outside, yet every denoising box lies within the image (up to the logit clamp)."""
    torch.manual_seed(0)
    dn = Denoising(num_classes=2, dim=8, dn_number=50, label_noise_ratio=0.0, box_noise_scale=1.0)
    gt = torch.tensor([[0.1, 0.15, 0.2, 0.3]])                 # corners (0, 0, 0.2, 0.3)
    q = dn([{"labels": torch.tensor([1]), "boxes": gt}], num_queries=4)
    xyxy = box_cxcywh_to_xyxy(q.boxes_unact.sigmoid()[0])
    assert xyxy.min().item() >= -1e-6 and xyxy.max().item() <= 1 + 1e-6


def test_denoising_module_masks_whole_groups_of_positives_and_negatives():
    """DINO's mask from the module itself: a group is the 2 * max_n queries [n positives (padded),
    n negatives (padded)] of one noising round; inside a group every query sees every other
    (positives and negatives alike), groups do not see each other, and the matching queries do
    not see any denoising query (which may see them). Written out element by element."""
    torch.manual_seed(0)
    dn = Denoising(num_classes=3, dim=8, dn_number=4)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.2]])
    q = dn([{"labels": torch.tensor([0, 1]), "boxes": boxes},
            {"labels": torch.tensor([2]), "boxes": boxes[:1]}], num_queries=3)
    G, size, pad = 2, 4, 8                                        # 4 // 2 groups of 2 + 2
    assert q.meta == {"pad_size": pad, "num_groups": G, "group_size": size}
    want = torch.zeros(pad + 3, pad + 3, dtype=torch.bool)
    for i in range(pad + 3):
        for j in range(pad):
            want[i, j] = i >= pad or i // size != j // size
    assert torch.equal(q.attn_mask, want)


def test_query_selection_takes_the_best_valid_tokens_from_their_anchors():
    """Two-stage selection (Deformable DETR, DINO): the num_queries valid tokens with the highest
    class score (max over classes) are selected; with the box head at its zero init their
    proposals are their anchors: centre of the token's pixel ((j + .5) / W, (i + .5) / H), side
    0.05 * 2^level. Invalid anchors (a coordinate outside (0.01, 0.99): here the first and last
    rows of a 60-row level) are never selected, even when every valid token is needed."""
    torch.manual_seed(0)
    shapes = [(60, 4), (3, 5), (2, 2)]
    anchors, valid = [], []
    for lvl, (h, w) in enumerate(shapes):
        for i in range(h):
            for j in range(w):
                a = [(j + 0.5) / w, (i + 0.5) / h, 0.05 * 2 ** lvl, 0.05 * 2 ** lvl]
                anchors.append(a)
                valid.append(all(0.01 < v < 0.99 for v in a))
    anchors, valid = torch.tensor(anchors), torch.tensor(valid)
    S, K = len(anchors), 3
    memory = torch.randn(2, S, 16)
    for num_queries in (7, int(valid.sum())):
        qs = QuerySelection(16, K, num_queries)
        with torch.no_grad():
            qs.class_head.weight.normal_()
            token_logits = qs.class_head(qs.norm(qs.proj(memory)))          # (B, S, K)
            _, _, out = qs(memory, shapes)
        for b in range(2):
            score = token_logits[b].max(-1).values.masked_fill(~valid, -math.inf)
            want = set(score.argsort(descending=True)[:num_queries].tolist())
            picked = [int((token_logits[b] - lo).abs().sum(-1).argmin())
                      for lo in out["pred_logits"][b]]
            assert set(picked) == want
            torch.testing.assert_close(out["pred_boxes"][b], anchors[picked])


def test_deformable_attention_initial_offsets_are_deformable_detrs():
    """Deformable DETR's `_reset_parameters`: head h samples along (cos, sin)(2 pi h / M) scaled
    so that its larger coordinate is 1, point p at p + 1 times that, on every level; zero offset
    and attention weight matrices, zero attention bias. For M = 8 heads the directions are
    (1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)."""
    attn = MultiScaleDeformableAttention(dim=16, num_heads=8, num_levels=2, num_points=3)
    dirs = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    want = torch.tensor([[[[(p + 1) * dx, (p + 1) * dy] for p in range(3)] for _ in range(2)]
                         for dx, dy in dirs], dtype=torch.float32)
    torch.testing.assert_close(attn.sampling_offsets.bias.view(8, 2, 3, 2), want,
                               atol=1e-5, rtol=0)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    assert not attn.attention_weights.bias.any()


def relu_ffn(ffn, x):
    """DINO's FFN (post-norm, activation 'relu'): LN(x + W2 ReLU(W1 x + b1) + b2)."""
    hidden = (x @ ffn.net[0].weight.T + ffn.net[0].bias).clamp(min=0)
    return ffn.norm(x + hidden @ ffn.net[3].weight.T + ffn.net[3].bias)


def test_encoder_layer_and_reference_points_are_dinos():
    """DINO's DeformableTransformerEncoderLayer (post-norm): src = LN(src + MSDA(query = src +
    pos, reference, value = src)), then the ReLU FFN; each token's reference is its own pixel centre
    ((j + .5) / W_l, (i + .5) / H_l) (x first), the same on every level (no padding)."""
    from ivt.models.detr.encoder import token_reference_points
    shapes = [(2, 3), (1, 2)]
    ref = token_reference_points(shapes, 2, "cpu")
    pts = [[(j + 0.5) / w, (i + 0.5) / h] for h, w in shapes for i in range(h) for j in range(w)]
    want = torch.tensor(pts)[None, :, None, :].expand(2, -1, 2, -1)
    assert torch.equal(ref, want)

    torch.manual_seed(0)
    enc = build_encoder(DetectorConfig(num_classes=3, encoder="deformable", hidden_dim=8,
                                       num_heads=2, num_points=2, ffn_dim=16, enc_layers=1,
                                       num_feature_levels=2))
    layer = enc.layers[0]
    with torch.no_grad():                                # offsets that depend on the query
        layer.self_attn.sampling_offsets.weight.normal_(0, 0.5)
        layer.self_attn.attention_weights.weight.normal_(0, 0.5)
    src, pos = torch.randn(2, 8, 8), torch.randn(1, 8, 8)
    x = layer.norm(src + layer.self_attn(src + pos, want, src, shapes))
    torch.testing.assert_close(enc(src, pos, shapes), relu_ffn(layer.ffn, x))


def test_decoder_layer_is_dinos():
    """DINO's DeformableTransformerDecoderLayer (post-norm, order sa, ca, ffn): self-attention with
    q = k = tgt + query_pos and v = tgt, under the mask; deformable cross-attention with query
    tgt + query_pos around the reference box (cx, cy, w, h) on every level; then the ReLU FFN."""
    torch.manual_seed(0)
    decoder = build_decoder(tiny_config(num_feature_levels=2))
    layer = decoder.layers[0]
    with torch.no_grad():
        layer.cross_attn.sampling_offsets.weight.normal_(0, 0.5)
    shapes = [(6, 4), (3, 2)]
    memory, tgt, pos = torch.randn(1, 30, 32), torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    boxes = torch.rand(1, 5, 4) * 0.5 + 0.25
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[3:, :2] = True
    got = layer(tgt, pos, boxes, memory, shapes, mask)
    q = tgt + pos
    sa = layer.self_attn(q, q, tgt, attn_mask=mask, need_weights=False)[0]
    x = layer.norm1(tgt + sa)
    ref = boxes[:, :, None, :].expand(-1, -1, 2, -1)
    x = layer.norm2(x + layer.cross_attn(x + pos, ref, memory, shapes))
    torch.testing.assert_close(got, relu_ffn(layer.ffn, x))


def test_decoder_query_position_comes_from_the_current_reference_box():
    """DINO: each layer's query position is ref_point_head(gen_sineembed_for_position(reference))
    of the reference box that layer attends around (the previous layer's refined box)."""
    decoder, _, _, seen = run_decoder_recording_layers()
    pos1 = decoder.query_pos_head(box_position_embedding(seen["ref1"], 32))
    torch.testing.assert_close(seen["pos1"], pos1)


def test_hybrid_encoder_follows_rt_detrs_forward():
    """lyuwenyu/RT-DETR's HybridEncoder.forward, written out with the module's own blocks: AIFI
    on the last level; top-down, the running map passes its lateral conv (and replaces itself
    with that output), is upsampled x2 by nearest neighbour and fused as cat([up, finer]);
    bottom-up, the finest map is downsampled and fused as cat([down, top-down map]). Random BN
    statistics, so that no block is an identity in disguise."""
    torch.manual_seed(0)
    enc = HybridEncoder(num_levels=4, dim=8, num_heads=2, ffn_dim=16, dropout=0.0,
                        num_blocks=1).eval()
    with torch.no_grad():
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    feats = [torch.randn(1, 8, h, w) for h, w in SWIN_LEVELS["64x96"]]
    p = feats[:-1] + [enc.aifi(feats[-1])]
    inner = [p[-1]]
    for idx in range(3, 0, -1):
        high = enc.lateral[3 - idx](inner[0])
        inner[0] = high
        up = F.interpolate(high, scale_factor=2.0, mode="nearest")
        inner.insert(0, enc.fpn[3 - idx](torch.cat([up, p[idx - 1]], dim=1)))
    want = [inner[0]]
    for idx in range(3):
        down = enc.downsample[idx](want[-1])
        want.append(enc.pan[idx](torch.cat([down, inner[idx + 1]], dim=1)))
    with torch.no_grad():
        got = enc(feats)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_detector_wiring_of_levels_layers_and_denoising_targets():
    """Detector.forward's glue, against DINO: the deformable encoder's position of level l is
    the map embedding plus level_embed[l]; the denoising queries get the targets normalised by
    the input's (H, W) = (64, 96); aux_outputs (and the denoising ones) are the earlier decoder
    layers in order, the last layer being the main output, matching queries after the pad_size
    denoising ones; the decoder gets the denoising attention mask."""
    from ivt.models.detr.position_encoding import map_position_embedding
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(dec_layers=3), tuning="ivt").train()
    vis, ir, targets = batch()
    seen = {}
    model.encoder.register_forward_hook(lambda m, a, o: seen.update(pos=a[1], shapes=a[2]))
    model.denoising.register_forward_hook(lambda m, a, o: seen.update(dn_in=a[0], dn=o))
    model.decoder.register_forward_hook(lambda m, a, o: seen.update(mask=a[4], dec=o))
    with torch.no_grad():
        out = model(vis, ir, targets)
    pos = torch.cat([map_position_embedding(s, 32, "cpu") + model.level_embed[lvl]
                     for lvl, s in enumerate(seen["shapes"])])
    torch.testing.assert_close(seen["pos"][0], pos)
    x0, y0, x1, y1 = targets[0]["boxes"][0].tolist()
    torch.testing.assert_close(seen["dn_in"][0]["boxes"][0], torch.tensor(
        [(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W, (y1 - y0) / H]))
    assert torch.equal(seen["mask"], seen["dn"].attn_mask)
    pad = seen["dn"].meta["pad_size"]
    logits, boxes = seen["dec"]
    main = [out] + [out["aux_outputs"][i] for i in (1, 0)]
    dn = [out["dn_outputs"]] + [out["dn_outputs"]["aux_outputs"][i] for i in (1, 0)]
    assert len(out["aux_outputs"]) == len(out["dn_outputs"]["aux_outputs"]) == 2
    for layer, o, d in zip((2, 1, 0), main, dn):
        assert torch.equal(o["pred_logits"], logits[layer][:, pad:])
        assert torch.equal(o["pred_boxes"], boxes[layer][:, pad:])
        assert torch.equal(d["pred_logits"], logits[layer][:, :pad])
        assert torch.equal(d["pred_boxes"], boxes[layer][:, :pad])


def test_denoising_label_noise_draws_from_every_class():
    """DINO: a flipped label is `torch.randint_like(chosen_indice, 0, num_classes)`, uniform over
    all K classes. Every label 0 and ratio 1 (half of them flipped): each other class k makes
    about 1 / (2 K) = 1/8 of 4000 queries; all must occur (none would for a class left out)."""
    torch.manual_seed(0)
    K, n = 4, 500
    dn = Denoising(K, 16, dn_number=2000, label_noise_ratio=1.0, box_noise_scale=0.0)
    q = dn([{"labels": torch.zeros(n, dtype=torch.int64), "boxes": torch.rand(n, 4) * 0.5 + 0.25}],
           num_queries=10)
    got = torch.cdist(q.content[0], dn.label_embed.weight).argmin(-1)
    counts = torch.bincount(got, minlength=K).tolist()
    assert all(c > 0.1 * len(got) for c in counts[1:]), counts


def test_denoising_indices_point_at_each_targets_positive_queries():
    """The fixed assignment of the denoising loss, by hand for 2 groups of max_n = 3 (each group
    [3 positive slots, 3 negative slots]): an image with 2 targets gets queries 0, 1 (group 0) and
    6, 7 (group 1) for targets 0, 1, 0, 1. And it agrees with the module's layout: without noise
    the query at each pair holds its target's box and label embedding."""
    from ivt.models.detr.denoising import denoising_indices
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.6, 0.1, 0.2], [0.7, 0.4, 0.3, 0.1]])
    targets = [{"labels": torch.tensor([2, 0]), "boxes": boxes[1:]},
               {"labels": torch.tensor([1, 2, 0]), "boxes": boxes}]
    meta = {"pad_size": 12, "num_groups": 2, "group_size": 6}
    (q, t), _ = denoising_indices(meta, targets)
    assert q.tolist() == [0, 1, 6, 7] and t.tolist() == [0, 1, 0, 1]
    torch.manual_seed(0)
    dn = Denoising(num_classes=3, dim=8, dn_number=6, label_noise_ratio=0.0, box_noise_scale=0.0)
    out = dn(targets, num_queries=4)
    assert out.meta == meta
    for b, (q, t) in enumerate(denoising_indices(out.meta, targets)):
        torch.testing.assert_close(out.boxes_unact[b, q].sigmoid(), targets[b]["boxes"][t])
        torch.testing.assert_close(out.content[b, q], dn.label_embed(targets[b]["labels"][t]))


def test_box_heads_start_at_zero_and_mlps_are_detrs():
    """DINO zero-inits the last layer of each box head, weight AND bias (`nn.init.constant_(
    _bbox_embed.layers[-1].weight / .bias, 0)`), so a layer starts by keeping its reference box.
    DETR's MLP: Linear layers with ReLU between them, none after the last, written out."""
    from ivt.models.detr.decoder import MLP
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config())
    for head in (model.decoder.box_head, model.query_selection.box_head):
        assert not head.layers[-1].weight.any() and not head.layers[-1].bias.any()
    mlp = MLP(4, 8, 2, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    (w0, b0), (w1, b1), (w2, b2) = [(m.weight, m.bias) for m in mlp.layers]
    want = ((x @ w0.T + b0).clamp(min=0) @ w1.T + b1).clamp(min=0) @ w2.T + b2
    torch.testing.assert_close(mlp(x), want)


def test_zero_size_target_boxes_are_accepted():
    """The target contract is xyxy with x1 >= x0 and y1 >= y0: a zero-width or zero-height box
    (a clipped or degenerate annotation) is legal; only reversed corners are refused."""
    from ivt.models.detr.criterion import check_targets
    flat = {"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0], [1.0, 2.0, 4.0, 2.0]]),
            "labels": torch.tensor([0, 2])}
    check_targets([flat], 1, 3)
    with pytest.raises(ValueError, match="x1 >= x0"):
        check_targets([{"boxes": torch.tensor([[5.0, 5.0, 4.0, 9.0]]),
                        "labels": torch.tensor([0])}], 1, 3)


def test_predict_keeps_every_pair_when_the_model_has_fewer_than_max_dets():
    """DINO's post-processing takes the top min(num_select, Q * K) (query, class) pairs: with
    Q * K = 12 * 3 = 36 < 300 (the default max_dets) every pair comes back, best first."""
    torch.manual_seed(0)
    model = build_detector("swin_nano", tiny_config(), tuning="ivt").eval()
    vis, ir, _ = batch()
    for d in model.predict(vis, ir):
        assert d["scores"].shape == (36,) and torch.all(d["scores"][:-1] >= d["scores"][1:])

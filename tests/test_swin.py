"""Swin backbones with IV-tuning: parameter counts, forward/backward, checkpoints, input checks,
and the window attention against a brute-force float64 formulation."""
import re

import pytest
import torch
import torch.nn.functional as F

from ivt.models import VARIANTS, CheckpointError, build_backbone
from ivt.models.swin import PatchEmbed, PatchMerging, SwinBlock, checkpoint_filter_fn

# The paper's #TP for Swin-L (Tables 2 and 5), as the exact counts of the spec's table
# (../shared/spec/method.md, derived from the paper's modules), which round to the paper's
# printed millions (tests/test_summary.py compares ours with those printed values).
SWIN_L_COUNTS = [
    ({}, 6_062_788),
    (dict(variant="empg_only"), 15_172),
    (dict(variant="empg_ha"), 5_232_196),
    (dict(variant="mhsa_only"), 3_038_980),
    (dict(variant="ffn_only"), 3_038_980),
    (dict(variant="ipa_wo_projection"), 5_448_772),
    (dict(d2=16), 2_211_652),
    (dict(d2=32), 3_446_212),
    (dict(d1=16, d3=16), 6_645_768),
    (dict(d1=32, d3=32), 7_812_496),
    (dict(tuning="freeze"), 0),
]
SWIN_L_VISIBLE = 195_195_444   # + the classifier's final LayerNorm (3,072) = 195,198,516


def meta_backbone(name, **kw):
    with torch.device("meta"):
        return build_backbone(name, **kw)


def trainable(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("options,expected", SWIN_L_COUNTS)
def test_swin_l_trainable_parameters_match_paper(options, expected):
    assert trainable(meta_backbone("swin_l", **options)) == expected


def test_swin_l_full_trains_every_parameter():
    bb = meta_backbone("swin_l", tuning="full")
    total = sum(p.numel() for p in bb.parameters())
    assert total == SWIN_L_VISIBLE and trainable(bb) == total


def test_trainable_set_is_exactly_the_ivt_modules():
    bb = meta_backbone("swin_l")
    for name, p in bb.named_parameters():
        is_new = name.startswith(("ir_patch_embed.", "empg.")) or ".adapters." in name
        assert p.requires_grad == is_new, name
    assert sum(p.numel() for n, p in bb.named_parameters() if not p.requires_grad) == SWIN_L_VISIBLE


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_forward_backward(variant):
    torch.manual_seed(0)
    bb = build_backbone("swin_nano", variant=variant)
    for B, H, W in [(2, 48, 48), (1, 200, 328), (2, 35, 45)]:
        outs = bb(torch.randn(B, 3, H, W), torch.randn(B, 1, H, W))
        dims = [32, 64, 128, 256]
        grid = (-(-H // 4), -(-W // 4))
        for s, (o, c) in enumerate(zip(outs, dims)):
            assert o.shape == (B, c, *grid), (variant, s, o.shape)
            assert torch.isfinite(o).all()
            grid = (-(-grid[0] // 2), -(-grid[1] // 2))
        sum(o.pow(2).mean() for o in outs).backward()
        for name, p in bb.named_parameters():
            assert (p.grad is not None) == p.requires_grad, (variant, name)
            if p.grad is not None:
                assert torch.isfinite(p.grad).all()
        bb.zero_grad(set_to_none=True)


def test_swin_t_non_square_not_window_multiple():
    torch.manual_seed(0)
    bb = build_backbone("swin_t", layers=[0, 1, 2, 3, 10])
    outs = bb(torch.randn(1, 3, 200, 328), torch.randn(1, 3, 200, 328))
    assert [tuple(o.shape[1:]) for o in outs] == [(96, 50, 82), (192, 25, 41), (384, 13, 21),
                                                  (768, 7, 11)]
    outs[-1].sum().backward()
    assert all((p.grad is not None) == p.requires_grad for p in bb.parameters())


@pytest.mark.parametrize("tuning", ["full", "freeze"])
def test_visible_only_modes_ignore_infrared(tuning):
    bb = build_backbone("swin_nano", tuning=tuning).eval()
    x = torch.randn(1, 3, 32, 48)
    a, b = bb(x), bb(x, torch.randn(1, 3, 32, 48))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


# -- the wiring -------------------------------------------------------------------------------

def test_zero_prompt_and_adapters_reduce_to_the_frozen_model():
    """With P_E = 0, HA branches = 0 and IPA outputs = 0, IV-tuning is the visible model."""
    torch.manual_seed(0)
    vis_model = build_backbone("swin_nano", tuning="freeze").eval()
    ivt = build_backbone("swin_nano", tuning="ivt").eval()
    ivt.load_state_dict(vis_model.state_dict(), strict=False)
    with torch.no_grad():
        ivt.empg.s3.weight.zero_(); ivt.empg.s3.bias.zero_()
        for name, p in ivt.named_parameters():
            if re.search(r"\.ha\d\.up\.|\.ipa\d\.sft_out\.", name):
                p.zero_()
    x, ir = torch.randn(2, 3, 40, 56), torch.randn(2, 3, 40, 56)
    for a, b in zip(vis_model(x), ivt(x, ir)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the infrared changes the output once the prompt is live again
    with torch.no_grad():
        torch.nn.init.normal_(ivt.empg.s3.weight)
    assert not torch.allclose(vis_model(x)[0], ivt(x, ir)[0])


def test_external_prompt_per_stage():
    """Stage 1's IPAs see P_E; later stages' IPAs see the stage input after patch merging."""
    torch.manual_seed(0)
    bb = build_backbone("swin_nano").eval()
    seen, stage_inputs = {}, {}
    for i, stage in enumerate(bb.layers):
        for j, block in enumerate(stage.blocks):
            for k in (1, 2):
                getattr(block.adapters, f"ipa{k}").register_forward_hook(
                    lambda m, a, o, key=(i, j, k): seen.__setitem__(key, a[0].clone()))
        if stage.downsample is not None:
            stage.downsample.register_forward_hook(
                lambda m, a, o, i=i: stage_inputs.__setitem__(i, o[0].clone()))
    bb.empg.register_forward_hook(lambda m, a, o: stage_inputs.__setitem__(0, o.clone()))
    x = torch.randn(1, 3, 48, 64)
    bb(x, torch.randn(1, 3, 48, 64))
    assert len(seen) == 16
    for (i, j, k), p in seen.items():
        assert torch.equal(p, stage_inputs[i]), (i, j, k)


def test_ipa_deep_chains_prompts_within_a_stage():
    torch.manual_seed(0)
    bb = build_backbone("swin_nano", variant="ipa_deep").eval()
    calls = []
    for block in bb.layers[0].blocks:
        for ipa in (block.adapters.ipa1, block.adapters.ipa2):
            ipa.register_forward_hook(lambda m, a, o: calls.append((a[0].clone(), o.clone())))
    bb(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))
    for (_, prev_out), (next_in, _) in zip(calls, calls[1:]):
        assert torch.equal(prev_out, next_in)


def test_layers_option_places_adapters():
    bb = meta_backbone("swin_l", layers=[0, 5, 23])
    blocks = [b for s in bb.layers for b in s.blocks]
    assert [i for i, b in enumerate(blocks) if b.adapters is not None] == [0, 5, 23]
    with pytest.raises(ValueError, match="blocks 0..23"):
        meta_backbone("swin_l", layers=[24])
    with pytest.raises(ValueError, match="count from 0"):          # -1 would match no block
        meta_backbone("swin_l", layers=[3, -1])


def test_adapter_initialisation_is_not_zero():
    bb = build_backbone("swin_t", layers=[0])
    up = bb.layers[0].blocks[0].adapters.ha1.up.weight
    assert 0.015 < up.std().item() < 0.025


# -- window attention vs brute force ------------------------------------------------------------

def brute_force_window_attention(block: SwinBlock, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """Full attention over all tokens of the grid zero-padded at the bottom and right to
    multiples of the window (as the mmseg/mmdet Swin pads before it shifts), where token pairs
    outside the same (shifted) window, or from different regions of the cyclic shift, are
    excluded; bias from relative offsets. x: (H*W, C) normed tokens. Independent of
    partition/roll.

    Per axis, as timm decides it (`SwinTransformerBlock._calc_window_shift`): a side no larger
    than the window is one window of that side's size and is not shifted; a longer side has the
    full window and, in a shifted block, the shift w // 2. So a grid may be shifted along one
    axis only."""
    attn, w = block.attn, block.window_size
    heads, C = attn.num_heads, x.shape[1]
    image = (H, W)
    wh, ww = min(H, w), min(W, w)
    sh = w // 2 if block.shifted and H > w else 0
    sw = w // 2 if block.shifted and W > w else 0
    H, W = H + (-H) % wh, W + (-W) % ww
    x = F.pad(x.view(*image, C), (0, 0, 0, W - image[1], 0, H - image[0])).view(H * W, C)
    hh, ww_ = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    hh, ww_ = hh.flatten(), ww_.flatten()
    hs, ws = (hh - sh) % H, (ww_ - sw) % W                    # coordinates after the roll
    win = (hs // wh) * (W // ww) + ws // ww

    def region(c, n, size, s):
        return (c >= n - size).long() + (c >= n - s).long() if s else torch.zeros_like(c)
    reg = region(hs, H, wh, sh) * 3 + region(ws, W, ww, sw)
    allowed = (win[:, None] == win[None, :]) & (reg[:, None] == reg[None, :])
    dh = hs[:, None] - hs[None, :] + w - 1
    dw = ws[:, None] - ws[None, :] + w - 1
    bias = attn.relative_position_bias_table[(dh * (2 * w - 1) + dw).clamp(0, (2 * w - 1) ** 2 - 1)]
    qkv = attn.qkv(x).view(-1, 3, heads, C // heads).permute(1, 2, 0, 3)  # (3, h, N, d)
    logits = qkv[0] @ qkv[1].transpose(-1, -2) * attn.scale + bias.permute(2, 0, 1)
    logits = logits.masked_fill(~allowed, float("-inf"))
    out = (logits.softmax(-1) @ qkv[2]).transpose(0, 1).reshape(-1, C)
    return attn.proj(out).view(H, W, C)[:image[0], :image[1]].reshape(-1, C)


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("hw", [(8, 12), (12, 8), (16, 16), (9, 14), (13, 6), (4, 4),
                                (4, 12), (11, 3), (2, 9)])
def test_window_attention_matches_brute_force(shifted, hw, attention):
    torch.manual_seed(1)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shifted=shifted, mlp_ratio=2,
                      drop_path=0.0, attention=attention).double()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    H, W = hw
    x = torch.randn(1, H * W, 16, dtype=torch.float64)
    ours = block.window_attention(x, hw)[0]
    ref = brute_force_window_attention(block, x[0], H, W)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("tuning,options", [("full", {}), ("ivt", {"impl": "fast"}),
                                            ("vpt", {}), ("ivt", {"impl": "fast",
                                                                  "memory": "recompute"})])
def test_explicit_attention_equals_sdpa(tuning, options):
    """attention="math" (softmax(q k^T / sqrt(d) + bias) v, the bias broadcast over a batch of
    3) and the default "sdpa" are the same function: outputs and every gradient, the relative
    position tables' too where they train (full) and where the prompts join the keys (vpt)."""
    vis, ir = torch.randn(3, 3, 64, 48, dtype=torch.float64), torch.randn(3, 3, 64, 48,
                                                                          dtype=torch.float64)
    runs = []
    for attention in ("sdpa", "math"):
        torch.manual_seed(0)
        model = build_backbone("swin_nano", tuning=tuning, attention=attention,
                               drop_path_rate=0.0)
        if options:
            from ivt.fast import make_fast
            model = make_fast(model, options["impl"], options.get("memory", "keep"))
        model = model.double()
        for table in (m for n, m in model.named_parameters() if "relative_position" in n):
            torch.nn.init.normal_(table)
        outs = model(vis, ir)
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in outs).backward()
        runs.append((outs, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (outs_a, grads_a), (outs_b, grads_b) = runs
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert any("relative_position" in n for n in grads_a) == (tuning == "full")
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


def test_small_grid_uses_one_unshifted_window():
    """A grid no larger than the window in both dimensions is plain attention with its bias,
    read from the (2w - 1)^2 table at the tokens' row and column offsets (a 3 x 5 grid: rows and
    columns told apart). The table is random: a block made alone starts with a zero table, which
    would hide which entries are read."""
    torch.manual_seed(2)
    block = SwinBlock(dim=8, num_heads=2, window_size=7, shifted=True, mlp_ratio=2,
                      drop_path=0.0).double()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    x = torch.randn(1, 15, 8, dtype=torch.float64)
    ours = block.window_attention(x, (3, 5))[0]
    attn = block.attn
    qkv = attn.qkv(x[0]).view(15, 3, 2, 4).permute(1, 2, 0, 3)
    hh, ww = torch.meshgrid(torch.arange(3), torch.arange(5), indexing="ij")
    hh, ww = hh.flatten(), ww.flatten()
    idx = (hh[:, None] - hh[None, :] + 6) * 13 + (ww[:, None] - ww[None, :] + 6)
    logits = qkv[0] @ qkv[1].transpose(-1, -2) * attn.scale + \
        attn.relative_position_bias_table[idx].permute(2, 0, 1)
    ref = attn.proj((logits.softmax(-1) @ qkv[2]).transpose(0, 1).reshape(15, 8))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_patch_embedding_pads_the_image_at_the_bottom_and_right():
    """An image whose sides are not multiples of the patch is zero-padded at the bottom and
    right (the Swin release's and mmseg's PatchEmbed), so pixel (0, 0) stays in the top-left
    corner of patch (0, 0): a 10 x 13 image is embedded as the 12 x 16 image that has it in its
    top-left corner and zeros elsewhere."""
    torch.manual_seed(4)
    embed = PatchEmbed(8, 4).double()
    x = torch.randn(1, 3, 10, 13, dtype=torch.float64)
    padded = torch.zeros(1, 3, 12, 16, dtype=torch.float64)
    padded[:, :, :10, :13] = x
    tokens, hw = embed(x)
    assert hw == (3, 4)
    want = F.conv2d(padded, embed.proj.weight, embed.proj.bias, stride=4)    # (1, 8, 3, 4)
    want = embed.norm(want.flatten(2).transpose(1, 2))
    torch.testing.assert_close(tokens, want, rtol=1e-12, atol=1e-12)


def test_patch_merging_pads_odd_grids_at_the_bottom_and_right_in_release_order():
    """Patch merging as the Swin release writes it: the (H, W) grid zero-padded at the bottom and
    right to even sides, then x0 = x[0::2, 0::2], x1 = x[1::2, 0::2], x2 = x[0::2, 1::2],
    x3 = x[1::2, 1::2] concatenated on channels, LayerNorm, Linear 4C -> 2C. On a 5 x 7 grid,
    so both the order and the side of the padding show."""
    torch.manual_seed(5)
    merge = PatchMerging(4).double()
    torch.nn.init.normal_(merge.norm.weight)
    torch.nn.init.normal_(merge.norm.bias)
    z = torch.randn(2, 5 * 7, 4, dtype=torch.float64)
    out, hw = merge(z, (5, 7))
    assert hw == (3, 4)
    grid = torch.zeros(2, 6, 8, 4, dtype=torch.float64)
    grid[:, :5, :7] = z.view(2, 5, 7, 4)
    x = torch.cat([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2],
                   grid[:, 1::2, 1::2]], dim=-1)                              # (2, 3, 4, 16)
    want = merge.reduction(F.layer_norm(x, (16,), merge.norm.weight, merge.norm.bias))
    torch.testing.assert_close(out, want.reshape(2, 12, 8), rtol=1e-12, atol=1e-12)


# -- checkpoints --------------------------------------------------------------------------------

def _to_original_layout(sd):
    """timm layout -> the original release's: downsample at the end of the previous stage,
    stored buffers, classifier head and final norm."""
    out = {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    for k in list(out):
        if k.endswith("relative_position_bias_table"):
            out[k.replace("bias_table", "index")] = torch.zeros(4, dtype=torch.long)
    out["layers.0.blocks.1.attn_mask"] = torch.zeros(2, 2)
    out["norm.weight"], out["norm.bias"] = torch.ones(3), torch.zeros(3)
    out["head.weight"], out["head.bias"] = torch.zeros(5, 3), torch.zeros(5)
    return out


def _random_visible_state(name, compact=False):
    """Random weights for `name`'s visible model. compact: every tensor is a broadcast view of
    one random row, so torch.save stores a few KB even for Swin-L."""
    torch.manual_seed(3)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_backbone(name, tuning="freeze").state_dict().items()}
    if compact:
        return {k: torch.randn(s[-1]).expand(s) for k, s in shapes.items()}
    return {k: torch.randn(s) * 0.02 for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["swin_t", "swin_l"])
def test_both_checkpoint_layouts_load(name, tmp_path):
    sd = _random_visible_state(name, compact=name == "swin_l")
    files = {"original.pth": {"model": _to_original_layout(sd)}, "timm.pth": sd}
    for fname, obj in files.items():
        torch.save(obj, tmp_path / fname)
    if name == "swin_t":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "timm.safetensors"))
    bb = build_backbone(name, tuning="ivt")
    for f in sorted(tmp_path.iterdir()):
        for p in bb.parameters():
            p.data.zero_()
        bb.load_pretrained(str(f))
        own = bb.state_dict()
        for k, v in sd.items():
            assert torch.equal(own[k], v), (f.name, k)
        assert trainable(bb) > 0 and not any(p.requires_grad for n, p in bb.named_parameters()
                                             if not bb.is_added_name(n))


def test_relative_position_table_is_resized_for_another_window(tmp_path):
    """Every block's table is resized as the Swin release's `load_pretrained` does (utils.py):
    the (L, heads) table viewed as (1, heads, S, S), `F.interpolate(size=(2w - 1, 2w - 1),
    mode='bicubic')` (align_corners False), viewed back; here on random tables, in float64."""
    sd = _random_visible_state("swin_t")            # window 7: 13x13 tables
    torch.save({"model": _to_original_layout(sd)}, tmp_path / "w7.pth")
    bb = build_backbone("swin_t", tuning="freeze", window_size=12,
                        pretrained=str(tmp_path / "w7.pth"))
    table = bb.layers[0].blocks[0].attn.relative_position_bias_table
    assert table.shape == (23 * 23, 3)
    own, n = bb.state_dict(), 0
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table"):
            heads = v.shape[1]
            ref = F.interpolate(v.double().permute(1, 0).reshape(1, heads, 13, 13), size=(23, 23),
                                mode="bicubic", align_corners=False)
            torch.testing.assert_close(own[k].double(), ref.reshape(heads, 23 * 23).permute(1, 0),
                                       rtol=1e-5, atol=1e-7, msg=lambda m, k=k: f"{k}: {m}")
            n += 1
    assert n == 12
    # bicubic resize keeps a constant table constant
    const = checkpoint_filter_fn({"layers.0.blocks.0.attn.relative_position_bias_table":
                                  torch.full((169, 3), 0.5)}, 12)
    torch.testing.assert_close(const["layers.0.blocks.0.attn.relative_position_bias_table"],
                               torch.full((529, 3), 0.5))


def test_drop_path_rates_rise_linearly_over_all_blocks():
    """Stochastic depth as the Swin release (and timm's SwinTransformer) sets it:
    `dpr = [x.item() for x in torch.linspace(0, drop_path_rate, sum(depths))]`, stage i taking
    dpr[sum(depths[:i]):sum(depths[:i + 1])]: 0 at the first block, the rate at the last."""
    bb = build_backbone("swin_nano", tuning="freeze", drop_path_rate=0.3)
    rates = [blk.drop_path.p for stage in bb.layers for blk in stage.blocks]
    assert len(rates) == 8                          # depths (2, 2, 2, 2)
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64),
                               torch.linspace(0, 0.3, 8, dtype=torch.float64))


def test_drop_path_keeps_or_drops_each_sample_whole_and_rescales_the_kept():
    """Stochastic depth (Huang et al. 2016, as timm's drop_path): in training each sample's
    branch is either 0 or x / (1 - p), with probability 1 - p of being kept, and its gradient is
    the same per-sample factor; in eval it is the identity."""
    from ivt.models.swin import DropPath
    p, batch = 0.3, 4000
    drop = DropPath(p).train()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 5, dtype=torch.float64, requires_grad=True)
    y = drop(x)
    kept = y.detach().flatten(1).ne(0).any(1)
    expected = torch.where(kept[:, None, None], x.detach() / (1 - p), torch.zeros_like(x))
    torch.testing.assert_close(y.detach(), expected, rtol=1e-15, atol=0)
    assert abs(kept.double().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / batch) ** 0.5)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (expected != 0).double() / (1 - p), rtol=1e-15, atol=0)
    assert drop.eval()(x) is x


def test_wrong_model_checkpoint_names_the_keys(tmp_path):
    torch.save(_random_visible_state("swin_t"), tmp_path / "t.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(\d+\): layers\.2\.blocks\.10\."):
        build_backbone("swin_s", pretrained=str(tmp_path / "t.pth"))
    sd = _random_visible_state("swin_t")
    sd["layers.0.blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError,
                       match=r"unexpected keys \(1\): layers\.0\.blocks\.0\.attn\.extra"):
        build_backbone("swin_t", pretrained=str(tmp_path / "extra.pth"))


def test_shape_mismatch_names_the_keys(tmp_path):
    bb = build_backbone("swin_nano", tuning="freeze")
    sd = dict(bb.state_dict())
    sd["layers.1.downsample.reduction.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"layers\.1\.downsample\.reduction\.weight: "
                                              r"checkpoint \(3, 3\) vs model \(64, 128\)"):
        bb.load_pretrained(str(tmp_path / "wide.pth"))


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "swin_large_patch4_window12_384_22k.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        build_backbone("swin_t", pretrained=str(missing))


def test_unreadable_checkpoint_is_reported(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.pth"):
        build_backbone("swin_t", pretrained=str(bad))


# -- bad input ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def nano():
    return build_backbone("swin_nano")


def test_ir_missing_is_an_error(nano):
    with pytest.raises(ValueError, match="needs the infrared image"):
        nano(torch.randn(1, 3, 32, 32))


def test_one_channel_thermal_image_is_repeated_to_three():
    """A (B, 1, H, W) thermal image is the (B, 3, H, W) one with its channel repeated (spec
    sec. 1, IR patch embedding), for IV-tuning and for a PETL method's IR patch embedding."""
    torch.manual_seed(0)
    x, ir = torch.randn(2, 3, 24, 40), torch.randn(2, 1, 24, 40)
    for tuning in ("ivt", "adaptformer"):
        bb = build_backbone("swin_nano", tuning=tuning).eval()
        with torch.no_grad():
            for a, b in zip(bb(x, ir), bb(x, ir.repeat(1, 3, 1, 1))):
                assert torch.equal(a, b), tuning


def test_ir_missing_variant_uses_visible():
    bb = build_backbone("swin_nano", variant="ir_missing")
    assert len(bb(torch.randn(1, 3, 64, 64))) == 4


@pytest.mark.parametrize("vis,ir,message", [
    ((1, 3, 32, 32), (1, 3, 32, 48), "same batch size and spatial size"),
    ((1, 3, 32, 32), (2, 3, 32, 32), "same batch size and spatial size"),
    ((1, 4, 32, 32), (1, 3, 32, 32), r"vis must be a \(B, 3, H, W\) tensor, got \(1, 4, 32, 32\)"),
    ((1, 3, 32, 32), (1, 2, 32, 32),
     r"ir must be a \(B, 1 or 3, H, W\) tensor, got \(1, 2, 32, 32\)"),
    ((3, 32, 32), (1, 3, 32, 32), r"vis must be a \(B, 3, H, W\) tensor, got \(3, 32, 32\)"),
])
def test_bad_inputs_fail_clearly(nano, vis, ir, message):
    with pytest.raises(ValueError, match=message):
        nano(torch.randn(*vis), torch.randn(*ir))


def test_bad_build_options():
    with pytest.raises(ValueError, match="unknown backbone 'swin_xl'"):
        build_backbone("swin_xl")
    with pytest.raises(ValueError, match="unknown IV-tuning variant 'deep'"):
        build_backbone("swin_nano", variant="deep")
    with pytest.raises(ValueError, match="tuning must be one of"):
        build_backbone("swin_nano", tuning="lora")
    with pytest.raises(ValueError, match="attention='flash': expected one of sdpa, math"):
        build_backbone("swin_nano", attention="flash")
    with pytest.raises(ValueError, match="only apply to tuning='ivt'"):
        build_backbone("swin_nano", tuning="full", d2=16)


# -- mmseg's and mmdet's per-output LayerNorms -----------------------------------------------------
def test_out_norms_layer_normalise_each_stage_output():
    """out_norms=True: each output map is the plain model's, LayerNorm-ed over its channels at
    every position (eps 1e-5) with that level's own affine; written out in float64."""
    torch.manual_seed(0)
    plain = build_backbone("swin_nano", tuning="ivt")
    normed = build_backbone("swin_nano", tuning="ivt", out_norms=True)
    missing, unexpected = normed.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == [f"out_norms.{i}.{p}" for i in range(4) for p in ("bias", "weight")]
    assert not unexpected
    with torch.no_grad():
        for norm in normed.out_norms:
            norm.weight.normal_()
            norm.bias.normal_()
    vis, ir = torch.randn(1, 3, 64, 96), torch.randn(1, 3, 64, 96)
    for x, y, norm in zip(plain.eval()(vis, ir), normed.eval()(vis, ir), normed.out_norms):
        x = x.double()
        mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
        w, b = norm.weight.double()[:, None, None], norm.bias.double()[:, None, None]
        torch.testing.assert_close(y.double(), (x - mean) / (var + 1e-5).sqrt() * w + b,
                                   rtol=1e-4, atol=1e-4)


def test_out_norms_belong_to_the_visible_model(tmp_path):
    """Frozen unless tuning='full'; a classification checkpoint, which has none, leaves them at
    LayerNorm's (1, 0); taps='release' reads maps they do not apply to."""
    for tuning in ("ivt", "freeze", "vpt"):
        model = build_backbone("swin_nano", tuning=tuning, out_norms=True)
        assert not any(p.requires_grad for p in model.out_norms.parameters()), tuning
    assert all(p.requires_grad for p in build_backbone("swin_nano", tuning="full",
                                                       out_norms=True).out_norms.parameters())
    sd = _random_visible_state("swin_nano")
    torch.save({"model": _to_original_layout(sd)}, tmp_path / "release.pth")
    model = build_backbone("swin_nano", out_norms=True, pretrained=str(tmp_path / "release.pth"))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    for norm in model.out_norms:
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))
        assert torch.equal(norm.bias, torch.zeros_like(norm.bias))
    with pytest.raises(ValueError, match="out_norms"):
        build_backbone("swin_nano", out_norms=True, taps="release")


def test_segmentation_and_detection_build_the_mmlab_swin():
    from ivt.models.detr import DetectorConfig, build_detector
    from ivt.models.segmentor import build_segmentor
    assert build_segmentor("swin_nano", 9).backbone.out_norms is not None
    assert build_segmentor("swin_nano", 9, out_norms=False).backbone.out_norms is None
    assert build_detector("swin_nano", DetectorConfig(num_classes=6)).backbone.out_norms is not None
    assert not hasattr(build_segmentor("eva02_b", 9, img_size=32).backbone, "out_norms")


def test_cached_attention_bias_is_the_position_bias_in_the_dtype_asked_for():
    """With the bias table frozen (no grad), `attention_bias` is cached; asked in float32 and
    then in bfloat16 for the same window, each answer has the dtype asked for, and both are the
    relative position bias written out by hand: bias[h, i, j] = table[(yi - yj + w - 1) *
    (2w - 1) + (xi - xj + w - 1), h] for tokens i, j of a w x w window in row-major order."""
    from ivt.models.swin import WindowAttention
    torch.manual_seed(0)
    w, heads = 3, 2
    attn = WindowAttention(8, heads, w)
    torch.nn.init.normal_(attn.relative_position_bias_table)
    table = attn.relative_position_bias_table.detach()
    coords = [(y, x) for y in range(w) for x in range(w)]
    want = torch.empty(heads, w * w, w * w)
    for i, (yi, xi) in enumerate(coords):
        for j, (yj, xj) in enumerate(coords):
            want[:, i, j] = table[(yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)]
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16, torch.float32):
            bias = attn.attention_bias((w, w), None, None, dtype)
            assert bias.dtype == dtype and bias.shape == (1, heads, w * w, w * w)
            assert torch.equal(bias[0], want.to(dtype))

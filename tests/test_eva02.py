"""EVA02 backbone: parameter counts (Tab. 5), IV-tuning wiring, every variant forward/backward,
checkpoint layouts (original release and timm, patch 14 into patch 16). Tiny configurations keep
this CPU-only file fast; EVA02-L is built on the meta device, EVA02-B once on the CPU."""
import math
import re

import pytest
import torch
from safetensors.torch import save_file

from ivt.models import (BACKBONES, CheckpointError, build_backbone, count_parameters,
                        normalization_for)
from ivt.models.eva02 import (EVA02Backbone, EVA02Config, apply_rope, eva_patch_conversion,
                              feature_blocks, rope_sin_cos)
from ivt.models.ivtuning import VARIANTS, IVTConfig


def tiny(tuning="ivt", patch=16, img=64, depth=4, **ivt_options):
    cfg = EVA02Config(embed_dim=64, depth=depth, num_heads=2, mlp_hidden=int(64 * 4 * 2 / 3),
                      patch_size=patch, img_size=(img, img) if isinstance(img, int) else img)
    return EVA02Backbone("tiny", cfg, tuning, IVTConfig(**ivt_options) if tuning == "ivt" else None)


def randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def visible_state(model, extra=None):
    sd = {k: v.clone() for k, v in model.state_dict().items() if not model.is_added_name(k)}
    return {**sd, **(extra or {})}


def to_original_layout(sd):
    """timm names -> the EVA02 release's names, with its leftovers and stored rope buffers."""
    out = {}
    for k, v in sd.items():
        k = (k.replace(".mlp.norm.", ".mlp.ffn_ln.").replace(".mlp.fc1_g.", ".mlp.w1.")
              .replace(".mlp.fc1_x.", ".mlp.w2.").replace(".mlp.fc2.", ".mlp.w3.")
              .replace(".attn.q_proj.bias", ".attn.q_bias")
              .replace(".attn.v_proj.bias", ".attn.v_bias"))
        out[k] = v
    C = sd["cls_token"].shape[-1]
    n = sd["pos_embed"].shape[1] - 1
    out.update({"mask_token": torch.zeros(1, 1, C), "lm_head.weight": torch.zeros(10, C),
                "lm_head.bias": torch.zeros(10), "norm.weight": torch.ones(C),
                "norm.bias": torch.zeros(C),
                "rope.freqs_cos": torch.zeros(n, 32), "rope.freqs_sin": torch.zeros(n, 32),
                "blocks.0.attn.rope.freqs_cos": torch.zeros(n, 32)})
    return out


# -- sizes and counts ---------------------------------------------------------------------------
def test_registered_and_feature_blocks():
    assert "eva02_b" in BACKBONES and "eva02_l" in BACKBONES
    assert feature_blocks(24) == [7, 11, 15, 23]          # blocks 8, 12, 16, 24 (1-based)
    assert feature_blocks(12) == [3, 5, 7, 11]


def test_eva02_l_parameter_counts():
    """Spec sec. 3: 336,848 per layer x 24 + IR patch embed 787,456 + EMPG 25,796 + LN 2,048."""
    with torch.device("meta"):
        ivt = build_backbone("eva02_l", tuning="ivt", img_size=512)
        first10 = build_backbone("eva02_l", tuning="ivt", img_size=512, layers=range(10))
        frozen = build_backbone("eva02_l", tuning="freeze", img_size=512)
    assert count_parameters(ivt, trainable_only=True) == 8_899_652
    assert count_parameters(ivt.blocks[0].adapters) == 336_848
    assert count_parameters(ivt.ir_patch_embed) == 787_456
    assert count_parameters(ivt.empg) == 25_796 + 2_048
    assert count_parameters(first10, trainable_only=True) == 4_183_780
    assert count_parameters(frozen, trainable_only=True) == 0
    assert count_parameters(frozen) == 304_237_504       # the paper's 304.24M: EVA02-L at 512
    assert ivt.blocks[0].mlp.fc1_g.out_features == 2730 and ivt.pos_embed.shape == (1, 1025, 1024)
    assert ivt.out_channels == [1024] * 4 and ivt.out_strides == [4, 8, 16, 32]


def test_eva02_l_meta_forward_shapes():
    with torch.device("meta"):
        model = build_backbone("eva02_l", tuning="ivt", img_size=512)
        outs = model(torch.empty(1, 3, 224, 224), torch.empty(1, 1, 224, 224))
    assert [tuple(o.shape) for o in outs] == [(1, 1024, 56, 56), (1, 1024, 28, 28),
                                              (1, 1024, 14, 14), (1, 1024, 7, 7)]


def test_eva02_b_layers_subset_forward_backward():
    model = build_backbone("eva02_b", tuning="ivt", layers=[0, 6, 11], img_size=(64, 96))
    assert model.blocks[0].mlp.fc1_g.out_features == 2048
    assert [b.adapters is not None for b in model.blocks].count(True) == 3
    vis, ir = torch.randn(2, 3, 48, 80), torch.randn(2, 1, 48, 80)   # 3 x 5 grid, pos embed resized
    outs = model(vis, ir)
    assert [tuple(o.shape) for o in outs] == [(2, 768, 12, 20), (2, 768, 6, 10), (2, 768, 3, 5),
                                              (2, 768, 2, 3)]
    sum(o.square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


def test_inputs_are_normalised_with_openai_clip_statistics():
    """EVA02 was pre-trained on inputs normalised with OpenAI CLIP's mean and std (the EVA
    release's OPENAI_DATASET_MEAN/STD, timm's `eva02_*.mim_*` pretrained_cfg), Swin with
    ImageNet's: the published constants, written out."""
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for name in ("eva02_b", "eva02_l"):
        norm = normalization_for(name)
        assert norm.mean == pytest.approx(clip_mean) and norm.std == pytest.approx(clip_std)
    norm = normalization_for("swin_l")
    assert norm.mean == pytest.approx((0.485, 0.456, 0.406))
    assert norm.std == pytest.approx((0.229, 0.224, 0.225))


# -- rotary embedding ---------------------------------------------------------------------------
def test_rope_layout_and_relative_positions():
    sin, cos = rope_sin_cos((16, 16), 64)
    assert sin.shape == (256, 64)
    # token (i, j): first half row angles i * f_k, second half column angles j * f_k, pairs repeated
    f = 1.0 / 10000 ** (torch.arange(16) / 16)
    i, j = 3, 5
    expected = torch.cat([i * f, j * f]).repeat_interleave(2)
    assert torch.allclose(torch.atan2(sin[i * 16 + j], cos[i * 16 + j]),
                          torch.atan2(expected.sin(), expected.cos()), atol=1e-5)
    # on the reference grid the rotated dot product depends only on the offset between tokens
    q, k = torch.randn(64), torch.randn(64)
    rq, rk = apply_rope(q.expand(256, 64), sin, cos), apply_rope(k.expand(256, 64), sin, cos)
    dot = lambda a, b: (rq[a] * rk[b]).sum()              # noqa: E731
    assert torch.allclose(dot(0 * 16 + 0, 2 * 16 + 3), dot(5 * 16 + 7, 7 * 16 + 10), atol=1e-4)
    # other grids are scaled onto the reference grid: a 32-grid's row 2 is the 16-grid's row 1
    sin32, _ = rope_sin_cos((32, 8), 64)
    assert torch.allclose(sin32[2 * 8, :32], sin[1 * 16, :32], atol=1e-6)


def test_released_sizes_rotate_on_the_reference_grid_of_16():
    """EVA02-B/L as built: token (i, j) of an (H, W) grid is rotated by the angles
    [i / H * 16 * f_k, j / W * 16 * f_k], f_k = 10000^(-k / (d/4)), k < d/4 (head dim d = 64),
    each repeated for its interleaved pair: positions scaled onto the 16 x 16 pre-training grid
    (224 / 14), as the EVA02 release's VisionRotaryEmbeddingFast and timm's `ref_feat_shape`.
    Written out here in float64, on a non-square grid."""
    f = 1.0 / 10000 ** (torch.arange(16, dtype=torch.float64) / 16)
    for name in ("eva02_b", "eva02_l"):
        with torch.device("meta"):
            model = build_backbone(name, tuning="ivt")
        sin, cos = model.rope_tables((8, 24), torch.device("cpu"))
        assert sin.shape == (8 * 24, 64)
        for i, j in ((3, 5), (7, 23), (1, 12)):
            angles = torch.cat([i / 8 * 16 * f, j / 24 * 16 * f]).repeat_interleave(2)
            torch.testing.assert_close(sin[i * 24 + j].double(), angles.sin(), rtol=0, atol=1e-5)
            torch.testing.assert_close(cos[i * 24 + j].double(), angles.cos(), rtol=0, atol=1e-5)


def test_visible_layer_norms_have_eps_1e_6():
    """Every LayerNorm of the visible EVA02 (each block's norm1, norm2 and the SwiGLU's subln
    norm) uses eps 1e-6 (spec sec. 5, timm's Eva, the EVA02 release); the IV-tuning modules keep
    PyTorch's 1e-5 (spec sec. 1, SFT). A tiny model's golden outputs are too close to tell
    1e-5 from 1e-6, so the modules are read."""
    for name in ("eva02_b", "eva02_l"):
        with torch.device("meta"):
            model = build_backbone(name, tuning="ivt")
        norms = {n: m.eps for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        visible = {n: eps for n, eps in norms.items() if not model.is_added_name(n)}
        assert len(visible) == 3 * model.cfg.depth
        assert set(visible.values()) == {1e-6}, visible
        assert {eps for n, eps in norms.items() if model.is_added_name(n)} == {1e-5}


# -- every variant, square and non-square ---------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_forward_backward(variant):
    torch.manual_seed(0)
    model = tiny(variant=variant).train()
    for H, W in ((64, 64), (48, 80), (16, 16)):
        vis, ir = torch.randn(2, 3, H, W), torch.randn(2, 1, H, W)
        outs = model(vis, None if variant == "ir_missing" else ir)
        h, w = H // 16, W // 16
        assert [tuple(o.shape) for o in outs] == [(2, 64, 4 * h, 4 * w), (2, 64, 2 * h, 2 * w),
                                                  (2, 64, h, w), (2, 64, math.ceil(h / 2),
                                                                     math.ceil(w / 2))]
        assert all(torch.isfinite(o).all() for o in outs)
        model.zero_grad(set_to_none=True)
        sum(o.square().mean() for o in outs).backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == p.requires_grad, (variant, (H, W), name)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= {"ir_patch_embed", "empg", "blocks"}


@pytest.mark.parametrize("tuning", ["full", "freeze"])
def test_visible_only_tunings(tuning):
    model = tiny(tuning)
    outs = model(torch.randn(2, 3, 32, 48))
    assert [tuple(o.shape) for o in outs][2] == (2, 64, 2, 3)
    if tuning == "full":
        sum(o.mean() for o in outs).backward()
        assert all(p.grad is not None for p in model.parameters())
    else:
        assert not any(p.requires_grad for p in model.parameters())


def test_input_checks():
    model = tiny()
    with pytest.raises(ValueError, match="multiples of the patch"):
        model(torch.randn(1, 3, 40, 64), torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="infrared"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="blocks 0..3"):
        tiny(layers=[4])


# -- IV-tuning wiring -----------------------------------------------------------------------------
def test_silenced_adapters_give_the_visible_model():
    """With zero up-projections and a zero EMPG output, IV-tuning must reproduce the frozen model:
    the adapters touch patch tokens only and the prompt enters before cls and position embedding."""
    ivt = randomize(tiny()).eval()
    with torch.no_grad():
        silenced = [ivt.empg.s3] + [m for b in ivt.blocks for m in (
            b.adapters.ha1.up, b.adapters.ha2.up, b.adapters.ipa1.up, b.adapters.ipa2.up)]
        for linear in silenced:
            linear.weight.zero_()
            linear.bias.zero_()
        for b in ivt.blocks:
            b.adapters.ipa1.sft_out.beta.zero_()                   # IPA = gelu(0 * gamma + 0)
            b.adapters.ipa2.sft_out.beta.zero_()
    frozen = tiny("freeze")
    frozen.load_state_dict(visible_state(ivt))
    frozen.eval()
    vis, ir = torch.randn(2, 3, 48, 64), torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        for a, b in zip(ivt(vis, ir), frozen(vis)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("variant", ["ivt", "ipa_deep"])
def test_external_prompt_per_block(variant):
    """Block 0 gets P_E; block l > 0 its input tokens without cls (ivt), or the previous IPA's
    output (ipa_deep, Fig. 4(e))."""
    model = tiny(variant=variant).eval()
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = (args, output)
        return hook

    model.empg.register_forward_hook(record("empg"))
    for i, b in enumerate(model.blocks):
        b.register_forward_hook(record(f"block{i}"))
        b.adapters.ipa1.register_forward_hook(record(f"ipa1_{i}"))
        b.adapters.ipa2.register_forward_hook(record(f"ipa2_{i}"))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 48), torch.randn(2, 3, 32, 48))
    assert torch.equal(seen["ipa1_0"][0][0], seen["empg"][1])
    for i in range(1, len(model.blocks)):
        prompt = seen[f"ipa1_{i}"][0][0]
        if variant == "ipa_deep":
            assert torch.equal(prompt, seen[f"ipa2_{i - 1}"][1])
            assert torch.equal(seen[f"ipa2_{i}"][0][0], seen[f"ipa1_{i}"][1])
        else:
            block_input = seen[f"block{i - 1}"][1][0]           # previous block's output
            assert torch.equal(prompt, block_input[:, 1:])
            assert torch.equal(seen[f"ipa2_{i}"][0][0], prompt)


# -- checkpoints ----------------------------------------------------------------------------------
def plain_bicubic(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of Keys' cubic convolution (a = -0.75), half-pixel centres
    (align_corners=False), border samples repeated: the published definition of the plain bicubic
    resize that EVA's `interpolate_patch_14to16.py` and the authors' loaders call."""
    def w(d):
        d = abs(d)
        if d <= 1:
            return (1.25 * d - 2.25) * d * d + 1
        return ((-0.75 * d + 3.75) * d - 6) * d + 3 if d < 2 else 0.0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        x0 = math.floor(x)
        for k in range(x0 - 1, x0 + 3):
            m[i, min(max(k, 0), n_in - 1)] += w(x - k)
    return m


def resize2d(grid: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(..., h, w) -> (..., H, W) by separable matrices (H, h) and (W, w), in float64."""
    return rows @ grid.double() @ cols.T


def test_eva_patch_conversion_is_evas_plain_bicubic():
    """EVA's 14 -> 16 tool, written out: kernel and position grid resampled by Keys' bicubic."""
    w14 = torch.randn(8, 3, 14, 14)
    pos = torch.randn(1, 1 + 16 * 16, 8)
    out = eva_patch_conversion({"patch_embed.proj.weight": w14, "pos_embed": pos}, 16)
    k = plain_bicubic(14, 16)
    torch.testing.assert_close(out["patch_embed.proj.weight"].double(), resize2d(w14, k, k),
                               rtol=1e-5, atol=1e-5)
    g = plain_bicubic(16, 32)
    grid = pos[0, 1:].reshape(16, 16, 8).permute(2, 0, 1)
    want = resize2d(grid, g, g).permute(1, 2, 0).reshape(1, 32 * 32, 8)
    assert out["pos_embed"].shape == (1, 1 + 32 * 32, 8)
    torch.testing.assert_close(out["pos_embed"][:, 1:].double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["pos_embed"][:, 0], pos[:, 0])
    # an image resample of the kernel: a flat patch's token grows by about (16/14)^2
    flat14, flat16 = w14.sum((1, 2, 3)), out["patch_embed.proj.weight"].sum((1, 2, 3))
    ratio = (flat16 / flat14).median().item()
    assert abs(ratio - (16 / 14) ** 2) < 0.15, ratio


@pytest.mark.parametrize("img,stored", [(64, (4, 4)), ((32, 80), (2, 5))])
def test_position_embedding_follows_the_input_grid_by_plain_bicubic(img, stored):
    """At an input grid other than the stored one, EVA02 adds its position embedding resized by
    plain bicubic (EVA's and the authors' code), not timm's antialiased resize. Also from a
    non-square stored grid (img_size (32, 80): 2 rows of 5), whose entries are row-major."""
    model = randomize(tiny("freeze", img=img))
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.zero_()
    z, hw, _ = model.embed(torch.randn(1, 3, 48, 112))                    # 3 x 7
    assert hw == (3, 7)
    grid = model.pos_embed[0, 1:].detach().reshape(*stored, 64).permute(2, 0, 1)
    want = resize2d(grid, plain_bicubic(stored[0], 3), plain_bicubic(stored[1], 7))
    want = want.permute(1, 2, 0)
    torch.testing.assert_close(z[0, 1:].double(), want.reshape(21, 64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["timm.safetensors", "timm.pth", "original.pt", "original.pth"])
def test_checkpoint_layouts_patch14_into_patch16(tmp_path, layout):
    source = randomize(tiny("freeze", patch=14, img=56))               # release-like: patch 14, 4x4
    sd = visible_state(source, {"fc_norm.weight": torch.ones(64), "fc_norm.bias": torch.zeros(64)})
    path = tmp_path / layout
    if layout.startswith("original"):
        torch.save({"module": to_original_layout(sd)}, path)
    elif layout.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)

    same = tiny("freeze", patch=14, img=56)                            # same patch: exact copy
    same.load_pretrained(str(path))
    for k, v in source.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k

    model = tiny("ivt", patch=16, img=(64, 96))                        # paper's patch, 4x6 grid
    before = {k: v.clone() for k, v in model.state_dict().items() if model.is_added_name(k)}
    model.load_pretrained(str(path))
    own = model.state_dict()
    # EVA's conversion (kernel 14 -> 16, grid 4 -> 32), then the grid 32 -> 4 x 6, all bicubic
    k = plain_bicubic(14, 16)
    torch.testing.assert_close(own["patch_embed.proj.weight"].double(),
                               resize2d(sd["patch_embed.proj.weight"], k, k), rtol=1e-5, atol=1e-5)
    grid = sd["pos_embed"][0, 1:].reshape(4, 4, 64).permute(2, 0, 1)
    grid = resize2d(grid, plain_bicubic(4, 32), plain_bicubic(4, 32))
    grid = resize2d(grid, plain_bicubic(32, 4), plain_bicubic(32, 6)).permute(1, 2, 0)
    assert own["pos_embed"].shape == (1, 1 + 4 * 6, 64)
    torch.testing.assert_close(own["pos_embed"][0, 1:].double(), grid.reshape(24, 64),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(own["pos_embed"][:, 0], sd["pos_embed"][:, 0])   # cls entry kept
    assert torch.equal(own["blocks.1.attn.q_proj.bias"], sd["blocks.1.attn.q_proj.bias"])
    assert torch.equal(own["blocks.2.mlp.norm.weight"], sd["blocks.2.mlp.norm.weight"])
    for k, v in before.items():                                        # IV-tuning modules untouched
        assert torch.equal(own[k], v), k
    outs = model(torch.randn(1, 3, 64, 96), torch.randn(1, 3, 64, 96))
    assert outs[2].shape == (1, 64, 4, 6)


def test_wrong_checkpoints_name_the_keys(tmp_path):
    deeper = visible_state(tiny("freeze", depth=5))
    torch.save(deeper, tmp_path / "deeper.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys .*blocks\.4\.attn\.k_proj\.weight"):
        tiny("freeze").load_pretrained(str(tmp_path / "deeper.pth"))

    missing = visible_state(tiny("freeze"))
    del missing["blocks.0.mlp.norm.weight"]
    missing["blocks.0.attn.inner_attn_ln.weight"] = torch.ones(64)
    save_file(missing, str(tmp_path / "missing.safetensors"))
    with pytest.raises(CheckpointError) as err:
        tiny("freeze").load_pretrained(str(tmp_path / "missing.safetensors"))
    assert re.search(r"missing keys \(1\): blocks\.0\.mlp\.norm\.weight", str(err.value))
    assert "blocks.0.attn.inner_attn_ln.weight" in str(err.value)

    wider = EVA02Backbone("wider", EVA02Config(96, 4, 2, 256, img_size=(64, 64)), "freeze")
    torch.save({"module": visible_state(wider)}, tmp_path / "wider.pt")
    with pytest.raises(CheckpointError, match="shape mismatches"):
        tiny("freeze").load_pretrained(str(tmp_path / "wider.pt"))

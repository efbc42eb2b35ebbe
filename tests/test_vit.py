"""DINOv2 and MAE on the shared ViT: equality with timm on golden fixtures from both checkpoint
layouts (timm's and the original releases'), parameter counts, the IV-tuning wiring around cls
and register tokens, checkpoint errors (unknown, missing keys; registers), the fast path, and a
training smoke run of each task with dinov2_b. Tiny configurations keep this CPU-only file fast;
the B/L sizes are built on the meta device."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kernels
from ivt.fast import make_fast
from ivt.models import (BACKBONES, PETL_METHODS, CheckpointError, PETLConfig, build_backbone,
                        count_parameters, normalization_for)
from ivt.data.transforms import IMAGENET
from ivt.models.dinov2 import DINOv2Backbone
from ivt.models.ivtuning import IVTConfig
from ivt.models.mae import MAEBackbone
from ivt.models.vit import LayerScale, ViTConfig, feature_blocks, resize_patch_kernel
from ivt.weights import RELEASES

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
FAMILY = {"dinov2_tiny": DINOv2Backbone, "dinov2_reg_tiny": DINOv2Backbone,
          "mae_tiny": MAEBackbone}


# -- goldens: timm's VisionTransformer on identical weights ----------------------------------------
def golden_model(name: str, tuning: str = "full"):
    """Our model for the golden fixture `name`, built from the timm constructor arguments
    recorded in the fixture (random weights: the test loads them)."""
    with safe_open(str(GOLDEN / f"{name}.safetensors"), framework="pt") as f:
        c = json.loads(f.metadata()["config"])
    cfg = ViTConfig(c["embed_dim"], c["depth"], c["num_heads"],
                    int(c["embed_dim"] * c["mlp_ratio"]), patch_size=c["patch_size"],
                    img_size=(c["img_size"], c["img_size"]), drop_path_rate=0.0,
                    layer_scale=c.get("init_values"), registers=c.get("reg_tokens", 0))
    return FAMILY[name](name, cfg, tuning, IVTConfig() if tuning == "ivt" else None)


@pytest.mark.parametrize("layout", ["timm", "release"])
@pytest.mark.parametrize("name", list(FAMILY))
def test_block_outputs_equal_timm(name, layout):
    """Blocks 0-2's patch tokens (timm's `forward_intermediates`, norm=False) at two non-square
    inputs, one grid larger and one smaller than the stored position embedding; loaded from
    timm's file and from the original release's layout of the same weights."""
    model = golden_model(name)
    file = f"{name}.safetensors" if layout == "timm" else f"{name}_release.pth"
    model.load_pretrained(str(GOLDEN / file))
    model.eval()
    io = load_file(str(GOLDEN / f"{name}_io.safetensors"))
    sizes = [k.split(".")[1] for k in io if k.startswith("input.")]
    assert len(sizes) == 2
    for size in sizes:
        with torch.no_grad():
            maps = dict(zip(model.feature_blocks, model.forward_blocks(io[f"input.{size}"])))
        for block in (0, 1, 2):
            want = io[f"out.{size}.{block}"]
            assert maps[block].shape == want.shape, (size, block)
            err = ((maps[block] - want).abs().max() / want.abs().max()).item()
            assert err < 1e-5, f"{name} ({layout}) block {block} at {size}: relative {err:.3g}"


def test_release_layouts_differ_from_timm_where_documented():
    """The fixtures exercise what the conversion does: the DINOv2 release stores `mask_token`
    and, with registers, `register_tokens` and a position entry for cls; timm's register file
    has neither (its cls token holds that entry); MAE's release wraps its state dict."""
    timm_reg = load_file(str(GOLDEN / "dinov2_reg_tiny.safetensors"))
    release_reg = torch.load(GOLDEN / "dinov2_reg_tiny_release.pth", weights_only=True)
    assert "reg_token" in timm_reg and "register_tokens" in release_reg
    assert timm_reg["pos_embed"].shape[1] == 16 and release_reg["pos_embed"].shape[1] == 17
    assert "mask_token" in torch.load(GOLDEN / "dinov2_tiny_release.pth", weights_only=True)
    assert set(torch.load(GOLDEN / "mae_tiny_release.pth", weights_only=True)) == {"model"}


# -- sizes and counts ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, width, depth, trainable", [
    ("dinov2_b", 768, 12, 3_695_236), ("dinov2_l", 1024, 24, 8_899_652),
    ("dinov2_l_reg", 1024, 24, 8_899_652), ("mae_b", 768, 12, 3_695_236),
    ("mae_l", 1024, 24, 8_899_652)])
def test_parameter_counts(name, width, depth, trainable):
    """IV-tuning's modules depend on the width and depth only: per block the four adapters of
    Sec. 3 (two HA of C d2 + d2 + d2 C + C, 4C for LN affine and SFT, HO(64) 8,608; two IPA of
    C d3 + d3 + d3 C + C, 6C for LN affine and the two SFTs), the IR patch embedding
    (16 x 16 x 3 x C + C) and EMPG with its LayerNorm."""
    C = width
    ha = 2 * (C * 64 + 64 + 64 * C + C + 4 * C + 8_608)
    ipa = 2 * (C * 8 + 8 + 8 * C + C + 6 * C)
    with torch.device("meta"):
        model = build_backbone(name, tuning="ivt", img_size=512)
        frozen = build_backbone(name, tuning="freeze", img_size=224)
    assert count_parameters(model.blocks[0].adapters) == ha + ipa
    assert count_parameters(model.ir_patch_embed) == 16 * 16 * 3 * C + C
    assert count_parameters(model, trainable_only=True) == trainable
    assert len(model.blocks) == depth and model.out_channels == [C] * 4
    assert model.out_strides == [4, 8, 16, 32] and model.feature_blocks == [
        depth * k // 24 - 1 for k in (8, 12, 16, 24)]
    # The visible ViT at 224 (patch 16, 14 x 14 + cls positions): patch embedding, cls token,
    # positions, registers, per block two LayerNorms, qkv, proj, fc1, fc2 (+ LayerScale).
    per_block = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * (4 * C * C) + 4 * C + C
    layer_scale = 2 * C if name.startswith("dinov2") else 0
    registers = 4 * C if name.endswith("_reg") else 0
    visible = (16 * 16 * 3 * C + C) + C + 197 * C + registers + depth * (per_block + layer_scale)
    assert count_parameters(frozen) == visible


def test_registered_with_imagenet_statistics_and_releases():
    for name in ("dinov2_b", "dinov2_l", "dinov2_b_reg", "dinov2_l_reg", "mae_b", "mae_l"):
        assert name in BACKBONES and normalization_for(name) == IMAGENET
    assert RELEASES["dinov2_l"].url == ("https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/"
                                        "dinov2_vitl14_pretrain.pth")
    assert RELEASES["dinov2_b_reg"].file_name == "dinov2_vitb14_reg4_pretrain.pth"
    assert RELEASES["mae_l"].url == ("https://dl.fbaipublicfiles.com/mae/pretrain/"
                                     "mae_pretrain_vit_large.pth")
    assert RELEASES["mae_b"].file_name == "mae_pretrain_vit_base.pth"


def test_summary_prints_the_trainable_count(capsys):
    from ivt import summary
    summary.main(["--backbone", "dinov2_l_reg"])
    out = capsys.readouterr().out
    assert re.search(r"trainable \(#TP\)\s+8,899,652", out)


# -- IV-tuning wiring ------------------------------------------------------------------------------
def tiny(family=DINOv2Backbone, tuning="ivt", registers=4, patch=8, img=32, **ivt_options):
    cfg = ViTConfig(32, 3, 2, 128, patch_size=patch, img_size=(img, img), drop_path_rate=0.0,
                    layer_scale=0.5 if family is DINOv2Backbone else None, registers=registers)
    return family("tiny", cfg, tuning, IVTConfig(**ivt_options) if tuning == "ivt" else None)


def randomize(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def visible_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not model.is_added_name(k)}


@pytest.mark.parametrize("family, registers", [(DINOv2Backbone, 4), (DINOv2Backbone, 0),
                                               (MAEBackbone, 0)])
def test_silenced_adapters_give_the_visible_model(family, registers):
    """With zero up-projections, zero IPA output shifts and a zero EMPG output, IV-tuning
    reproduces the frozen model: the adapters touch the patch tokens only (cls and registers
    pass unchanged) and the prompt enters before cls, positions and registers. `zero_init_up`
    builds the up-projections at zero (checked first; `randomize` then moves every weight, so
    they are zeroed again by hand)."""
    built = tiny(family, registers=registers, zero_init_up=True)
    ups = [m.up for b in built.blocks for m in (b.adapters.ha1, b.adapters.ha2,
                                                 b.adapters.ipa1, b.adapters.ipa2)]
    assert ups and all(not u.weight.any() and not u.bias.any() for u in ups)
    default = tiny(family, registers=registers)
    assert all(b.adapters.ha1.up.weight.any() for b in default.blocks)
    ivt = randomize(built).eval()
    with torch.no_grad():
        ivt.empg.s3.weight.zero_()
        ivt.empg.s3.bias.zero_()
        for b in ivt.blocks:
            for m in (b.adapters.ha1, b.adapters.ha2, b.adapters.ipa1, b.adapters.ipa2):
                m.up.weight.zero_()                            # randomize moved them off zero
                m.up.bias.zero_()
            b.adapters.ipa1.sft_out.beta.zero_()               # IPA = gelu(0 * gamma + 0)
            b.adapters.ipa2.sft_out.beta.zero_()
    frozen = tiny(family, "freeze", registers=registers)
    frozen.load_state_dict(visible_state(ivt))
    frozen.eval()
    vis, ir = torch.randn(2, 3, 40, 24), torch.randn(2, 1, 40, 24)
    with torch.no_grad():
        got, want = ivt(vis, ir), frozen(vis)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # and the adapters do change the output once their up-projections are not zero
    with torch.no_grad():
        ivt.blocks[1].adapters.ha1.up.bias.fill_(0.5)
        assert not torch.allclose(ivt(vis, ir)[2], want[2])


def test_registers_follow_cls_without_positions_and_blocks_prompt_their_patch_tokens():
    """DINOv2's registers sit after cls, get no position embedding, and never reach the
    adapters: every IPA reads the (B, N, C) patch tokens of its block's input (P_E at block 0),
    and the feature maps are the patch tokens only."""
    model = randomize(tiny(DINOv2Backbone, registers=4)).eval()
    seen = {}                                                # name -> (inputs, output)
    watched = {"empg": model.empg, **{f"block{i}": b for i, b in enumerate(model.blocks)},
               **{f"ipa1_{i}": b.adapters.ipa1 for i, b in enumerate(model.blocks)}}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, args, out, key=name: seen.update({key: (args, out)}))
    vis, ir = torch.randn(2, 3, 24, 40), torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        maps = model.forward_blocks(vis, ir)
        z, hw, prompt = model.embed(vis, ir)
    assert z.shape == (2, 1 + 4 + 15, 32) and hw == (3, 5)
    assert torch.equal(z[:, 1:5], model.reg_token.expand(2, -1, -1))      # no positions added
    cls = (model.cls_token + model.pos_embed[:, :1])[:, 0]             # cls + its position
    torch.testing.assert_close(z[:, 0], cls.expand(2, -1))
    assert torch.equal(seen["ipa1_0"][0][0], seen["empg"][1])
    for i in range(1, 3):
        assert torch.equal(seen[f"ipa1_{i}"][0][0], seen[f"block{i - 1}"][1][0][:, 5:])
    last = seen["block2"][1][0]
    assert torch.equal(maps[3], last[:, 5:].reshape(2, 3, 5, 32).permute(0, 3, 1, 2))
    for i in range(3):                              # the blocks keep the registers' rows apart
        assert seen[f"block{i}"][1][0].shape == (2, 20, 32)


def test_layer_scale_scales_each_residual_branch():
    """DINOv2's block: z + ls1(attn(norm1(z))), then + ls2(mlp(norm2(.))), against the formula."""
    block = randomize(tiny(DINOv2Backbone, "freeze", registers=0)).blocks[0].eval()
    assert isinstance(block.ls1, LayerScale) and isinstance(block.ls2, LayerScale)
    z = torch.randn(2, 1 + 6, 32)
    a = z + block.attn(block.norm1(z), None) * block.ls1.gamma
    want = a + block.mlp(block.norm2(a)) * block.ls2.gamma
    got, _ = block(z, (2, 3), None, None)
    torch.testing.assert_close(got, want)


def test_drop_path_rates_rise_linearly_to_the_rate_at_the_last_block():
    """Stochastic depth as timm's VisionTransformer / Eva set it,
    `dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]`: 0 at the first block,
    the full rate at the last (`build_backbone`'s drop_path_rate is the last block's)."""
    for family in (DINOv2Backbone, MAEBackbone):
        cfg = ViTConfig(32, 6, 2, 64, patch_size=8, img_size=(32, 32), drop_path_rate=0.3)
        model = family("tiny", cfg, "freeze", None)
        got = torch.tensor([b.drop_path.p for b in model.blocks], dtype=torch.float64)
        torch.testing.assert_close(got, torch.linspace(0, 0.3, 6, dtype=torch.float64))


def test_features_are_block_outputs_resized_bilinearly():
    """The four features are the patch tokens (cls and registers dropped, no norm) of blocks
    d/3, d/2, 2d/3 and d, resized by x4, x2, x1, x0.5 bilinearly with align_corners=False
    (PyTorch's default, mmseg's `resize` in the ViT-Adapter / MultiLevelNeck necks), the x0.5
    map ceil-sized. An odd 3 x 5 token grid; the block outputs are captured with hooks and
    resized here."""
    torch.manual_seed(0)
    cfg = ViTConfig(32, 6, 2, 64, patch_size=8, img_size=(32, 32), drop_path_rate=0.0,
                    layer_scale=0.5, registers=4)
    model = randomize(DINOv2Backbone("tiny", cfg, "freeze", None)).eval()
    blocks = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: blocks.__setitem__(i, out[0]))
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 24, 40))
    assert feature_blocks(6) == [1, 2, 3, 5]
    sizes = [(12, 20), (6, 10), (3, 5), (2, 3)]                   # ceil(3 / 2), ceil(5 / 2)
    for index, size, got in zip((1, 2, 3, 5), sizes, outs):
        m = blocks[index][:, 5:].reshape(2, 3, 5, 32).permute(0, 3, 1, 2)
        want = m if size == (3, 5) else F.interpolate(m, size=size, mode="bilinear",
                                                      align_corners=False)
        assert got.shape == (2, 32, *size)
        torch.testing.assert_close(got, want)


# -- checkpoints -----------------------------------------------------------------------------------
def test_patch_kernel_resize_preserves_tokens():
    """Pseudo-inverse resize: embedding a bicubically upsampled 14x14 patch with the 16x16 kernel
    gives the token of the original patch with the 14x14 kernel."""
    w14 = torch.randn(8, 3, 14, 14)
    w16 = resize_patch_kernel(w14, 16)
    x = torch.randn(4, 3, 14, 14)
    x16 = F.interpolate(x, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)
    torch.testing.assert_close(F.conv2d(x16, w16), F.conv2d(x, w14), rtol=1e-4, atol=1e-4)


def test_patch14_release_into_patch16(tmp_path):
    """The default patch 16: a patch-14 checkpoint's kernel is resized (FlexiViT) and its
    position embedding to the model's grid; its registers and LayerScale load as they are."""
    source = randomize(tiny(DINOv2Backbone, "freeze", patch=14, img=42, registers=4))   # 3 x 3
    sd = visible_state(source)
    release = {("register_tokens" if k == "reg_token" else k): v for k, v in sd.items()}
    release["mask_token"] = torch.zeros(1, 32)
    torch.save(release, tmp_path / "release.pth")
    model = tiny(DINOv2Backbone, "ivt", patch=16, registers=4)
    model.load_pretrained(str(tmp_path / "release.pth"))
    own = model.state_dict()
    torch.testing.assert_close(own["patch_embed.proj.weight"],
                               resize_patch_kernel(sd["patch_embed.proj.weight"], 16))
    assert own["pos_embed"].shape == (1, 1 + 2 * 2, 32)                     # 32 / 16 = 2
    assert torch.equal(own["pos_embed"][:, 0], sd["pos_embed"][:, 0])
    for key in ("reg_token", "blocks.2.ls2.gamma", "blocks.1.attn.qkv.bias"):
        assert torch.equal(own[key], sd[key]), key


def test_mae_full_release_drops_its_decoder(tmp_path):
    """MAE's `_full` / visualisation files also hold the decoder and its mask token: dropped on
    purpose; everything else of the encoder must match."""
    sd = visible_state(randomize(tiny(MAEBackbone, "freeze", registers=0)))
    extra = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
             "decoder_blocks.0.norm1.weight": torch.ones(16), "norm.weight": torch.ones(32),
             "norm.bias": torch.zeros(32)}
    torch.save({"model": {**sd, **extra}}, tmp_path / "mae_full.pth")
    model = tiny(MAEBackbone, "freeze", registers=0)
    model.load_pretrained(str(tmp_path / "mae_full.pth"))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_unknown_and_missing_keys_are_listed(tmp_path):
    sd = visible_state(tiny(DINOv2Backbone, "freeze", registers=0))
    del sd["blocks.1.ls1.gamma"]
    sd["blocks.1.attn.q_norm.weight"] = torch.ones(16)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError) as err:
        tiny(DINOv2Backbone, "freeze", registers=0).load_pretrained(
            str(tmp_path / "odd.safetensors"))
    text = str(err.value)
    assert "odd.safetensors" in text
    assert re.search(r"missing keys \(1\): blocks\.1\.ls1\.gamma", text)
    assert re.search(r"unexpected keys \(1\): blocks\.1\.attn\.q_norm\.weight", text)
    # an MAE checkpoint has no LayerScale: loading it into DINOv2 names every missing gamma
    torch.save({"model": visible_state(tiny(MAEBackbone, "freeze", registers=0))},
               tmp_path / "mae.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \(6\): blocks\.0\.ls1\.gamma"):
        tiny(DINOv2Backbone, "freeze", registers=0).load_pretrained(str(tmp_path / "mae.pth"))


@pytest.mark.parametrize("layout", ["release", "timm"])
def test_register_count_mismatch_says_so(tmp_path, layout):
    """A checkpoint with registers into a model without them, and the reverse: an error that
    names the file, both counts and the backbone to use, not a list of keys."""
    reg = visible_state(tiny(DINOv2Backbone, "freeze", registers=4))
    if layout == "release":
        reg["register_tokens"] = reg.pop("reg_token")
    plain = visible_state(tiny(DINOv2Backbone, "freeze", registers=0))
    torch.save(reg, tmp_path / "reg.pth")
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"reg\.pth: the checkpoint has 4 register tokens, "
                                              r"the model none: build dinov2_b_reg"):
        tiny(DINOv2Backbone, "freeze", registers=0).load_pretrained(str(tmp_path / "reg.pth"))
    with pytest.raises(CheckpointError, match=r"plain\.pth: the checkpoint has no register "
                                              r"tokens, the model 4: build dinov2_b / dinov2_l"):
        tiny(DINOv2Backbone, "freeze", registers=4).load_pretrained(str(tmp_path / "plain.pth"))


# -- the compared PETL methods ---------------------------------------------------------------------
@pytest.mark.parametrize("method", PETL_METHODS)
@pytest.mark.parametrize("family, registers", [(DINOv2Backbone, 4), (MAEBackbone, 0)])
def test_petl_methods_train_their_modules_and_zeroed_leave_the_model(family, registers, method):
    """Each compared method on the plain ViTs: only its modules and the IR patch embedding get
    gradients; all of them zero give the frozen model's output (not VPT: zero prompts are still
    keys that take attention mass)."""
    torch.manual_seed(0)
    frozen = randomize(tiny(family, "freeze", registers=registers)).eval()
    model = tiny(family, method, registers=registers)                # as build_backbone does
    model.add_petl(PETLConfig(method=method))
    model.load_state_dict(frozen.state_dict(), strict=False)
    vis, ir = torch.randn(2, 3, 24, 40), torch.randn(2, 1, 24, 40)
    sum(f.square().mean() for f in model.train()(vis, ir)).backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == model.is_added_name(name) == p.requires_grad, name
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_added_name(name):
                p.zero_()
        same = all(torch.equal(a, b) for a, b in zip(frozen(vis), model.eval()(vis, ir)))
    assert same == (method != "vpt")


def test_vpt_prompts_are_extra_keys_and_values_of_the_fused_projection():
    """VPT-deep with a fused qkv: the prompts' keys and values come from the k and v thirds of
    the qkv weights; the same as attending over [x, prompts] and keeping the first L outputs."""
    attn = randomize(tiny(MAEBackbone, "freeze", registers=0).double()).blocks[0].attn
    x = torch.randn(2, 1 + 6, 32, dtype=torch.float64)
    extra = torch.randn(2, 3, 32, dtype=torch.float64)
    full = attn(torch.cat([x, extra], 1), None)[:, :7]
    torch.testing.assert_close(attn(x, None, extra), full, rtol=1e-10, atol=1e-12)


# -- the fast path ---------------------------------------------------------------------------------
FAST_CASES = {"dinov2_reg": (DINOv2Backbone, 4), "mae": (MAEBackbone, 0)}


def fast_pair(case, memory="keep", fused=False, drop_path=0.2, variant="ivt"):
    """Reference and fast (or fused) float64 models with the same random weights."""
    family, registers = FAST_CASES[case]

    def build():
        cfg = ViTConfig(32, 3, 2, 128, patch_size=8, img_size=(24, 32), drop_path_rate=drop_path,
                        layer_scale=0.5 if registers else None, registers=registers)
        return family("tiny", cfg, "ivt", IVTConfig(d2=16, variant=variant))
    ref = randomize(build().double(), scale=0.05, seed=7)
    fast = make_fast(build().double(), "fused" if fused else "fast", memory)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def step(model, vis, ir):
    """Outputs and every trainable gradient of one training-mode step (seeded dropout)."""
    model.train()
    torch.manual_seed(1)
    outs = model(vis, ir)
    sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
        for o in outs).backward()
    return outs, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("memory", ["keep", "checkpoint", "checkpoint:1+recompute"])
@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_training_equals_reference(case, memory):
    ref, fast = fast_pair(case, memory)
    assert type(fast).__mro__[2] is type(ref)               # the family's class stays a base
    gen = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=gen) for _ in range(2))
    (o1, g1), (o2, g2) = step(ref, vis, ir), step(fast, vis, ir)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    scale = max(g.abs().max().item() for g in g1.values())
    assert set(g1) == set(g2)
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-8, atol=1e-11 * scale, msg=name)


@pytest.mark.parametrize("fused", [False, True], ids=["fast", "fused"])
@pytest.mark.parametrize("case", list(FAST_CASES))
def test_fast_inference_equals_reference(case, fused):
    """At inference; fused: each adapter one `kernels.hybrid_adapter_eval` call writing over
    the block's patch rows past the cls (and register) rows."""
    ref, fast = fast_pair(case, fused=fused)
    gen = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=gen) for _ in range(2))
    ref.eval(), fast.eval()
    with torch.no_grad():
        for a, b in zip(ref(vis, ir), fast(vis, ir)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_fused_triton_kernels_with_registers(monkeypatch):
    """DINOv2 with registers (5 rows before the patch tokens) through the Triton kernels in the
    interpreter: inference (the adapters writing past the 5 rows) and a training step equal the
    reference path in float64."""
    ref, fused = fast_pair("dinov2_reg", fused=True, drop_path=0.0, variant="ivt")
    for m in (ref, fused):
        for block in m.blocks:                         # no dropout: nothing drawn on either path
            block.adapters.ha1.drop.p = block.adapters.ha2.drop.p = 0.0
    gen = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=gen) for _ in range(2))
    monkeypatch.setenv("IVT_KERNELS", "torch")
    (o1, g1) = step(ref, vis, ir)
    ref.eval()
    with torch.no_grad():
        e1 = ref(vis, ir)
    monkeypatch.setenv("IVT_KERNELS", "triton")
    (o2, g2) = step(fused, vis, ir)
    fused.eval()
    with torch.no_grad():
        e2 = fused(vis, ir)
    for a, b in zip(list(o1) + list(e1), list(o2) + list(e2)):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * a.abs().max().item())
    scale = max(g.abs().max().item() for g in g1.values())
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


# -- the three tasks -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_data(tmp_path_factory):
    from ivt.data.synthetic import write_m3fd, write_mfnet, write_vt
    root = tmp_path_factory.mktemp("data")
    write_mfnet(root / "mfnet", n_train=4, n_val=2, n_test=0, size=(32, 48))
    write_vt(root / "vt", n_train=4, n_test=2, n_vt1000=1, n_vt821=1, size=(32, 40))
    write_m3fd(root / "m3fd", 6, size=(48, 64))
    return root


COMMON = ["--backbone", "dinov2_b", "--pretrained", "none", "--d2", "8", "--batch-size", "2",
          "--iters", "10", "--eval-every", "0", "--log-every", "5", "--workers", "0",
          "--device", "cpu", "--kernels", "torch"]
TASKS = {
    "seg": ("train_seg", lambda d: ["--data", str(d / "mfnet"), "--crop", "32",
                                    "--head-dim", "16"]),
    "sod": ("train_sod", lambda d: ["--data", str(d / "vt" / "VT5000" / "Train"), "--size", "32",
                                    "--val-count", "2"]),
    "det": ("train_det", lambda d: ["--data", str(d / "m3fd"), "--split-dir", str(d / "m3fd"),
                                    "--size", "64", "--hidden-dim", "16", "--num-queries", "8",
                                    "--dec-layers", "2"]),
}


@pytest.mark.usefixtures("script_env")
@pytest.mark.parametrize("task", list(TASKS))
def test_ten_iterations_of_each_task_with_dinov2_b(task, task_data, tmp_path):
    """10 iterations of each training script with the full-width dinov2_b (random, frozen),
    tiny inputs (2 x 2 tokens; 4 x 4 for detection, whose stride-32 level must be larger than
    1 x 1 for its BatchNorm) and batch 2: the loss is finite, the run saves its
    checkpoint, and only IV-tuning's modules and the head trained."""
    sys.path.insert(0, str(ROOT))
    script, args = TASKS[task]
    module = __import__(script)
    out = tmp_path / task
    module.main(args(task_data) + COMMON + ["--out", str(out)])
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    saved = torch.load(out / "last.pt", weights_only=False)
    assert saved["config"]["backbone"] == "dinov2_b"
    assert saved["config"]["normalization"]["mean"] == list(IMAGENET.mean)


# -- what the releases' files and sizes need -----------------------------------------------------
def test_family_sizes_are_the_releases():
    """The sizes of the releases (dinov2/hub/backbones.py, MAE's models_vit.py): ViT-B 768 wide,
    12 blocks, 12 heads; ViT-L 1024, 24, 16; MLP ratio 4; DINOv2 with LayerScale at timm's
    random init 1e-5 and, in the `_reg` models, 4 registers; MAE without either. The heads do
    not show in any parameter count."""
    from ivt.models.dinov2 import DINOV2_CONFIGS
    from ivt.models.mae import MAE_CONFIGS
    sizes = {"b": (768, 12, 12), "l": (1024, 24, 16)}
    for name, cfg in {**DINOV2_CONFIGS, **MAE_CONFIGS}.items():
        width, depth, heads = sizes[name.split("_")[1]]
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (
            width, depth, heads, 4 * width), name
        dinov2 = name.startswith("dinov2")
        assert cfg.layer_scale == (1e-5 if dinov2 else None), name
        assert cfg.registers == (4 if name.endswith("_reg") else 0), name
        assert cfg.patch_size == 16 and cfg.qkv_fused and not cfg.swiglu, name


def aa_bicubic_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) float64 weights of an antialiased bicubic resize written out by hand (PIL's
    convolution resampling, which timm's `resample_abs_pos_embed` gets from PyTorch with
    `antialias=True`): Keys' cubic with a = -0.5 stretched by the scale when shrinking, centred at
    (i + 1/2) n_in / n_out, each row normalised to sum 1."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)

    def keys(x, a=-0.5):
        x = abs(x)
        if x < 1:
            return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a if x < 2 else 0.0
    w = torch.tensor([[keys((j + 0.5 - (i + 0.5) * scale) / stretch) for j in range(n_in)]
                      for i in range(n_out)], dtype=torch.float64)
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("family, img_from, img_to", [(MAEBackbone, 48, 80),
                                                      (DINOv2Backbone, 80, 48)])
def test_checkpoint_position_grid_is_resized_as_timm_does(tmp_path, family, img_from, img_to):
    """A release's position embedding stored for another grid (MAE's 14 x 14 for 224 px into a
    512 px model; here 3 x 3 -> 5 x 5, and DINOv2 5 x 5 -> 3 x 3) is resized on loading as timm
    resizes it, antialiased bicubic (computed here by hand in float64), the cls entry kept."""
    src = randomize(tiny(family, "freeze", registers=0, patch=16, img=img_from))
    sd = visible_state(src)
    torch.save({"model": sd} if family is MAEBackbone else sd, tmp_path / "release.pth")
    model = tiny(family, "freeze", registers=0, patch=16, img=img_to)
    model.load_pretrained(str(tmp_path / "release.pth"))
    got = model.state_dict()["pos_embed"]
    n_in, n_out = img_from // 16, img_to // 16
    grid = sd["pos_embed"][0, 1:].double().reshape(n_in, n_in, -1)
    w = aa_bicubic_matrix(n_in, n_out)
    want = torch.einsum("ij,jkc,lk->ilc", w, grid, w).reshape(1, n_out * n_out, -1)
    assert got.shape == (1, 1 + n_out * n_out, 32)
    assert torch.equal(got[:, :1], sd["pos_embed"][:, :1])
    torch.testing.assert_close(got[:, 1:].double(), want, rtol=1e-5, atol=1e-6)

"""The compared PETL methods (paper Sec. 4.5, Table 4) as tuning modes: parameter counts against
closed-form formulas and Table 4, which parameters train, neutrality of zeroed additions, the
methods' equations against float64 references, and delta checkpoints."""
import math

import pytest
import torch
import torch.nn.functional as F

from ivt.checkpoint import atomic_save, load_checkpoint, load_model_state, make_checkpoint
from ivt.models import PETL_METHODS, PETLConfig, build_backbone, count_parameters
from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.petl.adaptformer import AdaptFormer
from ivt.models.petl.bi_adaptformer import BiAdaptFormer, binarize
from ivt.models.petl.rein import Rein
from ivt.models.segmentor import build_segmentor

METHODS = PETL_METHODS
SWIN_L_DIMS, SWIN_L_DEPTHS = (192, 384, 768, 1536), (2, 2, 18, 2)
IR_EMBED_SWIN_L = 3 * 192 * 16 + 192 + 2 * 192          # conv 4x4 + bias, LayerNorm: 9,792


def tiny_eva02(tuning: str) -> EVA02Backbone:
    cfg = EVA02Config(embed_dim=64, depth=4, num_heads=2, mlp_hidden=int(64 * 4 * 2 / 3),
                      patch_size=16, img_size=(64, 64), drop_path_rate=0.0)
    bb = EVA02Backbone("tiny", cfg, tuning, None)
    if tuning in METHODS:
        bb.add_petl(PETLConfig(method=tuning))
    return bb


def build(family: str, tuning: str, seed: int = 0):
    torch.manual_seed(seed)
    if family == "swin":
        return build_backbone("swin_nano", tuning=tuning, drop_path_rate=0.0)
    return tiny_eva02(tuning)


def inputs(family: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = (40, 56) if family == "swin" else (64, 48)     # Swin: padded windows; EVA02: 4 x 3
    return torch.randn(2, 3, *size, generator=g), torch.randn(2, 1, *size, generator=g)


# -- counts ---------------------------------------------------------------------------------------
def swin_l_count(tuning: str, **options) -> int:
    with torch.device("meta"):
        return count_parameters(build_backbone("swin_l", tuning=tuning, **options), True)


def test_swin_l_counts_match_the_closed_forms():
    blocks = [c for c, d in zip(SWIN_L_DIMS, SWIN_L_DEPTHS) for _ in range(d)]
    assert IR_EMBED_SWIN_L == 9792
    vpt = sum(10 * c for c in blocks)                                    # p C per block
    adaptformer = sum(2 * c * 64 + 64 + c for c in blocks)               # 2 C r + r + C
    bi = sum(2 * c * 32 for c in blocks)                                 # 2 C r, no biases
    rein = sum(d * (100 * 16 + 16 * c) + 2 * (c * c + c) + 1             # per stage
               for c, d in zip(SWIN_L_DIMS, SWIN_L_DEPTHS))
    assert swin_l_count("vpt") == vpt + IR_EMBED_SWIN_L == 190_272
    assert swin_l_count("adaptformer") == adaptformer + IR_EMBED_SWIN_L == 2_339_520
    assert swin_l_count("bi_adaptformer") == bi + IR_EMBED_SWIN_L == 1_164_864
    assert swin_l_count("rein") == rein + IR_EMBED_SWIN_L == 6_609_604
    assert swin_l_count("freeze", ir_embed=True) == IR_EMBED_SWIN_L
    assert swin_l_count("full", ir_embed=True) == swin_l_count("full") + IR_EMBED_SWIN_L
    assert swin_l_count("vpt", prompt_length=11) == 11 * sum(blocks) + IR_EMBED_SWIN_L


def test_table4_adapter_counts():
    """Table 4: AdaptFormer 2.34M, Bi-AdaptFormer 1.16M at their default widths (64, 32)."""
    assert round(swin_l_count("adaptformer") / 1e6, 2) == 2.34
    assert round(swin_l_count("bi_adaptformer") / 1e6, 2) == 1.16
    assert abs(swin_l_count("vpt") / 0.20e6 - 1) < 0.05          # 0.19M: see summary's notes


def test_summary_methods_prints_table4(capsys):
    from ivt import summary
    summary.main(["--methods"])
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:9]}
    assert "2,339,520" in rows["AdaptFormer"] and "2.34M" in rows["AdaptFormer"]
    assert "1,164,864" in rows["Bi-AdaptFormer"] and "1.16M" in rows["Bi-AdaptFormer"]
    assert "190,272" in rows["VPT"] and "prompt length 10" in rows["VPT"]
    assert "6,609,604" in rows["Rein"] and "14.72M" in rows["Rein"]
    summary.main(["--methods", "--prompt-length", "11"])
    assert "208,320" in capsys.readouterr().out


# -- what trains ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["swin", "eva02"])
@pytest.mark.parametrize("method", METHODS)
def test_only_the_method_and_ir_embedding_get_gradients(family, method):
    bb = build(family, method)
    bb.train()
    added = set(bb.added_module_names())
    assert "ir_patch_embed" in added and len(added) >= 2
    vis, ir = inputs(family)
    sum(f.square().mean() for f in bb(vis, ir)).backward()
    for name, p in bb.named_parameters():
        if bb.is_added_name(name):
            assert p.requires_grad and p.grad is not None, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trained = [p.grad.abs().sum().item() for n, p in bb.named_parameters()
               if bb.is_added_name(n) and not n.startswith("ir_patch_embed")]
    assert sum(trained) > 0
    assert not any(k.startswith(tuple(added)) for k in bb.visible_state_keys())


def zero_added(bb) -> None:
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if bb.is_added_name(name):
                p.zero_()


@pytest.mark.parametrize("family", ["swin", "eva02"])
@pytest.mark.parametrize("method", METHODS)
def test_zeroed_additions_leave_the_frozen_model_unchanged(family, method):
    """All added parameters zero (IR embedding included) -> the visible model's exact output,
    except VPT: zero prompts are still keys that take attention mass."""
    frozen = build(family, "freeze", seed=3).eval()
    bb = build(family, method, seed=4).eval()
    bb.load_state_dict(frozen.state_dict(), strict=False)
    zero_added(bb)
    vis, ir = inputs(family)
    with torch.no_grad():
        ref, out = frozen(vis), bb(vis, ir)
    same = all(torch.equal(a, b) for a, b in zip(ref, out))
    assert same == (method != "vpt")


def test_adaptformer_is_neutral_at_initialisation_but_not_after_a_step():
    frozen = build("swin", "freeze", seed=3).eval()
    bb = build("swin", "adaptformer", seed=4)
    bb.load_state_dict(frozen.state_dict(), strict=False)
    with torch.no_grad():                                      # IR embedding off: zero it only
        for p in bb.ir_patch_embed.parameters():
            p.zero_()
    vis, ir = inputs("swin")
    bb.eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(frozen(vis), bb(vis, ir)))
    opt = torch.optim.SGD([p for p in bb.parameters() if p.requires_grad], lr=1.0)
    bb.train()
    sum(f.mean() for f in bb(vis, ir)).backward()
    opt.step()
    bb.eval()
    with torch.no_grad():
        assert not all(torch.equal(a, b) for a, b in zip(frozen(vis), bb(vis, ir)))


# -- the methods' equations -----------------------------------------------------------------------
def test_binarize_two_levels_and_straight_through_gradient():
    torch.manual_seed(0)
    w = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)
    q = binarize(w)
    mean, std = w.detach().mean(), w.detach().std()
    levels = torch.tensor([mean - 0.6744897501960817 * std, mean + 0.6744897501960817 * std],
                          dtype=torch.float64)
    expected = torch.where(w.detach() > mean, levels[1], levels[0])
    torch.testing.assert_close(q.detach(), expected)
    g = torch.randn(16, 8, dtype=torch.float64)
    (q * g).sum().backward()
    # Straight-through estimator: Q(w) = B(w^) std + mean with B's value sign(w^) c and B's
    # derivative that of the identity. By the product rule the gradient of sum(g Q(w)) is that of
    # sum(g (S std(w) + mean(w))) + std0 sum(g w^(w)), S = sign(w^) c fixed, std0 = std fixed.
    w2 = w.detach().clone().requires_grad_(True)
    m2, s2 = w2.mean(), w2.std()
    w_hat = (w2 - m2) / (s2 + 1e-5)
    S = torch.sign(w_hat.detach()) * 0.6744897501960817
    ((g * (S * s2 + m2)).sum() + s2.detach() * (g * w_hat).sum()).backward()
    torch.testing.assert_close(w.grad, w2.grad)
    assert torch.equal(binarize(torch.zeros(4, 3)), torch.zeros(4, 3))


def test_rein_matches_a_float64_reference():
    torch.manual_seed(0)
    rein = Rein(dim=12, num_layers=3, tokens=5, rank=2, patch=4).double()
    with torch.no_grad():
        rein.scale.fill_(0.7)
    f = torch.randn(2, 7, 12, dtype=torch.float64)
    out = rein(f, layer=1)
    a, b = rein.tokens_a[1].detach(), rein.tokens_b[1].detach()
    t = a @ b                                                             # (m, C)
    w_t, b_t = rein.mlp_token2feat.weight.detach(), rein.mlp_token2feat.bias.detach()
    w_f, b_f = rein.mlp_delta_f.weight.detach(), rein.mlp_delta_f.bias.detach()
    ref = torch.empty_like(f)
    for i in range(2):
        for n in range(7):
            logits = torch.tensor([float(f[i, n] @ t[j]) / math.sqrt(12) for j in range(5)])
            s = torch.exp(logits - logits.max())
            s = s / s.sum()
            d = sum(s[j] * (w_t @ t[j] + b_t) for j in range(1, 5))      # first token dropped
            ref[i, n] = f[i, n] + 0.7 * (w_f @ (d + f[i, n]) + b_f)
    torch.testing.assert_close(out.detach(), ref)


def test_adaptformer_matches_eq_2_and_3():
    """AdaptFormer (Chen et al. 2022, Eq. 2-3; the release's `Adapter.forward`): the bottleneck
    reads the MLP sub-layer's input x' (in parallel with the MLP, not after it), with dropout on
    its hidden units, x = x' + MLP(LN(x')) + s up(dropout(relu(down(x')))). Written out in
    float64 with a non-zero up-projection; in training the same dropout mask is drawn from the
    same generator state. After attention (pos 0) the block is left alone."""
    torch.manual_seed(0)
    af = AdaptFormer(16, bottleneck=8, scale=0.1, dropout=0.5).double()
    with torch.no_grad():
        for p in (af.up.weight, af.up.bias, af.down.bias):
            p.normal_()
    z_in = torch.randn(2, 6, 16, dtype=torch.float64)                 # x'
    z_out = z_in + torch.randn(2, 6, 16, dtype=torch.float64)         # x' + MLP(LN(x'))
    prompt, hw = torch.randn(2, 6, 16, dtype=torch.float64), (2, 3)
    same, p0 = af(0, z_in, z_out, prompt, hw)
    assert same is z_out and p0 is prompt

    def x_tilde(x, training):                                         # Eq. 2, hidden dropout
        h = F.relu(x @ af.down.weight.T + af.down.bias)
        return F.dropout(h, 0.5, training=training) @ af.up.weight.T + af.up.bias

    af.eval()
    got, p1 = af(1, z_in, z_out, prompt, hw)
    torch.testing.assert_close(got, z_out + 0.1 * x_tilde(z_in, False))   # Eq. 3
    assert p1 is prompt
    af.train()
    torch.manual_seed(1)
    got, _ = af(1, z_in, z_out, prompt, hw)
    torch.manual_seed(1)
    torch.testing.assert_close(got, z_out + 0.1 * x_tilde(z_in, True))


def test_vpt_prompts_act_as_extra_keys_and_values_in_every_window():
    """Swin block with VPT equals an explicit per-window computation with the prompts appended
    to the window's keys and values (float64, no shift: block 0)."""
    torch.manual_seed(0)
    bb = build("swin", "vpt").double().eval()
    block = bb.layers[0].blocks[0]
    attn = block.attn
    z = torch.randn(1, 8 * 8, 32, dtype=torch.float64)
    with torch.no_grad():
        got = block.window_attention(block.norm1(z), (8, 8), block.norm1(block.prompts)[None])
        x = block.norm1(z).view(8, 8, 32)
        p = block.norm1(block.prompts)                                   # (P, C)
        ref = torch.empty(8, 8, 32, dtype=torch.float64)
        h, d = attn.num_heads, 32 // attn.num_heads
        bias = attn.position_bias((4, 4))                                # (h, 16, 16)
        for wy in range(2):
            for wx in range(2):
                win = x[4 * wy:4 * wy + 4, 4 * wx:4 * wx + 4].reshape(16, 32)
                q, k, v = attn.qkv(win).view(16, 3, h, d).unbind(1)
                _, kp, vp = attn.qkv(p).view(-1, 3, h, d).unbind(1)
                k, v = torch.cat([k, kp]), torch.cat([v, vp])           # (16 + P, h, d)
                logits = torch.einsum("nhd,mhd->hnm", q, k) * attn.scale
                logits[:, :, :16] += bias
                o = torch.einsum("hnm,mhd->nhd", logits.softmax(-1), v).reshape(16, 32)
                ref[4 * wy:4 * wy + 4, 4 * wx:4 * wx + 4] = attn.proj(o).view(4, 4, 32)
    torch.testing.assert_close(got, ref.view(1, 64, 32))


# -- inputs and options ---------------------------------------------------------------------------
def test_infrared_required_exactly_when_an_ir_embedding_exists():
    vis, ir = inputs("swin")
    with pytest.raises(ValueError, match="tuning='rein'.*infrared"):
        build("swin", "rein")(vis)
    with pytest.raises(ValueError, match="infrared"):
        build_backbone("swin_nano", tuning="freeze", ir_embed=True)(vis)
    plain = build("swin", "freeze").eval()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain(vis), plain(vis, ir)))


def test_option_errors():
    with pytest.raises(ValueError, match="prompt_length"):
        build_backbone("swin_nano", tuning="adaptformer", prompt_length=5)
    with pytest.raises(ValueError, match="ir_embed=False"):
        build_backbone("swin_nano", tuning="vpt", ir_embed=False)
    with pytest.raises(ValueError, match="d2"):
        build_backbone("swin_nano", tuning="rein", d2=16)
    with pytest.raises(ValueError, match="rein_tokens"):
        build_backbone("swin_nano", tuning="rein", rein_tokens=1)
    with pytest.raises(ValueError, match="ir_embed applies to tuning 'full' or 'freeze'"):
        build_backbone("swin_nano", tuning="ivt", ir_embed=True)


# -- delta checkpoints ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_delta_checkpoint_reproduces_predictions(tmp_path, method):
    torch.manual_seed(0)
    visible = build_backbone("swin_nano", tuning="freeze")
    pretrained = tmp_path / "visible.pth"
    torch.save({k: visible.state_dict()[k] for k in visible.visible_state_keys()}, pretrained)

    torch.manual_seed(1)
    model = build_segmentor("swin_nano", 4, tuning=method, pretrained=str(pretrained), head_dim=16)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    vis, ir = inputs("swin")
    model.train()
    for _ in range(2):
        opt.zero_grad()
        model(vis, ir).logsumexp(1).mean().backward()
        opt.step()
    path = tmp_path / "last.pt"
    atomic_save(make_checkpoint(model, opt, 2, {"tuning": method}, str(pretrained), "0" * 64),
                str(path))
    ckpt = load_checkpoint(str(path))
    assert ckpt["delta"]
    saved = set(ckpt["model"])
    assert any(k.startswith("backbone.ir_patch_embed.") for k in saved)
    assert not any(k.startswith("backbone.layers.0.blocks.0.attn.") for k in saved)

    torch.manual_seed(2)                                      # different fresh initialisation
    fresh = build_segmentor("swin_nano", 4, tuning=method, pretrained=str(pretrained), head_dim=16)
    load_model_state(fresh, ckpt["model"], True, str(path))
    assert torch.equal(model.eval().predict(vis, ir), fresh.eval().predict(vis, ir))
    with torch.no_grad():
        assert torch.equal(model(vis, ir), fresh(vis, ir))


# -- the comparison demo --------------------------------------------------------------------------
def test_demo_methods_smoke(tmp_path):
    """`ivt.demo.methods.run` plumbing on the demo's smoke preset: one row per mode, counts
    from the built models, metrics in range; the printed table has a row per mode."""
    from ivt import demo
    from ivt.demo import methods as demo_methods
    summary = demo_methods.run(tmp_path, seed=1, quiet=True, settings=demo.PRESETS["smoke"])
    assert list(summary) == list(demo_methods.RUNS)
    for name, r in summary.items():
        for key in ("miou_all", "miou_day", "miou_night"):
            assert 0.0 <= r[key] <= 100.0, (name, key)
        bb = build_backbone("swin_nano", tuning=r["tuning"],
                            **(dict(d2=demo.PRESETS["smoke"].d2) if name == "ivt" else {}))
        assert r["trainable_params"] == count_parameters(bb, True)
    assert summary["freeze"]["trainable_params"] == 0
    assert summary["full_vis"]["trainable_fraction"] == 1.0
    assert (tmp_path / "methods_summary.json").is_file()
    header, *rows = demo_methods.format_table(summary).splitlines()
    assert header.split()[0] == "method" and len(rows) == len(summary)
    for row, (name, r) in zip(rows, summary.items()):
        assert row.split()[0] == name and f"{r['trainable_params']:,}" in row


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_each_method_starts_as_its_release(family):
    """The defaults and initialisations of the compared methods' own code, in a built backbone:
    AdaptFormer s = 0.1, dropout 0.1, up-projection zero (neutral at the start); Bi-AdaptFormer
    s = 1, dropout 0.1, up-projection trunc-normal std 1e-3 cut at +-2e-3; Rein alpha = 1e-3;
    VPT prompts uniform in +-sqrt(6 / (3 patch^2 + C)) (drawn wide enough to reach the bound)."""
    adapt = [m for m in build(family, "adaptformer").modules() if isinstance(m, AdaptFormer)]
    assert adapt and {(m.scale, m.drop.p) for m in adapt} == {(0.1, 0.1)}
    assert all(not m.up.weight.any() and not m.up.bias.any() for m in adapt)
    bi = [m for m in build(family, "bi_adaptformer").modules() if isinstance(m, AdaptFormer)]
    assert bi and {(m.scale, m.drop.p) for m in bi} == {(1.0, 0.1)}
    up = torch.cat([m.up.weight.flatten() for m in bi])
    assert up.abs().max() <= 2e-3 and 0.7e-3 < up.std() < 1.0e-3   # N(0, 1e-3) cut at 2 sigma: 0.88e-3
    reins = [m for m in build(family, "rein").modules() if isinstance(m, Rein)]
    assert reins and all(m.scale.item() == pytest.approx(1e-3, rel=1e-6) for m in reins)
    bb = build(family, "vpt")
    patch = bb.patch_embed.patch
    for name, p in bb.named_parameters():
        if name.endswith(".prompts"):
            bound = math.sqrt(6 / (3 * patch * patch + p.shape[1]))
            assert p.abs().max() <= bound, name
            assert p.abs().max() > (0.95 if p.numel() >= 500 else 0.5) * bound, name


# -- initialisations and wiring the counts cannot see ---------------------------------------------
def test_adaptformer_down_projection_starts_as_the_releases_lora_init():
    """AdaptFormer's "lora" init: W_down kaiming-uniform (a = sqrt 5, PyTorch's Linear default:
    uniform in +-1/sqrt(C)), both biases zero. A zero W_down would leave the adapter dead (with
    W_up = 0 neither projection's weight ever gets a gradient). The dropout a PETLConfig names
    reaches every adapter."""
    bb = build("swin", "adaptformer")
    adapters = [m for m in bb.modules() if isinstance(m, AdaptFormer)]
    assert adapters
    for m in adapters:
        bound = 1 / math.sqrt(m.down.in_features)
        w = m.down.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert not m.down.bias.any() and not m.up.bias.any()
    torch.manual_seed(0)
    eva = EVA02Backbone("tiny", EVA02Config(embed_dim=64, depth=4, num_heads=2, mlp_hidden=170,
                                            img_size=(64, 64)), "adaptformer", None)
    eva.add_petl(PETLConfig(method="adaptformer", dropout=0.3))
    assert {m.drop.p for m in eva.modules() if isinstance(m, AdaptFormer)} == {0.3}


def test_rein_tokens_start_in_the_releases_bound_and_hooks_use_their_own_layer():
    """Rein's release draws A and B uniform in +-sqrt(6 / (3 * 16^2 + sqrt(C r))) (patch 16 for
    every backbone). Each block's hook refines the block's output (pos 1, z_out; after attention
    it leaves the block alone) with the tokens of its own index in its stage's shared Rein;
    `rein_tokens` and `rein_rank` set the token factorisation's shapes."""
    bb = build_backbone("swin_nano", tuning="rein", rein_tokens=7, rein_rank=4)
    for rein, stage in zip(bb.rein, bb.block_stages()):
        assert rein.tokens_a.shape == (len(stage), 7, 4)
        assert rein.tokens_b.shape == (len(stage), 4, rein.dim)
    big = build("swin", "rein").rein[0]                          # 100 x 16 tokens per block
    val = math.sqrt(6 / (3 * 16 * 16 + math.sqrt(big.dim * 16)))
    for t in (big.tokens_a, big.tokens_b):
        assert t.abs().max() <= val and t.abs().max() > 0.9 * val
    torch.manual_seed(0)
    for rein, stage in zip(bb.rein, bb.block_stages()):
        with torch.no_grad():
            rein.scale.fill_(0.5)
            rein.mlp_delta_f.weight.normal_()
        for layer, block in enumerate(stage):
            hook = block.adapters
            assert hook.rein is rein and hook.layer == layer
            z_in = torch.randn(2, 5, rein.dim)
            z_out = z_in + torch.randn(2, 5, rein.dim)
            with torch.no_grad():
                same, p = hook(0, z_in, z_out, None, (1, 5))
                got, _ = hook(1, z_in, z_out, None, (1, 5))
                t = rein.tokens_a[layer] @ rein.tokens_b[layer]
                s = F.softmax(z_out @ t.T / math.sqrt(rein.dim), dim=-1)
                d = s[..., 1:] @ rein.mlp_token2feat(t[1:])
                want = z_out + 0.5 * rein.mlp_delta_f(d + z_out)
            assert same is z_out and p is None
            torch.testing.assert_close(got, want)


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_ir_patch_embedding_is_freshly_initialised(family):
    """Sec. 4.5's IR patch embedding has the visible one's architecture with its own fresh
    weights (PyTorch's default conv init: uniform in +-1/sqrt(3 p^2)), not a copy of the
    visible embedding's."""
    bb = build(family, "vpt")
    vis, ir = bb.patch_embed.proj, bb.ir_patch_embed.proj
    assert type(bb.ir_patch_embed) is type(bb.patch_embed) and ir.weight.shape == vis.weight.shape
    assert not torch.equal(ir.weight, vis.weight) and not torch.equal(ir.bias, vis.bias)
    bound = 1 / math.sqrt(3 * bb.patch_embed.patch ** 2)
    assert ir.weight.abs().max() <= bound and ir.weight.abs().max() > 0.9 * bound


def test_bi_adaptformer_runs_on_binarised_weights():
    """Bi-AdaptFormer's forward uses the 1-bit weights: x_l = x'_l + MLP(LN(x'_l))
    + s Q(W_up) ReLU(Q(W_down) x'_l), no biases, with Q(w) = mean +- 0.6745 std by the sign of
    w - mean (Binary Adapters' quantiser at 1 bit), written out in float64."""
    torch.manual_seed(0)
    bi = BiAdaptFormer(16, bottleneck=8, scale=0.5, dropout=0.0).double().eval()
    with torch.no_grad():
        bi.up.weight.normal_()

    def q(w):
        w = w.detach()
        mean, std = w.mean(), w.std()
        return torch.where(w > mean, mean + 0.6744897501960817 * std,
                           mean - 0.6744897501960817 * std)

    z_in = torch.randn(2, 6, 16, dtype=torch.float64)
    z_out = z_in + torch.randn(2, 6, 16, dtype=torch.float64)
    got, _ = bi(1, z_in, z_out, None, (2, 3))
    want = z_out + 0.5 * F.relu(z_in @ q(bi.down.weight).T) @ q(bi.up.weight).T
    torch.testing.assert_close(got.detach(), want)

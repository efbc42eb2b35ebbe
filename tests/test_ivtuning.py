"""The IV-tuning modules against independent float64 formulations of the paper's equations."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

from ivt.models import build_backbone
from ivt.models.ivtuning import (EMPG, SFT, BlockAdapters, HybridAdapter, HybridOperation,
                                 InternalPromptAdapter, IVTConfig, SimAM, map_to_tokens,
                                 tokens_to_map)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_token_map_layout_is_row_major_for_non_square_grids():
    B, H, W, C = 2, 3, 5, 4
    z = torch.arange(B * H * W * C, dtype=torch.float64).view(B, H * W, C)
    m = tokens_to_map(z, (H, W))
    assert m.shape == (B, C, H, W)
    for h in range(H):
        for w in range(W):
            assert torch.equal(m[:, :, h, w], z[:, h * W + w])
    assert torch.equal(map_to_tokens(m), z)
    with pytest.raises(ValueError, match="do not form a 5x3 grid"):
        tokens_to_map(z[:, :14], (5, 3))


@pytest.mark.parametrize("lam", [1e-4, 0.5])
def test_simam_matches_eq_12(lam):
    """Eq. 11-12 written as the paper does: e* = 4(s2 + l) / ((t - mu)^2 + 2 s2 + 2 l),
    out = x * sigmoid(1 / e*), with s2 = sum (t - mu)^2 / (HW - 1); at the default lambda and at
    one large enough to move every output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    ref = torch.empty_like(x)
    for b in range(2):
        for c in range(3):
            t = x[b, c]
            mu = t.mean()
            s2 = ((t - mu) ** 2).sum() / (t.numel() - 1)
            e_star = 4 * (s2 + lam) / ((t - mu) ** 2 + 2 * s2 + 2 * lam)
            ref[b, c] = t * torch.sigmoid(1 / e_star)
    torch.testing.assert_close(SimAM(lam)(x), ref, rtol=1e-12, atol=1e-12)


def test_simam_single_pixel_is_defined():
    x = torch.randn(2, 3, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(SimAM()(x),
                               x * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))


@pytest.mark.parametrize("c,expected", [(64, 8_608), (8, 180), (13, 13 // 4 * 10 + 2 * 169 + 52)])
def test_hybrid_operation_parameter_count(c, expected):
    assert n_params(HybridOperation(c)) == expected


@pytest.mark.parametrize("c,hw", [(8, (5, 7)), (13, (4, 4)), (64, (3, 9))])
def test_hybrid_operation_matches_nchw_convolutions(c, hw):
    """Fig. 3 built from NCHW layers (depthwise Conv2d, 1x1 Conv2d, BatchNorm2d), float64."""
    torch.manual_seed(0)
    ho = HybridOperation(c).double().train()
    cp = c // 4
    dw = nn.Conv2d(cp, cp, 3, padding=1, groups=cp).double()
    pw1, pw2 = nn.Conv2d(c, c, 1).double(), nn.Conv2d(c, c, 1).double()
    bn = nn.BatchNorm2d(c).double().train()
    with torch.no_grad():
        dw.weight.copy_(ho.dwconv.weight); dw.bias.copy_(ho.dwconv.bias)
        pw1.weight.copy_(ho.pw1.weight[:, :, None, None]); pw1.bias.copy_(ho.pw1.bias)
        pw2.weight.copy_(ho.pw2.weight[:, :, None, None]); pw2.bias.copy_(ho.pw2.bias)
        bn.weight.normal_(); bn.bias.normal_()
        ho.bn.weight.copy_(bn.weight); ho.bn.bias.copy_(bn.bias)
    x = torch.randn(2, c, *hw, dtype=torch.float64)
    y = x + torch.cat([dw(x[:, :cp]), x[:, cp:]], 1)
    ref = y + pw2(F.relu(bn(pw1(y))))
    ours = tokens_to_map(ho(map_to_tokens(x), hw), hw)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ho.bn.running_mean, bn.running_mean)   # BN trains normally


def test_sft_eq_14():
    torch.manual_seed(0)
    sft = SFT(6).double()
    with torch.no_grad():
        sft.gamma.normal_(); sft.beta.normal_(); sft.norm.weight.normal_(); sft.norm.bias.normal_()
    z = torch.randn(2, 10, 6, dtype=torch.float64)
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    ln = (z - mu) / torch.sqrt(var + 1e-5) * sft.norm.weight + sft.norm.bias
    torch.testing.assert_close(sft(z), ln * sft.gamma + sft.beta)
    plain = SFT(6, with_norm=False).double()
    assert n_params(plain) == 12
    torch.testing.assert_close(plain(z), z)            # gamma 1, beta 0 at init


def test_hybrid_adapter_eq_15():
    torch.manual_seed(0)
    ha = HybridAdapter(16, hidden=8, dropout=0.0).double()
    z, hw = torch.randn(2, 12, 16, dtype=torch.float64), (3, 4)
    ref = z + ha.up(F.gelu(ha.ho(ha.down(ha.sft(z)), hw)))
    torch.testing.assert_close(ha(z, hw), ref)
    # the dropout acts on GELU's output (the same mask, drawn from the same generator state)
    drop = HybridAdapter(16, hidden=8, dropout=0.5).double().train()
    drop.load_state_dict(ha.state_dict())
    torch.manual_seed(1)
    got = drop(z, hw)
    torch.manual_seed(1)
    h = F.gelu(drop.ho(drop.down(drop.sft(z)), hw))
    torch.testing.assert_close(got, z + drop.up(F.dropout(h, 0.5, training=True)))
    # per-block counts of Swin-L's breakdown at C = 192, d2 = 64
    big = HybridAdapter(192, 64)
    assert n_params(big.down) + n_params(big.up) == 129 * 192 + 64
    assert n_params(big.ho) == 8_608 and n_params(big.sft) == 4 * 192


def test_internal_prompt_adapter_structure():
    torch.manual_seed(0)
    ipa = InternalPromptAdapter(16, hidden=4).double()
    p, hw = torch.randn(2, 6, 16, dtype=torch.float64), (2, 3)
    h = ipa.down(ipa.sft_in(p))
    h = map_to_tokens(SimAM()(tokens_to_map(h, hw)))
    ref = F.gelu(ipa.sft_out(ipa.up(F.gelu(h))))
    torch.testing.assert_close(ipa(p, hw), ref)
    assert n_params(InternalPromptAdapter(192, 8)) == 17 * 192 + 8 + 6 * 192
    assert n_params(InternalPromptAdapter(192, 8, projection=False)) == 6 * 192


def test_empg_eq_7_to_13():
    torch.manual_seed(0)
    empg = EMPG(12, hidden=8).double().train()
    assert n_params(empg) - n_params(empg.norm) == 104 + 104 + 180 + 108   # s1, s2, HO(8), s3
    zv, zi, hw = torch.randn(2, 2, 20, 12, dtype=torch.float64).unbind(0) + ((4, 5),)
    mv = empg.ho(empg.s1(empg.norm(zv)), hw)                                 # Eq. 8, 10
    mi = map_to_tokens(SimAM()(tokens_to_map(empg.s2(empg.norm(zi)), hw)))  # Eq. 9, 11
    torch.testing.assert_close(empg(zv, zi, hw), empg.s3(mv + mi))           # Eq. 13
    assert n_params(EMPG(192, 8)) == 4_996 + 384 and n_params(EMPG(1024, 8)) == 25_796 + 2_048


def test_empg_init_is_xavier():
    """Every EMPG weight with dim > 1 (s1, s2, s3 and HO's dwconv, pw1, pw2) is xavier-uniform,
    bound sqrt(6 / ((fan_in + fan_out) k)) with k the kernel area (Glorot & Bengio 2010; the
    EMPG docstring). At C0 = 192, d1 = 32, PyTorch's default init (bound 1/sqrt(fan_in k)) is
    clearly apart: 0.072 (s1, s2) and 0.18 (s3) vs 0.16, 0.18 vs 0.31 for pw1/pw2, 0.33 vs 0.27
    for the dwconv. Each tensor holds >= 72 samples, so its largest |w| lies within 20% of its
    bound."""
    torch.manual_seed(0)
    empg = EMPG(192, 32)
    checked = []
    for name, p in empg.named_parameters():
        if p.dim() < 2:                                   # biases, LayerNorm, BN: defaults
            continue
        k = p[0, 0].numel()                               # kernel area, 1 for a Linear
        bound = (6 / ((p.shape[0] + p.shape[1]) * k)) ** 0.5
        m = p.detach().abs().max().item()
        assert 0.8 * bound < m <= bound, f"{name}: max |w| {m:.4f}, xavier bound {bound:.4f}"
        checked.append(name)
    assert checked == ["s1.weight", "ho.dwconv.weight", "ho.pw1.weight", "ho.pw2.weight",
                       "s2.weight", "s3.weight"]


def test_ipa_width_is_d3_and_empg_width_d1():
    """The widths of Sec. 3: EMPG hidden d1, Hybrid Adapter hidden d2, IPA hidden d3 (the
    ablations of Tab. 8 vary d1 and d3 together, so all three differ here). One IPA of
    width d3 has 2 C d3 + d3 + C (down, up) + 4 C + 2 C (SFT with LN, SFT without)
    parameters; checked in BlockAdapters and in a whole Swin backbone."""
    C, d1, d2, d3 = 32, 4, 8, 12
    ba = BlockAdapters(C, IVTConfig(d1=d1, d2=d2, d3=d3))
    for ipa in (ba.ipa1, ba.ipa2):
        assert (ipa.down.in_features, ipa.down.out_features, ipa.up.in_features) == (C, d3, d3)
        assert n_params(ipa) == 2 * C * d3 + d3 + C + 6 * C
    for ha in (ba.ha1, ba.ha2):
        assert ha.down.out_features == d2 and ha.ho.cp == d2 // 4
    bb = build_backbone("swin_nano", tuning="ivt", d1=d1, d2=d2, d3=d3)
    empg = bb.empg
    assert empg.s1.out_features == empg.s2.out_features == empg.s3.in_features == d1
    widths = {(n.rsplit(".", 1)[-1], m.down.out_features) for n, m in bb.named_modules()
              if n.endswith(("ipa1", "ipa2", "ha1", "ha2"))}
    assert widths == {("ipa1", d3), ("ipa2", d3), ("ha1", d2), ("ha2", d2)}


@pytest.mark.parametrize("name", ["swin_nano", "eva02_b"])
def test_defaults_are_the_papers(name):
    """spec/method.md, Sec. 3: widths d1 = 8, d2 = 64, d3 = 8, the Hybrid Adapter's dropout
    p = 0.1 after its GELU, SimAM's lambda = 1e-4 (Eq. 12); in every adapter of a built
    backbone."""
    cfg = IVTConfig()
    assert (cfg.d1, cfg.d2, cfg.d3, cfg.dropout, cfg.lam) == (8, 64, 8, 0.1, 1e-4)
    bb = build_backbone(name, tuning="ivt", img_size=(32, 32))
    drops = [m.drop.p for m in bb.modules() if isinstance(m, HybridAdapter)]
    lams = [m.lam for m in bb.modules() if isinstance(m, SimAM)]
    assert drops and set(drops) == {0.1}
    assert lams and set(lams) == {1e-4}
    assert bb.empg.s1.out_features == 8


@pytest.mark.parametrize("name", ["swin_nano", "eva02_b"])
def test_adapters_start_as_the_spec_says_with_nothing_zero_initialised(name):
    """spec/method.md Sec. 2, Initialisation: every Linear of a Hybrid Adapter or an IPA is
    trunc-normal std 0.02 with zero bias, nothing zero-initialised (zero-init `up` is an extra,
    off by default); EMPG's shared LayerNorm starts at 1 / 0 with PyTorch's eps 1e-5. The sample
    std of n >= 256 normal draws has a standard error of 0.02 / sqrt(2n) <= 9e-4."""
    assert IVTConfig().zero_init_up is False
    torch.manual_seed(0)
    bb = build_backbone(name, tuning="ivt", img_size=(32, 32))
    adapters = [m for m in bb.modules() if isinstance(m, (HybridAdapter, InternalPromptAdapter))]
    linears = [lin for a in adapters for lin in (a.down, a.up)]
    assert linears and all(lin.weight.numel() >= 256 for lin in linears)
    for lin in linears:
        assert torch.count_nonzero(lin.bias) == 0
        assert 0.014 < lin.weight.std().item() < 0.026, lin
    pooled = torch.cat([lin.weight.flatten() for lin in linears])
    assert abs(pooled.std().item() - 0.02) < 0.02 / (2 * pooled.numel()) ** 0.5 * 6
    norm = bb.empg.norm
    assert norm.eps == 1e-5
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.bias, torch.zeros_like(norm.bias))


@pytest.mark.parametrize("name", ["swin_nano", "eva02_b"])
def test_the_first_blocks_input_is_eq_2(name):
    """Eq. 2: Z0 = Zv + P_E with P_E = EMPG(Zv, Zi) (Eq. 7-13); for EVA02 (spec Sec. 2) on the
    patch tokens, before the cls token is prepended and the absolute position embedding added
    (here at the embedding's own grid: no resize)."""
    torch.manual_seed(0)
    bb = build_backbone(name, tuning="ivt", img_size=(32, 32)).double().eval()
    vis, ir = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(2, 3, 32, 32,
                                                                          dtype=torch.float64)
    first = bb.layers[0].blocks[0] if name.startswith("swin") else bb.blocks[0]
    seen = {}
    first.register_forward_pre_hook(lambda m, args: seen.update(z=args[0].clone()))
    with torch.no_grad():
        bb(vis, ir)
        zv, hw = bb.patch_embed(vis)
        zi, _ = bb.ir_patch_embed(ir)
        z0 = zv + bb.empg(zv, zi, hw)
        if not name.startswith("swin"):
            assert bb.pos_embed.shape[1] == 1 + hw[0] * hw[1]
            z0 = torch.cat([bb.cls_token.expand(2, -1, -1), z0], 1) + bb.pos_embed
    torch.testing.assert_close(seen["z"], z0, rtol=0, atol=1e-12)

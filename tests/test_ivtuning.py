"""The IV-tuning modules against independent float64 formulations of the paper's equations."""
import torch
import torch.nn as nn
import torch.nn.functional as F
import pytest

from ivt.models.ivtuning import (EMPG, SFT, HybridAdapter, HybridOperation, InternalPromptAdapter,
                                 SimAM, map_to_tokens, tokens_to_map)


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


def test_simam_matches_eq_12():
    """Eq. 11-12 written as the paper does: e* = 4(s2 + l) / ((t - mu)^2 + 2 s2 + 2 l),
    out = x * sigmoid(1 / e*), with s2 = sum (t - mu)^2 / (HW - 1)."""
    torch.manual_seed(0)
    x, lam = torch.randn(2, 3, 5, 7, dtype=torch.float64), 1e-4
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
    torch.testing.assert_close(SimAM()(x), x * torch.sigmoid(torch.tensor(0.5, dtype=torch.float64)))


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
    empg = EMPG(192, 8)
    bound = (6 / (192 + 8)) ** 0.5
    w = empg.s1.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound

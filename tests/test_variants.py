"""IV-tuning's variants (the paper's Sec. 4.6, Tables 5-6 and Fig. 4) checked by value.

For every variant, a tiny Swin and a tiny EVA02 (float64, eval mode, seeded random weights) run
once with hooks on EMPG and every block. Each recorded block output is then recomputed by the
formulas written below from the block's own frozen sub-layers and the adapters' weights, with
the variant's wiring taken from `EXPECTED` (written out here from the paper, not read from
`IVTConfig`): which of HA1/IPA1/HA2/IPA2 exist, sequential or parallel HA input, which prompt each
block's IPAs read, SimAM or not, IPA projections or not, EMPG's visible stream or not, and what
the infrared stream is fed. Separate tests check the defining differences directly: parallel and
sequential outputs differ; `ir_missing` equals IV-tuning fed vis as ir; `pe_ir`'s P_E does not
change with the visible image; `layers` leaves the other blocks pure visible blocks.
Only the reference forward (what `build_backbone` builds; `ivt.fast.make_fast` gives the fast
path, tests/test_fast_path.py) is tested here.
"""
import math
from typing import Dict, List, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivt.models import VARIANTS
from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.ivtuning import IVTConfig, SimAM
from ivt.models.swin import SwinBackbone, SwinConfig

BASE = dict(ha=(0, 1), ipa=(0, 1), parallel=False, deep=False, simam=True, projection=True,
            visible=True, ir_is_vis=False)
# What each variant is (Sec. 4.6); positions: 0 after attention, 1 after the MLP.
EXPECTED: Dict[str, dict] = {
    "ivt": {},
    "empg_only": dict(ha=(), ipa=()),
    "empg_ha": dict(ipa=()),
    "mhsa_only": dict(ha=(0,), ipa=(0,)),
    "ffn_only": dict(ha=(1,), ipa=(1,)),
    "parallel": dict(parallel=True),
    "ipa_wo_projection": dict(projection=False),
    "ipa_deep": dict(deep=True),
    "wo_simam": dict(simam=False),
    "pe_ir": dict(visible=False),
    "ir_missing": dict(ir_is_vis=True),
}
LAM = 1e-4


def test_every_variant_has_an_expectation():
    assert set(EXPECTED) == set(VARIANTS)


# -- tiny models ------------------------------------------------------------------------------
def tiny(family: str, variant: str, layers=None, tuning: str = "ivt", seed: int = 0) -> nn.Module:
    """A float64 model in eval mode with every parameter and BatchNorm statistic random."""
    ivt_cfg = (IVTConfig(d1=4, d2=8, d3=4, variant=variant, layers=layers) if tuning == "ivt"
               else None)
    if family == "swin":
        model = SwinBackbone("swin_tiny", SwinConfig(16, (2, 2), (2, 2), 3, drop_path_rate=0.0),
                             tuning, ivt_cfg)
    else:
        model = EVA02Backbone("eva02_tiny", EVA02Config(32, 3, 2, 85, patch_size=8,
                                                        img_size=(32, 32), drop_path_rate=0.0),
                              tuning, ivt_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 1 / math.sqrt(math.prod(p.shape[1:])) if p.dim() >= 2 else 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "gamma")):
                p.add_(1.0)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model.double().eval()


def inputs(family: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    size = (28, 36) if family == "swin" else (24, 40)      # grids 7 x 9 (Swin) and 3 x 5 (EVA02)
    return (torch.randn((2, 3) + size, generator=g, dtype=torch.float64),
            torch.randn((2, 3) + size, generator=g, dtype=torch.float64))


def blocks_of(model) -> List[nn.Module]:
    if isinstance(model, SwinBackbone):
        return [b for stage in model.layers for b in stage.blocks]
    return list(model.blocks)


def run_recorded(model, vis, ir):
    """Forward with hooks: EMPG's (args, P_E), every block's (args, (z, prompt)), in call order."""
    rec = {"empg": None, "blocks": []}
    hooks = [model.empg.register_forward_hook(lambda m, a, o: rec.__setitem__("empg", (a, o)))]
    for b in blocks_of(model):
        hooks.append(b.register_forward_hook(lambda m, a, o: rec["blocks"].append((m, a, o))))
    with torch.no_grad():
        rec["out"] = model(vis, ir)
    for h in hooks:
        h.remove()
    return rec


# -- independent formulas (Sec. 3.2-3.4, Eq. 7-15), on the modules' weights ---------------------
def linear(z, lin):
    return z @ lin.weight.T + lin.bias


def layer_norm(z, ln):
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    return (z - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def sft(z, m, with_ln=True):
    """Eq. 14: LN(z) * gamma + beta, or z * gamma + beta."""
    return (layer_norm(z, m.norm) if with_ln else z) * m.gamma + m.beta


def simam(h, hw):
    """Eq. 11-12 per sample and channel of the (H, W) grid, on tokens (B, N, c)."""
    mu = h.mean(1, keepdim=True)
    d = (h - mu) ** 2
    v = d.sum(1, keepdim=True) / (hw[0] * hw[1] - 1)
    return h * torch.sigmoid(d / (4 * (v + LAM)) + 0.5)


def hybrid_operation(h, hw, m):
    """Fig. 3 / Eq. 10 on tokens (B, N, c): partial depthwise conv + residual, then 1x1 convs with
    BatchNorm (eval: running statistics) and a second residual."""
    B, N, c = h.shape
    cp = c // 4
    x = h.transpose(1, 2).reshape(B, c, *hw)
    conv = F.conv2d(x[:, :cp], m.dwconv.weight, m.dwconv.bias, padding=1, groups=cp)
    y = (x + torch.cat([conv, x[:, cp:]], 1)).reshape(B, c, N).transpose(1, 2)
    t = linear(y, m.pw1)
    t = (t - m.bn.running_mean) / torch.sqrt(m.bn.running_var + m.bn.eps) * m.bn.weight + m.bn.bias
    return y + linear(torch.relu(t), m.pw2)


def ha_branch(z, hw, m):
    """psi(z) of Eq. 15: up(gelu(HO(down(SFT(z))))) (dropout off in eval)."""
    return linear(gelu(hybrid_operation(linear(sft(z, m.sft), m.down), hw, m.ho)), m.up)


def ipa(p, hw, m, e):
    """Sec. 3.4: gelu(SFT'(up(gelu(simam(down(SFT(P))))))), without down/up or SimAM per variant."""
    h = sft(p, m.sft_in)
    if e["projection"]:
        h = linear(h, m.down)
    if e["simam"]:
        h = simam(h, hw)
    h = gelu(h)
    if e["projection"]:
        h = linear(h, m.up)
    return gelu(sft(h, m.sft_out, with_ln=False))


def empg(zv, zi, hw, m, e):
    """Eq. 7-13: P_E = s3(HO(s1(LN(Zv))) + simam(s2(LN(Zi)))), one shared LN."""
    mi = linear(layer_norm(zi, m.norm), m.s2)
    if e["simam"]:
        mi = simam(mi, hw)
    if not e["visible"]:
        return linear(mi, m.s3)
    mv = hybrid_operation(linear(layer_norm(zv, m.norm), m.s1), hw, m.ho)
    return linear(mv + mi, m.s3)


def adapt(adapters, e, pos, z_in, z_out, prompt, hw):
    """Eq. 5-6 after sub-layer `pos`: z_out + psi(z_out) + IPA(P); parallel (Fig. 4(a)) feeds
    psi the sub-layer's input; ipa_deep (Fig. 4(e)) passes IPA's output on as the prompt."""
    if adapters is None:
        return z_out, prompt
    z = z_out
    if pos in e["ha"]:
        z = z + ha_branch(z_in if e["parallel"] else z_out, hw, getattr(adapters, f"ha{pos + 1}"))
    if pos in e["ipa"]:
        p_internal = ipa(prompt, hw, getattr(adapters, f"ipa{pos + 1}"), e)
        z = z + p_internal
        if e["deep"]:
            prompt = p_internal
    return z, prompt


def block_formula(block, args, e):
    """A block's (z, prompt) from its recorded inputs: frozen sub-layers, then the adapters."""
    if len(args) == 3:                                               # Swin: (z, hw, prompt)
        z, hw, prompt = args
        a = z + block.window_attention(block.norm1(z), hw)
        a, prompt = adapt(block.adapters, e, 0, z, a, prompt, hw)
        m = a + block.mlp(block.norm2(a))
        return adapt(block.adapters, e, 1, a, m, prompt, hw)
    z, hw, rope, prompt = args                                       # EVA02: patch tokens only
    a = z + block.attn(block.norm1(z), rope)
    patches, prompt = adapt(block.adapters, e, 0, z[:, 1:], a[:, 1:], prompt, hw)
    a = torch.cat([a[:, :1], patches], 1)
    m = a + block.mlp(block.norm2(a))
    patches, prompt = adapt(block.adapters, e, 1, a[:, 1:], m[:, 1:], prompt, hw)
    return torch.cat([m[:, :1], patches], 1), prompt


def expected_prompts(model, rec, e) -> List[torch.Tensor]:
    """The external prompt each block must receive (Sec. 3.1; Fig. 4(e) for ipa_deep).

    Swin: stage 1's blocks get P_E, a later stage's blocks its input after patch merging; with
    ipa_deep each block gets the previous block's last IPA output within the stage. EVA02: block
    0 gets P_E, block l > 0 its input tokens without cls; with ipa_deep the previous block's.
    """
    p_e = rec["empg"][1]
    want = []
    if isinstance(model, SwinBackbone):
        i = 0
        for s, stage in enumerate(model.layers):
            for j in range(len(stage.blocks)):
                _, args, _ = rec["blocks"][i]
                if j == 0:
                    want.append(p_e if s == 0 else args[0])
                else:
                    want.append(rec["blocks"][i - 1][2][1] if e["deep"] else want[-1])
                i += 1
        return want
    for i, (_, args, _) in enumerate(rec["blocks"]):
        if i == 0:
            want.append(p_e)
        else:
            want.append(rec["blocks"][i - 1][2][1] if e["deep"] else args[0][:, 1:])
    return want


def check_structure(model, e, layers: Optional[List[int]]):
    """The modules a variant has: EMPG's visible stream and SimAM, which blocks carry adapters,
    which of HA1/IPA1/HA2/IPA2 they hold, and the IPAs' projections and SimAM."""
    assert (model.empg.s1 is not None) == e["visible"]
    assert (model.empg.ho is not None) == e["visible"]
    assert isinstance(model.empg.simam, SimAM) == e["simam"]
    for index, block in enumerate(blocks_of(model)):
        has = (layers is None or index in layers) and bool(e["ha"] or e["ipa"])
        assert (block.adapters is not None) == has, index
        if not has:
            continue
        for pos in (0, 1):
            ha = getattr(block.adapters, f"ha{pos + 1}")
            p = getattr(block.adapters, f"ipa{pos + 1}")
            assert (ha is not None) == (pos in e["ha"]), (index, pos)
            assert (p is not None) == (pos in e["ipa"]), (index, pos)
            if p is not None:
                assert isinstance(p.down, nn.Linear) == e["projection"]
                assert isinstance(p.up, nn.Linear) == e["projection"]
                assert isinstance(p.simam, SimAM) == e["simam"]
                assert not any(isinstance(m, nn.Linear) for m in p.modules()) or e["projection"]
    n_simam = sum(isinstance(m, SimAM) for m in model.modules())
    n_ipa = sum(len(e["ipa"]) for b in blocks_of(model) if b.adapters is not None)
    assert n_simam == (1 + n_ipa if e["simam"] else 0)


def assert_close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", ["swin", "eva02"])
@pytest.mark.parametrize("variant,layers", [(v, None) for v in VARIANTS] + [("ivt", [1, 2])])
def test_variant_equals_its_formula(family, variant, layers):
    e = {**BASE, **EXPECTED[variant]}
    model = tiny(family, variant, layers)
    check_structure(model, e, layers)
    vis, ir = inputs(family)
    rec = run_recorded(model, vis, ir)
    # EMPG on the two patch embeddings; the infrared one is fed vis for ir_missing (Fig. 4(h)).
    zv, hw = model.patch_embed(vis)
    zi, _ = model.ir_patch_embed(vis if e["ir_is_vis"] else ir)
    args, p_e = rec["empg"]
    assert_close(args[0], zv, "EMPG's visible tokens")
    assert_close(args[1], zi, "EMPG's infrared tokens")
    assert_close(p_e, empg(zv, zi, hw, model.empg, e), "P_E")
    prompts = expected_prompts(model, rec, e)
    assert len(rec["blocks"]) == len(blocks_of(model))
    for i, ((block, args, (z, prompt)), want_prompt) in enumerate(zip(rec["blocks"], prompts)):
        assert_close(args[-1], want_prompt, f"block {i}'s external prompt")
        want_z, want_next = block_formula(block, args, e)
        assert_close(z, want_z, f"block {i}'s output")
        assert_close(prompt, want_next, f"block {i}'s returned prompt")


# -- the defining differences, directly -------------------------------------------------------
def twin(family, variant, source, **kw):
    """A model of `variant` holding `source`'s weights (same modules, other wiring)."""
    model = tiny(family, variant, seed=99, **kw)
    model.load_state_dict(source.state_dict())
    return model


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_parallel_and_sequential_differ(family):
    seq = tiny(family, "ivt")
    par = twin(family, "parallel", seq)
    vis, ir = inputs(family)
    with torch.no_grad():
        diff = max((a - b).abs().max().item() for a, b in zip(seq(vis, ir), par(vis, ir)))
    assert diff > 1e-2


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_ir_missing_equals_feeding_vis_as_ir(family):
    missing = tiny(family, "ir_missing")
    ivt = twin(family, "ivt", missing)
    vis, ir = inputs(family)
    with torch.no_grad():
        got, got_none = missing(vis, ir), missing(vis)
        want, with_ir = ivt(vis, vis), ivt(vis, ir)
    for a, b, c in zip(got, got_none, want):
        assert torch.equal(a, b)
        assert_close(a, c, "ir_missing(vis, ir) vs ivt(vis, vis)")
    assert max((a - b).abs().max().item() for a, b in zip(want, with_ir)) > 1e-2


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_pe_ir_prompt_ignores_the_visible_stream(family):
    vis, ir = inputs(family)
    vis2, _ = inputs(family, seed=2)
    p_e = {}
    for variant in ("pe_ir", "ivt"):
        model = tiny(family, variant)
        a, b = run_recorded(model, vis, ir)["empg"][1], run_recorded(model, vis2, ir)["empg"][1]
        p_e[variant] = (a - b).abs().max().item()
    assert p_e["pe_ir"] == 0.0
    assert p_e["ivt"] > 1e-2


@pytest.mark.parametrize("family", ["swin", "eva02"])
def test_layers_leaves_the_other_blocks_pure_visible(family):
    """With layers=[1, 2], every other block computes exactly what the visible model's block
    (same weights, no adapters) computes on the same input; blocks 1 and 2 do not."""
    model = tiny(family, "ivt", layers=[1, 2])
    visible = tiny(family, "ivt", tuning="freeze", seed=5)
    visible.load_state_dict({k: v for k, v in model.state_dict().items()
                             if k in visible.state_dict()})
    vis, ir = inputs(family)
    rec = run_recorded(model, vis, ir)
    for index, ((_, args, (z, _)), plain) in enumerate(zip(rec["blocks"], blocks_of(visible))):
        with torch.no_grad():
            z_plain, _ = plain(*args[:-1], None)
        if index in (1, 2):
            assert (z - z_plain).abs().max().item() > 1e-2, index
        else:
            assert torch.equal(z, z_plain), index

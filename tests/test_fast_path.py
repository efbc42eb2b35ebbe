"""The fast path (`impl="fast"`, `ivt.fast.make_fast`) is a different forward over the same
parameters: its outputs, a loss and every trainable gradient must equal the reference path's, for
every IV-tuning variant, on Swin and EVA02, in float64, with dropout, drop-path and BatchNorm in
training mode, and with every memory option.

At inference (eval mode, no autograd) the fast path's outputs equal the reference path's too,
with random BatchNorm running statistics.

Also: the stage-batched IPAs equal the per-IPA modules, window attention's `extra_kv` equals
attention over the window plus the extra tokens written out by hand, and the relative-position
index stays out of the state dict.
"""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ivt.fast import make_fast
from ivt.fast.prompts import _FoldDown, _FoldUp, _NormDown, _UpGelu, internal_prompts
from ivt.fast.swin import FastSwinBlock
from ivt.models import VARIANTS, build_backbone
from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.ivtuning import InternalPromptAdapter, IVTConfig
from ivt.models.swin import SwinBlock

ROOT = Path(__file__).resolve().parents[1]


def randomize(model):
    """Non-trivial values for every parameter (gamma/beta, LN affine, BN affine included)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model


def tiny_eva(fast, variant="ivt", layers=None, memory="keep", fused=False):
    """A 3-block EVA02 with IV-tuning: the reference path, or with `fast` the fast (or `fused`)
    one with the memory option `memory`."""
    cfg = EVA02Config(embed_dim=32, depth=3, num_heads=2, mlp_hidden=48, patch_size=8,
                      img_size=(24, 32), drop_path_rate=0.2)
    model = EVA02Backbone("tiny", cfg, "ivt", IVTConfig(variant=variant, layers=layers, d2=16))
    return make_fast(model, "fused" if fused else "fast", memory) if fast else model


def impl(fast, fused=False):
    """make_fast's `impl` for one side of a `pair`."""
    return ("fused" if fused else "fast") if fast else "reference"


def run(model, vis, ir, train=True):
    """Outputs, a loss and the gradient of every trainable parameter, training mode (or eval
    mode with `train=False`), seed 1."""
    model.train(train)
    torch.manual_seed(1)                      # same dropout and drop-path draws in both paths
    outs = model(vis, ir)
    weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outs]
    loss = sum((o * w).sum() + o.pow(2).mean() for o, w in zip(outs, weights))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return outs, loss, grads


def assert_same(ref, fast):
    (o1, l1, g1), (o2, l2, g2) = ref, fast
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=0)
    assert set(g1) == set(g2)
    # Gradients that are zero in exact arithmetic (a bias before train-mode BatchNorm) are
    # rounding noise on both paths: the absolute tolerance follows the largest gradient.
    scale = max(g.abs().max().item() for g in g1.values())
    for name in g1:
        assert g2[name] is not None, name
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-8, atol=1e-11 * scale,
                                   msg=lambda m: f"{name}: {m}")


def assert_same_buffers(ref, fast):
    """BatchNorm running statistics and batch counts: updated once per forward on both paths
    (a checkpoint's recomputation must not update them again)."""
    for (n1, b1), (n2, b2) in zip(ref.named_buffers(), fast.named_buffers()):
        assert n1 == n2
        torch.testing.assert_close(b2, b1, rtol=1e-12, atol=1e-14, msg=n1)


def pair(build):
    ref = randomize(build(False).double())
    fast = build(True).double()
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("variant", VARIANTS)
def test_swin_fast_equals_reference(variant):
    ref, fast = pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", variant=variant,
                                                        d2=16, drop_path_rate=0.2), impl(f)))
    torch.manual_seed(0)
    vis = torch.randn(2, 3, 44, 60, dtype=torch.float64)       # 11 x 15 tokens: odd, padded
    ir = torch.randn(2, 1, 44, 60, dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))
    assert_same_buffers(ref, fast)


@pytest.mark.parametrize("layers, memory",
                         [([0, 3, 5], "keep"), (None, "checkpoint"), ([2], "checkpoint"),
                          (None, "checkpoint:3"), (None, "recompute"),
                          ([0, 3, 5], "checkpoint:3+recompute")])
def test_swin_fast_layers_and_memory(layers, memory):
    ref, fast = pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", layers=layers, d2=16,
                                                        drop_path_rate=0.2),
                                         impl(f), memory if f else "keep"))
    torch.manual_seed(0)
    vis, ir = torch.randn(1, 3, 36, 28, dtype=torch.float64), torch.randn(1, 3, 36, 28,
                                                                          dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))
    assert_same_buffers(ref, fast)


@pytest.mark.parametrize("variant", VARIANTS)
def test_eva02_fast_equals_reference(variant):
    ref, fast = pair(lambda f: tiny_eva(f, variant))
    torch.manual_seed(0)
    vis, ir = torch.randn(2, 3, 24, 40, dtype=torch.float64), torch.randn(2, 3, 24, 40,
                                                                          dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))


@pytest.mark.parametrize("layers, memory",
                         [([1], "keep"), (None, "checkpoint"), (None, "checkpoint:2"),
                          (None, "recompute"), ([0, 2], "checkpoint:1+recompute")])
def test_eva02_fast_layers_and_memory(layers, memory):
    ref, fast = pair(lambda f: tiny_eva(f, layers=layers, memory=memory))
    torch.manual_seed(0)
    vis, ir = torch.randn(1, 3, 32, 24, dtype=torch.float64), torch.randn(1, 3, 32, 24,
                                                                          dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))
    assert_same_buffers(ref, fast)


def run_eval(model, vis, ir):
    """Inference outputs: eval mode (BatchNorm on its running statistics), no autograd."""
    model.eval()
    with torch.no_grad():
        return model(vis, ir)


def eval_pair(build):
    """Reference and fast models sharing random weights and random BatchNorm running stats."""
    ref, fast = pair(build)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, buffer in ref.named_buffers():
            if name.endswith("running_mean"):
                buffer.copy_(torch.randn(buffer.shape, generator=g) * 0.3)
            elif name.endswith("running_var"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


@pytest.mark.parametrize("fused", [False, True], ids=["fast", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_swin_fast_inference_equals_reference(variant, fused):
    """At inference; with impl="fused" each Hybrid Adapter, its residual and the internal
    prompt are one `kernels.hybrid_adapter_eval` call (its PyTorch reference here, on the CPU)."""
    ref, fast = eval_pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", variant=variant,
                                                             d2=16), impl(f, fused)))
    vis = torch.randn(2, 3, 44, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ir = torch.randn(2, 1, 44, 60, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(run_eval(ref, vis, ir), run_eval(fast, vis, ir)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_checkpointed_blocks_update_batchnorm_statistics_in_the_forward():
    """memory="checkpoint" in training mode: the forward updates BatchNorm's running statistics
    and batch count as the reference path's forward does, and the recomputation in backward
    leaves them alone."""
    ref, fast = pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", d2=16),
                                         impl(f), "checkpoint" if f else "keep"))
    g = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, 36, 28, dtype=torch.float64, generator=g) for _ in range(2))
    outs = {}
    for name, model in (("ref", ref), ("fast", fast)):
        model.train()
        torch.manual_seed(1)
        outs[name] = model(vis, ir)
    assert_same_buffers(ref, fast)
    after_forward = {n: b.clone() for n, b in fast.named_buffers()}
    sum(o.sum() for o in outs["fast"]).backward()
    for name, b in fast.named_buffers():
        assert torch.equal(b, after_forward[name]), name


def test_checkpointed_blocks_in_eval_mode_with_grad_equal_reference():
    """Gradients through checkpointed blocks with the model in eval mode (BatchNorm on its
    random running statistics, e.g. a BatchNorm-frozen step): the recomputation in backward
    normalises as the forward did, so outputs and gradients equal the reference path's without
    checkpointing, and no running statistic changes."""
    ref, fast = eval_pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", d2=16),
                                              impl(f), "checkpoint" if f else "keep"))
    before = {n: b.clone() for n, b in fast.named_buffers()}
    g = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, 36, 28, dtype=torch.float64, generator=g) for _ in range(2))
    assert_same(run(ref, vis, ir, train=False), run(fast, vis, ir, train=False))
    for name, b in fast.named_buffers():
        assert torch.equal(b, before[name]), name


@pytest.mark.parametrize("fused", [False, True], ids=["fast", "fused"])
@pytest.mark.parametrize("variant", ["ivt", "parallel", "ipa_deep", "ffn_only",
                                     "ipa_wo_projection"])
def test_eva02_fast_inference_equals_reference(variant, fused):
    """At inference; with impl="fused" the internal prompts of all blocks are folded at once,
    as factors where they have projections (`fold_block_ipas`), as SFTs where not (Fig. 4(f))."""
    ref, fast = eval_pair(lambda f: tiny_eva(f, variant, fused=fused))
    vis = torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ir = torch.randn(2, 3, 24, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for a, b in zip(run_eval(ref, vis, ir), run_eval(fast, vis, ir)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_fast_and_reference_share_state_dict_and_modules():
    """make_fast changes no parameter, buffer or module name; impl="reference" undoes it."""
    pairs = [(build_backbone("swin_nano", "ivt"),
              make_fast(build_backbone("swin_nano", "ivt"), "fused", "checkpoint")),
             (tiny_eva(False), tiny_eva(True, memory="checkpoint"))]
    for ref, fast in pairs:
        a, b = ref.state_dict(), fast.state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert not any(k.endswith("relative_position_index") for k in a)
        assert [n for n, _ in ref.named_modules()] == [n for n, _ in fast.named_modules()]
        assert [type(m) for m in ref.modules()] != [type(m) for m in fast.modules()]
        make_fast(fast, "reference")
        assert [type(m) for m in ref.modules()] == [type(m) for m in fast.modules()]


def test_importing_the_package_imports_no_kernels():
    """`ivt`, `ivt.models`, `ivt.trainer` and `ivt.tasks` load neither `kernels` nor Triton, nor
    does building a model: only making it fast or fused does (`ivt.fast`)."""
    code = ("import sys, ivt, ivt.models, ivt.trainer, ivt.tasks; "
            "assert 'kernels' not in sys.modules and 'triton' not in sys.modules; "
            "model = ivt.models.build_backbone('swin_nano', 'ivt'); "
            "assert 'kernels' not in sys.modules and 'ivt.fast' not in sys.modules; "
            "import ivt.fast; ivt.fast.make_fast(model, 'fast'); "
            "assert 'kernels' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("memory, count", [("keep", 0), ("checkpoint:1", 1),
                                           ("checkpoint:3", 3), ("checkpoint:5", 5),
                                           ("checkpoint", 8)])
def test_checkpoint_n_recomputes_the_first_blocks(memory, count, monkeypatch):
    """memory="checkpoint:n" runs the first n blocks' forward twice (again in backward), the
    others once; "checkpoint" all 8 of swin_nano's; 3 crosses from stage 1 (2 blocks) into
    stage 2."""
    calls = []
    original = FastSwinBlock.body
    monkeypatch.setattr(FastSwinBlock, "body",
                        lambda self, *a: calls.append(self) or original(self, *a))
    model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fast", memory)
    blocks = [b for stage in model.layers for b in stage.blocks]
    vis, ir = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    sum(o.sum() for o in model(vis, ir)).backward()
    assert [sum(c is b for c in calls) for b in blocks] == [2] * count + [1] * (8 - count)


@pytest.mark.parametrize("memory, count", [("keep", 0), ("checkpoint:2", 2), ("checkpoint", 3)])
def test_eva02_checkpoint_n_recomputes_the_first_blocks(memory, count, monkeypatch):
    """The same on the ViT path (`FastViTBlock`): with memory="checkpoint:n" the first n of
    the 3 blocks run their forward again in backward, the others once."""
    from ivt.fast.vit import FastViTBlock
    calls = []
    original = FastViTBlock.body
    monkeypatch.setattr(FastViTBlock, "body",
                        lambda self, *a: calls.append(self) or original(self, *a))
    model = tiny_eva(True, memory=memory).train()
    sum(o.sum() for o in model(torch.randn(1, 3, 24, 32), torch.randn(1, 3, 24, 32))).backward()
    assert [sum(c is b for c in calls) for b in model.blocks] == [2] * count + [1] * (3 - count)


def forward_counts(model, names):
    """{name: forward calls} summed over every module whose qualified name ends with it."""
    counts = dict.fromkeys(names, 0)
    for qualified, module in model.named_modules():
        for name in names:
            if qualified.endswith("." + name):
                module.register_forward_hook(
                    lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


@pytest.mark.parametrize("family", ["swin", "eva02"])
@pytest.mark.parametrize("recompute", [False, True])
def test_recompute_reruns_each_sublayer_up_to_its_last_linear(family, recompute):
    """memory="recompute": in backward each block reruns its frozen sub-layers up to, not
    including, their last Linear (which keeps nothing for backward): q/k/v and the MLP's first
    Linear(s) run twice, the output projections and fc2 once; the adapters are not rerun."""
    memory = "recompute" if recompute else "keep"
    if family == "swin":
        model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fast", memory)
        names, vis = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "ha1.down"], (1, 3, 64, 64)
        blocks = sum(len(stage.blocks) for stage in model.layers)
    else:
        model = tiny_eva(True, memory=memory)
        names = ["attn.k_proj", "attn.proj", "mlp.fc1_g", "mlp.fc2", "ha1.down"]
        vis = (1, 3, 24, 32)
        blocks = len(model.blocks)
    counts = forward_counts(model, names)
    model.train()
    sum(o.sum() for o in model(torch.randn(vis), torch.randn(vis))).backward()
    twice = 2 if recompute else 1
    assert counts == dict(zip(names, [twice * blocks, blocks, twice * blocks, blocks, blocks]))


@pytest.mark.parametrize("variant", ["parallel", "ipa_deep", "mhsa_only", "ir_missing"])
def test_recompute_equals_reference(variant):
    ref, fast = pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", variant=variant,
                                                        d2=16, drop_path_rate=0.2),
                                         impl(f), "recompute" if f else "keep"))
    torch.manual_seed(0)
    vis = torch.randn(2, 3, 44, 60, dtype=torch.float64)
    ir = torch.randn(2, 1, 44, 60, dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))
    ref, fast = pair(lambda f: tiny_eva(f, variant, memory="recompute"))
    vis, ir = torch.randn(2, 3, 24, 40, dtype=torch.float64), torch.randn(2, 3, 24, 40,
                                                                          dtype=torch.float64)
    assert_same(run(ref, vis, ir), run(fast, vis, ir))


@pytest.mark.parametrize("tuning", ["full", "freeze"])
def test_full_and_frozen_eva02_take_the_fast_attention(tuning):
    """Full fine-tuning and the frozen model get the fast forwards too (EVA02's q and k rotated
    together as complex numbers): same outputs and gradients as the reference, in float64; a
    PETL method's backbone is left as built."""
    cfg = EVA02Config(embed_dim=32, depth=3, num_heads=2, mlp_hidden=48, patch_size=8,
                      img_size=(24, 32), drop_path_rate=0.2)
    ref, fast = pair(lambda f: make_fast(EVA02Backbone("tiny", cfg, tuning, None), impl(f)))
    assert type(fast.blocks[0]).__name__ == "FastViTBlock"
    torch.manual_seed(0)
    vis = torch.randn(2, 3, 24, 40, dtype=torch.float64)
    if tuning == "freeze":                    # nothing trainable: the outputs, in eval mode
        ref.eval(), fast.eval()
        for a, b in zip(ref(vis), fast(vis)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-13)
    else:
        assert_same(run(ref, vis, None), run(fast, vis, None))
    vpt = make_fast(build_backbone("swin_nano", "vpt"), "fast")
    assert not any(type(m).__name__.startswith("Fast") for m in vpt.modules())


def test_memory_options_need_a_fast_impl_and_ivt():
    with pytest.raises(ValueError, match="memory='recompute' needs impl 'fast' or 'fused'"):
        make_fast(build_backbone("swin_nano", "ivt"), "reference", "recompute")
    cfg = EVA02Config(embed_dim=32, depth=3, num_heads=2, mlp_hidden=48, patch_size=8)
    with pytest.raises(ValueError, match="needs impl 'fast' or 'fused' and tuning 'ivt'"):
        make_fast(EVA02Backbone("tiny", cfg, "full", None), "fast", "recompute")
    with pytest.raises(ValueError, match="impl='turbo'"):
        make_fast(build_backbone("swin_nano", "ivt"), "turbo")
    with pytest.raises(ValueError, match="memory='checkpoint' needs"):
        make_fast(build_backbone("swin_nano", "ivt"), "reference", "checkpoint")
    with pytest.raises(ValueError, match="memory='checkpoint' needs"):
        make_fast(build_backbone("swin_nano", "full"), "fast", "checkpoint")
    with pytest.raises(ValueError, match="memory='checkpoint:2' needs impl"):
        make_fast(build_backbone("swin_nano", "ivt"), "reference", "checkpoint:2")
    for bad in ("checkpoint:0", "checkpoint:-1", "checkpoint:1.5", "checkpoint:all", "all",
                "recompute+checkpoint:2", "checkpoint+recompute"):
        with pytest.raises(ValueError, match="number of blocks"):
            make_fast(build_backbone("swin_nano", "ivt"), "fast", bad)
    make_fast(build_backbone("swin_nano", "full"), "fused")    # no adapters to fuse: no error
    with pytest.raises(TypeError, match="impl"):           # the builders build the paper's model
        build_backbone("swin_nano", "ivt", impl="fast")


@pytest.mark.parametrize("projection, simam", [(True, True), (False, True), (True, False)])
def test_batched_ipas_equal_each_ipa(projection, simam):
    torch.manual_seed(3)
    ipas = [randomize(InternalPromptAdapter(12, 4, simam, projection)).double() for _ in range(3)]
    p = torch.randn(2, 5 * 7, 12, dtype=torch.float64)
    stacked = internal_prompts(ipas, p, (5, 7))
    for ipa, out in zip(ipas, stacked):
        torch.testing.assert_close(out, ipa(p, (5, 7)), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_ipa_folds_keep_only_their_inputs(autocast):
    """The SFTs folded into the IPAs' projections (`_FoldDown`, `_FoldUp`) equal the algebra
    written out in float64 with autograd (forward and every gradient), in float32 under
    autocast too, while holding for backward only their inputs: no (k, d3, C) weight stack."""
    g = torch.Generator().manual_seed(8)
    k, d3, c = 3, 4, 10
    a, cc = (torch.randn(k, c, generator=g) for _ in range(2))
    gam, beta, u = (torch.randn(k, 1, c, generator=g) for _ in range(3))
    down_w = [torch.randn(d3, c, generator=g) for _ in range(k)]
    down_b = [torch.randn(d3, generator=g) for _ in range(k)]
    up_w = [torch.randn(c, d3, generator=g) for _ in range(k)]
    inputs = [a, cc, *down_w, *down_b, gam, beta, u, *up_w]
    rs = [torch.randn(shape, generator=g) for shape in ((k, d3, c), (k, d3), (k, d3, c),
                                                        (k, 1, c))]

    def reference(a, cc, *rest):
        W, b = torch.stack(rest[:k]), torch.stack(rest[k:2 * k])
        gam, beta, u, *up = rest[2 * k:]
        return (W * a[:, None, :], b + torch.einsum("kdc,kc->kd", W, cc),
                torch.stack([w.t() for w in up]) * gam, u * gam + beta)

    def folds(a, cc, *rest):
        gam, beta, u, *up = rest[2 * k:]
        return (*_FoldDown.apply(a, cc, *rest[:2 * k]), *_FoldUp.apply(gam, beta, u, *up))

    results, held = [], []
    for fn, dtype in ((reference, torch.float64), (folds, torch.float32)):
        xs = [t.to(dtype).requires_grad_() for t in inputs]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and fn is folds), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: held.append(t) or t,
                                                         lambda t: t):
            outs = fn(*xs)
        grads = torch.autograd.grad(sum((o * r).sum() for o, r in zip(outs, rs)), xs)
        results.append((outs, grads))
        if fn is folds:
            assert all(o.dtype == torch.float32 for o in outs)
            assert {t.data_ptr() for t in held} <= {x.data_ptr() for x in xs}
        held.clear()
    (o1, g1), (o2, g2) = results
    for ours, expected in zip(list(o2) + list(g2), list(o1) + list(g1)):
        torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_up_projection_gelu_keeps_only_its_inputs(autocast):
    """The IPAs' up-projection + GELU (`_UpGelu`) equals autograd through baddbmm, the float32
    cast autocast needs, and GELU (forward and every gradient), while holding for backward only
    its inputs: no (k, BN, C) pre-activation."""
    g = torch.Generator().manual_seed(5)
    k, n, d3, c = 3, 50, 8, 40
    b, h, w = (torch.randn(shape, generator=g, requires_grad=True)
               for shape in ((k, 1, c), (k, n, d3), (k, d3, c)))
    r = torch.randn(k, n, c, generator=g)
    held = []

    def pack(t):
        held.append(t)
        return t

    results = []
    for fn in ("reference", "recomputing"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fn == "reference":
                pre = torch.baddbmm(b, h, w)
                out = F.gelu(pre.float() if pre.dtype != w.dtype else pre)
            else:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = _UpGelu.apply(b, h, w)
        grads = torch.autograd.grad((out * r).sum(), (b, h, w))
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    assert o2.dtype == o1.dtype == torch.float32
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(o2, o1, **tol)
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e, **tol)
    assert sorted(t.numel() for t in held) == sorted(t.numel() for t in (b, h, w))


@pytest.mark.parametrize("autocast, dtype", [(False, torch.float64), (True, torch.float32),
                                             (True, torch.bfloat16)],
                         ids=["float64", "float32-bf16-autocast", "bf16-bf16-autocast"])
def test_norm_down_projection_recomputes_the_norm(autocast, dtype):
    """The IPAs' LayerNorm and folded down-projection (`_NormDown`) equals autograd through
    `F.layer_norm` and `F.linear` (forward and every gradient, bit for bit: the same operators
    in the same dtypes, with autocast too), on a strided prompt (EVA02's patch rows), while
    holding for backward only P and W: not the normalised prompt."""
    g = torch.Generator().manual_seed(6)
    B, N, C, kd3 = 2, 14, 24, 12
    p = torch.randn(B, 1 + N, C, generator=g, dtype=torch.float64)[:, 1:].to(dtype)
    p.requires_grad_()
    w, b = (torch.randn(shape, generator=g, dtype=torch.float64).to(
        torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        for shape in ((kd3, C), (kd3,)))
    r = torch.randn(B, N, kd3, generator=g, dtype=torch.float64)
    held = []

    def pack(t):
        held.append(t)
        return t

    results = []
    for fn in ("autograd", "recomputing"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fn == "autograd":
                out = F.linear(F.layer_norm(p, (C,), eps=1e-6), w, b)
            else:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    out = _NormDown.apply(p, w, b, 1e-6)
        grads = torch.autograd.grad((out * r.to(out.dtype)).sum(), (p, w, b))
        results.append((out, grads))
    (o1, g1), (o2, g2) = results
    assert o2.dtype == o1.dtype == (torch.bfloat16 if autocast else torch.float64)
    torch.testing.assert_close(o2, o1, rtol=0, atol=0)
    for a, e in zip(g2, g1):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=0, atol=0)
    assert len(held) == 2 and held[0] is p and held[1] is w
    # the float64 gradients against the published LayerNorm backward, written out
    if dtype == torch.float64:
        mu, var = p.mean(-1, keepdim=True), p.var(-1, unbiased=False, keepdim=True)
        n = (p - mu) / (var + 1e-6).sqrt()
        dn = r @ w
        dp = (dn - dn.mean(-1, keepdim=True) - n * (dn * n).mean(-1, keepdim=True)) / (
            var + 1e-6).sqrt()
        torch.testing.assert_close(g2[0], dp.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g2[1], (r.reshape(-1, kd3).t() @ n.reshape(-1, C)).detach(),
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shifted", [False, True])
def test_window_attention_extra_kv(shifted):
    """Each window attends to its own tokens (bias, shift mask) plus P extra tokens (no bias,
    no mask): written out window by window with explicit softmax."""
    torch.manual_seed(4)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shifted=shifted, mlp_ratio=2,
                      drop_path=0.0).double()
    torch.nn.init.normal_(block.attn.relative_position_bias_table)
    attn = block.attn
    B, H, W, C, P = 2, 8, 8, 8, 3
    x = torch.randn(B, H * W, C, dtype=torch.float64)
    extra = torch.randn(B, P, C, dtype=torch.float64)
    ours = block.window_attention(x, (H, W), extra)
    s = 2 if shifted else 0
    grid = torch.roll(x.view(B, H, W, C), (-s, -s), dims=(1, 2))
    region = torch.zeros(H, W, dtype=torch.long)                 # the shift's regions
    if s:
        for i, hs in enumerate((slice(0, -4), slice(-4, -s), slice(-s, None))):
            for j, ws in enumerate((slice(0, -4), slice(-4, -s), slice(-s, None))):
                region[hs, ws] = 3 * i + j
    out = torch.zeros_like(grid)
    d = C // 2
    ke = attn.qkv(extra)[..., C:2 * C].view(B, P, 2, d)
    ve = attn.qkv(extra)[..., 2 * C:].view(B, P, 2, d)
    hh, ww = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    hh, ww = hh.flatten(), ww.flatten()
    idx = (hh[:, None] - hh[None, :] + 3) * 7 + (ww[:, None] - ww[None, :] + 3)
    for b in range(B):
        for wi in range(0, H, 4):
            for wj in range(0, W, 4):
                t = grid[b, wi:wi + 4, wj:wj + 4].reshape(16, C)
                r = region[wi:wi + 4, wj:wj + 4].reshape(16)
                qkv = attn.qkv(t).view(16, 3, 2, d)
                for h in range(2):
                    logits = qkv[:, 0, h] @ qkv[:, 1, h].T * attn.scale
                    logits = logits + attn.relative_position_bias_table[idx, h]
                    logits = logits - 100.0 * (r[:, None] != r[None, :])   # Swin's mask value
                    le = qkv[:, 0, h] @ ke[b, :, h].T * attn.scale            # (16, P)
                    prob = torch.cat([logits, le], 1).softmax(-1)
                    vals = torch.cat([qkv[:, 2, h], ve[b, :, h]], 0)
                    out[b, wi:wi + 4, wj:wj + 4, h * d:(h + 1) * d] = (prob @ vals).view(4, 4, d)
    ref = attn.proj(torch.roll(out, (s, s), dims=(1, 2)).reshape(B, H * W, C))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)


def test_eva02_attention_extra_kv():
    torch.manual_seed(5)
    model = tiny_eva(False).double()
    attn = model.blocks[0].attn
    B, N, C, P = 2, 12, 32, 3
    x = torch.randn(B, 1 + N, C, dtype=torch.float64)
    extra = torch.randn(B, P, C, dtype=torch.float64)
    sin, cos = torch.randn(N, 16, dtype=torch.float64), torch.randn(N, 16, dtype=torch.float64)
    ours = attn(x, (sin, cos), extra)
    # The same attention over the sequence [x, extra], keeping the first 1 + N outputs, with the
    # extra tokens' rotary angles zero (sin 0, cos 1: not rotated) and their queries discarded.
    full = attn(torch.cat([x, extra], 1),
                (torch.cat([sin, torch.zeros(P, 16, dtype=torch.float64)]),
                 torch.cat([cos, torch.ones(P, 16, dtype=torch.float64)])))[:, :1 + N]
    torch.testing.assert_close(ours, full, rtol=1e-10, atol=1e-12)


def test_eva02_fast_heads_rotate_q_and_k_at_once_and_leave_cls_alone():
    """`attention_heads` with `with_cls_row` tables equals `Attention.heads` (which splits the
    cls token off, rotates the patch tokens' q and k one after the other and puts cls back),
    value and input gradient, on real rotary tables."""
    from ivt.fast.eva02 import attention_heads, with_cls_row
    from ivt.models.eva02 import rope_sin_cos
    torch.manual_seed(6)
    attn = randomize(tiny_eva(False).double()).blocks[1].attn
    rope = rope_sin_cos((3, 4), 16, device="cpu")
    x = torch.randn(2, 1 + 12, 32, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 1 + 12, 32, dtype=torch.float64)
    ours = attention_heads(attn, x, with_cls_row(rope))
    (g_ours,) = torch.autograd.grad((ours * r).sum(), x)
    reference = attn.heads(x, rope)
    (g_ref,) = torch.autograd.grad((reference * r).sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-12, atol=1e-13)
    turns = with_cls_row(rope)
    assert turns.forward.shape == turns.inverse.shape == (13, 8) and (turns.forward[0] == 1).all()
    torch.testing.assert_close(turns.forward * turns.inverse, torch.ones(13, 8) + 0j)


def test_eva02_fast_rotation_in_bf16_rounds_as_the_reference():
    """Under autocast q and k are bf16: the complex rotation computes in float32 and rounds
    once to bf16, as `apply_rope` does; its gradient (the inverse turn) equals the float64
    gradient of `apply_rope` rounded the same way."""
    from ivt.fast.eva02 import _Turn, with_cls_row
    from ivt.models.eva02 import apply_rope, rope_sin_cos
    torch.manual_seed(7)
    sin, cos = rope_sin_cos((5, 3), 32, device="cpu")
    turns = with_cls_row((sin, cos))
    x = torch.randn(2, 3, 4, 16, 32).bfloat16().requires_grad_()
    g = torch.randn(2, 3, 4, 16, 32).bfloat16()
    ours = _Turn.apply(x, turns)
    (dx,) = torch.autograd.grad(ours, x, g)
    assert ours.dtype == dx.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    reference = apply_rope(x64[..., 1:, :], sin.double(), cos.double())
    (dx64,) = torch.autograd.grad(reference, x64, g[..., 1:, :].double())
    # each result is the float64 value rounded to bf16 (float32's rounding first can move a
    # value across a bf16 tie: 1 bf16 ulp at most)
    torch.testing.assert_close(ours[..., 1:, :].double(), reference.bfloat16().double(),
                               rtol=2 ** -8, atol=0)
    torch.testing.assert_close(dx[..., 1:, :].double(), dx64[..., 1:, :].bfloat16().double(),
                               rtol=2 ** -8, atol=0)
    assert torch.equal(ours[..., :1, :], x[..., :1, :]) and torch.equal(dx[..., :1, :],
                                                                          g[..., :1, :])


def test_frozen_linear_saves_no_input():
    """The fast path relies on autograd not saving a Linear's input when its weight is frozen
    (dx = dy W needs only W): what is saved must be the weight's storage alone."""
    lin = torch.nn.Linear(8, 16).requires_grad_(False)
    x = torch.randn(4, 5, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        F.gelu(lin(x * 2))
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert lin.weight.untyped_storage().data_ptr() in storages
    activation = [t for t in saved if t.untyped_storage().data_ptr()
                  != lin.weight.untyped_storage().data_ptr()]
    assert [tuple(t.shape) for t in activation] == [(4, 5, 16)]     # GELU's input only


class ScaleHook(torch.nn.Module):
    """A block hook that is not `BlockAdapters` (as the PETL methods plug in)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))

    def forward(self, pos, z_in, z_out, prompt, hw):
        return z_in + (z_out - z_in) * self.scale, prompt


@pytest.mark.parametrize("backbone", ["swin", "eva02"])
def test_fast_path_calls_other_hooks_as_usual(backbone):
    """A block whose hook is not `BlockAdapters` calls it as the reference does, on the patch
    tokens only where the block also has a cls token (EVA02)."""
    if backbone == "swin":
        ref, fast = pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", d2=16,
                                                            drop_path_rate=0.0), impl(f)))
        hooked, size = [m.layers[1].blocks[0] for m in (ref, fast)], (32, 48)
    else:
        ref, fast = pair(lambda f: tiny_eva(f))
        hooked, size = [m.blocks[1] for m in (ref, fast)], (24, 40)
    for block in hooked:
        block.adapters = ScaleHook()
    torch.manual_seed(0)
    vis, ir = (torch.randn(2, 3, *size, dtype=torch.float64) for _ in range(2))
    assert_same(run(ref, vis, ir), run(fast, vis, ir))


def test_only_impl_fused_runs_the_hybrid_adapter_kernels(monkeypatch):
    """impl="fast" keeps each Hybrid Adapter as its modules' forward (`FastHybridAdapter.branch`)
    and only impl="fused" hands it, its residual and internal prompt to
    `kernels.hybrid_adapter_eval` at inference; making a fused model fast again undoes it."""
    import kernels
    calls = []
    original = kernels.hybrid_adapter_eval
    monkeypatch.setattr(kernels, "hybrid_adapter_eval",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build_backbone("swin_nano", "ivt", d2=16).eval()
    vis, ir = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    counts = []
    for chosen in ("fast", "fused", "fast"):
        calls.clear()
        make_fast(model, chosen)
        with torch.no_grad():
            model(vis, ir)
        counts.append(len(calls))
    assert counts[0] == counts[2] == 0 and counts[1] > 0, counts


def test_checkpoint_n_plus_recompute_recomputes_the_other_blocks_sublayers():
    """memory="checkpoint:N+recompute": the first N blocks checkpointed, and the others
    recompute their frozen sub-layers as memory="recompute" does (q/k/v and fc1 twice, the
    output projections, fc2 and the adapters once); `parse_memory` says so: (N, True)."""
    from ivt.fast import parse_memory
    assert parse_memory("checkpoint:3+recompute") == (3, True)
    assert parse_memory("checkpoint:3") == (3, False)
    model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fast", "checkpoint:3+recompute")
    later = [b for stage in model.layers for b in stage.blocks][3:]
    names = ["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adapters.ha1.down"]
    counts = dict.fromkeys(names, 0)
    for block in later:
        for name in names:
            block.get_submodule(name).register_forward_hook(
                lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    model.train()
    vis, ir = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    sum(o.sum() for o in model(vis, ir)).backward()
    n = len(later)
    assert counts == dict(zip(names, [2 * n, n, 2 * n, n, n])), counts


def test_checkpoint_n_keeps_only_the_inputs_of_its_stages_ipas(monkeypatch):
    """A stage's IPAs, computed together for all its blocks, are checkpointed with the stage's
    first block: with memory="checkpoint:3" (swin_nano's stages of 2 blocks) those of stages 1
    and 2, whose first blocks are checkpointed, run again in backward, those of stages 3 and 4
    once."""
    import ivt.fast.swin as fast_swin
    calls = []
    original = fast_swin.block_internal_prompts
    monkeypatch.setattr(fast_swin, "block_internal_prompts",
                        lambda hooks, *a: calls.append(id(hooks[0])) or original(hooks, *a))
    model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fast", "checkpoint:3")
    assert [len(stage.blocks) for stage in model.layers] == [2, 2, 2, 2]
    model.train()
    vis, ir = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    sum(o.sum() for o in model(vis, ir)).backward()
    firsts = [id(stage.blocks[0].adapters) for stage in model.layers]
    assert [calls.count(first) for first in firsts] == [2, 2, 1, 1]


@pytest.mark.parametrize("backbone", ["swin", "eva02"])
def test_fused_inference_reads_the_handed_layer_norms(backbone):
    """At fused inference each adapter's kernel hands the next sub-layer the LayerNorm of its
    patch tokens (`ivt.fast.swin.fused_eval_block`, `ivt.fast.vit.fused_eval_block`), which
    that sub-layer reads instead of normalising again: norm1 and norm2 see the patch tokens only
    in the first block of each stage (Swin: after patch merging; EVA02: after the embedding),
    and there norm1 only; elsewhere at most EVA02's cls row."""
    if backbone == "swin":
        model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fused")
        firsts = [id(stage.blocks[0]) for stage in model.layers]
        blocks, size = [b for stage in model.layers for b in stage.blocks], (32, 48)
    else:
        model = tiny_eva(True, fused=True)
        blocks, size = list(model.blocks), (24, 32)
        firsts = [id(blocks[0])]
    calls = []
    for block in blocks:
        for name in ("norm1", "norm2"):
            getattr(block, name).register_forward_hook(
                lambda _m, args, _out, b=block, n=name: calls.append((id(b), n, args[0].shape[1])))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, *size), torch.randn(1, 3, *size))
    prefix = getattr(model, "prefix", 0)
    assert sorted((b, n) for b, n, tokens in calls if tokens > prefix) == sorted(
        (b, "norm1") for b in firsts)


@pytest.mark.parametrize("backbone", ["swin", "eva02"])
def test_fused_inference_with_adapters_on_some_blocks(backbone):
    """Fused inference where only some blocks have adapters (`layers`): the blocks without take
    their plain forward, the stage or backbone without fused LayerNorm hand-overs where a block
    has none; outputs equal the reference path's."""
    if backbone == "swin":
        ref, fast = eval_pair(lambda f: make_fast(build_backbone("swin_nano", "ivt", d2=16,
                                                                 layers=[0, 3, 5]),
                                                  impl(f, True)))
        size = (44, 60)
    else:
        ref, fast = eval_pair(lambda f: tiny_eva(f, layers=[1], fused=True))
        size = (24, 40)
    gen = torch.Generator().manual_seed(0)
    vis, ir = (torch.randn(2, 3, *size, dtype=torch.float64, generator=gen) for _ in range(2))
    for a, b in zip(run_eval(ref, vis, ir), run_eval(fast, vis, ir)):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)


def test_eva02_fast_rotary_turns_follow_the_grid():
    """The fast path's rotary turns (`with_cls_row`, cached per grid) are those of each input's
    own grid: a 3 x 4 then a 4 x 3 patch grid (the same 12 tokens), each equal to the reference
    path's outputs, in training (tables kept) and at inference."""
    ref, fast = pair(lambda f: tiny_eva(f))
    gen = torch.Generator().manual_seed(0)
    for size in ((24, 32), (32, 24), (24, 32)):
        vis, ir = (torch.randn(1, 3, *size, dtype=torch.float64, generator=gen) for _ in range(2))
        assert_same(run(ref, vis, ir), run(fast, vis, ir))
        for a, b in zip(run_eval(ref, vis, ir), run_eval(fast, vis, ir)):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11)

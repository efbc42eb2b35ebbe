"""The inference Hybrid Adapter kernel (`kernels/hybrid_adapter.py`) against its PyTorch
reference, and the reference against the `HybridAdapter` module it stands for.

On a CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, as `make test` sets);
with a GPU also on it, in float32 (TF32 matmuls) and with bfloat16 tokens. Shapes and values are
fresh random draws on every run; a failure prints the seed, and KERNELS_TEST_SEED=<seed> replays
it.
"""
import os
from functools import partial
import random

import pytest
import torch
import torch.nn.functional as F

import kernels
from ivt.fast.adapters import kernel_weights
from ivt.models.ivtuning import HybridAdapter
from kernels.reference import HybridAdapterWeights, hybrid_adapter_eval_reference

SEED = int(os.environ.get("KERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))

# (device, token dtype, relative tolerance against the float64 reference)
TARGETS = []
if kernels.interpreter_ready():
    TARGETS += [("cpu", torch.float32, 1e-5), ("cpu", torch.bfloat16, 3e-2)]
if kernels.TRITON_INSTALLED and torch.cuda.is_available():
    TARGETS += [("cuda", torch.float32, 5e-3), ("cuda", torch.bfloat16, 3e-2)]   # TF32 matmuls
needs_triton = pytest.mark.skipif(not TARGETS, reason=f"needs a GPU or {kernels.INTERPRETER_NEEDS}")


def random_weights(C: int, d2: int, gen: torch.Generator) -> HybridAdapterWeights:
    """float64 weights of an adapter with non-trivial values everywhere (BN statistics too)."""
    def r(*shape, scale=0.3, offset=0.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + offset
    cp = d2 // 4
    return HybridAdapterWeights(
        r(C, offset=1.0), r(C), r(C, offset=1.0), r(C), r(d2, C, scale=C ** -0.5), r(d2),
        r(cp, 1, 3, 3), r(cp), r(d2, d2, scale=d2 ** -0.5), r(d2), r(d2),
        torch.rand(d2, generator=gen, dtype=torch.float64) + 0.5, r(d2, offset=1.0), r(d2),
        r(d2, d2, scale=d2 ** -0.5), r(d2), r(C, d2, scale=d2 ** -0.5), r(C), 1e-5, 1e-5, cp)


def random_case(rng: random.Random):
    """(B, H, W, C, d2, with_extra): odd grids, 1-row and 1x1 grids, C and d2 off the blocks."""
    H, W = rng.choice([(1, 1), (1, 6), (5, 7), (3, 4), (9, 2), (11, 13)])
    return (rng.randint(1, 3), H, W, rng.choice([8, 24, 40, 72, 100]),
            rng.choice([4, 16, 20, 64, 70]), rng.random() < 0.7)


@needs_triton
@pytest.mark.parametrize("draw", range(6))
@pytest.mark.parametrize("device,dtype,tol", TARGETS,
                         ids=[f"{d}-{str(t)[6:]}" for d, t, _ in TARGETS])
def test_kernel_matches_reference(draw, device, dtype, tol):
    rng = random.Random(SEED * 31 + draw)
    gen = torch.Generator().manual_seed(SEED + draw)
    B, H, W, C, d2, with_extra = random_case(rng)
    msg = f"KERNELS_TEST_SEED={SEED}, draw {draw}: B={B} grid {H}x{W} C={C} d2={d2}, {dtype}"
    w = random_weights(C, d2, gen)
    # x is the patch-token view of EVA02 (a cls token in front): read in place
    x = torch.randn(B, H * W + 1, C, generator=gen, dtype=torch.float64)[:, 1:]
    residual = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    extra = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) if with_extra else None
    rounded = [t if t is None else t.to(dtype).double() for t in (x, residual, extra)]
    expected = hybrid_adapter_eval_reference(*rounded[:2], rounded[2], (H, W), w)
    on_device = [t if t is None else t.to(device, dtype) for t in rounded]
    w32 = HybridAdapterWeights(*[t.to(device, torch.float32) for t in w[:-3]], *w[-3:])
    out = kernels.hybrid_adapter_eval_triton(*on_device[:2], on_device[2], (H, W), w32)
    assert out.shape == expected.shape and out.dtype == dtype, msg
    err = ((out.double().cpu() - expected).abs().max() / expected.abs().max()).item()
    assert err < tol, f"relative error {err:.2e}: {msg}"


@needs_triton
@pytest.mark.parametrize("draw", range(4))
@pytest.mark.parametrize("device,dtype,tol", TARGETS,
                         ids=[f"{d}-{str(t)[6:]}" for d, t, _ in TARGETS])
def test_low_rank_extra_matches_reference(draw, device, dtype, tol):
    """extra given as factors, gelu(h w + b) (`LowRankExtra`, an internal prompt), made in the
    kernel chunk by chunk of C: h a strided view, as `internal_prompts` slices it from its
    (B*N, k*r) map; ranks below, at and above the kernel's 16-wide matmul tile."""
    rng = random.Random(SEED * 37 + draw)
    gen = torch.Generator().manual_seed(SEED + 100 + draw)
    B, H, W, C, d2, _ = random_case(rng)
    r, k = rng.choice([1, 5, 8, 20]), rng.randint(1, 3)
    msg = f"KERNELS_TEST_SEED={SEED}, draw {draw}: B={B} grid {H}x{W} C={C} d2={d2} r={r}"
    w = random_weights(C, d2, gen)
    x, residual = (torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) for _ in range(2))
    h_all = torch.randn(B * H * W, k * r, generator=gen, dtype=torch.float64)
    factors = (h_all.view(-1, k, r).transpose(0, 1)[k - 1],                 # (B*N, r), strided
               torch.randn(r, C, generator=gen, dtype=torch.float64) * r ** -0.5,
               torch.randn(C, generator=gen, dtype=torch.float64))
    rounded = [t.to(dtype).double() for t in (x, residual)]
    expected = hybrid_adapter_eval_reference(*rounded, kernels.LowRankExtra(*factors), (H, W), w)
    extra = kernels.LowRankExtra(*(t.to(device, torch.float32) for t in factors))
    w32 = HybridAdapterWeights(*[t.to(device, torch.float32) for t in w[:-3]], *w[-3:])
    out = kernels.hybrid_adapter_eval_triton(*(t.to(device, dtype) for t in rounded), extra,
                                             (H, W), w32)
    assert out.shape == expected.shape and out.dtype == dtype, msg     # the residual's dtype
    err = ((out.double().cpu() - expected).abs().max() / expected.abs().max()).item()
    assert err < tol, f"relative error {err:.2e}: {msg}"


IMPLS = ([("reference", hybrid_adapter_eval_reference)]
         + [(f"triton-{device}", kernels.hybrid_adapter_eval_triton) for device in
            sorted({device for device, _, _ in TARGETS})])


@pytest.mark.parametrize("impl", IMPLS, ids=[name for name, _ in IMPLS])
def test_eval_writes_into_given_views(impl):
    """`out` and `NextNorm.out`: the result and its LayerNorm written into the patch rows of
    (B, 1 + N, C) tensors: the same values as new tensors, the cls rows untouched; and over the
    residual itself, as EVA02's fused inference writes them; a view of another shape or dtype
    is refused, naming the argument."""
    name, fn = impl
    device = "cuda" if name == "triton-cuda" else "cpu"
    gen = torch.Generator().manual_seed(SEED + 300)
    B, H, W, C, d2 = 2, 5, 3, 40, 20
    w64 = random_weights(C, d2, gen)
    w = HybridAdapterWeights(*[t.to(device, torch.float32) for t in w64[:-3]], *w64[-3:])
    x = torch.randn(B, 1 + H * W, C, generator=gen).to(device)[:, 1:]
    nw, nb = (torch.randn(C, generator=gen).to(device) for _ in range(2))
    norm = kernels.NextNorm(nw, nb, 1e-6, torch.bfloat16)
    plain, plain_normed = fn(x, x, None, (H, W), w, norm)
    out = torch.full((B, 1 + H * W, C), 7.0, device=device)
    normed = torch.full((B, 1 + H * W, C), 7.0, device=device, dtype=torch.bfloat16)
    got, got_normed = fn(x, x, None, (H, W), w, norm._replace(out=normed[:, 1:]), out[:, 1:])
    assert got.data_ptr() == out[:, 1:].data_ptr() and torch.equal(out[:, 1:], plain)
    assert got_normed.data_ptr() == normed[:, 1:].data_ptr()
    assert torch.equal(normed[:, 1:], plain_normed)
    assert (out[:, 0] == 7).all() and (normed[:, 0] == 7).all()
    z = x.clone()                                                # residual = x = out
    fn(z, z, None, (H, W), w, None, z)
    assert torch.equal(z, plain)
    with pytest.raises(ValueError, match="out: expected a"):
        fn(x, x, None, (H, W), w, None, out[:, 1:].double())
    with pytest.raises(ValueError, match="norm.out: expected a"):
        fn(x, x, None, (H, W), w, norm._replace(out=normed[:, 2:]))


@needs_triton
def test_a_grid_that_does_not_hold_the_tokens_is_refused():
    """The partial conv reads each token's 3x3 neighbours on the (H, W) grid: a grid of another
    size would read the wrong neighbours, so both kernels refuse it, naming it."""
    device = TARGETS[0][0]
    gen = torch.Generator().manual_seed(SEED + 301)
    w64 = random_weights(16, 8, gen)
    w = HybridAdapterWeights(*[t.to(device, torch.float32) for t in w64[:-3]], *w64[-3:])
    x = torch.randn(2, 15, 16, generator=gen).to(device)
    with pytest.raises(ValueError, match=r"hw \(4, 4\) holds 16 tokens, x has 15"):
        kernels.hybrid_adapter_eval_triton(x, x, None, (4, 4), w)
    with pytest.raises(ValueError, match=r"hw \(3, 4\) holds 12 tokens, x has 15"):
        kernels.hybrid_adapter_train_triton(x, x, None, (3, 4), w, None, 0.0, 0.1, False)


def draw_running_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """model, its BatchNorm running statistics drawn away from their initial 0 and 1."""
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0, 0.3)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    return model


@needs_triton
@pytest.mark.parametrize("draw", range(4))
@pytest.mark.parametrize("device,dtype,tol", TARGETS,
                         ids=[f"{d}-{str(t)[6:]}" for d, t, _ in TARGETS])
def test_next_norm_matches_reference(draw, device, dtype, tol):
    """With a `NextNorm` the inference kernel also returns the LayerNorm of its output, made from
    statistics merged chunk by chunk of C: against F.layer_norm of the kernel's own output in
    float64 (so only the normalisation is measured), on tokens whose mean is 1,000 times their
    spread (a sum of squares in float32 would lose the variance), in float32 and in bfloat16
    (the dtype autocast hands the next Linear); and the output itself as without it."""
    rng = random.Random(SEED * 41 + draw)
    gen = torch.Generator().manual_seed(SEED + 200 + draw)
    B, H, W, C, d2, with_extra = random_case(rng)
    msg = f"KERNELS_TEST_SEED={SEED}, draw {draw}: B={B} grid {H}x{W} C={C} d2={d2}, {dtype}"
    w = random_weights(C, d2, gen)
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    residual = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) + 1000.0
    extra = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) if with_extra else None
    norm_w = torch.randn(C, generator=gen, dtype=torch.float64) * 0.3 + 1.0
    norm_b = torch.randn(C, generator=gen, dtype=torch.float64) * 0.3
    w32 = HybridAdapterWeights(*[t.to(device, torch.float32) for t in w[:-3]], *w[-3:])
    on_device = [t if t is None else t.to(device, dtype) for t in (x, residual, extra)]
    plain = kernels.hybrid_adapter_eval_triton(*on_device[:2], on_device[2], (H, W), w32)
    for normed_dtype in (torch.float32, torch.bfloat16):
        norm = kernels.NextNorm(norm_w.to(device, torch.float32), norm_b.to(device, torch.float32),
                                1e-5, normed_dtype)
        out, normed = kernels.hybrid_adapter_eval_triton(*on_device[:2], on_device[2], (H, W), w32,
                                                         norm)
        assert torch.equal(out, plain), msg
        assert normed.shape == out.shape and normed.dtype == normed_dtype, msg
        expected = F.layer_norm(out.double().cpu(), (C,), norm_w, norm_b, 1e-5)
        # float32 holds tokens near 1,000 to about 6e-5, which the normalisation scales up by
        # 1/std; bfloat16 keeps 8 bits
        rounding = 1e-4 if normed_dtype == torch.float32 else 1e-2
        err = ((normed.double().cpu() - expected).abs().max() / expected.abs().max()).item()
        assert err < max(tol, rounding), f"relative error {err:.2e}: {msg}, {normed_dtype}"


def test_next_norm_reference():
    """The reference's (out, LayerNorm(out) in the asked dtype)."""
    gen = torch.Generator().manual_seed(SEED)
    w = random_weights(24, 16, gen)
    x = torch.randn(2, 12, 24, generator=gen, dtype=torch.float64)
    nw, nb = torch.rand(24, generator=gen, dtype=torch.float64), torch.randn(24, generator=gen)
    out, normed = hybrid_adapter_eval_reference(x, x, None, (3, 4), w,
                                                kernels.NextNorm(nw, nb.double(), 1e-6,
                                                                 torch.float32))
    torch.testing.assert_close(out, hybrid_adapter_eval_reference(x, x, None, (3, 4), w))
    assert normed.dtype == torch.float32
    torch.testing.assert_close(normed, F.layer_norm(out, (24,), nw, nb.double(), 1e-6).float())


def tiny_eva02(fused: bool, d2: int = 16, fast: bool = True, seed: int = 0):
    """A 3-block EVA02 (width 32, 8 x 8 patches) with IV-tuning, its weights drawn from seed: on
    the fast path (impl "fused" or "fast"), or with fast=False the reference path."""
    from ivt.fast import make_fast
    from ivt.models.eva02 import EVA02Backbone, EVA02Config
    from ivt.models.ivtuning import IVTConfig

    torch.manual_seed(seed)
    cfg = EVA02Config(embed_dim=32, depth=3, num_heads=2, mlp_hidden=48, patch_size=8,
                      img_size=(24, 32), drop_path_rate=0.0)
    model = EVA02Backbone("tiny", cfg, "ivt", IVTConfig(d2=d2, dropout=0.0))
    return make_fast(model, "fused" if fused else "fast") if fast else model


def swin_nano(fused: bool):
    from ivt.fast import make_fast
    from ivt.models import build_backbone
    return make_fast(build_backbone("swin_nano", "ivt", d2=20), "fused" if fused else "fast")


# backbone: (build(fused) on the fast path, input (H, W): 13 x 9 tokens; 5 x 4 and a cls token)
MODELS = {"swin_nano": (swin_nano, (52, 36)),
          "eva02": (lambda fused: tiny_eva02(fused, d2=20, seed=SEED % 2**31), (40, 32))}
# backbone: (whether each adapter's call hands on the LayerNorm of its output, concatenations of
# a (B, 1, C) cls row with (B, N, C) tokens in the fused forward)
HAND_OVERS = {
    # the last block of each of the 4 stages hands on none (patch merging or the end)
    "swin_nano": ([True, True, True, False] * 4, 0),
    # all but the last block's second adapter; the two concatenations are the cls token's with
    # the patch embeddings and the resized position embedding's (the fast path: 2 + one per
    # adapter)
    "eva02": ([True] * 5 + [False], 2),
}


@pytest.mark.parametrize("autocast", [False, True], ids=["float64", "bf16-autocast"])
@pytest.mark.parametrize("backbone", list(HAND_OVERS))
def test_fused_inference_hands_on_each_layer_norm(monkeypatch, backbone, autocast):
    """At inference with fused adapters, each adapter's call also makes the LayerNorm that the
    next sub-layer reads (`ivt.fast.swin.FastSwinStage`, `ivt.fast.vit.fused_eval_block`;
    here on the reference kernels), in bfloat16 under bf16 autocast, and the model's outputs are
    the fast path's (float64: to rounding). EVA02's adapters write the patch rows of the
    (B, 1 + N, C) results in place (`FastBlockAdapters.fused_eval`'s `lead`): no
    concatenation."""
    (build_model, (height, width)), (hands_on, cls_rows_joined) = (MODELS[backbone],
                                                                   HAND_OVERS[backbone])

    def build(fused):
        torch.manual_seed(SEED % 2**31)
        return build_model(fused).eval()

    fast, fused = draw_running_statistics(build(False)), build(True)
    with torch.no_grad():
        for m in fast.modules():                  # every LayerNorm its own affine
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    fused.load_state_dict(fast.state_dict())
    handed, concatenated = [], []
    plain_call, plain_cat = kernels.hybrid_adapter_eval, torch.cat

    def spy(*args):
        result = plain_call(*args)
        handed.append(result[1].dtype if isinstance(result, tuple) else None)
        return result

    def cat_spy(tensors, *args, **kwargs):
        if tensors[0].dim() == 3 and tensors[0].shape[1] == 1:
            concatenated.append([tuple(t.shape) for t in tensors])
        return plain_cat(tensors, *args, **kwargs)

    monkeypatch.setattr(kernels, "hybrid_adapter_eval", spy)
    monkeypatch.setenv("IVT_KERNELS", "torch")
    dtype = torch.float32 if autocast else torch.float64
    fast, fused = fast.to(dtype), fused.to(dtype)
    vis, ir = (torch.randn(2, 3, height, width, dtype=dtype) for _ in range(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = fast(vis, ir)
        monkeypatch.setattr(torch, "cat", cat_spy)
        got = fused(vis, ir)
        monkeypatch.setattr(torch, "cat", plain_cat)
    handed_dtype = torch.bfloat16 if autocast else torch.float64
    assert handed == [handed_dtype if h else None for h in hands_on]
    assert len(concatenated) == cls_rows_joined, concatenated
    for a, b in zip(got, expected):
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < (3e-2 if autocast else 1e-10), f"KERNELS_TEST_SEED={SEED}: {err:.2e}"


# (token dtype, relative tolerance) of the training kernels under the interpreter: float64 is
# limited by the scalars Triton passes as float32 (1 / (1 - p), BatchNorm's momentum)
TRAIN_TARGETS = ([(torch.float64, 1e-6), (torch.float32, 1e-4)]
                 if kernels.interpreter_ready() else [])
if kernels.TRITON_INSTALLED and torch.cuda.is_available():
    # TF32 matmuls: the ReLU after the training BatchNorm flips where TF32's rounding moves its
    # input across 0, which moves pw1's weight gradient by up to 4e-2 of the largest gradient
    # (TF32 rounding emulated under the interpreter, over the draws of both training tests)
    TRAIN_TARGETS += [(torch.float32, 6e-2)]


def training_run(fn, case, dtype, device, seed, lead=0):
    """Output, every input and parameter gradient, and the running statistics of one training
    forward + backward of `fn` (the kernel or the reference) on the case's random inputs. The
    tokens are the rows after the first of a (B, 1 + N, C) tensor (EVA02's patch tokens, a
    strided view); with lead > 0, `fn` gets the whole (B, lead + N, C) tensors instead, and its
    `lead` argument."""
    B, H, W, C, d2, x_is_residual, with_extra, with_dropout = case
    gen = torch.Generator().manual_seed(seed)
    w64 = random_weights(C, d2, gen)
    tensors = [t.to(device, dtype).requires_grad_(i not in (10, 11))
               for i, t in enumerate(w64[:18])]
    w = HybridAdapterWeights(*tensors, *w64[18:])
    rows = max(lead, 1)
    x_full = torch.randn(B, H * W + rows, C, generator=gen, dtype=torch.float64).to(device,
                                                                                     dtype)
    x_full.requires_grad_()
    x = x_full if lead else x_full[:, 1:]
    inputs = [x_full]
    residual = x
    if not x_is_residual:
        residual = torch.randn(B, H * W + lead, C, generator=gen, dtype=torch.float64).to(
            device, dtype)
        inputs.append(residual.requires_grad_())
    extra = None
    if with_extra:
        extra = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64).to(device, dtype)
        inputs.append(extra.requires_grad_())
    keep = (torch.rand(B * H * W, d2, generator=gen) > 0.1).to(device) if with_dropout else None
    out = fn(x, residual, extra, (H, W), w, keep, 0.1 if with_dropout else 0.0, 0.1, True,
             **({"lead": lead} if lead else {}))
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, dtype))
    grads = [t.grad for t in inputs] + [t.grad for t in tensors if t.requires_grad]
    return out, grads, [w.bn_mean, w.bn_var]


def random_training_case(rng: random.Random):
    """(B, H, W, C, d2, x is the residual, with extra, with dropout); at least 2 tokens."""
    H, W = rng.choice([(1, 2), (1, 6), (5, 7), (3, 4), (9, 2), (11, 13)])
    return (rng.randint(1, 3), H, W, rng.choice([8, 24, 40, 72, 100]),
            rng.choice([4, 16, 20, 64, 70]), rng.random() < 0.5, rng.random() < 0.7,
            rng.random() < 0.7)


@pytest.mark.skipif(not TRAIN_TARGETS, reason=f"needs a GPU or {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("draw", range(4))
@pytest.mark.parametrize("dtype,tol", TRAIN_TARGETS, ids=[str(t)[6:] for t, _ in TRAIN_TARGETS])
def test_training_kernels_match_reference(draw, dtype, tol):
    """Forward, every gradient and the BatchNorm running statistics of the training kernels
    against autograd through the reference, with the same dropout mask; in two of the four
    draws with `lead` rows (EVA02's cls token, or a cls token and registers) that the adapter
    leaves as they are: the kernels copy them to the output, and their gradient to x's where x
    is the residual (in draw 1 it is, as on EVA02), else write zeros there.

    Below float64 both are compared with the float64 reference: the kernels may err by `tol`, or
    by twice what the reference itself errs in `dtype` where that is more. BatchNorm over a
    handful of tokens is ill-conditioned (over 2 tokens its input gradient is a difference of
    nearly equal terms), and there the reference's own float32 gradients err by more than 1e-4 of
    the largest one."""
    device = "cuda" if torch.cuda.is_available() and dtype == torch.float32 and tol > 1e-3 \
        else "cpu"
    rng = random.Random(SEED * 17 + draw)
    case = random_training_case(rng)
    lead = rng.choice([1, 5]) if draw % 2 else 0
    if draw == 1:                                   # as on EVA02: x is the residual
        case = case[:5] + (True,) + case[6:]
    msg = f"KERNELS_TEST_SEED={SEED}, draw {draw}: {case}, lead {lead}, {dtype}"
    truth = training_run(kernels.hybrid_adapter_train_reference, case, torch.float64, device,
                         SEED, lead)
    reference = (truth if dtype == torch.float64 else
                 training_run(kernels.hybrid_adapter_train_reference, case, dtype, device, SEED,
                              lead))
    got = training_run(kernels.hybrid_adapter_train, case, dtype, device, SEED, lead)
    scale = max(g.abs().max().item() for g in truth[1])

    def named(run):
        return ([("out", run[0])] + [(f"grad {i}", g) for i, g in enumerate(run[1])]
                + [("running stats", s) for s in run[2]])

    for (name, exact), (_, ref), (_, b) in zip(named(truth), named(reference), named(got)):
        # the pw1 bias has a zero gradient in exact arithmetic (BatchNorm follows): compared at
        # the largest gradient's scale, as every gradient's absolute floor
        ref_scale = exact.abs().max().item() if name == "out" or "running" in name else scale

        def error(t):
            return (t.double() - exact.double()).abs().max().item() / max(ref_scale, 1e-30)

        bound = max(tol, 2 * error(ref))
        assert error(b) < bound, (f"{name}: relative error {error(b):.2e} (the reference in "
                                  f"{dtype}: {error(ref):.2e}); {msg}")


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_training_kernels_draw_the_dropout_mask_as_defined():
    """Given no mask and p > 0, the training kernels draw it from torch's generator as dropout
    defines it, each unit kept with probability 1 - p: the same run as the reference given
    `torch.empty(M, d2, dtype=bool).bernoulli_(1 - p)` drawn from the same state, and as the
    reference drawing it itself."""
    p = 0.3

    def drawing(fn, explicit):
        def run(x, residual, extra, hw, w, keep, rate, *rest):
            assert keep is None and rate == 0.0
            torch.manual_seed(SEED)
            if explicit:
                keep = torch.empty(x.shape[0] * x.shape[1], w.down_weight.shape[0],
                                   dtype=torch.bool, device=x.device).bernoulli_(1 - p)
            return fn(x, residual, extra, hw, w, keep, p, *rest)
        return run

    case = (2, 5, 7, 40, 20, True, True, False)           # (B, H, W, C, d2, ...), no mask given
    reference = kernels.hybrid_adapter_train_reference
    expected = training_run(drawing(reference, True), case, torch.float64, "cpu", SEED)
    undropped = training_run(reference, case, torch.float64, "cpu", SEED)
    assert not torch.allclose(expected[0], undropped[0])
    for got in (training_run(drawing(kernels.hybrid_adapter_train, False), case, torch.float64,
                             "cpu", SEED),
                training_run(drawing(reference, False), case, torch.float64, "cpu", SEED)):
        for a, b in zip([expected[0]] + expected[1] + expected[2],
                        [got[0]] + got[1] + got[2]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def low_rank_training_run(fn, case, r, dtype, device, seed, lead=0, bf16_tokens=False):
    """`training_run` with the extra given as factors (`LowRankExtra`: h a strided view, as
    `internal_prompts` makes it, w and b), the gradients of the three factors last; x the
    residual, (B, lead + N, C). With bf16_tokens, x and h hold bfloat16 values, as under
    autocast: in bfloat16, or, for a float64 run, bfloat16's values in float64."""
    B, H, W, C, d2, x_is_residual, _, with_dropout = case
    gen = torch.Generator().manual_seed(seed)

    def leaf(t, token=False):
        if token and bf16_tokens:
            t = t.to(torch.bfloat16)
            return t.to(device, dtype if dtype == torch.float64 else t.dtype).requires_grad_()
        return t.to(device, dtype).requires_grad_()
    w64 = random_weights(C, d2, gen)
    tensors = [t.to(device, dtype).requires_grad_(i not in (10, 11))
               for i, t in enumerate(w64[:18])]
    w = HybridAdapterWeights(*tensors, *w64[18:])
    x = leaf(torch.randn(B, lead + H * W, C, generator=gen, dtype=torch.float64), True)
    factors = [leaf(torch.randn(B * H * W, 3 * r, generator=gen, dtype=torch.float64), True),
               leaf(torch.randn(r, C, generator=gen, dtype=torch.float64) * r ** -0.5),
               leaf(torch.randn(C, generator=gen, dtype=torch.float64))]
    extra = kernels.LowRankExtra(factors[0].view(-1, 3, r)[:, 1], *factors[1:])  # h strided
    keep = ((torch.rand(B * H * W, d2, generator=gen) > 0.1).to(device) if with_dropout
            else None)
    out = fn(x, x, extra, (H, W), w, keep, 0.1 if with_dropout else 0.0, 0.1, True,
             **({"lead": lead} if lead else {}))
    out.backward(torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device,
                                                                               out.dtype))
    return out, [x.grad] + [t.grad for t in tensors if t.requires_grad] + [
        f.grad for f in factors]


@pytest.mark.skipif(not TRAIN_TARGETS, reason=f"needs a GPU or {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("dtype,tol", TRAIN_TARGETS, ids=[str(t)[6:] for t, _ in TRAIN_TARGETS])
def test_training_kernels_with_low_rank_extra(draw, dtype, tol):
    """The extra as its factors in training: made in the forward kernel, its backward in
    `_low_rank_backward_kernel`: the output and every gradient, the factors' included (h's at
    the rows of the strided view and zero elsewhere), against autograd through the reference
    (the extra as `LowRankExtra.dense`). Ranks below, at and above the 16-wide matmul tile;
    in draw 1 with a cls token first (`lead`), as on EVA02."""
    device = "cuda" if torch.cuda.is_available() and dtype == torch.float32 and tol > 1e-3 \
        else "cpu"
    rng = random.Random(SEED * 29 + draw)
    case = random_training_case(rng)
    r = rng.choice([1, 5, 8, 20])
    lead = 1 if draw == 1 else 0
    msg = (f"KERNELS_TEST_SEED={SEED}, draw {draw}: {case}, r={r}, lead {lead}, {dtype} on "
           f"{device}")
    expected = low_rank_training_run(kernels.hybrid_adapter_train_reference, case, r, dtype,
                                     device, SEED, lead)
    got = low_rank_training_run(kernels.hybrid_adapter_train, case, r, dtype, device, SEED, lead)
    scale = max(g.abs().max().item() for g in expected[1])
    for name, a, b in [("out", expected[0], got[0])] + [
            (f"grad {i}", a, b) for i, (a, b) in enumerate(zip(expected[1], got[1]))]:
        ref_scale = a.abs().max().item() if name == "out" else scale
        err = (b - a).abs().max().item() / max(ref_scale, 1e-30)
        assert err < tol, f"{name}: relative error {err:.2e}; {msg}"
    for a in expected[1][-3:]:
        assert a.abs().max() > 1e-3 * scale, f"a factor's gradient is ~0, the test is void; {msg}"


def assert_within_bfloat16_rounding(truth, got):
    """The output within 2e-2 of its largest value, every gradient within 2e-2 of the largest
    gradient, of the float64 run `truth` (`low_rank_training_run`'s (out, grads))."""
    scale = max(g.abs().max().item() for g in truth[1])
    worst = []
    for name, a, b in [("out", truth[0], got[0])] + [
            (f"grad {i}", a, b) for i, (a, b) in enumerate(zip(truth[1], got[1]))]:
        ref_scale = a.abs().max().item() if name == "out" else scale
        worst.append(((b.double() - a).abs().max().item() / ref_scale, name))
    assert max(worst)[0] < 2e-2, (sorted(worst)[-3:], f"KERNELS_TEST_SEED={SEED}")


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("case,r,lead", [((2, 5, 7, 40, 20, True, True, True), 5, 0),
                                         ((1, 11, 13, 72, 64, True, True, False), 20, 1),
                                         ((3, 3, 4, 24, 16, True, True, True), 8, 0)])
def test_training_kernels_with_bfloat16_tokens(case, r, lead):
    """As under autocast: x and the extra's h in bfloat16, the weights and the extra's w and b
    in float32, so that the matmuls over tokens run in bfloat16 (n_hat, dh and P = dh^T n_hat
    in bfloat16, accumulated in float32; dh_e stored in bfloat16): the output and every
    gradient against the float64 reference on the same values, within 2e-2 of the largest,
    the output in the residual's dtype, bfloat16, as the reference's (the interpreter's
    float32 to bfloat16 stores truncate where a GPU rounds to nearest: the down-projection's
    weight gradient errs by up to 1e-2 here)."""
    run = partial(low_rank_training_run, case=case, r=r, device="cpu", seed=SEED, lead=lead,
                  bf16_tokens=True)
    truth = run(kernels.hybrid_adapter_train_reference, dtype=torch.float64)
    got = run(kernels.hybrid_adapter_train, dtype=torch.float32)
    assert got[1][0].dtype == torch.bfloat16 and got[1][-3].dtype == torch.bfloat16

    def reference_under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return kernels.hybrid_adapter_train_reference(*args, **kwargs)
    reference = run(reference_under_autocast, dtype=torch.float32)
    assert got[0].dtype == reference[0].dtype == torch.bfloat16        # the residual's dtype
    assert_within_bfloat16_rounding(truth, got)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_training_under_autocast_holds_the_normalised_input_not_x():
    """Under bf16 autocast with float32 tokens (Swin's and EVA02's residual stream), the
    training kernels keep for the backward the normalised input n_hat in bfloat16, the dtype
    autocast runs the down-projection Linear in, instead of x: nothing saved shares x's
    storage, the one saved tensor of x's size is bfloat16, and the output and every gradient
    stay within 2e-2 of the largest of the float64 reference on the same values (x's gradient
    in float32)."""
    saved = {}

    def under_autocast(x, residual, extra, hw, w, keep, *rest, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = kernels.hybrid_adapter_train(x, residual, extra, hw, w, keep, *rest, **kwargs)
        saved["x"], saved["tensors"] = x, out.grad_fn.saved_tensors
        return out

    run = partial(low_rank_training_run, case=(2, 5, 7, 40, 20, True, True, True), r=5,
                  device="cpu", seed=SEED)
    truth = run(kernels.hybrid_adapter_train_reference, dtype=torch.float64)
    got = run(under_autocast, dtype=torch.float32)
    x = saved["x"]
    storages = {t.untyped_storage().data_ptr() for t in saved["tensors"] if t is not None}
    assert x.untyped_storage().data_ptr() not in storages
    token_sized = [t for t in saved["tensors"] if t is not None and t.numel() == x.numel()]
    assert [t.dtype for t in token_sized] == [torch.bfloat16]
    assert got[1][0].dtype == torch.float32
    assert_within_bfloat16_rounding(truth, got)


def float64_runs(case, while_fused=lambda: None):
    """`training_run` of the reference and then of the kernels, float64 on the CPU, with
    `while_fused()` called in between (to patch what only the kernels' run should see)."""
    expected = training_run(kernels.hybrid_adapter_train_reference, case, torch.float64, "cpu",
                            SEED)
    while_fused()
    return expected, training_run(kernels.hybrid_adapter_train, case, torch.float64, "cpu", SEED)


def assert_same_training(expected, got):
    """Output and every gradient equal to float64 rounding, gradients at the largest one's
    scale (the pw1 bias has a zero gradient in exact arithmetic)."""
    scale = max(g.abs().max().item() for g in expected[1])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-6, atol=1e-6)
    for i, (a, b) in enumerate(zip(expected[1], got[1])):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{i}: {m}")


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("block_m, budget", [(32, 3_000), (16, 36 * 632)],
                         ids=["4 programs", "36 programs"])
def test_training_kernels_with_many_tiles_per_program(monkeypatch, block_m, budget):
    """1,152 tokens (36 tiles of 32), a BatchNorm merge of 8 tiles a step (4 full groups, then 4
    tiles) in two programs of 8 channels each, and a partial-sum budget (rows of 304 + 328
    floats a program) that leaves the backward kernels 4 programs, each looping over 9 tiles;
    or 72 tiles of 16 in 36 programs of 2 tiles, whose BatchNorm partials the second kernel sums
    in three steps of 16 rows."""
    import kernels.hybrid_adapter as fused
    monkeypatch.setattr(fused, "BN_MERGE_TILES", 8)
    monkeypatch.setattr(fused, "BN_MERGE_CHANNELS", 8)
    monkeypatch.setattr(fused, "BLOCK_M", block_m)
    monkeypatch.setattr(fused, "PARTIAL_FLOATS", budget)
    case = (2, 24, 24, 40, 16, False, True, True)
    expected, got = float64_runs(case)
    assert_same_training(expected, got)
    for a, b in zip(expected[2], got[2]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-9)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_training_kernels_write_every_element_they_read(monkeypatch):
    """The backward's workspace (per-program partial sums, the (M, D) maps, n_hat) and every
    output come from torch.empty, poisoned here with NaN: an element a kernel reads before
    writing it, or a partial sum a program leaves unwritten, turns a gradient into NaN. Several
    programs with several tiles each (a partial-sum budget of 3,000 floats)."""
    import kernels.hybrid_adapter as fused
    monkeypatch.setattr(fused, "PARTIAL_FLOATS", 3_000)
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    case = (2, 9, 14, 40, 16, True, True, True)        # 252 tokens: 8 tiles
    expected, got = float64_runs(case, while_fused=lambda: monkeypatch.setattr(
        torch, "empty", poisoned))
    monkeypatch.setattr(torch, "empty", real_empty)
    assert_same_training(expected, got)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("block_m,block_c", [(16, 16), (64, 64), (32, 128)])
def test_kernels_at_other_tile_sizes(monkeypatch, block_m, block_c):
    """`bench/kernels.py --adapter-tiles` times other tile sizes; the kernels compute the same
    function at them (training and inference, against the reference in float64)."""
    import kernels.hybrid_adapter as fused
    monkeypatch.setattr(fused, "BLOCK_M", block_m)
    monkeypatch.setattr(fused, "BLOCK_C", block_c)
    case = (2, 9, 14, 72, 20, True, True, True)        # 252 tokens, C off the channel step
    assert_same_training(*float64_runs(case))
    gen = torch.Generator().manual_seed(SEED)
    w = random_weights(72, 20, gen)
    x, extra = (torch.randn(2, 9 * 14, 72, generator=gen, dtype=torch.float64) for _ in range(2))
    torch.testing.assert_close(kernels.hybrid_adapter_eval_triton(x, x, extra, (9, 14), w),
                               hybrid_adapter_eval_reference(x, x, extra, (9, 14), w))


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_layer_norm_of_tokens_far_from_zero(training):
    """The kernels take the LayerNorm statistics and the down-projection in one pass over C,
    from sums of x - K (K a per-row shift): in float32, tokens with a mean of 1,000 and a
    standard deviation of 1, and one channel 30 standard deviations out, give the float64
    reference's output and gradients (sums of raw x and x^2 would lose every digit of the
    variance to cancellation). A zero residual: the output is the adapter's branch alone."""
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2 = 2, 5, 7, 200, 16
    w = random_weights(C, d2, gen)
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) + 1000.0
    x[..., 3] += 30.0
    x = x.float().double()                        # the same tokens in both precisions
    grad = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    runs = []
    for dtype in (torch.float64, torch.float32):
        tensors = [t.to(dtype).detach().requires_grad_(i not in (10, 11))
                   for i, t in enumerate(w[:18])]
        wt = HybridAdapterWeights(*tensors, *w[18:])
        xt = x.to(dtype).detach().requires_grad_()
        if not training:
            fn = kernels.hybrid_adapter_eval_triton if dtype == torch.float32 \
                else hybrid_adapter_eval_reference
            runs.append([fn(xt, torch.zeros_like(xt), None, (H, W), wt).detach()])
            continue
        fn = kernels.hybrid_adapter_train if dtype == torch.float32 \
            else kernels.hybrid_adapter_train_reference
        out = fn(xt, torch.zeros_like(xt), None, (H, W), wt, None, 0.0, 0.1, False)
        out.backward(grad.to(dtype))
        runs.append([out.detach(), xt.grad] + [t.grad for t in tensors if t.requires_grad])
    # gradients at the largest one's scale (the pw1 bias's is zero in exact arithmetic)
    grad_scale = max([g.abs().max().item() for g in runs[0][1:]], default=0.0)
    for i, (a, b) in enumerate(zip(*runs)):
        scale = a.abs().max().item() if i == 0 else grad_scale
        err = (b.double() - a).abs().max().item() / scale
        assert err < 1e-4, f"tensor {i}: relative error {err:.2e}, KERNELS_TEST_SEED={SEED}"


@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="needs Triton")
def test_tile_sizes_on_the_benchmarked_shapes(monkeypatch):
    """The tile rule on a 132-SM GPU (H100 SXM, H200): 16-token tiles where at most 132 of
    them cover the tokens, one wave of the kernels a multiprocessor holds one of (Swin-L 384
    batch 8's stage 4, 72 tiles; EVA02-L 512 batch 2, 128), 32 elsewhere (stage 3: 288
    16-token tiles would take 3 waves); channel steps of 64 where 64 divides C, else 32;
    BLOCK_M / BLOCK_C fix them; off a GPU the tiles are 32 tokens."""
    import kernels.hybrid_adapter as fused
    gpu = torch.device("cuda")
    monkeypatch.setattr(fused, "MULTIPROCESSORS", 132)
    shapes = {"swin_l stage 1": (8 * 96 * 96, 192), "stage 2": (8 * 48 * 48, 384),
              "stage 3": (8 * 24 * 24, 768), "stage 4": (8 * 12 * 12, 1536),
              "eva02_l": (2 * 32 * 32, 1024), "odd width": (8 * 96 * 96, 100)}
    chosen = {name: fused.tile_sizes(M, C, gpu) for name, (M, C) in shapes.items()}
    assert chosen == {"swin_l stage 1": (32, 64), "stage 2": (32, 64), "stage 3": (32, 64),
                      "stage 4": (16, 64), "eva02_l": (16, 64), "odd width": (32, 32)}
    assert fused.tile_sizes(132 * 16, 1024, gpu)[0] == 16          # 132 tiles: one wave
    assert fused.tile_sizes(132 * 16 + 1, 1024, gpu)[0] == 32      # 133 would need two
    monkeypatch.setattr(fused, "MULTIPROCESSORS", None)       # no GPU
    assert fused.tile_sizes(8 * 24 * 24, 768, torch.device("cpu")) == (32, 64)
    monkeypatch.setattr(fused, "BLOCK_M", 64)
    monkeypatch.setattr(fused, "BLOCK_C", 16)
    assert fused.tile_sizes(8 * 24 * 24, 768, gpu) == (64, 16)


@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="needs Triton")
def test_backward_programs_one_wave(monkeypatch):
    """The backward kernels' programs, each looping over its tiles: at most one per tile and
    within the partial-sum budget, and on a 132-SM GPU at most the 132 it holds at once (a
    133rd would start only when one of those had finished all its tiles)."""
    import kernels.hybrid_adapter as fused
    monkeypatch.setattr(fused, "PARTIAL_FLOATS", 2 ** 21)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    row = (64 * 64 + 3 * 64) + (64 * 64 + 64) + (16 * 10 + 64)      # d2 = 64: 8,672 floats
    with fused.assume_multiprocessors(132):
        assert fused._programs(2304, row, gpu) == 132           # Swin-L stage 1, batch 8
        assert fused._programs(100, row, gpu) == 100            # one per tile
        assert fused._programs(2304, 2 ** 21 // 50, gpu) == 50  # the budget
        assert fused._programs(2304, row, cpu) == 132           # any device, as compile_check
    assert fused._programs(2304, row, cpu) == 241               # no GPU: the budget's


def test_reference_is_the_adapter_at_inference():
    """residual = x gives HA(x) (Eq. 15, its residual inside) plus the internal prompt."""
    torch.manual_seed(SEED % 2**31)
    ha = HybridAdapter(40, 20).double()
    with torch.no_grad():
        for p in ha.parameters():
            p.add_(torch.randn_like(p) * 0.2)
        ha.ho.bn.running_mean.normal_(0, 0.3)
        ha.ho.bn.running_var.uniform_(0.5, 1.5)
    ha.eval()
    x = torch.randn(2, 5 * 7, 40, dtype=torch.float64)
    prompt = torch.randn(2, 5 * 7, 40, dtype=torch.float64)
    with torch.no_grad():
        expected = ha(x, (5, 7)) + prompt
        got = hybrid_adapter_eval_reference(x, x, prompt, (5, 7), kernel_weights(ha))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"KERNELS_TEST_SEED={SEED}: {m}")


def test_dispatch_uses_the_reference_without_triton(monkeypatch):
    monkeypatch.setenv("IVT_KERNELS", "torch")
    gen = torch.Generator().manual_seed(0)
    w = random_weights(8, 16, gen)
    x = torch.randn(1, 6, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kernels.hybrid_adapter_eval(x, x, None, (2, 3), w),
                               hybrid_adapter_eval_reference(x, x, None, (2, 3), w))


@needs_triton
@pytest.mark.parametrize("fused", [False, True], ids=["fast", "fused"])
@pytest.mark.parametrize("backbone", list(MODELS))
def test_fast_model_inference_with_the_kernel(monkeypatch, backbone, fused):
    """A whole IV-tuned Swin or EVA02 at inference, fast path: the Triton kernels (on a GPU, or
    the interpreter) give the outputs of the PyTorch reference, in float32; `fused`: every
    Hybrid Adapter in the fused inference kernel, its internal prompt passed as `LowRankExtra`
    factors, handing on the next LayerNorm (and in EVA02 writing over its input's patch
    rows)."""
    build_model, (height, width) = MODELS[backbone]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(SEED % 2**31)
    model = draw_running_statistics(build_model(fused)).eval().to(device)
    vis, ir = (torch.randn(2, 3, height, width, device=device) for _ in range(2))
    launched = []
    real = kernels.hybrid_adapter_eval_triton
    monkeypatch.setattr(kernels, "hybrid_adapter_eval_triton",
                        lambda *a, **k: launched.append(1) or real(*a, **k))
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("IVT_KERNELS", backend)
        with torch.no_grad():
            outputs[backend] = model(vis, ir)
    adapters = sum(isinstance(m, HybridAdapter) for m in model.modules())
    # the fused path runs every adapter in the kernel (and only under IVT_KERNELS=triton)
    assert len(launched) == (adapters if fused else 0) and adapters > 0, (len(launched), adapters)
    tol = 1e-2 if device == "cuda" else 1e-5                       # TF32 matmuls on a GPU
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < tol, f"KERNELS_TEST_SEED={SEED}: relative error {err:.2e}"


def fused_training_run(model, vis, ir):
    """Outputs, a loss, every trainable gradient and the buffers of one training step."""
    model.train()
    torch.manual_seed(1)
    outs = model(vis, ir)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
               for o in outs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return outs, grads, {n: b.clone() for n, b in model.named_buffers()}


def assert_runs_equal(expected, got, rtol):
    (o1, g1, b1), (o2, g2, b2) = expected, got
    for a, b in zip(o1, o2):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * a.abs().max().item())
    scale = max(g.abs().max().item() for g in g1.values())    # pw1 biases: zero, plus rounding
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"{name}: {m}")
    for name in b1:
        torch.testing.assert_close(b2[name], b1[name], rtol=rtol, atol=rtol, msg=name)


def assert_fused_step_equals_reference(build, size, monkeypatch):
    """One float64 training step, on the same weights and a batch of 2 (H, W) = size images, of
    build(False) on the reference path (all PyTorch) and of build(True) with every kernel in the
    interpreter: equal outputs, gradients and buffers."""
    reference, fused = build(False), build(True)
    fused.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(SEED)
    vis, ir = (torch.randn(2, 3, *size, generator=gen, dtype=torch.float64) for _ in range(2))
    monkeypatch.setenv("IVT_KERNELS", "torch")
    expected = fused_training_run(reference, vis, ir)
    monkeypatch.setenv("IVT_KERNELS", "triton")
    assert_runs_equal(expected, fused_training_run(fused, vis, ir), 1e-6)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("variant, memory", [("ivt", "keep"), ("parallel", "checkpoint"),
                                             ("ivt", "recompute")])
def test_fused_training_step_equals_reference_path(variant, memory, monkeypatch):
    """A whole Swin training step with every Hybrid Adapter in the Triton training kernels
    (interpreter, float64, dropout off so that both paths draw nothing): outputs, every
    gradient and the BatchNorm running statistics equal the reference path's; under
    memory="checkpoint" the recomputation leaves the running statistics alone; "recompute"
    recomputes the frozen sub-layers around the adapters' kernels."""
    from ivt.fast import make_fast
    from ivt.models import build_backbone

    def build(fused):
        torch.manual_seed(0)
        model = build_backbone("swin_nano", "ivt", variant=variant, d2=20, dropout=0.0,
                               drop_path_rate=0.0)
        return make_fast(model, "fused" if fused else "reference",
                         memory if fused else "keep").double()

    assert_fused_step_equals_reference(build, (36, 28), monkeypatch)    # 9 x 7 tokens


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_fused_eva02_training_step_equals_reference_path(monkeypatch):
    """The same for EVA02, whose adapters read the patch tokens as a view that skips the cls
    token and whose internal prompts (each block's own, as factors) come from weights folded
    for all blocks at once."""
    assert_fused_step_equals_reference(lambda fused: tiny_eva02(fused, fast=fused).double(),
                                       (24, 32), monkeypatch)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_fused_training_hands_the_kernels_the_dropout_rate(monkeypatch):
    """The fused adapters in training hand their kernel each adapter's drop rate and no mask,
    so that the kernel draws it (`test_training_kernels_draw_the_dropout_mask_as_defined`)."""
    from ivt.fast import make_fast
    from ivt.models import build_backbone
    monkeypatch.setenv("IVT_KERNELS", "triton")
    seen = []
    train = kernels.hybrid_adapter_train

    def spy(x, residual, extra, hw, weights, keep, p, *rest):
        seen.append((keep, p))
        return train(x, residual, extra, hw, weights, keep, p, *rest)
    monkeypatch.setattr(kernels, "hybrid_adapter_train", spy)
    torch.manual_seed(SEED)
    model = make_fast(build_backbone("swin_nano", "ivt", d2=16), "fused").train()
    rate = [m.drop.p for m in model.modules() if isinstance(m, HybridAdapter)]
    assert len(set(rate)) == 1 and 0 < rate[0] < 1
    sum(o.sum() for o in model(torch.randn(2, 3, 32, 40), torch.randn(2, 3, 32, 40))).backward()
    assert seen == [(None, rate[0])] * len(rate)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_fused_training_with_dropout_replays_its_mask_under_checkpointing(monkeypatch):
    """With dropout on, the fused adapters draw their masks from torch's generator: a
    checkpointed step recomputes the same masks, so it equals the step that keeps its
    activations (outputs, gradients, running statistics)."""
    from ivt.fast import make_fast
    from ivt.models import build_backbone
    monkeypatch.setenv("IVT_KERNELS", "triton")

    def build(checkpoint):
        torch.manual_seed(0)
        return make_fast(build_backbone("swin_nano", "ivt", d2=16), "fused",
                         "checkpoint" if checkpoint else "keep").double()

    plain, checkpointed = build(False), build(True)
    checkpointed.load_state_dict(plain.state_dict())
    gen = torch.Generator().manual_seed(SEED)
    vis = torch.randn(1, 3, 32, 40, generator=gen, dtype=torch.float64)
    ir = torch.randn(1, 3, 32, 40, generator=gen, dtype=torch.float64)
    assert_runs_equal(fused_training_run(plain, vis, ir),
                      fused_training_run(checkpointed, vis, ir), 1e-10)


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_fused_training_refuses_one_token_per_channel_as_the_reference(monkeypatch):
    """Batch 1 at 32x32: Swin's last stage is one token, whose BatchNorm batch statistics do not
    exist. The reference's BatchNorm refuses it; so does the fused path, which would otherwise
    normalise it to 0 and pull the running variance towards 0."""
    from ivt.fast import make_fast
    from ivt.models import build_backbone
    monkeypatch.setenv("IVT_KERNELS", "triton")
    x = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    for impl in (None, "fused"):
        model = build_backbone("swin_nano", "ivt", d2=8).train()
        model = make_fast(model, impl) if impl else model
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            model(*x)


# (ha1, ha2, their BatchNorms: mode or None for momentum None, autograd, position, the SFT
# LayerNorm's and the BatchNorm's eps or None for their defaults)
ADAPTER_MODES = {
    "inference, eps of their own": ("eval", "eval", "eval", False, 1, (1e-2, 0.3)),
    "eval, with autograd": ("eval", "eval", "eval", True, 0, None),
    "ha2 training, ha1 eval, no autograd": ("eval", "train", "train", False, 1, None),
    "training, cumulative BatchNorm": ("train", "train", None, True, 0, None),
    "training, frozen BatchNorm": ("train", "train", "eval", True, 0, None),
}


@pytest.mark.skipif(not kernels.interpreter_ready(),
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
@pytest.mark.parametrize("case", list(ADAPTER_MODES))
def test_fused_block_adapters_follow_each_adapters_mode(case, monkeypatch):
    """One block's fused adapters (`FastBlockAdapters` with `fused`, every kernel in the
    interpreter) equal the reference `BlockAdapters` in float64 (output, gradients, BatchNorm
    buffers) at inference with LayerNorm and BatchNorm eps of their own, and in the modes the
    fused kernels do not cover: eval mode with autograd on (the inference kernel makes no
    gradients), one adapter training while the other is in eval mode (it normalises by its
    batch's statistics and updates them), BatchNorm's cumulative average (momentum None) and a
    frozen BatchNorm in a training adapter."""
    import copy
    from ivt.fast import FAST
    from ivt.models.ivtuning import BlockAdapters, IVTConfig
    ha1_mode, ha2_mode, bn_mode, grad, pos, eps = ADAPTER_MODES[case]
    gen = torch.Generator().manual_seed(SEED)
    reference = BlockAdapters(16, IVTConfig(d2=8, d3=4, dropout=0.0)).double()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    draw_running_statistics(reference)
    fused = copy.deepcopy(reference)
    for m in fused.modules():
        m.__class__ = FAST.get(type(m), type(m))
    fused.fused = True
    inputs = [torch.randn(2, 15, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    r = torch.randn(2, 15, 16, generator=gen, dtype=torch.float64)
    monkeypatch.setenv("IVT_KERNELS", "triton")
    results = []
    for model in (reference, fused):
        model.ha1.train(ha1_mode == "train")
        model.ha2.train(ha2_mode == "train")
        for ha in (model.ha1, model.ha2):
            if bn_mode is None:
                ha.ho.bn.momentum = None
            else:
                ha.ho.bn.train(bn_mode == "train")
            if eps is not None:
                ha.sft.norm.eps, ha.ho.bn.eps = eps
        xs = [t.clone().requires_grad_(grad) for t in inputs]           # z_in, z_out, prompt
        ha, ipa = (model.ha1, model.ipa1) if pos == 0 else (model.ha2, model.ipa2)
        with torch.set_grad_enabled(grad):
            out, _ = model(pos, *xs, (3, 5))                            # 3 x 5 tokens
        grads = (torch.autograd.grad((out * r).sum(), xs[1:] + list(ha.parameters())
                                     + list(ipa.parameters())) if grad else [])
        results.append((out, grads, [b.clone() for b in model.buffers()]))
    (o1, g1, b1), (o2, g2, b2) = results
    torch.testing.assert_close(o2, o1, rtol=1e-6, atol=1e-6 * o1.abs().max().item())
    scale = max([g.abs().max().item() for g in g1], default=0.0)   # pw1's bias: 0 + rounding
    for a, e in zip(g2, g1):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6 * scale)
    for a, e in zip(b2, b1):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


def test_low_rank_extra_gelu_in_the_promoted_dtype_under_autocast():
    """`LowRankExtra.dense` under bfloat16 autocast, as the reference IPA's SFT' makes its
    output: the matmul in bfloat16 (autocast's, as a Linear's), the GELU in float32 (the
    promoted dtype of that and the float32 weights), so the result is float32 and equals
    gelu of the bfloat16 product taken to float32, not that GELU rounded to bfloat16."""
    gen = torch.Generator().manual_seed(SEED)
    h = torch.randn(6, 4, generator=gen)
    w, b = torch.randn(4, 8, generator=gen), torch.randn(8, generator=gen)
    pre = torch.addmm(b.bfloat16(), h.bfloat16(), w.bfloat16()).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = kernels.LowRankExtra(h, w, b).dense((2, 3, 8))
    assert dense.dtype == torch.float32
    torch.testing.assert_close(dense, F.gelu(pre).view(2, 3, 8), rtol=1e-6, atol=1e-6)


def test_a_destination_with_strided_channels_is_refused():
    """`out` must hold the result with contiguous channels (`kernels.utils.destination`; the
    kernels write each token's channels at unit stride): a (B, N, C) view whose channels are
    strided is refused with a ValueError naming it, not written."""
    gen = torch.Generator().manual_seed(0)
    w = random_weights(8, 16, gen)
    x = torch.randn(1, 6, 8, generator=gen, dtype=torch.float64)
    out = torch.empty(1, 8, 6, dtype=torch.float64).transpose(1, 2)        # (1, 6, 8)
    with pytest.raises(ValueError, match="contiguous channels"):
        hybrid_adapter_eval_reference(x, x, None, (2, 3), w, out=out)


@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="needs Triton")
def test_channel_steps_of_64_only_where_64_divides_c():
    """The channel step is 64 only where 64 divides C, 32 otherwise (`tile_sizes`): C = 96
    (Swin-T/S's first stage), divisible by 32 but not by 64, takes 32; 128 takes 64."""
    import kernels.hybrid_adapter as fused
    cpu = torch.device("cpu")
    assert fused.tile_sizes(1024, 96, cpu)[1] == 32
    assert fused.tile_sizes(1024, 128, cpu)[1] == 64

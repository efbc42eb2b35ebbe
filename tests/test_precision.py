"""Frozen matmul weights stored in bfloat16 (`ivt.precision`): under bf16 autocast the training
step is bit for bit the one the float32 weights give, for IV-tuning's paths and every PETL
method."""
import copy

import pytest
import torch
from torch import nn

from ivt.fast import make_fast
from ivt.models import build_backbone
from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.ivtuning import IVTConfig
from ivt.models.segmentor import build_segmentor
from ivt.precision import MATMUL_LAYERS, store_frozen_weights


def tiny_eva02_fast() -> nn.Module:
    cfg = EVA02Config(embed_dim=32, depth=3, num_heads=2, mlp_hidden=48, patch_size=8,
                      img_size=(24, 32), drop_path_rate=0.0)
    return make_fast(EVA02Backbone("tiny", cfg, "ivt", IVTConfig(d2=16)), "fast")


CASES = {
    "ivt reference": lambda: build_backbone("swin_nano", "ivt"),
    "ivt fast, recompute": lambda: make_fast(build_backbone("swin_nano", "ivt"), "fast",
                                             "recompute"),
    "ivt fast, checkpoint": lambda: make_fast(build_backbone("swin_nano", "ivt"), "fast",
                                              "checkpoint"),
    "eva02 ivt fast": tiny_eva02_fast,
    "freeze + head": lambda: build_segmentor("swin_nano", 9, "freeze", head_dim=32),
    "vpt": lambda: build_backbone("swin_nano", "vpt"),
    "adaptformer": lambda: build_backbone("swin_nano", "adaptformer"),
    "bi_adaptformer": lambda: build_backbone("swin_nano", "bi_adaptformer"),
    "rein": lambda: build_backbone("swin_nano", "rein"),
}


def bf16_step(model: nn.Module, vis: torch.Tensor, ir: torch.Tensor):
    """Output and every trainable gradient of one forward + backward under CPU bf16 autocast
    (random draws from seed 0: dropout and drop-path draw the same masks in both runs)."""
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(vis, ir)
    maps = out if isinstance(out, (list, tuple)) else [out]
    loss = sum((m.float() * torch.linspace(-1, 1, m.numel()).view(m.shape)).sum() for m in maps)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in trainable])
    return maps, dict(zip([n for n, _ in trainable], grads))


@pytest.mark.parametrize("case", list(CASES))
def test_bf16_frozen_weights_give_the_same_step(case):
    """The fused adapters (impl="fused") are left out: their kernels read only the
    adapters' own float32 weights, and the frozen layers around them are the fast path's."""
    torch.manual_seed(1)
    model = CASES[case]().train()
    stored = copy.deepcopy(model)
    frozen = [m for m in stored.modules() if isinstance(m, MATMUL_LAYERS)
              and not any(p.requires_grad for p in m.parameters(recurse=False))]
    trainable_before = {n: p.dtype for n, p in stored.named_parameters() if p.requires_grad}
    cast = store_frozen_weights(stored, torch.bfloat16)

    assert frozen and cast == sum(p.numel() for m in frozen for p in m.parameters())
    for n, p in stored.named_parameters():       # only the frozen Linear/conv weights changed
        expected = trainable_before.get(n, torch.bfloat16 if any(
            p is q for m in frozen for q in m.parameters()) else torch.float32)
        assert p.dtype == expected, n
    assert store_frozen_weights(stored, torch.bfloat16) == 0          # nothing left to cast

    g = torch.Generator().manual_seed(2)
    size = (24, 32) if case.startswith("eva02") else (40, 56)     # 3 x 4 patches; padded windows
    vis, ir = (torch.randn(2, 3, *size, generator=g) for _ in range(2))
    (maps, grads), (maps_bf16, grads_bf16) = bf16_step(model, vis, ir), bf16_step(stored, vis, ir)
    for a, b in zip(maps, maps_bf16):
        assert torch.equal(a, b)
    assert grads.keys() == grads_bf16.keys() and grads
    for n in grads:
        assert torch.equal(grads[n], grads_bf16[n]), n


def test_stored_weights_need_autocast():
    """Outside autocast a float32 input meets a bfloat16 weight: the Linear refuses, it does not
    compute in some other precision silently."""
    model = build_backbone("swin_nano", "ivt")
    store_frozen_weights(model, torch.bfloat16)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32))


def test_only_wholly_frozen_linears_and_convolutions_are_cast():
    """The module docstring's rule, on layers named here rather than through MATMUL_LAYERS (the
    ops torch's autocast runs in bf16: linear, conv1d, conv2d, conv3d): each frozen one, weight
    and bias, is cast and counted by its values; a frozen LayerNorm, a Linear whose bias trains
    and a trainable Linear stay float32."""
    frozen = nn.ModuleList([nn.Linear(3, 4), nn.Conv1d(2, 3, 3), nn.Conv2d(2, 3, 3),
                            nn.Conv3d(2, 3, 3, bias=False)])
    kept = nn.ModuleList([nn.LayerNorm(4), nn.Linear(4, 5), nn.Linear(5, 6)])
    for p in [*frozen.parameters(), *kept[0].parameters(), kept[1].weight]:
        p.requires_grad_(False)
    model = nn.Sequential(frozen, kept)
    assert store_frozen_weights(model, torch.bfloat16) == 3 * 4 + 4 + 2 * 3 * 3 + 3 + \
        2 * 3 * 3 * 3 + 3 + 2 * 3 * 3 * 3 * 3
    assert {p.dtype for p in frozen.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in kept.parameters()} == {torch.float32}


@pytest.mark.parametrize("impl", ["reference", "fast", "fused"])
def test_adapters_keep_the_block_stream_dtype_under_autocast(impl):
    """Under bf16 autocast every block of the IV-tuned Swin hands on its stream in the dtype the
    frozen model's own block does (full fine-tuning, no adapters: bf16 on the CPU), in training
    and at inference (the fused paths' kernels included; at inference they run whole blocks, so
    only the stage outputs are seen): the internal prompt, float32 there (SFT' has float32
    parameters), is added in the stream's dtype and does not widen it. (EVA02's stream is
    float32 from the float32 position embedding on, with or without adapters.)"""
    g = torch.Generator().manual_seed(3)
    vis, ir = (torch.randn(2, 3, 40, 56, generator=g) for _ in range(2))

    def stream_dtypes(model: nn.Module, training: bool):
        seen = []
        for m in model.modules():
            if hasattr(m, "adapters") and hasattr(m, "norm2"):           # a transformer block
                m.register_forward_hook(lambda _m, _a, out: seen.append(out[0].dtype))
        model.train(training)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
            maps = model(vis, ir) if model.tuning == "ivt" else model(vis)
        return seen, [m.dtype for m in maps]

    for training in (True, False):
        frozen_blocks, frozen_maps = stream_dtypes(build_backbone("swin_nano", "full"), training)
        blocks, maps = stream_dtypes(make_fast(build_backbone("swin_nano", "ivt"), impl),
                                     training)
        assert frozen_blocks == [torch.bfloat16] * 8 and frozen_maps == [torch.bfloat16] * 4
        assert maps == frozen_maps
        assert blocks == (frozen_blocks if training or impl != "fused" else [])


def test_folded_sft_computes_bf16_tokens_in_the_parameters_float32():
    """SFT folded into its LayerNorm (`_FoldedSFT`) given bfloat16 tokens under bf16 autocast:
    as the reference's LayerNorm there, it computes in its float32 parameters' precision, forward
    and backward: a float32 result, and the result and the parameters' gradients within float32
    rounding of the float64 SFT on the same values (bf16 arithmetic errs by about 1e-3); the
    tokens' gradient comes back in their dtype."""
    import torch.nn.functional as F
    from ivt.fast.adapters import _FoldedSFT
    gen = torch.Generator().manual_seed(0)
    C = 24
    z = (torch.randn(2, 5, C, generator=gen) * 3 + 1).bfloat16().requires_grad_()
    params = [(torch.randn(C, generator=gen) * 0.3 + offset).requires_grad_()
              for offset in (1.0, 0.0, 1.0, 0.0)]                      # w, b, gamma, beta
    grad = torch.randn(2, 5, C, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _FoldedSFT.apply(z, *params, 1e-5)
    out.backward(grad)
    z64, p64 = (z.detach().double().requires_grad_(),
                [p.detach().double().requires_grad_() for p in params])
    expected = F.layer_norm(z64, (C,), p64[0], p64[1], 1e-5) * p64[2] + p64[3]   # Eq. 14
    expected.backward(grad.double())
    assert out.dtype == torch.float32 and z.grad.dtype == torch.bfloat16
    for name, got, exact in [("out", out, expected)] + [
            (f"d{n}", p.grad, q.grad) for n, p, q in zip(["w", "b", "gamma", "beta"], params, p64)]:
        err = ((got.double() - exact).abs().max() / exact.abs().max()).item()
        assert err < 1e-5, f"{name}: relative error {err:.1e}"

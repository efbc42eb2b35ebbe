"""The inference Hybrid Adapter kernel (`kernels/hybrid_adapter.py`) against its PyTorch
reference, and the reference against the `HybridAdapter` module it stands for.

On a CPU the kernel runs under Triton's interpreter (`TRITON_INTERPRET=1`, as `make test` sets);
with a GPU also on it, in float32 (TF32 matmuls) and with bfloat16 tokens. Shapes and values are
fresh random draws on every run; a failure prints the seed, and KERNELS_TEST_SEED=<seed> replays
it.
"""
import os
import random

import pytest
import torch

import kernels
from ivt.models.ivtuning import HybridAdapter
from kernels.reference import HybridAdapterWeights, hybrid_adapter_eval_reference

SEED = int(os.environ.get("KERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))

# (device, token dtype, relative tolerance against the float64 reference)
TARGETS = []
if kernels.TRITON_INSTALLED and kernels.triton_interpreter_on():
    TARGETS += [("cpu", torch.float32, 1e-5)]
if kernels.TRITON_INSTALLED and torch.cuda.is_available():
    TARGETS += [("cuda", torch.float32, 5e-3), ("cuda", torch.bfloat16, 3e-2)]   # TF32 matmuls
needs_triton = pytest.mark.skipif(not TARGETS, reason="needs a GPU or TRITON_INTERPRET=1")


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
        got = hybrid_adapter_eval_reference(x, x, prompt, (5, 7), ha.eval_weights())
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12,
                               msg=lambda m: f"KERNELS_TEST_SEED={SEED}: {m}")


def test_dispatch_uses_the_reference_without_triton(monkeypatch):
    monkeypatch.setenv("IVT_KERNELS", "torch")
    gen = torch.Generator().manual_seed(0)
    w = random_weights(8, 16, gen)
    x = torch.randn(1, 6, 8, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(kernels.hybrid_adapter_eval(x, x, None, (2, 3), w),
                               hybrid_adapter_eval_reference(x, x, None, (2, 3), w))


@pytest.mark.skipif(not (kernels.TRITON_INSTALLED and kernels.triton_interpreter_on()),
                    reason="needs TRITON_INTERPRET=1")
def test_fast_model_inference_with_the_kernel(monkeypatch):
    """A whole IV-tuned Swin at inference, fast path: every Hybrid Adapter through the Triton
    kernel (interpreter) gives the outputs of the PyTorch reference, in float32."""
    from ivt.models import build_backbone
    torch.manual_seed(SEED % 2**31)
    model = build_backbone("swin_nano", "ivt", fast=True, d2=20)
    with torch.no_grad():
        for name, t in model.named_buffers():
            if name.endswith("running_mean"):
                t.normal_(0, 0.3)
            elif name.endswith("running_var"):
                t.uniform_(0.5, 1.5)
    model.eval()
    vis, ir = torch.randn(2, 3, 52, 36), torch.randn(2, 3, 52, 36)       # 13 x 9 tokens
    outputs = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("IVT_KERNELS", backend)
        with torch.no_grad():
            outputs[backend] = model(vis, ir)
    for got, expected in zip(outputs["triton"], outputs["torch"]):
        err = ((got - expected).abs().max() / expected.abs().max()).item()
        assert err < 1e-5, f"KERNELS_TEST_SEED={SEED}: relative error {err:.2e}"

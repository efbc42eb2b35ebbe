"""The CPU-proxy targets of `bench/train_step.py` (docs/benchmarks.md), each in a mode of
`--impl fused`: operators per training step within 1.5x full fine-tuning's and bytes held for
backward within 0.5x, on Swin-T (128 x 96, batch 2, the benchmark's default case) as the CPU runs
full fine-tuning (its window attention on SDPA's math path) and as the GPU step runs (bf16
autocast, the attention counted as a GPU's fused kernel), and on EVA02 (`eva02_b`, 64 x 64,
batch 1) against full fine-tuning's reference forward. The fused kernels run under Triton's
interpreter on `PROXY_ADAPTER_TILES` (tests/test_bench_proxies.py says why).
"""
import pytest

import kernels
from script_runs import PROXY_ADAPTER_TILES, load_bench

pytestmark = pytest.mark.skipif(not kernels.interpreter_ready(),
                                reason=f"needs {kernels.INTERPRETER_NEEDS} (the fused kernels)")
train_step = load_bench("train_step")
LEAN = "ivt:fused:checkpoint:2+recompute"


@pytest.fixture(scope="module")
def swin_t_lean():
    """Full fine-tuning and `--impl fused --memory checkpoint:2+recompute` (stage 1's two blocks
    checkpointed, the other blocks' frozen sub-layers recomputed) on the benchmark's default
    case (Swin-T, 128 x 96, batch 2, the mmseg Segformer head of width 256)."""
    result = train_step.cpu_proxies("swin_t", (128, 96), 2, ["full", "full+gpu_attention", LEAN],
                                    adapter_tiles=PROXY_ADAPTER_TILES)
    return result["modes"]


def test_lean_mode_runs_at_most_one_and_a_half_of_full_fine_tunings_operators(swin_t_lean):
    """The operator target as the CPU runs full fine-tuning (1.39x here, 1.40x at 224 x 224,
    docs/benchmarks.md)."""
    assert swin_t_lean[LEAN]["ops_vs_full"] <= 1.5, swin_t_lean


@pytest.mark.xfail(strict=True, reason="not reached: 1.84x (1,471 against 799 operators) once "
                   "full fine-tuning's window attention counts as the one fused kernel a GPU "
                   "runs forward and one backward; see docs/benchmarks.md")
def test_lean_mode_within_one_and_a_half_of_full_fine_tuning_with_gpu_attention(swin_t_lean):
    lean, full = swin_t_lean[LEAN], swin_t_lean["full+gpu_attention"]
    assert lean["operators"] <= 1.5 * full["operators"], swin_t_lean


def test_lean_mode_holds_at_most_half_of_full_fine_tunings_bytes(swin_t_lean):
    """The memory target, in the same mode (0.42x here; 0.46x at 224 x 224), also against full
    fine-tuning's attention as a GPU's fused kernel holds (0.41x): the head's BatchNorm inputs
    and ReLU outputs, the same in both modes, are in both sums."""
    assert swin_t_lean[LEAN]["bytes_vs_full"] <= 0.5, swin_t_lean
    full = swin_t_lean["full+gpu_attention"]
    assert swin_t_lean[LEAN]["bytes_for_backward"] <= 0.5 * full["bytes_for_backward"]


def test_fused_mode_meets_both_proxies_as_the_gpu_step_runs():
    """Under bf16 autocast with the frozen weights stored in bf16 (`--amp`, as the GPU step
    runs), on the default case (Swin-T, 128 x 96, batch 2), `ivt:fused` runs within 1.5x the
    operators and holds under 0.5x the bytes of full fine-tuning with its attention counted as
    a GPU's fused kernel (1.36x and 0.38x, docs/benchmarks.md: full fine-tuning's weights are
    cast to bf16 every step, and the casts are held for backward)."""
    modes = train_step.cpu_proxies("swin_t", (128, 96), 2, ["full+gpu_attention", "ivt:fused"],
                                   adapter_tiles=PROXY_ADAPTER_TILES, amp=True)["modes"]
    fused, full = modes["ivt:fused"], modes["full+gpu_attention"]
    assert fused["operators"] <= 1.5 * full["operators"], modes
    assert fused["bytes_for_backward"] <= 0.5 * full["bytes_for_backward"], modes


def test_eva02_recompute_mode_meets_the_proxies_against_full_fine_tunings_reference():
    """EVA02 (`eva02_b`, 64 x 64, batch 1): `ivt:fused:recompute` within 1.5x the operators and
    0.5x the bytes of full fine-tuning's reference forward (1.34x and 0.48x,
    docs/benchmarks.md); full fine-tuning's own fast forward (q and k rotated together as complex
    numbers) runs fewer operators than its reference forward and holds the same bytes."""
    modes = train_step.cpu_proxies("eva02_b", (64, 64), 1,
                                   ["full", "full:fast", "ivt:fused:recompute"],
                                   adapter_tiles=PROXY_ADAPTER_TILES)["modes"]
    assert modes["ivt:fused:recompute"]["ops_vs_full"] <= 1.5, modes
    assert modes["ivt:fused:recompute"]["bytes_vs_full"] <= 0.5, modes
    assert modes["full:fast"]["operators"] < 0.8 * modes["full"]["operators"], modes
    assert modes["full:fast"]["bytes_for_backward"] == modes["full"]["bytes_for_backward"]

"""The CPU proxies of `bench/train_step.py` (issue 10's acceptance, measured without a GPU):
aten operators per training step and bytes held for backward, full fine-tuning vs IV-tuning.

Measured here on swin_nano (64 x 96, batch 2, head width 64, reference kernels).
"""
import importlib.util
from pathlib import Path

import pytest

import kernels

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def proxies():
    spec = importlib.util.spec_from_file_location("bench_train_step",
                                                  ROOT / "bench" / "train_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    previous = kernels.backend()
    kernels.set_backend("torch")           # count the PyTorch operators the reference kernels use
    try:
        return bench.cpu_proxies("swin_nano", (64, 96), 2,
                                 ["full", "ivt", "ivt_fast", "ivt_fast_ckpt"], head_dim=64)
    finally:
        kernels.set_backend(previous)


def test_fast_path_holds_at_most_half_of_full_fine_tuning_for_backward(proxies):
    modes = proxies["modes"]
    assert modes["ivt_fast_ckpt"]["bytes_vs_full"] <= 0.5, modes
    assert modes["ivt_fast"]["bytes_for_backward"] < modes["ivt"]["bytes_for_backward"], modes


def test_fast_path_runs_fewer_operators_than_the_reference(proxies):
    modes = proxies["modes"]
    assert modes["ivt_fast"]["aten_ops"] <= 0.8 * modes["ivt"]["aten_ops"], modes


@pytest.mark.xfail(strict=True, reason="not reached: ivt_fast runs ~2.3x full fine-tuning's aten "
                   "operators on swin_nano (each Hybrid Adapter is ~50 operators forward + "
                   "backward, 16 of them against 8 frozen blocks); see docs/benchmarks.md")
def test_fast_path_operators_within_one_and_a_half_of_full_fine_tuning(proxies):
    assert proxies["modes"]["ivt_fast"]["ops_vs_full"] <= 1.5, proxies["modes"]


def test_proxy_counts_are_positive_and_trainable_sets_differ(proxies):
    modes = proxies["modes"]
    assert all(m["aten_ops"] > 0 and m["bytes_for_backward"] > 0 for m in modes.values())
    assert modes["ivt"]["trainable"] == modes["ivt_fast"]["trainable"] < modes["full"]["trainable"]

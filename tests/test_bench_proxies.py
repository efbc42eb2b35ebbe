"""The CPU proxies of `bench/train_step.py` (the speed and memory targets, measured without a
GPU): operators per training step and bytes held for backward, full fine-tuning vs IV-tuning.

Measured here on swin_nano (64 x 96, batch 2, head width 64): reference kernels, and for
`--impl fused` its Triton kernels under the interpreter, each launch counted as one operator;
with the counters themselves and the benchmark's tables. The targets, on Swin-T and EVA02, are
tests/test_bench_targets.py.
The fused kernels run here on 256-token tiles (`PROXY_ADAPTER_TILES`): the same launches, a
third of the interpreter's time; the bytes held are a little lower than at a GPU's tiles (0.6%
on swin_nano's `ivt:fused`, the BatchNorm's per-tile partial sums: `cpu_proxies`), far less than
any margin asserted here.
"""
import json

import pytest

import kernels
from script_runs import PROXY_ADAPTER_TILES, load_bench


def _bench():
    return load_bench("train_step")


INTERPRETER = kernels.interpreter_ready()
needs_interpreter = pytest.mark.skipif(
    not INTERPRETER, reason=f"needs {kernels.INTERPRETER_NEEDS} (the fused kernels)")


@pytest.fixture(scope="module")
def proxies():
    modes = ["full", "ivt", "ivt:fast", "ivt:fast:checkpoint", "ivt:fast:recompute"] + (
        ["ivt:fused", "ivt:fused:checkpoint:4", "ivt:fused:recompute"] if INTERPRETER else [])
    return _bench().cpu_proxies("swin_nano", (64, 96), 2, modes, head_dim=64,
                                adapter_tiles=PROXY_ADAPTER_TILES)


def test_fast_path_holds_at_most_half_of_full_fine_tuning_for_backward(proxies):
    modes = proxies["modes"]
    assert modes["ivt:fast:checkpoint"]["bytes_vs_full"] <= 0.5, modes
    assert modes["ivt:fast"]["bytes_for_backward"] < modes["ivt"]["bytes_for_backward"], modes


def test_fast_path_runs_fewer_operators_than_the_reference(proxies):
    modes = proxies["modes"]
    assert modes["ivt:fast"]["operators"] <= 0.8 * modes["ivt"]["operators"], modes


@pytest.mark.xfail(strict=True, reason="not reached by the PyTorch-operator fast path: "
                   "ivt:fast runs ~2.2x full fine-tuning's operators on swin_nano; the Hybrid "
                   "Adapters alone (~46 operators each, about their floor at operator "
                   "granularity) bring it to 1.7x; --impl fused reaches it (test_fused_"
                   "adapters_operators_within_one_and_a_half_of_full_fine_tuning); see "
                   "docs/benchmarks.md")
def test_fast_path_operators_within_one_and_a_half_of_full_fine_tuning(proxies):
    assert proxies["modes"]["ivt:fast"]["ops_vs_full"] <= 1.5, proxies["modes"]


def test_proxy_counts_are_positive_and_trainable_sets_differ(proxies):
    modes = proxies["modes"]
    assert all(m["aten_ops"] > 0 and m["bytes_for_backward"] > 0 for m in modes.values())
    assert modes["ivt"]["trainable"] == modes["ivt:fast"]["trainable"] < modes["full"]["trainable"]


def test_gpu_tables_ratios_and_a_mode_that_did_not_fit(tmp_path):
    """The GPU run is rare and short: its table writer is checked here on made-up figures, so a
    formatting error cannot lose a measured run. Ratios are best-of-(eager, graph) over full
    fine-tuning's best, and inference graph ms over the frozen model's."""
    bench = _bench()
    row = dict(eager_ms=300.0, graph_ms=110.0, gpu_busy_ms=96.0, kernels=9031,
               eager_peak_gb=13.2, graph_peak_gb=13.0, trainable=7_066_061)
    full = dict(row, eager_ms=99.0, graph_ms=70.0, trainable=196_198_717)
    result = {"device": "Some GPU", "date": "2026-11-27", "torch": "2.11", "triton": "3.6",
              "cases": [{"backbone": "swin_l", "size": 384, "batch": 8,
                         "train": {"full": full, "ivt:fast": row,
                                   "ivt": {"error": "out of memory (80 GB card)"}},
                         "inference": {"freeze": {"eager_ms": 20.0, "graph_ms": 10.0},
                                       "ivt:fast": {"eager_ms": 40.0, "graph_ms": 11.5,
                                                    "gpu_busy_ms": 9.0, "kernels": 1234}}}]}
    row["top_kernels"] = [["_ho_backward_kernel", 1500.0, 48], ["sm90_gemm_bf16", 750.0, 96]]
    text = bench.gpu_tables(result)
    assert "* train `ivt:fast`: `_ho_backward_kernel` 1.50 ms (48), `sm90_gemm_bf16` 0.75 ms " \
        "(96)" in text
    train_part, inference_part = text.split("Costliest")[0].split("| inference")
    rows = lambda part: {line.split("|")[1].strip(): line  # noqa: E731
                         for line in part.splitlines() if line.startswith("| ")}
    train, inference = rows(train_part), rows(inference_part)
    assert "| 1.57x |" in train["ivt:fast"]                    # min(300, 110) / min(99, 70)
    assert "| 1.00x |" in train["full"]
    assert "out of memory (80 GB card)" in train["ivt"]
    assert train["ivt:fast"].count("|") == train["full"].count("|")
    assert inference["ivt:fast"].endswith("| 9.0 | 1,234 | 1.15x |")     # 11.5 / 10
    assert inference["freeze"].endswith("| - | - | 1.00x |")     # an earlier run: no profile
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nkept\n")
    bench.write_section(out, *bench.CPU_SECTION, "cpu tables")
    bench.write_section(out, *bench.GPU_SECTION, "an earlier, interrupted run")
    bench.write_section(out, *bench.GPU_SECTION, text)        # rewritten, not appended twice
    written = out.read_text()
    assert written.count(bench.GPU_SECTION[0]) == 1 and "interrupted" not in written
    assert "kept" in written and "1.57x" in written and "cpu tables" in written


def test_gpu_runs_merge_and_a_failed_capture_keeps_the_eager_figures(tmp_path):
    """`--merge` lays a later run's rows over an earlier run's (per case and mode), refuses runs
    on different cards, and `--render` writes the merged table without a GPU; a mode whose graph
    capture failed keeps its eager figures and is compared on them."""
    bench = _bench()
    row = dict(eager_ms=200.0, graph_ms=80.0, gpu_busy_ms=70.0, kernels=3000,
               eager_peak_gb=5.0, graph_peak_gb=5.5, trainable=7)
    first = {"device": "Some GPU", "date": "2026-11-26", "torch": "2.11", "triton": "3.6",
             "cases": [{"backbone": "swin_l", "size": 384, "batch": 8,
                        "train": {"full": dict(row, eager_ms=100.0, graph_ms=50.0,
                                               eager_peak_gb=10.0),
                                  "ivt": {"error": "failed: RuntimeError: stale"}},
                        "inference": {"freeze": {"eager_ms": 20.0, "graph_ms": 10.0}}}]}
    no_graph = {k: v for k, v in row.items() if not k.startswith("graph")}
    second = dict(first, date="2026-11-27", cases=[
        {"backbone": "swin_l", "size": 384, "batch": 8, "inference": {},
         "train": {"ivt": row, "ivt:fused": dict(no_graph, eager_ms=60.0,
                                                 graph_error="RuntimeError: capture")}}])
    merged = bench.merge_results([first, second])
    case = merged["cases"][0]
    assert list(case["train"]) == ["full", "ivt", "ivt:fused"] and merged["runs"] == 2
    assert case["train"]["ivt"] == row and case["inference"]["freeze"]["graph_ms"] == 10.0
    assert merged["date"] == "2026-11-27"
    with pytest.raises(SystemExit, match="different cards"):
        bench.merge_results([first, dict(second, device="Other GPU")])
    files = []
    for i, run in enumerate((first, second)):
        files.append(tmp_path / f"run{i}.json")
        files[-1].write_text(json.dumps(run))
    out = tmp_path / "benchmarks.md"
    bench.main(["--render", "--merge", *map(str, files), "--out", str(out)])
    lines = {line.split("|")[1].strip(): line for line in out.read_text().splitlines()
             if line.startswith("| ")}
    assert "| 1.60x |" in lines["ivt"]                 # min(200, 80) / min(100, 50)
    assert "| 0.50x |" in lines["ivt"]                 # eager peak 5 / 10
    assert "| 1.20x |" in lines["ivt:fused"]           # eager 60 / 50: no graph figure
    assert "capture failed" in lines["ivt:fused"] and "Merged from 2 runs" in out.read_text()


def test_gpu_jobs_put_both_cases_key_modes_before_the_rest():
    """A GPU run cut short by its time limit keeps the comparisons that matter for every case:
    the first three training modes of each case, then inference, then the rest mode by mode;
    a Swin-only mode (`full+math`) is not run for EVA02, a ViT-only one (`full:fast`,
    `freeze:fast`) not for Swin."""
    bench = _bench()
    cases = [("swin_l", 384, 8), ("eva02_l", 512, 2)]
    jobs = bench.gpu_jobs(cases, ["full", "fused", "lean", "full+math", "full:fast", "ivt"],
                          ["freeze", "freeze:fast"])
    assert jobs[:6] == [(0, "train", "full"), (0, "train", "fused"), (0, "train", "lean"),
                        (1, "train", "full"), (1, "train", "fused"), (1, "train", "lean")]
    assert jobs[6:9] == [(0, "inference", "freeze"), (1, "inference", "freeze"),
                         (1, "inference", "freeze:fast")]
    assert jobs[9:] == [(0, "train", "full+math"), (1, "train", "full:fast"),
                        (0, "train", "ivt"), (1, "train", "ivt")]
    assert bench.gpu_jobs(cases[:1], ["full"], []) == [(0, "train", "full")]


def test_cpu_command_writes_only_its_own_section(tmp_path):
    out = tmp_path / "benchmarks.md"
    bench = _bench()
    out.write_text("# Benchmarks\n\n" + "\n".join(bench.GPU_SECTION) + "\n")
    bench.main(["--device", "cpu", "--backbone", "swin_nano", "--size", "32", "48", "--batch", "1",
                "--head-dim", "16", "--modes", "full", "ivt:fast", "--adapter-tiles", "128:32",
                "--out", str(out)])
    text = out.read_text()
    assert text.count(bench.CPU_SECTION[0]) == 1 and bench.GPU_SECTION[0] in text
    assert "`swin_nano`, 32x48, batch 1, head width 16, fused adapter tiles 128x32:" in text
    assert "| full | " in text and "| ivt:fast | " in text and "| ivt |" not in text


@needs_interpreter
def test_fused_adapters_operators_within_one_and_a_half_of_full_fine_tuning(proxies):
    """--impl fused: each Hybrid Adapter as Triton kernels. Operators + launches per step,
    against full fine-tuning as the CPU runs it (its attention on SDPA's math path)."""
    fused = proxies["modes"]["ivt:fused"]
    assert fused["triton_launches"] > 0 and fused["ops_vs_full"] <= 1.5, proxies["modes"]


@needs_interpreter
def test_checkpointing_the_first_blocks_trades_operators_for_memory(proxies):
    """memory="checkpoint:4" (swin_nano's stages 1 and 2) sits between no and full checkpointing:
    it holds well under half of what the uncheckpointed step holds, for fewer extra operators
    than recomputing every block costs."""
    modes = proxies["modes"]
    fused, ckpt4 = modes["ivt:fused"], modes["ivt:fused:checkpoint:4"]
    assert ckpt4["bytes_for_backward"] < 0.55 * fused["bytes_for_backward"], modes
    extra_all = modes["ivt:fast:checkpoint"]["operators"] - modes["ivt:fast"]["operators"]
    assert 0 < ckpt4["operators"] - fused["operators"] < 0.5 * extra_all, modes


@needs_interpreter
def test_recomputing_frozen_sublayers_trades_few_operators_for_memory(proxies):
    """memory="recompute" reruns each frozen sub-layer up to its last Linear in backward: on
    swin_nano (whose 64-wide Hybrid Adapters are twice its 32 channels, so the adapters keep most
    of what is left) it holds under three quarters of what the fused step holds, for under a
    quarter of the operators that checkpointing every block adds; less on the fast path too."""
    modes = proxies["modes"]
    fused, lean = modes["ivt:fused"], modes["ivt:fused:recompute"]
    assert lean["bytes_for_backward"] < 0.75 * fused["bytes_for_backward"], modes
    extra_all = modes["ivt:fast:checkpoint"]["operators"] - modes["ivt:fast"]["operators"]
    assert 0 < lean["operators"] - fused["operators"] < 0.25 * extra_all, modes
    fast_lean = modes["ivt:fast:recompute"]
    # the PyTorch-operator adapters keep far more of their own (about 20 tensors each, 2C wide)
    assert fast_lean["bytes_for_backward"] < 0.85 * modes["ivt:fast"]["bytes_for_backward"], modes


def test_gpu_attention_gives_the_attention_and_its_gradients_as_two_launches():
    """`gpu_attention`: SDPA as one launch forward and one backward, none of the operators run
    inside them counted; values and gradients of q, k, v and the additive mask (a Swin window's
    position bias, broadcast over the batch) equal to softmax(q k^T * scale + mask) v written
    out in float64, on odd sizes."""
    import torch

    bench = _bench()
    gen = torch.Generator().manual_seed(7)
    B, h, N, d = 3, 2, 7, 5
    q, k, v = (torch.randn(B, h, N, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    mask = torch.randn(1, h, N, N, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(B, h, N, d, generator=gen, dtype=torch.float64)
    scale = 0.3
    expected = torch.softmax(q @ k.transpose(-2, -1) * scale + mask, -1) @ v
    expected_grads = torch.autograd.grad(expected, (q, k, v, mask), grad)
    launches, sdpa = bench.Launches(), torch.nn.functional.scaled_dot_product_attention
    with bench.gpu_attention(launches), bench.OpCounter(launches) as counter:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                               scale=scale)
        grads = torch.autograd.grad(out, (q, k, v, mask), grad)
    assert launches.count == 2 and counter.count == 0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa             # restored


def test_gpu_attention_counts_as_the_cpus_own_fused_attention():
    """Where the CPU runs its own fused attention (IV-tuning's frozen position bias), counting
    SDPA as `gpu_attention` changes neither operators nor bytes held; where it falls back to
    the math path (full fine-tuning's trained bias), it counts fewer operators."""
    bench = _bench()
    bench.CPU_ONLY["ivt:fast+gpu_attention"] = ("ivt", {"impl": "fast"})
    modes = bench.cpu_proxies("swin_nano", (64, 96), 2, ["full", "full+gpu_attention", "ivt:fast",
                                                         "ivt:fast+gpu_attention"],
                              head_dim=64)["modes"]
    own, counted = modes["ivt:fast"], modes["ivt:fast+gpu_attention"]
    assert counted["attention_kernels"] == 16                  # 8 blocks, forward and backward
    assert counted["operators"] == own["operators"], modes
    assert counted["bytes_for_backward"] == own["bytes_for_backward"], modes
    assert modes["full+gpu_attention"]["operators"] < 0.85 * modes["full"]["operators"], modes


def test_operator_count_leaves_out_views_detach_and_empty_allocations():
    """What the counter counts, on operators written out here: an allocation of no elements
    (torch 2.11's activation checkpointing makes one a call, 2.13's none) launches nothing, as a
    view or a detach does not; every other operator counts once."""
    import torch

    with _bench().OpCounter() as counter:
        x = torch.ones(3)                                 # 1
        x.view(3, 1).t().detach()                         # views and detach: 0
        torch.empty((0,))                                 # no elements: 0
        torch.empty((2, 0))                               # 0
        torch.empty((2, 1))                               # 1
        (x * 2).sum()                                     # 2
    assert counter.count == 4


def test_amp_proxies_run_the_step_as_the_gpu_does():
    """`--amp` (`cpu_proxies(..., amp=True)`): the frozen weights stored in bf16, the step in
    bf16 autocast. Full fine-tuning's trained Linear weights are cast to bf16 in every forward
    and their gradients back in backward: at least two operators a Linear more than in
    float32."""
    import torch

    bench = _bench()
    model, _ = bench.build("swin_nano", "ivt", (64, 96), "cpu", 64, amp=True)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert {m.weight.dtype for m in linears if not m.weight.requires_grad} == {torch.bfloat16}
    assert {m.weight.dtype for m in linears if m.weight.requires_grad} == {torch.float32}
    full = {amp: bench.cpu_proxies("swin_nano", (64, 96), 2, ["full"], head_dim=64,
                                   amp=amp) for amp in (False, True)}
    assert full[True]["amp"] and not full[False]["amp"]
    model, _ = bench.build("swin_nano", "full", (64, 96), "cpu", 64)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    extra = full[True]["modes"]["full"]["operators"] - full[False]["modes"]["full"]["operators"]
    assert extra >= 2 * n_linear, (extra, n_linear)


def test_kernel_time_counts_kernels_not_annotation_ranges(monkeypatch):
    """`bench/profiling.kernel_time` sums the CUDA kernels of the profiler's device timeline; a
    `record_function` scope (every optimizer.step() is one) is also on it, as a user annotation
    spanning its kernels: counted, it added the optimizer's time twice and listed it as the
    costliest "kernel". Checked on a stand-in profiler (the CPU records no CUDA events)."""
    import contextlib
    import types

    import torch
    import torch.profiler
    profiling = load_bench("profiling")
    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def event(name, us, device=cuda, annotation=False):
        return types.SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                                     time_range=types.SimpleNamespace(elapsed_us=lambda: us))

    events = [event("sm90_gemm", 300.0), event("sm90_gemm", 200.0), event("adam_kernel", 100.0),
              event("Optimizer.step#AdamW.step", 120.0, annotation=True),
              event("aten::mm", 40.0, device=cpu)]
    recorder = types.SimpleNamespace(events=lambda: events)
    monkeypatch.setattr(torch.profiler, "profile",
                        lambda **kwargs: contextlib.nullcontext(recorder))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    busy_ms, launches, top = profiling.kernel_time(lambda: None)
    assert (busy_ms, launches) == (0.6, 3)
    assert top == [["sm90_gemm", 500.0, 2], ["adam_kernel", 100.0, 1]]


def test_gpu_benchmark_profiles_once_before_timing_any_mode(monkeypatch):
    """Every mode is timed after the profiler's first use (which may leave CUPTI's callbacks
    slowing kernel launches from then on), not full fine-tuning's eager step before it and the
    others after: the order of calls, on stand-ins for the GPU and the measurements."""
    import types

    import torch
    bench = _bench()
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a card")
    monkeypatch.setattr(bench, "profile_once_before_timing", lambda: calls.append("profile"))
    for kind in ("train", "inference"):
        monkeypatch.setattr(bench, f"gpu_{kind}_case",
                            lambda *a, kind=kind: calls.append(f"{kind} {a[3]}") or {"ms": 1.0})
    args = types.SimpleNamespace(cases=["swin_nano:64:2"], modes=["full", "ivt"],
                                 inference_modes=["freeze"])
    bench.gpu_benchmark(args)
    assert calls[0] == "profile" and calls.count("profile") == 1
    assert "train full" in calls[1:] and "train ivt" in calls[1:], calls

"""bench/vs_timm.py (our backbones against timm's, a GPU benchmark, and its CPU proxies): its
tables on made-up figures, its fast-forward side, its counts, and its message where timm is
missing (timm is not a dependency of the project)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from script_runs import load_bench

ROOT = Path(__file__).resolve().parents[1]


def made_up(cases: list) -> dict:
    """A run's result with made-up figures for `cases`."""
    return {"device": "Some GPU", "date": "2026-11-27", "torch": "2.11", "timm": "1.0",
            "tiny": False, "cases": cases}


def _vs_timm():
    return load_bench("vs_timm")


def test_table_gives_ours_over_timm():
    result = made_up([{"backbone": "swin_l", "size": 384, "batch": 8,
                      "ours": {"train_ms": 90.0, "inference_ms": 30.0},
                      "timm": {"train_ms": 100.0, "inference_ms": 24.0}}])
    row = [line for line in _vs_timm().table(result).splitlines()
           if line.startswith("| swin_l")][0]
    assert row == "| swin_l | 384, 8 | 90.0 | 100.0 | 0.90x | 30.0 | 24.0 | 1.25x |"


def test_table_lists_the_kernels_whose_time_differs_most():
    """With a profiled training call per side, the kernels with the largest time differences,
    either way, come first; a kernel only one side launches counts as 0 on the other."""
    ours = {"train_ms": 90.0, "inference_ms": 30.0, "train_busy_ms": 8.0, "train_kernels": 300,
            "train_by_kernel": [["gemm", 5000.0, 100], ["softmax", 2000.0, 24],
                                ["copy", 1000.0, 48]]}
    theirs = {"train_ms": 80.0, "inference_ms": 30.0, "train_busy_ms": 7.5, "train_kernels": 280,
              "train_by_kernel": [["gemm", 5100.0, 100], ["fused_attention", 2400.0, 24]]}
    result = made_up([{"backbone": "swin_l", "size": 384, "batch": 8,
                      "ours": ours, "timm": theirs}])
    text = _vs_timm().table(result)
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    assert rows == ["| `fused_attention` | 0.00 (0) | 2.40 (24) | -2.40 |",
                    "| `softmax` | 2.00 (24) | 0.00 (0) | +2.00 |",
                    "| `copy` | 1.00 (48) | 0.00 (0) | +1.00 |",
                    "| `gemm` | 5.00 (100) | 5.10 (100) | -0.10 |"]
    assert "GPU busy 8.0 ms in 300 kernels here, 7.5 ms in 280 in timm's" in text


def test_table_has_a_row_for_the_explicit_attention_build():
    result = made_up([{"backbone": "swin_l", "size": 384, "batch": 8,
                      "ours": {"train_ms": 90.0, "inference_ms": 30.0},
                      "ours_math": {"train_ms": 70.0, "inference_ms": 36.0},
                      "timm": {"train_ms": 100.0, "inference_ms": 24.0}}])
    rows = [line for line in _vs_timm().table(result).splitlines()
            if line.startswith("| swin_l")]
    assert rows == ["| swin_l | 384, 8 | 90.0 | 100.0 | 0.90x | 30.0 | 24.0 | 1.25x |",
                    "| swin_l, explicit attention | 384, 8 | 70.0 | 100.0 | 0.70x | 36.0 | 24.0 "
                    "| 1.50x |"]


def test_table_of_a_run_cut_short_has_the_cases_timm_was_measured_for():
    """The script rewrites its section after every side: a case whose timm side is not yet
    measured has no row."""
    result = made_up([{"backbone": "swin_l", "size": 384, "batch": 8,
                      "ours": {"train_ms": 90.0, "inference_ms": 30.0},
                      "timm": {"train_ms": 100.0, "inference_ms": 24.0}},
                     {"backbone": "eva02_l", "size": 512, "batch": 2,
                      "ours": {"train_ms": 103.0, "inference_ms": 25.0}}])
    rows = [line for line in _vs_timm().table(result).splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| swin_l"]


def test_table_has_a_row_for_the_fast_forward():
    """EVA02 is also measured with the fast forward that full fine-tuning takes (--impl fast),
    which builds the same model: same outputs, here on the CPU."""
    result = made_up([{"backbone": "eva02_l", "size": 512, "batch": 2,
                      "ours": {"train_ms": 103.0, "inference_ms": 25.0},
                      "ours_fast": {"train_ms": 92.0, "inference_ms": 24.0},
                      "timm": {"train_ms": 92.0, "inference_ms": 26.0}}])
    rows = [line for line in _vs_timm().table(result).splitlines()
            if line.startswith("| eva02_l")]
    assert rows[1] == ("| eva02_l, --impl fast | 512, 2 | 92.0 | 92.0 | 1.00x | 24.0 | 26.0 "
                       "| 0.92x |")
    vs_timm = _vs_timm()
    torch.manual_seed(0)
    model, features = vs_timm.ours("eva02_b", 64)
    fast, fast_features = vs_timm.ours_fast("eva02_b", 64)
    assert type(fast).__name__ == "FastEVA02Backbone"
    fast.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(features(x), fast_features(x)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_proxy_table_gives_ours_over_timm():
    result = made_up([{"backbone": "swin_t", "size": 224, "batch": 2,
                      "ours": {"operators": 900, "attention_kernels": 24,
                               "bytes_for_backward": 160e6},
                      "ours_math": {"operators": 1200, "attention_kernels": 0,
                                    "bytes_for_backward": 200e6},
                      "timm": {"operators": 1000, "attention_kernels": 0,
                               "bytes_for_backward": 200e6}}])
    rows = [line for line in _vs_timm().proxy_table(result).splitlines()
            if line.startswith("| swin_t")]
    assert rows == ["| swin_t | 224, 2 | 900 (24) | 1,000 (0) | 0.90x | 160.00 | 200.00 | 0.80x |",
                    "| swin_t, explicit attention | 224, 2 | 1,200 (0) | 1,000 (0) | 1.20x | "
                    "200.00 | 200.00 | 1.00x |"]


def test_proxies_count_each_attention_as_one_kernel_forward_and_one_backward():
    """swin_nano has 8 blocks: 16 attention kernels with SDPA, none with the explicit attention,
    which dispatches its matmuls, softmax and additions instead."""
    vs_timm = _vs_timm()
    fused = vs_timm.proxies(vs_timm.ours, "swin_nano", 64, 1)
    explicit = vs_timm.proxies(vs_timm.ours_math, "swin_nano", 64, 1)
    assert fused["attention_kernels"] == 16 and explicit["attention_kernels"] == 0
    assert fused["operators"] == fused["aten_ops"] + 16
    assert explicit["operators"] > fused["operators"]
    assert fused["parameters"] == explicit["parameters"]
    assert 0 < fused["bytes_for_backward"] and 0 < explicit["bytes_for_backward"]


STAND_IN = {"eva.py": ("Eva", "{768: 'eva02_b', 1024: 'eva02_l'}", "indices=None, "),
            "swin_transformer.py": ("SwinTransformer", "{32: 'swin_nano', 192: 'swin_l'}", "")}


def test_the_script_runs_against_a_stand_in_for_timm(tmp_path):
    """The whole script (every side of both tiny cases, the JSON written as it goes) against a
    stand-in `timm` whose models are ours: the plumbing checked where timm is not installed."""
    (tmp_path / "timm" / "models").mkdir(parents=True)
    (tmp_path / "timm" / "__init__.py").write_text("__version__ = 'stand-in'\n")
    (tmp_path / "timm" / "models" / "__init__.py").write_text("")
    for file, (cls, names, extra) in STAND_IN.items():
        (tmp_path / "timm" / "models" / file).write_text(
            "import torch\nfrom ivt.models import build_backbone\n\n\n"
            f"class {cls}(torch.nn.Module):\n"
            "    def __init__(self, img_size, embed_dim, **options):\n"
            "        super().__init__()\n"
            f"        self.m = build_backbone({names}[embed_dim], tuning='full',\n"
            "                                img_size=img_size, drop_path_rate=0.0)\n\n"
            f"    def forward_intermediates(self, x, {extra}intermediates_only=True):\n"
            "        return self.m(x)\n")
    out = tmp_path / "vs_timm.json"
    run = subprocess.run([sys.executable, "bench/vs_timm.py", "--tiny", "--device", "cpu",
                          "--steps", "1", "--warmup", "1", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-2000:]
    cases = json.loads(out.read_text())["cases"]
    assert [sorted(c) for c in cases] == [
        ["backbone", "batch", "ours", "ours_math", "size", "timm"],
        ["backbone", "batch", "ours", "ours_fast", "size", "timm"]]
    assert "| eva02_b, --impl fast | 64, 1 |" in run.stdout
    doc = tmp_path / "benchmarks.md"
    run = subprocess.run([sys.executable, "bench/vs_timm.py", "--tiny", "--proxies", "--out",
                          str(doc)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert run.returncode == 0, run.stderr[-2000:]
    section = doc.read_text()
    assert "<!-- bench/vs_timm.py --proxies: begin -->" in section
    assert "| swin_nano | 128, 1 |" in section and "| eva02_b, --impl fast | 64, 1 |" in section


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_without_timm_the_script_says_so():
    run = subprocess.run([sys.executable, "bench/vs_timm.py", "--tiny", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "timm is not installed" in run.stderr, run.stderr

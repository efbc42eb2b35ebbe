"""bench/vs_timm.py (our backbones against timm's, a GPU benchmark): its table on made-up figures,
and its message where timm is missing (timm is not a dependency of the project)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _vs_timm():
    spec = importlib.util.spec_from_file_location("bench_vs_timm", ROOT / "bench" / "vs_timm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_gives_ours_over_timm():
    result = {"device": "Some GPU", "date": "2026-11-27", "torch": "2.11", "timm": "1.0",
              "tiny": False,
              "cases": [{"backbone": "swin_l", "size": 384, "batch": 8,
                         "ours": {"train_ms": 90.0, "inference_ms": 30.0},
                         "timm": {"train_ms": 100.0, "inference_ms": 24.0}}]}
    row = [line for line in _vs_timm().table(result).splitlines()
           if line.startswith("| swin_l")][0]
    assert row == "| swin_l | 384, 8 | 90.0 | 100.0 | 0.90x | 30.0 | 24.0 | 1.25x |"


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_without_timm_the_script_says_so():
    run = subprocess.run([sys.executable, "bench/vs_timm.py", "--tiny", "--device", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "timm is not installed" in run.stderr, run.stderr

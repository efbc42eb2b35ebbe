"""bench/gpu_smoke.py: its CPU form (`--tiny`) runs every step, and the GPU form's command lines
are flags the scripts accept, with the paper's sizes, amp, the fused kernels and a CUDA graph."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import predict  # noqa: E402
import train_det  # noqa: E402
import train_seg  # noqa: E402
import train_sod  # noqa: E402


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", ROOT / "bench" / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tiny_form_runs_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "smoke"
    assert _smoke().main(["--tiny", "--out", str(out), "--iters", "4"]) == 0
    records = json.loads((out / "smoke.json").read_text())
    steps = [r["step"] for r in records]
    assert steps == ["data"] + [f"{t}: {s}" for t in ("seg", "sod", "det")
                                for s in ("train", "evaluate", "predict")] + [
        "ddp: torchrun, 1 process"]
    assert all(r["exit"] == 0 for r in records), records
    assert "mIoU" in json.loads((out / "seg_metrics.json").read_text())["all"]
    assert (out / "sod_metrics.json").exists() and (out / "det_metrics.json").exists()
    for task, suffix in (("seg", "_classes.png"), ("sod", "_saliency.png"), ("det", "_boxes.json")):
        assert any(out.glob(f"predictions/{task}/*{suffix}")), task
    first = json.loads((out / "runs" / "ddp" / "log.jsonl").read_text().splitlines()[0])
    assert first["world_size"] == 1


def test_a_failing_step_is_recorded_and_the_run_goes_on(tmp_path):
    record = _smoke().run_step("boom", [sys.executable, "-c", "print('went wrong'); exit(3)"],
                               tmp_path / "smoke.log")
    assert record["exit"] == 3 and record["tail"] == ["went wrong"]
    assert "exit 3" in (tmp_path / "smoke.log").read_text()


@pytest.mark.parametrize("task, script", [("seg", train_seg), ("sod", train_sod),
                                          ("det", train_det)])
def test_gpu_form_is_the_papers_sizes_with_every_speed_up(task, script, tmp_path):
    smoke = _smoke()
    data, checkpoint = tmp_path / "data", tmp_path / "run" / "last.pt"
    args = script.get_parser().parse_args(smoke.train_args(task, data, tmp_path / "run", False, 20))
    backbone, size, batch = {"seg": ("swin_l", 512, 2), "sod": ("eva02_l", 384, 8),
                             "det": ("swin_l", 640, 2)}[task]             # the paper's sizes
    assert (args.backbone, args.size, args.batch_size, args.iters) == (backbone, size, batch, 20)
    assert args.amp and args.cuda_graph and args.impl == "fused" and args.pretrained == "none"
    assert evaluate.get_parser().parse_args(
        smoke.eval_args(task, data, checkpoint, tmp_path / "m.json", False)).amp
    assert predict.get_parser().parse_args(
        smoke.predict_args(task, data, checkpoint, tmp_path / "p", False)).amp

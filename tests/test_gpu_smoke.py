"""bench/gpu_smoke.py: its CPU form (`--tiny`) runs every step, and the GPU form's command lines
are flags the scripts accept, with the paper's sizes, amp, the fused kernels and a CUDA graph."""
import json
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate  # noqa: E402
import predict  # noqa: E402
import train_det  # noqa: E402
import train_seg  # noqa: E402
import train_sod  # noqa: E402
from ivt.models import normalization_for  # noqa: E402
from ivt.tasks import task_module  # noqa: E402
from script_runs import load_bench  # noqa: E402


def _smoke():
    return load_bench("gpu_smoke")


def test_tiny_form_runs_every_step(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out, report = tmp_path / "smoke", tmp_path / "report"
    assert _smoke().main(["--tiny", "--out", str(out), "--iters", "4", "--parallel",
                          "--report", str(report)]) == 0
    records = json.loads((report / "smoke.json").read_text())
    steps = [r["step"] for r in records]
    chains = [[f"{t}: {s}" for s in ("train", "evaluate", "predict")]
              for t in ("seg", "sod", "det")]
    assert sorted(steps) == sorted(["data", "ddp: torchrun, 1 process", *sum(chains, [])])
    for chain in chains:                                  # in order within a chain
        assert [s for s in steps if s in chain] == chain
    assert all(r["status"] == "passed" and r["exit"] == 0 for r in records), records
    ends = [f"== {r['step']}: {r['status']}, {r['seconds']} s" for r in records]
    log = (report / "smoke.log").read_text().splitlines()       # each step's output, in order
    assert [line for line in log if line in ends] == ends
    assert "mIoU" in json.loads((out / "seg_metrics.json").read_text())["all"]
    assert (out / "sod_metrics.json").exists() and (out / "det_metrics.json").exists()
    for task, suffix in (("seg", "_classes.png"), ("sod", "_saliency.png"), ("det", "_boxes.json")):
        assert any(out.glob(f"predictions/{task}/*{suffix}")), task
    first = json.loads((out / "runs" / "ddp" / "log.jsonl").read_text().splitlines()[0])
    assert first["world_size"] == 1


def test_a_failing_step_is_recorded_and_its_chain_skipped(tmp_path):
    smoke = _smoke()
    report = smoke.Report(tmp_path)
    smoke.run_chain([("boom", [sys.executable, "-c", "print('went wrong'); exit(3)"]),
                     ("after", [sys.executable, "-c", "print('never')"])], report)
    boom, after = report.records
    assert (boom["status"], boom["exit"], boom["tail"]) == ("exit 3", 3, ["went wrong"])
    assert after["status"] == "skipped: boom did not pass" and after["exit"] is None
    assert json.loads((tmp_path / "smoke.json").read_text()) == report.records
    assert "went wrong" in (tmp_path / "smoke.log").read_text()
    assert "== after: skipped: boom did not pass" in (tmp_path / "smoke.log").read_text()


@pytest.mark.parametrize("own_session", [False, True], ids=["child", "child-in-own-session"])
def test_deadline_stops_a_step_with_its_children_and_skips_the_rest(tmp_path, own_session):
    """The step's whole process tree goes, also a child in a session of its own (as torchrun
    starts its worker), which would otherwise hold the output pipe open past the deadline."""
    smoke = _smoke()
    report = smoke.Report(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    grandchild = f"import time; open({str(pid_file)!r}, 'w')" \
                 ".write(str(__import__('os').getpid()));" \
                 " time.sleep(120)"
    slow = [sys.executable, "-c", f"import subprocess, sys; print('started', flush=True); "
                                  f"subprocess.run([sys.executable, '-c', {grandchild!r}], "
                                  f"start_new_session={own_session})"]
    start = time.monotonic()
    smoke.run_chain([("slow", slow), ("next", [sys.executable, "-c", "pass"])], report,
                    deadline=time.monotonic() + 3)
    assert time.monotonic() - start < 20
    slow_record, next_record = report.records
    assert slow_record["status"] == "timed out" and slow_record["tail"] == ["started"]
    assert next_record["status"] == "skipped: slow did not pass"
    pid = int(pid_file.read_text())
    for _ in range(50):                                   # the grandchild went with it
        state = Path(f"/proc/{pid}/status")
        if not state.exists() or "zombie" in state.read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out step's child process {pid} is still running")
    smoke.run_chain([("late", [sys.executable, "-c", "pass"])], report,
                    deadline=time.monotonic() - 1)
    assert report.records[-1]["status"] == "skipped: the deadline had passed"


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory):
    """The smoke's data (the GPU form writes the same number of images, larger)."""
    return _smoke().write_data(tmp_path_factory.mktemp("smoke_data"), tiny=True)


@pytest.mark.parametrize("task, script", [("seg", train_seg), ("sod", train_sod),
                                          ("det", train_det)])
def test_gpu_form_is_the_papers_sizes_with_every_speed_up(task, script, tmp_path, smoke_data):
    smoke = _smoke()
    data, checkpoint = smoke_data[task], tmp_path / "run" / "last.pt"
    args = script.get_parser().parse_args(smoke.train_args(task, data, tmp_path / "run", False, 20))
    backbone, size, batch = {"seg": ("swin_l", 512, 2), "sod": ("eva02_l", 384, 8),
                             "det": ("swin_l", 640, 2)}[task]             # the paper's sizes
    assert (args.backbone, args.size, args.batch_size, args.iters) == (backbone, size, batch, 20)
    assert args.amp and args.cuda_graph and args.impl == "fused" and args.pretrained == "none"
    assert evaluate.get_parser().parse_args(
        smoke.eval_args(task, data, checkpoint, tmp_path / "m.json", False)).amp
    assert predict.get_parser().parse_args(
        smoke.predict_args(task, data, checkpoint, tmp_path / "p", False)).amp
    # enough training images for the batch (the trainer refuses fewer)
    (tmp_path / "run").mkdir()
    task_class = {"seg": "SegTask", "sod": "SODTask", "det": "DetTask"}[task]
    train, _ = getattr(task_module(task), task_class)().build_datasets(
        args, normalization_for(backbone), tmp_path / "run", True)
    assert len(train) >= batch

"""Helpers for the tests of the repository's scripts: loading a benchmark script as a module,
reading a run's log, and starting a run in a child process that is killed with SIGKILL at a random
moment after its first checkpoint."""
import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The CPU proxies' fused-adapter tiles (tokens, channels): the launches a GPU's tiles make, in a
# third of the interpreter's time (tests/test_bench_proxies.py)
PROXY_ADAPTER_TILES = (256, 64)


def load_bench(name: str):
    """bench/<name>.py as a module (the bench folder is no package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def fake_validation_scores(monkeypatch, *scores):
    """Segmentation's validation returns these mIoU values in turn (how best.pt is chosen,
    without depending on what a tiny model scores)."""
    from ivt.tasks.seg import SegTask
    values = iter(scores)
    monkeypatch.setattr(SegTask, "evaluate", lambda self, *a: {"mIoU": next(values)})
    monkeypatch.setattr(SegTask, "format_eval", lambda self, r: str(r))


def run_killed_after_first_checkpoint(script: str, args, out: Path, timeout: float = 240) -> None:
    """Run `python <script> <args>` (writing to `out`) and SIGKILL it within 0.4 s of its first
    `last.pt`; fails if it exits or writes nothing before that."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not (Path(out) / "last.pt").exists():
            assert proc.poll() is None, "training exited before writing a checkpoint"
            assert time.time() < deadline, f"no checkpoint within {timeout} s"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.4))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def tiny_seg_args(data, out, iters, *extra):
    """train_seg.py flags for a seconds-long run of swin_nano on CPU, writing to `out`."""
    return ["--data", str(data), "--out", str(out), "--backbone", "swin_nano", "--d2", "8",
            "--head-dim", "16", "--crop", "32", "--batch-size", "2", "--iters", str(iters),
            "--eval-every", "2", "--log-every", "1", "--workers", "0", "--device", "cpu",
            "--kernels", "torch", *extra]


def run_torchrun(script: str, args, processes: int = 2, timeout: float = 300) -> None:
    """`torchrun --standalone --nproc_per_node=<processes> <script> <args>` on the CPU (gloo);
    fails with the end of its stderr unless it exits with 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={processes}", str(ROOT / script), *args]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]

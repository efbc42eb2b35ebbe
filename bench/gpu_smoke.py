"""End-to-end smoke of the three tasks as a user runs them on a GPU, at the paper's sizes.

    python bench/gpu_smoke.py                     # on a CUDA GPU, into runs/gpu_smoke
    python bench/gpu_smoke.py --tiny --out DIR    # the same steps on the CPU, tiny (a minute)

On the device machine, as its own call after `bench/gpu_session.sh` (which fills the first),
with what is left of the session's device time (about 3 minutes) as the deadline:
    python bench/gpu_smoke.py --parallel --deadline 170 --report $OUT

On synthetic data written in the real layouts (`ivt.data.synthetic`: MFNet, VT5000/1000/821,
M3FD), each step a child process as a user types it:

    seg   train_seg.py  swin_l  512, batch 2   20 iterations, then evaluate.py and predict.py
    sod   train_sod.py  eva02_l 384, batch 8   20 iterations, then evaluate.py and predict.py
    det   train_det.py  swin_l  640, batch 2   20 iterations, then evaluate.py and predict.py
    ddp   torchrun --nproc_per_node=1 train_seg.py (nccl on a GPU), 4 iterations

with `--amp --impl fused --cuda-graph` on the GPU and random weights (`--pretrained none`: the
device machine has no internet). `--tiny` runs swin_nano at 32-64 pixels on the CPU with the
PyTorch kernels (no amp, fused kernels or CUDA graph): the same commands, checked by
tests/test_gpu_smoke.py. The steps run in four chains (seg, sod and det: train -> evaluate ->
predict; ddp), one after another or, with `--parallel`, at the same time on one GPU. A step that
fails does not stop the other chains; the rest of its own chain is recorded as skipped. With
`--deadline`, a step still running then is stopped and recorded as timed out and the steps not
started are skipped. Each step's status, time and last lines of output go to smoke.json
(rewritten after every step, so a call cut short keeps what finished) and its whole output to
smoke.log, both in --report (default: --out); the exit status is the number of steps that did
not pass.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)             # the repository's packages, not this folder's scripts

from bench.sections import write_atomic  # noqa: E402
from ivt.data.synthetic import write_m3fd, write_mfnet, write_vt  # noqa: E402

# task -> (backbone, size, batch) on the GPU: the paper's settings (docs/training.md)
GPU_RUNS = {"seg": ("swin_l", 512, 2), "sod": ("eva02_l", 384, 8), "det": ("swin_l", 640, 2)}
SOD_VAL = 2          # VT5000 Train images held out for validation (`--val-count`)
TAIL_LINES = 15


def write_data(root: Path, tiny: bool) -> Dict[str, Path]:
    """Synthetic MFNet, VT and M3FD under root, at their real image sizes (tiny ones with
    --tiny), each with enough training images for a GPU batch. -> {task: dataset root}."""
    seg_size, sod_size, det_size = ((48, 64), (40, 48), (48, 64)) if tiny else \
        ((480, 640), (480, 640), (768, 1024))
    write_mfnet(root / "mfnet", n_train=6, n_val=2, n_test=2, size=seg_size)
    write_vt(root / "vt", n_train=GPU_RUNS["sod"][2] + SOD_VAL, n_test=2, n_vt1000=2,
             n_vt821=2, size=sod_size)
    write_m3fd(root / "m3fd", 10, size=det_size)
    return {"seg": root / "mfnet", "sod": root / "vt", "det": root / "m3fd"}


def train_args(task: str, data: Path, out: Path, tiny: bool, iters: int) -> List[str]:
    """The training script's flags for one task."""
    common = ["--out", str(out), "--iters", str(iters), "--eval-every", str(iters),
              "--log-every", "5", "--pretrained", "none"]
    if tiny:
        common += ["--backbone", "swin_nano", "--d2", "8", "--batch-size", "2", "--workers",
                   "0", "--device", "cpu", "--kernels", "torch"]
        sizes = {"seg": ["--size", "32", "--head-dim", "16"], "sod": ["--size", "32"],
                 "det": ["--size", "64", "--hidden-dim", "16", "--num-queries", "8",
                         "--dec-layers", "2"]}
        extra = sizes[task]
    else:
        backbone, size, batch = GPU_RUNS[task]
        common += ["--backbone", backbone, "--batch-size", str(batch), "--amp", "--impl",
                   "fused", "--cuda-graph"]
        extra = ["--size", str(size)]
    data_args = {"seg": ["--data", str(data)],
                 "sod": ["--data", str(data / "VT5000" / "Train"), "--val-count", str(SOD_VAL)],
                 "det": ["--data", str(data), "--split-dir", str(data)]}[task]
    return data_args + common + extra


def eval_args(task: str, data: Path, checkpoint: Path, out: Path, tiny: bool) -> List[str]:
    """evaluate.py's flags: the test split (SOD: VT5000's test set and VT1000)."""
    data_args = {"seg": ["--data", str(data), "--split", "test"],
                 "sod": ["--data", str(data / "VT5000" / "Test"), "--data", str(data / "VT1000")],
                 "det": ["--data", str(data), "--split-dir", str(data), "--split", "test"]}[task]
    device = ["--device", "cpu", "--kernels", "torch"] if tiny else ["--amp"]
    return data_args + ["--checkpoint", str(checkpoint), "--json", str(out)] + device


def predict_args(task: str, data: Path, checkpoint: Path, out: Path, tiny: bool) -> List[str]:
    """predict.py's flags on the dataset's own image folders."""
    inputs = {"seg": ["--rgbt", str(data / "images")],
              "sod": ["--vis", str(data / "VT821" / "RGB"), "--ir", str(data / "VT821" / "T")],
              "det": ["--vis", str(data / "Vis"), "--ir", str(data / "Ir")]}[task]
    device = ["--device", "cpu"] if tiny else ["--amp"]
    return inputs + ["--checkpoint", str(checkpoint), "--out", str(out)] + device


class Report:
    """The records of a smoke run, kept in order of completion in `folder`: smoke.json rewritten
    after every step, each step's output appended to smoke.log (safe across threads)."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.json, self.log = folder / "smoke.json", folder / "smoke.log"
        self.records: List[dict] = []
        self._lock = threading.Lock()

    def add(self, record: dict, output: str = "") -> dict:
        with self._lock:
            self.records.append(record)
            with self.log.open("a") as f:
                f.write(f"== {record['step']}: {record['command']}\n{output}\n"
                        f"== {record['step']}: {record['status']}, {record['seconds']} s\n")
            write_atomic(self.json, json.dumps(self.records, indent=1))
        return record


def descendants(pid: int) -> List[int]:
    """The processes descended from `pid` (children, theirs, ...), from /proc (Linux)."""
    children: Dict[int, List[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:                          # "pid (name) state ppid ...": the name may hold spaces
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def run_step(name: str, command: List[str], report: Report,
             deadline: float = math.inf) -> dict:
    """Run one command (cwd: the repository) until it ends or `deadline` (time.monotonic())
    passes, then stop it and its children. -> the record, also added to `report`, with its
    status: "passed", "exit N" or "timed out"."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = child.communicate(timeout=None if deadline == math.inf
                                      else max(deadline - time.monotonic(), 0.0))
        status = "passed" if child.returncode == 0 else f"exit {child.returncode}"
    except subprocess.TimeoutExpired:
        # the whole tree: torchrun starts its worker in a session of its own, and DataLoader
        # workers leave the group (`ivt.engine`), so the group alone would leave them running
        # with the output pipe open, and communicate() waiting for them
        for pid in [child.pid] + descendants(child.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            output, _ = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:               # something still holds the pipe
            child.stdout.close()
            child.wait()
            output = ""
        status = "timed out"
    seconds = round(time.perf_counter() - start, 1)
    tail = output.strip().splitlines()[-TAIL_LINES:]
    print(f"== {name}: {status}, {seconds} s", flush=True)
    if status != "passed":
        print("\n".join(tail), flush=True)
    return report.add({"step": name, "command": " ".join(command), "exit": child.returncode,
                       "status": status, "seconds": seconds, "tail": tail}, output)


def run_chain(steps: List[tuple], report: Report, deadline: float = math.inf) -> None:
    """The (name, command) steps in order; once one has not passed, or the deadline has
    passed, the rest are recorded as skipped, with the reason."""
    reason = None
    for name, command in steps:
        if reason is None and time.monotonic() >= deadline:
            reason = "the deadline had passed"
        if reason is not None:
            print(f"== {name}: skipped ({reason})", flush=True)
            report.add({"step": name, "command": " ".join(command), "exit": None,
                        "status": f"skipped: {reason}", "seconds": 0.0, "tail": []})
            continue
        if run_step(name, command, report, deadline)["status"] != "passed":
            reason = f"{name} did not pass"


def chains(out: Path, data: Dict[str, Path], tiny: bool, iters: int, tasks: List[str]
           ) -> Dict[str, List[tuple]]:
    """The steps of the module docstring for `tasks`, as chains of (name, command) that run in
    order: per task train -> evaluate -> predict, and ddp (torchrun, with seg's data)."""
    py = sys.executable
    result = {}
    for task in tasks:
        run_dir = out / "runs" / task
        checkpoint = run_dir / "last.pt"
        result[task] = [
            (f"{task}: train", [py, str(ROOT / f"train_{task}.py"),
                                *train_args(task, data[task], run_dir, tiny, iters)]),
            (f"{task}: evaluate", [py, str(ROOT / "evaluate.py"), *eval_args(
                task, data[task], checkpoint, out / f"{task}_metrics.json", tiny)]),
            (f"{task}: predict", [py, str(ROOT / "predict.py"), *predict_args(
                task, data[task], checkpoint, out / "predictions" / task, tiny)])]
    if "seg" in tasks:
        result["ddp"] = [("ddp: torchrun, 1 process", [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "train_seg.py"),
            *train_args("seg", data["seg"], out / "runs" / "ddp", tiny, 4)])]
    return result


def smoke(out: Path, tiny: bool, iters: int, tasks: List[str], report: Report,
          parallel: bool = False, seconds: Optional[float] = None) -> List[dict]:
    """Every step of the module docstring for `tasks`, the chains one after another or, with
    `parallel`, at the same time; within `seconds` of the start where given. -> the records,
    in order of completion."""
    deadline = math.inf if seconds is None else time.monotonic() + seconds
    start = time.perf_counter()
    data = write_data(out / "data", tiny)
    report.add({"step": "data", "command": "", "exit": 0, "status": "passed",
                "seconds": round(time.perf_counter() - start, 1), "tail": []})
    todo = list(chains(out, data, tiny, iters, tasks).values())
    with ThreadPoolExecutor(max_workers=len(todo) if parallel else 1) as pool:
        for done in [pool.submit(run_chain, steps, report, deadline) for steps in todo]:
            done.result()
    return report.records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs") / "gpu_smoke",
                   help="folder for the data, runs, predictions, smoke.log and smoke.json "
                        "(default: %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="swin_nano at 32-64 pixels on the CPU, PyTorch kernels: the same "
                        "steps in about a minute")
    p.add_argument("--iters", type=int, default=20, help="training iterations (default 20)")
    p.add_argument("--tasks", nargs="+", choices=list(GPU_RUNS), default=list(GPU_RUNS),
                   help="which tasks (default: all three, then torchrun with seg)")
    p.add_argument("--parallel", action="store_true",
                   help="run the chains (seg, sod, det, ddp) at the same time instead of one "
                        "after another")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop the step still running this many seconds after the start and "
                        "skip those not started (default: no limit)")
    p.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="folder for smoke.json and smoke.log (default: --out)")
    args = p.parse_args(argv)
    if args.deadline is not None and args.deadline <= 0:
        p.error(f"--deadline {args.deadline}: expected a positive number of seconds")
    if not args.tiny:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --tiny for the CPU form of the same steps")
    report = Report(args.report or args.out)
    records = smoke(args.out, args.tiny, args.iters, args.tasks, report, args.parallel,
                    args.deadline)
    failed = [f"{r['step']} ({r['status']})" for r in records if r["status"] != "passed"]
    print(f"{len(records) - len(failed)} of {len(records)} steps passed"
          + (f"; not passed: {', '.join(failed)}" if failed else ""))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end smoke of the three tasks as a user runs them on a GPU, at the paper's sizes.

    python bench/gpu_smoke.py                     # on a CUDA GPU, into runs/gpu_smoke
    python bench/gpu_smoke.py --tiny --out DIR    # the same steps on the CPU, tiny (a minute)

On the device machine, as its own call after `bench/gpu_session.sh` (which fills the first):
    python bench/gpu_smoke.py; cp runs/gpu_smoke/smoke.json runs/gpu_smoke/smoke.log $OUT/

On synthetic data written in the real layouts (`ivt.data.synthetic`: MFNet, VT5000/1000/821,
M3FD), each step a child process as a user types it:

    seg   train_seg.py  swin_l  512, batch 2   20 iterations, then evaluate.py and predict.py
    sod   train_sod.py  eva02_l 384, batch 8   20 iterations, then evaluate.py and predict.py
    det   train_det.py  swin_l  640, batch 2   20 iterations, then evaluate.py and predict.py
    ddp   torchrun --nproc_per_node=1 train_seg.py (nccl on a GPU), 4 iterations

with `--amp --impl fused --cuda-graph` on the GPU and random weights (`--pretrained none`: the
device machine has no internet). `--tiny` runs swin_nano at 32-64 pixels on the CPU with the
PyTorch kernels (no amp, fused kernels or CUDA graph): the same commands, checked by
tests/test_gpu_smoke.py. A failing step does not stop the others; each step's exit status, time
and last lines of output go to OUT/smoke.json, and the exit status is the number of failed steps.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)             # the repository's packages, not this folder's scripts

from ivt.data.synthetic import write_m3fd, write_mfnet, write_vt  # noqa: E402

# task -> (backbone, size, batch) on the GPU: the paper's settings (data.md, method.md)
GPU_RUNS = {"seg": ("swin_l", 512, 2), "sod": ("eva02_l", 384, 8), "det": ("swin_l", 640, 2)}
TAIL_LINES = 15


def write_data(root: Path, tiny: bool) -> Dict[str, Path]:
    """Synthetic MFNet, VT and M3FD under root, at their real image sizes (tiny ones with
    --tiny). -> {task: dataset root}."""
    seg_size, sod_size, det_size = ((48, 64), (40, 48), (48, 64)) if tiny else \
        ((480, 640), (480, 640), (768, 1024))
    write_mfnet(root / "mfnet", n_train=6, n_val=2, n_test=2, size=seg_size)
    write_vt(root / "vt", n_train=8, n_test=2, n_vt1000=2, n_vt821=2, size=sod_size)
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
                 "sod": ["--data", str(data / "VT5000" / "Train"), "--val-count", "2"],
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


def run_step(name: str, command: List[str], log: Path) -> dict:
    """Run one command (cwd: the repository), its output appended to `log`. -> the record."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = run.stdout + run.stderr
    with log.open("a") as f:
        f.write(f"== {name}: {' '.join(command)}\n{output}\n== {name}: exit {run.returncode}, "
                f"{seconds:.1f} s\n")
    tail = output.strip().splitlines()[-TAIL_LINES:]
    print(f"== {name}: exit {run.returncode}, {seconds:.1f} s", flush=True)
    if run.returncode:
        print("\n".join(tail), flush=True)
    return {"step": name, "exit": run.returncode, "seconds": round(seconds, 1), "tail": tail}


def smoke(out: Path, tiny: bool, iters: int, tasks: List[str]) -> List[dict]:
    """Every step of the module docstring for `tasks`; the records, in order."""
    out.mkdir(parents=True, exist_ok=True)
    log = out / "smoke.log"
    start = time.perf_counter()
    data = write_data(out / "data", tiny)
    records = [{"step": "data", "exit": 0, "seconds": round(time.perf_counter() - start, 1),
                "tail": []}]
    py = sys.executable
    for task in tasks:
        run_dir = out / "runs" / task
        script = str(ROOT / f"train_{task}.py")
        checkpoint = run_dir / "last.pt"
        records.append(run_step(f"{task}: train", [py, script, *train_args(
            task, data[task], run_dir, tiny, iters)], log))
        records.append(run_step(f"{task}: evaluate", [py, str(ROOT / "evaluate.py"), *eval_args(
            task, data[task], checkpoint, out / f"{task}_metrics.json", tiny)], log))
        records.append(run_step(f"{task}: predict", [py, str(ROOT / "predict.py"), *predict_args(
            task, data[task], checkpoint, out / "predictions" / task, tiny)], log))
    if "seg" in tasks:
        args = train_args("seg", data["seg"], out / "runs" / "ddp", tiny, 4)
        records.append(run_step("ddp: torchrun, 1 process", [
            py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "train_seg.py"), *args], log))
    return records


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
    args = p.parse_args(argv)
    if not args.tiny:
        import torch
        if not torch.cuda.is_available():
            p.error("no CUDA device: run with --tiny for the CPU form of the same steps")
    records = smoke(args.out, args.tiny, args.iters, args.tasks)
    (args.out / "smoke.json").write_text(json.dumps(records, indent=1))
    failed = [r["step"] for r in records if r["exit"]]
    print(f"{len(records) - len(failed)} of {len(records)} steps passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())

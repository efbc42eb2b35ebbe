"""The stages every demo shares: settings, the visible-light pre-training, fine-tuning and scoring
the three runs of a task, tables and figures.

A task (`ivt.demo.seg`, `.sod`, `.det`) describes itself as a `DemoTask` (its settings, data
writer, training arguments, scorer and figure) and `run_task` drives it:

    write the data -> pre-train the visible model -> per run in RUNS: fine-tune, score, count
    -> the night figure

The task modules and `ivt.demo.methods` import this module; it imports none of them.
"""
import importlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..checkpoint import atomic_save, load_checkpoint
from ..data.synthetic import write_mfnet
from ..engine import jsonable
from ..summary import count

RUNS = ("full_vis", "ivt", "ivt_ir_missing")
BACKBONE = "swin_nano"


@dataclass(frozen=True)
class Settings:
    """Everything the segmentation demo's numbers depend on, apart from the seed; the
    pre-training and the IV-tuning widths of every demo."""
    size: tuple = (96, 128)          # image (H, W)
    n_pretrain: int = 240            # day-only pre-training images
    n_pretrain_val: int = 8
    n_train: int = 240               # downstream training images (half night)
    n_val: int = 16
    n_test: int = 80                 # held-out test images (half night)
    crop: int = 96                   # square training crop
    batch_size: int = 8
    head_dim: int = 64               # Segformer head width
    pretrain_iters: int = 400
    pretrain_lr: float = 0.05
    full_iters: int = 300
    full_lr: float = 0.05           # the best of 0.003-0.1 for full_vis's day mIoU
    ivt_iters: int = 300
    ivt_lr: float = 0.05
    weight_decay: float = 1e-4
    d1: int = 8
    d2: int = 8                      # small Hybrid Adapter width keeps the trainable share small
    d3: int = 8
    figure_scenes: int = 4

    def schedule(self, tuning: str) -> Tuple[int, float]:
        """(iterations, learning rate) of a fine-tune with `tuning`."""
        return ((self.full_iters, self.full_lr) if tuning == "full"
                else (self.ivt_iters, self.ivt_lr))


PRESETS: Dict[str, Settings] = {
    "default": Settings(),
    "fast": Settings(n_pretrain=120, n_train=120, n_test=40, pretrain_iters=200,
                     full_iters=150, ivt_iters=150),
    # Plumbing only (the test suite): seconds, the numbers mean nothing.
    "smoke": Settings(size=(32, 48), n_pretrain=8, n_pretrain_val=2, n_train=8, n_val=2,
                      n_test=4, crop=32, batch_size=2, head_dim=16, pretrain_iters=2,
                      full_iters=2, ivt_iters=2, figure_scenes=2),
}


def repo_script(name: str):
    """Import a script of the repository root (train_seg, train_sod, train_det, evaluate)."""
    root = Path(__file__).resolve().parents[2]
    if (root / "train_seg.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module(name)


def run_spec(name: str) -> dict:
    """tuning, variant and the input the backbone sees besides the visible image."""
    return {"full_vis": dict(tuning="full", variant="ivt", ir="none"),
            "ivt": dict(tuning="ivt", variant="ivt", ir="thermal"),
            "ivt_ir_missing": dict(tuning="ivt", variant="ir_missing", ir="visible (no IR)")}[name]


def backbone_counts(s: Settings, tuning: str, variant: str = "ivt") -> dict:
    """Trainable backbone parameters, and their share of the visible model's parameters
    (the paper's #TP / backbone, as `python -m ivt.summary` prints it)."""
    opts = dict(d1=s.d1, d2=s.d2, d3=s.d3, variant=variant) if tuning == "ivt" else {}
    c = count(BACKBONE, tuning=tuning, **opts)
    return {"trainable_params": c["trainable"], "backbone_params": c["total"],
            "visible_params": c["visible"], "trainable_fraction": c["trainable"] / c["visible"]}


class StageLog:
    """`log(msg)` prints `[<prefix> <seconds since start>s] msg` (nothing when `quiet`)."""

    def __init__(self, prefix: str, quiet: bool = False):
        self.prefix, self.quiet, self.start = prefix, quiet, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.prefix} {self.elapsed():6.0f}s] {msg}", flush=True)


# -- segmentation data, training and scoring (the pre-training, `seg` and `methods`) -------------
def write_pretrain_data(out: Path, s: Settings, seed: int) -> Path:
    """The day-only visible images standing in for the pre-training data (every demo's)."""
    pre = out / "data" / "pretrain_day"
    # A distinct seed: no pre-training scene repeats a downstream one.
    write_mfnet(pre, s.n_pretrain, s.n_pretrain_val, 0, size=s.size, seed=10_000 + seed,
                night_fraction=0.0)
    return pre


def write_seg_data(out: Path, s: Settings, seed: int) -> Dict[str, Path]:
    """The downstream MFNet-layout scenes (half night), then the pre-training images."""
    down = out / "data" / "mfnet_synthetic"
    write_mfnet(down, s.n_train, s.n_val, s.n_test, size=s.size, seed=seed, night_fraction=0.5)
    return {"pretrain": write_pretrain_data(out, s, seed), "downstream": down}


def seg_train_args(s: Settings, data: Path, out: Path, seed: int, tuning: str, iters: int,
                   lr: float, variant: str = "ivt", pretrained: Optional[Path] = None
                   ) -> List[str]:
    """`train_seg.py`'s command line for one run."""
    args = ["--backbone", BACKBONE, "--tuning", tuning, "--data", str(data),
            "--train-split", "train", "--val-split", "val", "--iters", str(iters),
            "--batch-size", str(s.batch_size), "--crop", str(s.crop), "--lr", str(lr),
            "--weight-decay", str(s.weight_decay), "--head-dim", str(s.head_dim),
            "--device", "cpu", "--workers", "0", "--seed", str(seed), "--out", str(out),
            "--eval-every", str(max(1, iters // 6)), "--log-every", str(max(1, iters // 30))]
    if tuning == "ivt":
        args += ["--variant", variant, "--d1", str(s.d1), "--d2", str(s.d2), "--d3", str(s.d3)]
    if pretrained is not None:
        args += ["--pretrained", str(pretrained)]
    return args


def score_seg(data: Path, checkpoint: Path, pretrained: Path, dest: Path) -> dict:
    """mIoU over all, day and night test images (`evaluate.py`, its report saved to `dest`)."""
    m = repo_script("evaluate").main(
        ["--task", "seg", "--data", str(data), "--checkpoint", str(checkpoint),
         "--pretrained", str(pretrained), "--split", "test", "--device", "cpu", "--workers", "0",
         "--json", str(dest)])
    return {k: m[k] for k in ("miou_all", "miou_day", "miou_night")}


def train_run(script: str, args: List[str], folder: Path) -> dict:
    """`<script>.main(args)` for a run written to `folder`; a run already there (an earlier
    demo into the same --out, or one stopped by Ctrl-C) is continued with --resume, exactly as
    it would have gone on: a finished one trains no more."""
    if (folder / "last.pt").is_file():
        args = args + ["--resume"]
    return repo_script(script).main(args)


def export_backbone(checkpoint: Path, dest: Path) -> None:
    """The pre-training run's backbone as a plain state dict (timm layout, no IV-tuning keys),
    as a classification checkpoint holds it: without the segmentation Swin's output norms."""
    model = load_checkpoint(str(checkpoint))["model"]
    sd = {k[len("backbone."):]: v for k, v in model.items()
          if k.startswith("backbone.") and not k.startswith("backbone.out_norms.")}
    atomic_save(sd, str(dest))


def pretrain_visible(out: Path, data: Path, s: Settings, seed: int) -> Path:
    """Train swin_nano + Segformer head on day-only visible images (`--tuning full`) and export
    its backbone as the "visible-light pre-trained model"; returns the file. Exported once: the
    fine-tunes record its SHA-256 and continue only from the same file."""
    train_run("train_seg", seg_train_args(s, data, out / "pretrain", seed, "full",
                                          s.pretrain_iters, s.pretrain_lr), out / "pretrain")
    pretrained = out / f"{BACKBONE}_visible_pretrained.pth"
    if not pretrained.is_file():
        export_backbone(out / "pretrain" / "last.pt", pretrained)
    return pretrained


def pretrain_stage(log: StageLog, out: Path, data: Path, s: Settings, seed: int,
                   timings: Dict[str, float]) -> Path:
    """`pretrain_visible`, logged, its time in timings["pretrain"]: every demo starts here."""
    log(f"pre-training {BACKBONE} on day-time visible images ({s.pretrain_iters} iterations)")
    t0 = time.perf_counter()
    pretrained = pretrain_visible(out, data, s, seed)
    timings["pretrain"] = time.perf_counter() - t0
    return pretrained


# -- one task's demo -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoTask:
    """What `run_task` needs of a task. `t` below is the task's settings (`presets[preset]`, with
    `figure_scenes` and `schedule(tuning) -> (iterations, lr)`), `s` the shared `Settings`."""
    log_prefix: str                  # progress lines: [<log_prefix> 12s] ...
    out_prefix: str                  # <out>/<out_prefix><run>/, <out_prefix>night_predictions.png
    presets: Dict[str, object]       # preset name -> t
    data_line: Callable[..., str]    # (s, t) -> what `write_data` writes, for the log
    write_data: Callable[..., Dict[str, Path]]   # (out, s, t, seed) -> {"pretrain": ..., ...}
    train_data: str                  # the key of the training data in write_data's dict
    script: str                      # the training script: train_seg, train_sod or train_det
    train_args: Callable[..., List[str]]  # (t, s, that data, run folder, seed, run, pretrained)
    score: Callable[..., dict]       # (data, checkpoint, pretrained, run folder) -> metrics
    figure: Callable[..., object]    # (data, {run: checkpoint}, pretrained, png, scenes)


@dataclass
class DemoResult:
    summary: Dict[str, dict]         # run -> metrics, parameter counts, settings, seconds
    timings: Dict[str, float]        # stage -> seconds
    pretrained: Path
    figure: Path
    figure_scenes: object            # what the task's figure returned


def fine_tune(task: DemoTask, log: StageLog, s: Settings, t, data: Dict[str, Path], out: Path,
              seed: int, name: str, pretrained: Path) -> dict:
    """Train run `name` with the task's script, score it, count its parameters."""
    spec = run_spec(name)
    iters, lr = t.schedule(spec["tuning"])
    folder = out / f"{task.out_prefix}{name}"
    log(f"fine-tuning {name} ({iters} iterations)")
    t0 = time.perf_counter()
    train_run(task.script, task.train_args(t, s, data[task.train_data], folder, seed, name,
                                           pretrained), folder)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    metrics = task.score(data, folder / "last.pt", pretrained, folder)
    t_eval = time.perf_counter() - t0
    return {**metrics, **backbone_counts(s, spec["tuning"], spec["variant"]),
            "tuning": spec["tuning"],
            "variant": spec["variant"] if spec["tuning"] == "ivt" else None,
            "ir_input": spec["ir"], "iters": iters, "lr": lr, "train_seconds": t_train,
            "eval_seconds": t_eval, "checkpoint": str(folder / "last.pt")}


def run_task(task: DemoTask, out: Path, seed: int, preset: str) -> DemoResult:
    """Data, pre-training, the fine-tunes of RUNS and the night figure of one task."""
    s, t = PRESETS[preset], task.presets[preset]
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog(task.log_prefix)
    log(task.data_line(s, t))
    data = task.write_data(out, s, t, seed)
    timings = {"data": log.elapsed()}
    pretrained = pretrain_stage(log, out, data["pretrain"], s, seed, timings)
    summary = {}
    for name in RUNS:
        summary[name] = fine_tune(task, log, s, t, data, out, seed, name, pretrained)
        timings[name] = summary[name]["train_seconds"] + summary[name]["eval_seconds"]
    log("drawing night predictions")
    t0 = time.perf_counter()
    figure = out / f"{task.out_prefix}night_predictions.png"
    checkpoints = {name: Path(r["checkpoint"]) for name, r in summary.items()}
    scenes = task.figure(data, checkpoints, pretrained, figure, t.figure_scenes)
    timings["figure"] = time.perf_counter() - t0
    timings["total"] = log.elapsed()
    return DemoResult(summary, timings, pretrained, figure, scenes)


def write_task_summary(out: Path, task: DemoTask, result: DemoResult, seed: int, t,
                       margin_name: str, margin: float) -> Path:
    """<out>/<out_prefix>summary.json: the runs, the seed, the task's settings, the stage times
    and the night margin of ivt over full_vis."""
    path = out / f"{task.out_prefix}summary.json"
    path.write_text(json.dumps(jsonable(
        {"runs": result.summary, "seed": seed, "settings": asdict(t),
         "timings_s": result.timings, margin_name: margin}), indent=2) + "\n")
    return path


# -- report --------------------------------------------------------------------------------------
def titled_grid(rows: List[np.ndarray], titles: List[str], dest: Path, scale: int = 2) -> None:
    """Stack `rows` ((H, n*W, 3) uint8, n cells of width W each) into one figure enlarged by
    `scale` (nearest), with a white header naming the n columns; saved to `dest`."""
    grid = np.concatenate(rows, axis=0).astype(np.uint8)
    w = grid.shape[1] // len(titles)
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                       Image.NEAREST)
    header = 16
    canvas = Image.new("RGB", (img.width, img.height + header), "white")
    canvas.paste(img, (0, header))
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * w * scale + 3, 2), title, fill="black")
    canvas.save(dest)


def format_runs(summary: dict, columns: List[tuple]) -> str:
    """One row per run: name, tuning, IR input and trainable backbone parameters, then each of
    `columns` = (title, width, value(run record) -> number, format spec)."""
    lines = [f"{'run':<16}{'tuning':<8}{'IR input':<17}{'trainable backbone params':>27}"
             + "".join(f"{title:>{width}}" for title, width, _, _ in columns)]
    for name, r in summary.items():
        tp = f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.1f}%)"
        lines.append(f"{name:<16}{r['tuning']:<8}{r['ir_input']:<17}{tp:>27}"
                     + "".join(f"{value(r):>{width}{spec}}" for _, width, value, spec in columns))
    return "\n".join(lines)


def print_report(headline: str, table: str, margin: str, timings: Dict[str, float],
                 written: str) -> None:
    """A demo's closing lines: what ran, the table, the night margin, stage times, files."""
    print()
    print(headline)
    print(table)
    print(margin)
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"wrote {written}")

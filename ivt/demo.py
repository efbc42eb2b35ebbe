"""`python -m ivt.demo --out runs/demo`: IV-tuning's point, end to end, on a 2-core CPU.

1. Data. Two synthetic datasets in MFNet's layout (`ivt.data.synthetic.write_mfnet`): a
   day-only one that stands in for the visible-light pre-training data, and the downstream
   infrared-visible one (half day, half night; night visible images are dark and noisy, the
   thermal channel still shows the warm objects, and lit "cold decoys" look like objects in the
   visible image but are background).
2. Pre-training. `train_seg.py --tuning full` trains swin_nano + Segformer head from scratch on
   the day-only visible images; its backbone weights become the "visible-light pre-trained
   model" (a timm-layout state dict, loaded with `--pretrained`).
3. Three fine-tunes of that model on the downstream training set, with `train_seg.py`:
     full_vis        --tuning full: every backbone weight trains, visible images only
     ivt             --tuning ivt: backbone frozen, IV-tuning's modules train, thermal input
     ivt_ir_missing  --tuning ivt --variant ir_missing: the same, with the visible image fed
                     where the thermal one would go (Fig. 4(h): no infrared at all)
4. Evaluation with `evaluate.py` on the held-out test scenes (mIoU over all, day and night
   images), a table on stdout, `<out>/summary.json` and `<out>/night_predictions.png`.

Everything is deterministic given --seed (data, initialisation, shuffling, augmentation).
`<out>/demo_info.json` records the settings, the stage timings and the night margin.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checkpoint import load_checkpoint
from .data import PALETTE, MFNetDataset
from .data.synthetic import write_mfnet
from .engine import jsonable
from .models import build_backbone, count_parameters
from .tasks import load_trained

RUNS = ("full_vis", "ivt", "ivt_ir_missing")
BACKBONE = "swin_nano"


@dataclass(frozen=True)
class Settings:
    """Everything the demo's numbers depend on, apart from the seed."""
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


PRESETS: Dict[str, Settings] = {
    "default": Settings(),
    "fast": Settings(n_pretrain=120, n_train=120, n_test=40, pretrain_iters=200,
                     full_iters=150, ivt_iters=150),
    # Plumbing only (the test suite): seconds, the numbers mean nothing.
    "smoke": Settings(size=(32, 48), n_pretrain=8, n_pretrain_val=2, n_train=8, n_val=2,
                      n_test=4, crop=32, batch_size=2, head_dim=16, pretrain_iters=2,
                      full_iters=2, ivt_iters=2, figure_scenes=2),
}


def _repo_scripts():
    """Import train_seg.py and evaluate.py, which live at the repository root."""
    root = Path(__file__).resolve().parents[1]
    if (root / "train_seg.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import evaluate
    import train_seg
    return train_seg, evaluate


def run_spec(name: str) -> dict:
    """tuning, variant and the input the backbone sees besides the visible image."""
    return {"full_vis": dict(tuning="full", variant="ivt", ir="none"),
            "ivt": dict(tuning="ivt", variant="ivt", ir="thermal"),
            "ivt_ir_missing": dict(tuning="ivt", variant="ir_missing", ir="visible (no IR)")}[name]


def backbone_counts(s: Settings, tuning: str, variant: str) -> dict:
    """Trainable backbone parameters, and their share of the visible model's parameters
    (the paper's #TP / backbone, as `python -m ivt.summary` prints it)."""
    opts = dict(d1=s.d1, d2=s.d2, d3=s.d3, variant=variant) if tuning == "ivt" else {}
    bb = build_backbone(BACKBONE, tuning=tuning, **opts)
    trainable = count_parameters(bb, trainable_only=True)
    visible = sum(p.numel() for n, p in bb.named_parameters() if not bb.is_ivt_name(n))
    return {"trainable_params": trainable, "backbone_params": count_parameters(bb),
            "visible_params": visible, "trainable_fraction": trainable / visible}


def write_pretrain_data(out: Path, s: Settings, seed: int) -> Path:
    """The day-only visible images standing in for the pre-training data (every demo's)."""
    pre = out / "data" / "pretrain_day"
    # A distinct seed: no pre-training scene repeats a downstream one.
    write_mfnet(pre, s.n_pretrain, s.n_pretrain_val, 0, size=s.size, seed=10_000 + seed,
                night_fraction=0.0)
    return pre


def make_data(out: Path, s: Settings, seed: int) -> Dict[str, Path]:
    down = out / "data" / "mfnet_synthetic"
    write_mfnet(down, s.n_train, s.n_val, s.n_test, size=s.size, seed=seed, night_fraction=0.5)
    return {"pretrain": write_pretrain_data(out, s, seed), "downstream": down}


class StageLog:
    """`log(msg)` prints `[<prefix> <seconds since start>s] msg` (nothing when `quiet`)."""

    def __init__(self, prefix: str, quiet: bool = False):
        self.prefix, self.quiet, self.start = prefix, quiet, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{self.prefix} {self.elapsed():6.0f}s] {msg}", flush=True)


def train_args(s: Settings, data: Path, out: Path, seed: int, tuning: str, iters: int,
               lr: float, variant: str = "ivt", pretrained: Optional[Path] = None) -> List[str]:
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


def pretrain_visible(out: Path, data: Path, s: Settings, seed: int) -> Path:
    """Stage 2: train swin_nano + Segformer head on day-only visible images (`--tuning full`)
    and export its backbone as the "visible-light pre-trained model"; returns the file."""
    train_seg, _ = _repo_scripts()
    train_seg.main(train_args(s, data, out / "pretrain", seed, "full", s.pretrain_iters,
                              s.pretrain_lr))
    pretrained = out / f"{BACKBONE}_visible_pretrained.pth"
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


def print_report(headline: str, table: str, margin: str, timings: Dict[str, float],
                 written: str) -> None:
    """A demo's closing lines: what ran, the table, the night margin, stage times, files."""
    print()
    print(headline)
    print(table)
    print(margin)
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    print(f"wrote {written}")


def export_backbone(checkpoint: Path, dest: Path) -> None:
    """The pre-training run's backbone as a plain state dict (timm layout, no IV-tuning keys)."""
    model = load_checkpoint(str(checkpoint))["model"]
    sd = {k[len("backbone."):]: v for k, v in model.items() if k.startswith("backbone.")}
    torch.save(sd, dest)


# -- figure -------------------------------------------------------------------------------------
def colourise(label: np.ndarray) -> np.ndarray:
    lut = np.full((256, 3), 255, np.uint8)
    lut[:len(PALETTE)] = np.asarray(PALETTE, np.uint8)
    return lut[label]


def load_segmentor(checkpoint: Path, pretrained: Path):
    return load_trained(str(checkpoint), str(pretrained))[1]


def night_figure(data: Path, checkpoints: Dict[str, Path], pretrained: Path, dest: Path,
                 n_scenes: int, scale: int = 2) -> List[str]:
    """Rows: the first `n_scenes` night test scenes; columns: visible, thermal, ground truth,
    then each run's prediction (MFNet palette). Returns the scene names."""
    ds = MFNetDataset(data, "test_night", train=False)
    idx = list(range(min(n_scenes, len(ds))))
    models = {name: load_segmentor(path, pretrained) for name, path in checkpoints.items()}
    rows = []
    for i in idx:
        item = ds[i]
        vis, ir = ds.read_pair(ds.samples[i])
        cells = [vis, np.repeat(ir[..., None], 3, axis=2), colourise(item["label"].numpy())]
        for name, model in models.items():
            pred = model.predict(item["vis"][None], item["ir"][None])[0].numpy().astype(np.uint8)
            cells.append(colourise(pred))
        rows.append(np.concatenate(cells, axis=1))
    titled_grid(rows, ["visible", "thermal", "ground truth"] + list(models), dest, scale)
    return [ds.samples[i].name for i in idx]


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


# -- table --------------------------------------------------------------------------------------
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


def format_table(summary: dict) -> str:
    return format_runs(summary, [("mIoU all", 10, lambda r: r["miou_all"], ".1f"),
                                 ("day", 8, lambda r: r["miou_day"], ".1f"),
                                 ("night", 8, lambda r: r["miou_night"], ".1f"),
                                 ("train s", 9, lambda r: r["train_seconds"], ".0f")])


def run(out: Path, seed: int = 0, settings: Settings = PRESETS["default"], quiet: bool = False
        ) -> dict:
    """The whole demo; returns the summary dict it writes to <out>/summary.json."""
    train_seg, evaluate = _repo_scripts()
    s = settings
    out.mkdir(parents=True, exist_ok=True)
    timings = {}
    log = StageLog("demo")
    t0 = time.perf_counter()

    log(f"writing synthetic data ({s.n_pretrain} day-only pre-training images; "
        f"{s.n_train}/{s.n_val}/{s.n_test} train/val/test day+night images, {s.size[0]}x{s.size[1]})")
    data = make_data(out, s, seed)
    timings["data"] = time.perf_counter() - t0

    pretrained = pretrain_stage(log, out, data["pretrain"], s, seed, timings)

    summary, checkpoints = {}, {}
    for name in RUNS:
        spec = run_spec(name)
        iters, lr = ((s.full_iters, s.full_lr) if spec["tuning"] == "full"
                     else (s.ivt_iters, s.ivt_lr))
        log(f"fine-tuning {name} ({iters} iterations)")
        t0 = time.perf_counter()
        train_seg.main(train_args(s, data["downstream"], out / name, seed, spec["tuning"], iters,
                                  lr, spec["variant"], pretrained))
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        checkpoints[name] = out / name / "last.pt"
        m = evaluate.main(["--task", "seg", "--data", str(data["downstream"]),
                           "--checkpoint", str(checkpoints[name]), "--pretrained", str(pretrained),
                           "--split", "test", "--device", "cpu", "--workers", "0",
                           "--json", str(out / name / "test_metrics.json")])
        t_eval = time.perf_counter() - t0
        timings[name] = t_train + t_eval
        summary[name] = {"miou_all": m["miou_all"], "miou_day": m["miou_day"],
                         "miou_night": m["miou_night"],
                         **backbone_counts(s, spec["tuning"], spec["variant"]),
                         "tuning": spec["tuning"], "variant": spec["variant"] if
                         spec["tuning"] == "ivt" else None, "ir_input": spec["ir"],
                         "iters": iters, "lr": lr, "train_seconds": t_train,
                         "eval_seconds": t_eval, "checkpoint": str(checkpoints[name])}

    log("drawing night predictions")
    t0 = time.perf_counter()
    figure = out / "night_predictions.png"
    scenes = night_figure(data["downstream"], checkpoints, pretrained, figure, s.figure_scenes)
    timings["figure"] = time.perf_counter() - t0
    timings["total"] = log.elapsed()

    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    margin = summary["ivt"]["miou_night"] - summary["full_vis"]["miou_night"]
    info = {"seed": seed, "settings": asdict(s), "backbone": BACKBONE,
            "torch_threads": torch.get_num_threads(), "timings_s": timings,
            "night_margin_ivt_minus_full_vis": margin, "figure": str(figure),
            "figure_scenes": scenes, "pretrained": str(pretrained)}
    (out / "demo_info.json").write_text(json.dumps(jsonable(info), indent=2) + "\n")

    print_report(f"IV-tuning demo: {BACKBONE} pre-trained on day-time visible images, fine-tuned "
                 f"on {s.n_train} day+night scenes, tested on {s.n_test} (seed {seed})",
                 format_table(summary),
                 f"night mIoU, ivt - full_vis: {margin:+.1f} points, training "
                 f"{100 * summary['ivt']['trainable_fraction']:.1f}% of the backbone's "
                 "parameters", timings, f"{out / 'summary.json'}, {figure}")
    return summary


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ivt.demo", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", metavar="DIR",
                   help="output folder: data, checkpoints, summary.json, night_predictions.png "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the synthetic data, initialisation, shuffling and augmentation "
                        "(default: %(default)s)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--fast", action="store_true",
                   help="half the data and iterations: a quicker, noisier look (default: off)")
    g.add_argument("--smoke", action="store_true",
                   help="tiny images, a few iterations: checks the plumbing in seconds; the "
                        "numbers mean nothing (used by the tests) (default: off)")
    p.add_argument("--task", default="seg", choices=("seg", "sod", "det"),
                   help="seg: the MFNet-layout segmentation demo above; sod: the same argument "
                        "for salient object detection (VT layout, S-measure; ivt/demo_sod.py); "
                        "det: for detection (M3FD layout, COCO AP; ivt/demo_det.py) "
                        "(default: %(default)s)")
    p.add_argument("--methods", action="store_true",
                   help="instead, compare IV-tuning with the PETL methods of the paper's "
                        "Table 4 (full, freeze, VPT, AdaptFormer, Bi-AdaptFormer, Rein) on the "
                        "segmentation scenes (ivt/demo_methods.py)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads. A fixed count keeps reruns identical (float "
                        "sums depend on it); one also avoids OpenMP's slowdown on a busy "
                        "machine (default: %(default)s)")
    return p


def main(argv=None) -> dict:
    args = get_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("error: --threads must be at least 1")
    torch.set_num_threads(args.threads)
    preset = "smoke" if args.smoke else "fast" if args.fast else "default"
    if args.methods:
        from .demo_methods import run as run_methods
        return run_methods(Path(args.out), args.seed, settings=PRESETS[preset])
    if args.task == "sod":
        from .demo_sod import run as run_sod
        return run_sod(Path(args.out), args.seed, preset)
    if args.task == "det":
        from .demo_det import run as run_det
        return run_det(Path(args.out), args.seed, preset)
    return run(Path(args.out), args.seed, PRESETS[preset])


if __name__ == "__main__":
    main()

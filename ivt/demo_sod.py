"""`python -m ivt.demo --task sod`: the demo's argument for salient object detection.

The same visible-light "pre-trained model" as the segmentation demo (swin_nano trained on day-only
visible street scenes, `ivt.demo.pretrain_visible`), then three fine-tunes with `train_sod.py` on
synthetic scenes in the VT5000 layout, where the salient objects are the warm ones (half the
training scenes are night scenes, whose visible image shows almost nothing):

    full_vis        --tuning full: every backbone weight trains, visible images only
    ivt             --tuning ivt: backbone frozen, IV-tuning's modules train, thermal input
    ivt_ir_missing  --tuning ivt --variant ir_missing: no infrared at all (Fig. 4(h))

Each run keeps `train_sod.py`'s recipe apart from the demo's sizes, iterations and learning rates:
Adam without weight decay, gradient values clamped to +-0.5, the authors' SOD augmentation
(soft GTs; its 30-pixel crop border is a large share of the demo's small images).
Each is scored with `evaluate.py` on a day-only and a night-only test set (S-measure, max F,
max E, MAE at ground-truth size); `<out>/sod_summary.json` and `<out>/sod_night_predictions.png`.
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from .data.synthetic import write_vt_set
from .data.vt import VTDataset
from .demo import (BACKBONE, PRESETS, RUNS, Settings, _repo_scripts, backbone_counts,
                   StageLog, format_runs, pretrain_stage, print_report, run_spec, titled_grid,
                   write_pretrain_data)
from .engine import jsonable
from .tasks import load_trained
from .tasks.sod import saliency_png


@dataclass(frozen=True)
class SODSettings:
    n_train: int = 160               # VT5000/Train-layout scenes (half night)
    n_test: int = 40                 # per test set (day-only and night-only)
    size: int = 96                   # square input
    batch_size: int = 8
    iters: int = 200
    full_lr: float = 1e-3            # Adam (train_sod.py's: no weight decay, values clamped)
    ivt_lr: float = 1e-3
    figure_scenes: int = 4


SOD_PRESETS = {"default": SODSettings(),
               "fast": SODSettings(n_train=80, n_test=20, iters=100),
               "smoke": SODSettings(n_train=8, n_test=2, size=32, batch_size=2, iters=2,
                                    figure_scenes=2)}


def make_data(out: Path, s: Settings, t: SODSettings, seed: int) -> Dict[str, Path]:
    """Pre-training images (as the segmentation demo) and three VT-layout folders."""
    root = out / "data"
    write_vt_set(root / "vt_train", t.n_train, size=s.size, seed=seed, night_fraction=0.5)
    write_vt_set(root / "vt_test_day", t.n_test, size=s.size, seed=seed, night_fraction=0.0,
                 first_index=t.n_train + 1)
    write_vt_set(root / "vt_test_night", t.n_test, size=s.size, seed=seed, night_fraction=1.0,
                 first_index=t.n_train + t.n_test + 1)
    return {"pretrain": write_pretrain_data(out, s, seed), "train": root / "vt_train",
            "day": root / "vt_test_day", "night": root / "vt_test_night"}


def train_args(t: SODSettings, s: Settings, data: Path, out: Path, seed: int, name: str,
               pretrained: Path) -> List[str]:
    spec = run_spec(name)
    lr = t.full_lr if spec["tuning"] == "full" else t.ivt_lr
    args = ["--backbone", BACKBONE, "--tuning", spec["tuning"], "--data", str(data),
            "--val-count", "8" if t.n_train > 16 else "2", "--size", str(t.size),
            "--iters", str(t.iters), "--batch-size", str(t.batch_size), "--lr", str(lr),
            "--device", "cpu", "--workers", "0",
            "--seed", str(seed), "--out", str(out), "--eval-every", "0",
            "--log-every", str(max(1, t.iters // 4)), "--pretrained", str(pretrained)]
    if spec["tuning"] == "ivt":
        args += ["--variant", spec["variant"], "--d1", str(s.d1), "--d2", str(s.d2),
                 "--d3", str(s.d3)]
    return args


def night_figure(data: Path, checkpoints: Dict[str, Path], pretrained: Path, dest: Path,
                 n_scenes: int, scale: int = 2) -> None:
    """Rows: night test scenes; columns: visible, thermal, ground truth, each run's saliency."""
    models = {name: load_trained(str(path), str(pretrained)) for name, path in checkpoints.items()}
    size = next(iter(models.values()))[2]["config"]["size"]
    ds = VTDataset(data, train=False, size=size)
    rows = []
    for i in range(min(n_scenes, len(ds))):
        item = ds[i]
        vis, ir, gt = ds.read_images(i)
        cells = [vis, np.repeat(ir[..., None], 3, axis=2), np.repeat(gt[..., None], 3, axis=2)]
        for _, model, _ in models.values():
            with torch.no_grad():
                prob = model.predict(item["vis"][None], item["ir"][None]).float()
            prob = torch.nn.functional.interpolate(prob, size=gt.shape, mode="bilinear",
                                                   align_corners=False)[0, 0].numpy()
            cells.append(np.repeat(np.asarray(saliency_png(prob))[..., None], 3, axis=2))
        rows.append(np.concatenate(cells, axis=1))
    titled_grid(rows, ["visible", "thermal", "ground truth"] + list(models), dest, scale)


def format_table(summary: dict) -> str:
    return format_runs(summary, [("S day", 8, lambda r: r["day"]["S"], ".3f"),
                                 ("S night", 9, lambda r: r["night"]["S"], ".3f"),
                                 ("maxF night", 11, lambda r: r["night"]["maxF"], ".3f"),
                                 ("MAE night", 10, lambda r: r["night"]["MAE"], ".3f"),
                                 ("train s", 9, lambda r: r["train_seconds"], ".0f")])


def run(out: Path, seed: int = 0, preset: str = "default") -> dict:
    """The SOD demo; returns the summary it writes to <out>/sod_summary.json."""
    _, evaluate = _repo_scripts()
    import train_sod
    s, t = PRESETS[preset], SOD_PRESETS[preset]
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog("demo sod")
    timings = {}

    log(f"writing synthetic data ({t.n_train} training scenes, {t.n_test} day and {t.n_test} "
        f"night test scenes)")
    data = make_data(out, s, t, seed)
    pretrained = pretrain_stage(log, out, data["pretrain"], s, seed, timings)
    summary, checkpoints = {}, {}
    for name in RUNS:
        spec = run_spec(name)
        log(f"fine-tuning {name} ({t.iters} iterations)")
        t0 = time.perf_counter()
        train_sod.main(train_args(t, s, data["train"], out / f"sod_{name}", seed, name,
                                  pretrained))
        t_train = time.perf_counter() - t0
        checkpoints[name] = out / f"sod_{name}" / "last.pt"
        result = evaluate.main(["--data", str(data["day"]), "--data", str(data["night"]),
                                "--checkpoint", str(checkpoints[name]), "--pretrained",
                                str(pretrained), "--device", "cpu", "--workers", "0",
                                "--json", str(out / f"sod_{name}" / "test_metrics.json")])
        sets = result["sets"]
        summary[name] = {"day": sets[str(data["day"].as_posix())],
                         "night": sets[str(data["night"].as_posix())],
                         **backbone_counts(s, spec["tuning"], spec["variant"]),
                         "tuning": spec["tuning"], "ir_input": spec["ir"],
                         "train_seconds": t_train, "checkpoint": str(checkpoints[name])}
        timings[name] = time.perf_counter() - t0
    figure = out / "sod_night_predictions.png"
    night_figure(data["night"], checkpoints, pretrained, figure, t.figure_scenes)
    timings["total"] = log.elapsed()
    margin = summary["ivt"]["night"]["S"] - summary["full_vis"]["night"]["S"]
    (out / "sod_summary.json").write_text(json.dumps(jsonable(
        {"runs": summary, "seed": seed, "settings": asdict(t), "timings_s": timings,
         "night_S_margin_ivt_minus_full_vis": margin}), indent=2) + "\n")
    print_report(f"IV-tuning SOD demo: {BACKBONE}, {t.n_train} day+night training scenes, "
                 f"{t.n_test} day and {t.n_test} night test scenes (seed {seed})",
                 format_table(summary), f"night S-measure, ivt - full_vis: {margin:+.3f}",
                 timings, f"{out / 'sod_summary.json'}, {figure}")
    return summary

"""`python -m ivt.demo --task sod`: the demo's argument for salient object detection.

The same visible-light "pre-trained model" as the segmentation demo (swin_nano trained on day-only
visible street scenes, `ivt.demo.stages.pretrain_visible`), then three fine-tunes with
`train_sod.py` on synthetic scenes in the VT5000 layout, where the salient objects are the warm
ones (half the training scenes are night scenes, whose visible image shows almost nothing):

    full_vis        --tuning full: every backbone weight trains, visible images only
    ivt             --tuning ivt: backbone frozen, IV-tuning's modules train, thermal input
    ivt_ir_missing  --tuning ivt --variant ir_missing: no infrared at all (Fig. 4(h))

Each run keeps `train_sod.py`'s recipe apart from the demo's sizes, iterations and learning rates:
Adam without weight decay, gradient values clamped to +-0.5, the authors' SOD augmentation
(soft GTs; its 30-pixel crop border is a large share of the demo's small images).
Each is scored with `evaluate.py` on a day-only and a night-only test set (S-measure, max F,
max E, MAE at ground-truth size); `<out>/sod_summary.json` and `<out>/sod_night_predictions.png`.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..data.synthetic import write_vt_set
from ..data.vt import VTDataset
from ..tasks import config_normalization, load_trained
from ..tasks.sod import saliency_map
from .stages import (BACKBONE, DemoTask, Settings, format_runs, print_report, repo_script,
                     run_spec, run_task, titled_grid, write_pretrain_data, write_task_summary)


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

    def schedule(self, tuning: str) -> Tuple[int, float]:
        """(iterations, learning rate) of a fine-tune with `tuning`."""
        return self.iters, self.full_lr if tuning == "full" else self.ivt_lr


SOD_PRESETS = {"default": SODSettings(),
               "fast": SODSettings(n_train=80, n_test=20, iters=100),
               "smoke": SODSettings(n_train=8, n_test=2, size=32, batch_size=2, iters=2,
                                    figure_scenes=2)}


def make_data(out: Path, s: Settings, t: SODSettings, seed: int) -> Dict[str, Path]:
    """Three VT-layout folders, then the pre-training images (as the segmentation demo)."""
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
    """`train_sod.py`'s command line for run `name`."""
    spec = run_spec(name)
    iters, lr = t.schedule(spec["tuning"])
    args = ["--backbone", BACKBONE, "--tuning", spec["tuning"], "--data", str(data),
            "--val-count", "8" if t.n_train > 16 else "2", "--size", str(t.size),
            "--iters", str(iters), "--batch-size", str(t.batch_size), "--lr", str(lr),
            "--device", "cpu", "--workers", "0",
            "--seed", str(seed), "--out", str(out), "--eval-every", "0",
            "--log-every", str(max(1, iters // 4)), "--pretrained", str(pretrained)]
    if spec["tuning"] == "ivt":
        args += ["--variant", spec["variant"], "--d1", str(s.d1), "--d2", str(s.d2),
                 "--d3", str(s.d3)]
    return args


def score(data: Dict[str, Path], checkpoint: Path, pretrained: Path, folder: Path) -> dict:
    """`evaluate.py` on the day and the night test sets: {"day": metrics, "night": metrics}."""
    result = repo_script("evaluate").main(
        ["--data", str(data["day"]), "--data", str(data["night"]), "--checkpoint",
         str(checkpoint), "--pretrained", str(pretrained), "--device", "cpu", "--workers", "0",
         "--json", str(folder / "test_metrics.json")])
    return {part: result["sets"][str(data[part].as_posix())] for part in ("day", "night")}


def night_figure(data: Dict[str, Path], checkpoints: Dict[str, Path], pretrained: Path,
                 dest: Path, n_scenes: int, scale: int = 2) -> None:
    """Rows: night test scenes; columns: visible, thermal, ground truth, each run's saliency."""
    models = {name: load_trained(str(path), str(pretrained)) for name, path in checkpoints.items()}
    config = next(iter(models.values()))[2]["config"]
    ds = VTDataset(data["night"], train=False, size=config["size"],
                   norm=config_normalization(config))
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
            cells.append(np.repeat(saliency_map(prob)[..., None], 3, axis=2))
        rows.append(np.concatenate(cells, axis=1))
    titled_grid(rows, ["visible", "thermal", "ground truth"] + list(models), dest, scale)


TASK = DemoTask(
    log_prefix="demo sod", out_prefix="sod_", presets=SOD_PRESETS,
    data_line=lambda s, t: (f"writing synthetic data ({t.n_train} training scenes, {t.n_test} "
                            f"day and {t.n_test} night test scenes)"),
    write_data=make_data, train_data="train", script="train_sod", train_args=train_args,
    score=score, figure=night_figure)


def format_table(summary: dict) -> str:
    return format_runs(summary, [("S day", 8, lambda r: r["day"]["S"], ".3f"),
                                 ("S night", 9, lambda r: r["night"]["S"], ".3f"),
                                 ("maxF night", 11, lambda r: r["night"]["maxF"], ".3f"),
                                 ("MAE night", 10, lambda r: r["night"]["MAE"], ".3f"),
                                 ("train s", 9, lambda r: r["train_seconds"], ".0f")])


def run(out: Path, seed: int = 0, preset: str = "default") -> dict:
    """The SOD demo; returns the summary it writes to <out>/sod_summary.json."""
    t = SOD_PRESETS[preset]
    result = run_task(TASK, out, seed, preset)
    summary = result.summary
    margin = summary["ivt"]["night"]["S"] - summary["full_vis"]["night"]["S"]
    path = write_task_summary(out, TASK, result, seed, t, "night_S_margin_ivt_minus_full_vis",
                              margin)
    print_report(f"IV-tuning SOD demo: {BACKBONE}, {t.n_train} day+night training scenes, "
                 f"{t.n_test} day and {t.n_test} night test scenes (seed {seed})",
                 format_table(summary), f"night S-measure, ivt - full_vis: {margin:+.3f}",
                 result.timings, f"{path}, {result.figure}")
    return summary

"""`python -m ivt.demo --task det`: the demo's argument for object detection.

The same visible-light "pre-trained model" as the segmentation demo
(`ivt.demo.stages.pretrain_visible`), then three fine-tunes of a small DETR-style detector with
`train_det.py` on synthetic scenes in M3FD's layout (people, cars, buses, motorcycles, lamps and
trucks, all warm; half the training scenes are night scenes whose visible image shows almost
nothing):

    full_vis        --tuning full: every backbone weight trains, visible images only
    ivt             --tuning ivt: backbone frozen, IV-tuning's modules train, thermal input
    ivt_ir_missing  --tuning ivt --variant ir_missing: no infrared at all (Fig. 4(h))

Each is scored with `evaluate.py` on a day-only and a night-only test set (COCO mAP and AP50,
pycocotools' convention); `<out>/det_summary.json` and `<out>/det_night_predictions.png`.
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

from ..data.m3fd import M3FDDataset
from ..data.synthetic import write_m3fd
from ..tasks import config_normalization, load_trained
from ..visualize import draw_boxes
from .stages import (BACKBONE, DemoTask, Settings, format_runs, print_report, repo_script,
                     run_spec, run_task, titled_grid, write_pretrain_data, write_task_summary)

TOP_K = 4          # detections drawn per model and scene in the figure


@dataclass(frozen=True)
class DetSettings:
    n_images: int = 300              # M3FD-layout scenes, half night: 60/20/20% train/val/test
    size: int = 128                  # square input
    batch_size: int = 8
    iters: int = 300
    lr: float = 1e-3                 # AdamW, every run
    hidden_dim: int = 32
    num_queries: int = 20
    encoder: str = "hybrid"          # RT-DETR's; "deformable" (6 layers) trails it on these scenes
    enc_layers: int = 6              # deformable encoder layers (DINO's count)
    dec_layers: int = 3
    ffn_dim: int = 256               # 8 x hidden_dim, DINO's ratio (2048 for 256)
    # About 10 positive and 10 negative denoising queries per image: with the scenes' 1-6
    # objects, 2 * (10 // n) * n <= 20 = num_queries (DINO: 100 for 900 queries).
    dn_number: int = 10
    figure_scenes: int = 4

    def schedule(self, tuning: str) -> Tuple[int, float]:
        """(iterations, learning rate) of a fine-tune (the same for every tuning)."""
        return self.iters, self.lr


DET_PRESETS = {"default": DetSettings(),
               "fast": DetSettings(n_images=150, iters=150),
               "smoke": DetSettings(n_images=20, size=64, batch_size=2, iters=2,
                                    hidden_dim=16, num_queries=12, enc_layers=1, dec_layers=1,
                                    ffn_dim=32, dn_number=6, figure_scenes=2)}


def make_data(out: Path, s: Settings, t: DetSettings, seed: int) -> Dict[str, Path]:
    """One M3FD-layout dataset (half night) with train/val/test lists and the test list split
    into test_day and test_night, then the pre-training images (as the segmentation demo)."""
    root = out / "data"
    write_m3fd(root / "m3fd", t.n_images, size=s.size, seed=seed, night_fraction=0.5)
    return {"pretrain": write_pretrain_data(out, s, seed), "m3fd": root / "m3fd"}


def train_args(t: DetSettings, s: Settings, data: Path, out: Path, seed: int, name: str,
               pretrained: Path) -> List[str]:
    """`train_det.py`'s command line for run `name`."""
    spec = run_spec(name)
    args = ["--backbone", BACKBONE, "--tuning", spec["tuning"], "--data", str(data),
            "--split-dir", str(data), "--train-split", "train", "--val-split", "val",
            "--size", str(t.size), "--hidden-dim", str(t.hidden_dim),
            "--num-queries", str(t.num_queries), "--encoder", t.encoder,
            "--enc-layers", str(t.enc_layers), "--dec-layers", str(t.dec_layers),
            "--ffn-dim", str(t.ffn_dim), "--dn-number", str(t.dn_number),
            "--backbone-lr-mult", "1.0", "--iters", str(t.iters),
            "--batch-size", str(t.batch_size), "--lr", str(t.lr), "--device", "cpu",
            "--workers", "0", "--seed", str(seed), "--out", str(out), "--eval-every", "0",
            "--log-every", str(max(1, t.iters // 4)), "--pretrained", str(pretrained)]
    if spec["tuning"] == "ivt":
        args += ["--variant", spec["variant"], "--d1", str(s.d1), "--d2", str(s.d2),
                 "--d3", str(s.d3)]
    return args


def score(data: Dict[str, Path], checkpoint: Path, pretrained: Path, folder: Path) -> dict:
    """`evaluate.py` on the day and the night test images: {"day": APs, "night": APs}."""
    evaluate, metrics = repo_script("evaluate"), {}
    for part in ("day", "night"):
        r = evaluate.main(["--data", str(data["m3fd"]), "--split", f"test_{part}",
                           "--split-dir", str(data["m3fd"]), "--checkpoint", str(checkpoint),
                           "--pretrained", str(pretrained), "--device", "cpu", "--workers", "0",
                           "--json", str(folder / f"test_{part}.json")])
        metrics[part] = {k: r[k] for k in ("mAP", "mAP50", "mAP75")}
    return metrics


def night_figure(data: Dict[str, Path], checkpoints: Dict[str, Path], pretrained: Path,
                 dest: Path, n_scenes: int, scale: int = 2) -> None:
    """Rows: night test scenes; columns: the thermal image with ground truth, then each run's
    TOP_K highest-scoring detections (with their scores) on the visible image."""
    models = {name: load_trained(str(path), str(pretrained)) for name, path in checkpoints.items()}
    config = next(iter(models.values()))[2]["config"]
    ds = M3FDDataset(data["m3fd"], split="test_night", split_dir=data["m3fd"], train=False,
                     size=config["size"], norm=config_normalization(config))
    rows = []
    for i in range(min(n_scenes, len(ds))):
        batch = ds.collate_fn([ds[i]])
        vis, ir = ds.read_images(i)
        boxes, labels, _ = ds.gt(i)
        cells = [np.asarray(draw_boxes(np.repeat(ir[..., None], 3, axis=2), np.asarray(boxes),
                                       [ds.classes[int(c)] for c in labels]))]
        for _, model, _ in models.values():
            with torch.no_grad():
                pred = model.predict(batch["vis"], batch["ir"],
                                     [batch["targets"][0]["orig_size"]])[0]
            keep = pred["scores"].argsort(descending=True)[:TOP_K]
            cells.append(np.asarray(draw_boxes(vis, pred["boxes"][keep].numpy(),
                                               [ds.classes[int(c)] for c in pred["labels"][keep]],
                                               pred["scores"][keep].numpy())))
        rows.append(np.concatenate(cells, axis=1))
    titled_grid(rows, ["thermal + ground truth"] + list(models), dest, scale)


TASK = DemoTask(
    log_prefix="demo det", out_prefix="det_", presets=DET_PRESETS,
    data_line=lambda s, t: f"writing synthetic data ({t.n_images} day and night scenes)",
    write_data=make_data, train_data="m3fd", script="train_det", train_args=train_args,
    score=score, figure=night_figure)


def format_table(summary: dict) -> str:
    return format_runs(summary, [("mAP day", 9, lambda r: r["day"]["mAP"], ".1f"),
                                 ("AP50 day", 10, lambda r: r["day"]["mAP50"], ".1f"),
                                 ("mAP night", 11, lambda r: r["night"]["mAP"], ".1f"),
                                 ("AP50 night", 12, lambda r: r["night"]["mAP50"], ".1f"),
                                 ("train s", 9, lambda r: r["train_seconds"], ".0f")])


def run(out: Path, seed: int = 0, preset: str = "default") -> dict:
    """The detection demo; returns the summary it writes to <out>/det_summary.json."""
    t = DET_PRESETS[preset]
    result = run_task(TASK, out, seed, preset)
    summary = result.summary
    margin = summary["ivt"]["night"]["mAP50"] - summary["full_vis"]["night"]["mAP50"]
    path = write_task_summary(out, TASK, result, seed, t, "night_AP50_margin_ivt_minus_full_vis",
                              margin)
    print_report(f"IV-tuning detection demo: {BACKBONE} + a small DETR-style detector, "
                 f"{t.n_images} day+night scenes (60/20/20% train/val/test; seed {seed}; COCO "
                 "AP, at most 100 detections per image and class)", format_table(summary),
                 f"night AP50, ivt - full_vis: {margin:+.1f} points", result.timings,
                 f"{path}, {result.figure}")
    return summary

"""`python -m ivt.demo`: the segmentation demo on MFNet-layout scenes (the package's docstring
tells the story); `<out>/summary.json`, `<out>/demo_info.json`, `<out>/night_predictions.png`."""
import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

from ..data import MFNetDataset
from ..engine import jsonable
from ..tasks import config_normalization, load_trained
from ..visualize import colourise
from .stages import (BACKBONE, PRESETS, DemoTask, Settings, format_runs, print_report, run_spec,
                     run_task, score_seg, seg_train_args, titled_grid, write_seg_data)


def train_args(t: Settings, s: Settings, data: Path, out: Path, seed: int, name: str,
               pretrained: Path) -> List[str]:
    """`train_seg.py`'s command line for run `name` on the downstream scenes."""
    spec = run_spec(name)
    iters, lr = t.schedule(spec["tuning"])
    return seg_train_args(s, data, out, seed, spec["tuning"], iters, lr,
                          spec["variant"], pretrained)


def night_figure(data: Dict[str, Path], checkpoints: Dict[str, Path], pretrained: Path,
                 dest: Path, n_scenes: int, scale: int = 2) -> List[str]:
    """Rows: the first `n_scenes` night test scenes; columns: visible, thermal, ground truth,
    then each run's prediction (MFNet palette). Returns the scene names."""
    trained = {name: load_trained(str(path), str(pretrained)) for name, path in checkpoints.items()}
    models = {name: model for name, (_, model, _) in trained.items()}
    config = next(iter(trained.values()))[2]["config"]
    ds = MFNetDataset(data["downstream"], "test_night", train=False,
                      norm=config_normalization(config))
    idx = list(range(min(n_scenes, len(ds))))
    rows = []
    for i in idx:
        item = ds[i]
        vis, ir = ds.read_pair(ds.samples[i])
        cells = [vis, np.repeat(ir[..., None], 3, axis=2), colourise(item["label"].numpy())]
        for model in models.values():
            pred = model.predict(item["vis"][None], item["ir"][None])[0].numpy().astype(np.uint8)
            cells.append(colourise(pred))
        rows.append(np.concatenate(cells, axis=1))
    titled_grid(rows, ["visible", "thermal", "ground truth"] + list(models), dest, scale)
    return [ds.samples[i].name for i in idx]


TASK = DemoTask(
    log_prefix="demo", out_prefix="", presets=PRESETS,
    data_line=lambda s, t: (f"writing synthetic data ({s.n_pretrain} day-only pre-training "
                            f"images; {s.n_train}/{s.n_val}/{s.n_test} train/val/test day+night "
                            f"images, {s.size[0]}x{s.size[1]})"),
    write_data=lambda out, s, t, seed: write_seg_data(out, s, seed),
    train_data="downstream", script="train_seg", train_args=train_args,
    score=lambda data, checkpoint, pretrained, folder: score_seg(
        data["downstream"], checkpoint, pretrained, folder / "test_metrics.json"),
    figure=night_figure)


def format_table(summary: dict) -> str:
    return format_runs(summary, [("mIoU all", 10, lambda r: r["miou_all"], ".1f"),
                                 ("day", 8, lambda r: r["miou_day"], ".1f"),
                                 ("night", 8, lambda r: r["miou_night"], ".1f"),
                                 ("train s", 9, lambda r: r["train_seconds"], ".0f")])


def run(out: Path, seed: int = 0, preset: str = "default") -> dict:
    """The segmentation demo; returns the summary it writes to <out>/summary.json."""
    s = PRESETS[preset]
    result = run_task(TASK, out, seed, preset)
    summary = result.summary
    (out / "summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    margin = summary["ivt"]["miou_night"] - summary["full_vis"]["miou_night"]
    info = {"seed": seed, "settings": asdict(s), "backbone": BACKBONE,
            "torch_threads": torch.get_num_threads(), "timings_s": result.timings,
            "night_margin_ivt_minus_full_vis": margin, "figure": str(result.figure),
            "figure_scenes": result.figure_scenes, "pretrained": str(result.pretrained)}
    (out / "demo_info.json").write_text(json.dumps(jsonable(info), indent=2) + "\n")
    print_report(f"IV-tuning demo: {BACKBONE} pre-trained on day-time visible images, fine-tuned "
                 f"on {s.n_train} day+night scenes, tested on {s.n_test} (seed {seed})",
                 format_table(summary),
                 f"night mIoU, ivt - full_vis: {margin:+.1f} points, training "
                 f"{100 * summary['ivt']['trainable_fraction']:.1f}% of the backbone's "
                 "parameters", result.timings, f"{out / 'summary.json'}, {result.figure}")
    return summary

"""`python -m ivt.demo --methods`: the Table 4 comparison on the synthetic data. Every tuning mode
fine-tunes the same visible-light pre-trained swin_nano; one table of trainable parameters and
test mIoU.

The segmentation demo's data and pre-training (`ivt.demo.stages`): the synthetic day-only
pre-training set and the day+night infrared-visible downstream set, `train_seg.py --tuning full`
pre-training, the exported visible backbone. Then one `train_seg.py` fine-tune per mode, each at
the method's default hyperparameters (`python -m ivt.summary --methods`), and `evaluate.py` on
the held-out test scenes:

    full_vis        --tuning full      every backbone weight, visible images only
    freeze          --tuning freeze    the head alone, visible images only (Table 4's Freeze)
    vpt, adaptformer, bi_adaptformer, rein
                    --tuning <method>  the method's modules + the independent IR patch embedding
                                       (Sec. 4.5: infrared tokens added to the visible tokens)
    ivt             --tuning ivt       IV-tuning (the demo's d2 = 8)

`run(out)` returns the summary it writes to `<out>/methods_summary.json` and prints the table.
"""
import contextlib
import io
import json
import time
from pathlib import Path

import torch

from ..engine import jsonable
from .stages import (BACKBONE, PRESETS, Settings, StageLog, backbone_counts, pretrain_stage,
                     score_seg, seg_train_args, train_run, write_seg_data)

RUNS = ("full_vis", "freeze", "vpt", "adaptformer", "bi_adaptformer", "rein", "ivt")

# A few minutes on a 2-core CPU: the demo's "fast" data and schedule.
DEFAULT = PRESETS["fast"]


def tuning_of(run_name: str) -> str:
    return "full" if run_name == "full_vis" else run_name


def format_table(summary: dict) -> str:
    lines = [f"{'method':<16}{'trainable backbone params':>27}{'mIoU all':>10}{'day':>8}"
             f"{'night':>8}{'train s':>9}"]
    for name, r in summary.items():
        tp = f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.1f}%)"
        lines.append(f"{name:<16}{tp:>27}{r['miou_all']:>10.1f}{r['miou_day']:>8.1f}"
                     f"{r['miou_night']:>8.1f}{r['train_seconds']:>9.0f}")
    return "\n".join(lines)


def run(out: Path, seed: int = 0, quiet: bool = False, settings: Settings = DEFAULT) -> dict:
    """Pre-train, fine-tune every mode in RUNS, evaluate; returns {run: metrics and counts}.
    `quiet` keeps everything (progress, the scripts' output, the table) off stdout."""
    s, out = settings, Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog("methods", quiet)

    scripts_output = (contextlib.redirect_stdout(io.StringIO()) if quiet
                      else contextlib.nullcontext())
    log(f"writing synthetic data ({s.n_train}/{s.n_val}/{s.n_test} train/val/test, "
        f"{s.size[0]}x{s.size[1]})")
    data = write_seg_data(out, s, seed)
    with scripts_output:
        pretrained = pretrain_stage(log, out, data["pretrain"], s, seed, {})

    summary = {}
    for name in RUNS:
        tuning = tuning_of(name)
        iters, lr = s.schedule(tuning)
        log(f"fine-tuning {name} ({iters} iterations, lr {lr})")
        t0 = time.perf_counter()
        with scripts_output:
            train_run("train_seg", seg_train_args(s, data["downstream"], out / name, seed,
                                                  tuning, iters, lr, pretrained=pretrained),
                      out / name)
        t_train = time.perf_counter() - t0
        with scripts_output:
            m = score_seg(data["downstream"], out / name / "last.pt", pretrained,
                          out / name / "test_metrics.json")
        summary[name] = {"tuning": tuning, **m, **backbone_counts(s, tuning), "iters": iters,
                         "lr": lr, "train_seconds": t_train}

    (out / "methods_summary.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    if not quiet:
        print()
        print(f"Table 4 on synthetic data: {BACKBONE} pre-trained on day-time visible images, "
              f"fine-tuned on {s.n_train} day+night scenes, tested on {s.n_test} (seed {seed}, "
              f"{torch.get_num_threads()} threads, {log.elapsed():.0f}s)")
        print(format_table(summary))
        print(f"wrote {out / 'methods_summary.json'}")
    return summary

"""The Table 4 comparison on the synthetic data: every tuning mode fine-tunes the same
visible-light pre-trained swin_nano, one table of trainable parameters and test mIoU.

Reuses `ivt.demo`'s machinery: the synthetic day-only pre-training set and the day+night
infrared-visible downstream set, `train_seg.py --tuning full` pre-training, the exported visible
backbone. Then one `train_seg.py` fine-tune per mode, each at the method's default
hyperparameters (`python -m ivt.summary --methods`), and `evaluate.py` on the held-out test scenes:

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
from typing import Dict

import torch

from .demo import (BACKBONE, PRESETS, Settings, StageLog, _repo_scripts, make_data,
                   pretrain_stage, train_args)
from .engine import jsonable
from .models import build_backbone, count_parameters

RUNS = ("full_vis", "freeze", "vpt", "adaptformer", "bi_adaptformer", "rein", "ivt")

# A few minutes on a 2-core CPU: the demo's "fast" data and schedule.
DEFAULT = PRESETS["fast"]


def tuning_of(run_name: str) -> str:
    return "full" if run_name == "full_vis" else run_name


def counts(s: Settings, tuning: str) -> Dict[str, float]:
    """Trainable backbone parameters and their share of the visible model's."""
    opts = dict(d1=s.d1, d2=s.d2, d3=s.d3) if tuning == "ivt" else {}
    bb = build_backbone(BACKBONE, tuning=tuning, **opts)
    trainable = count_parameters(bb, trainable_only=True)
    visible = sum(p.numel() for n, p in bb.named_parameters() if not bb.is_added_name(n))
    return {"trainable_params": trainable, "visible_params": visible,
            "trainable_fraction": trainable / visible}


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
    train_seg, evaluate = _repo_scripts()
    s = settings
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = StageLog("methods", quiet)

    scripts_output = (contextlib.redirect_stdout(io.StringIO()) if quiet
                      else contextlib.nullcontext())
    log(f"writing synthetic data ({s.n_train}/{s.n_val}/{s.n_test} train/val/test, "
        f"{s.size[0]}x{s.size[1]})")
    data = make_data(out, s, seed)
    with scripts_output:
        pretrained = pretrain_stage(log, out, data["pretrain"], s, seed, {})

    summary = {}
    for name in RUNS:
        tuning = tuning_of(name)
        iters, lr = (s.full_iters, s.full_lr) if tuning == "full" else (s.ivt_iters, s.ivt_lr)
        log(f"fine-tuning {name} ({iters} iterations, lr {lr})")
        t0 = time.perf_counter()
        with scripts_output:
            train_seg.main(train_args(s, data["downstream"], out / name, seed, tuning, iters, lr,
                                      pretrained=pretrained))
        t_train = time.perf_counter() - t0
        with scripts_output:
            m = evaluate.main(["--task", "seg", "--data", str(data["downstream"]),
                               "--checkpoint", str(out / name / "last.pt"),
                               "--pretrained", str(pretrained), "--split", "test",
                               "--device", "cpu", "--workers", "0",
                               "--json", str(out / name / "test_metrics.json")])
        summary[name] = {"tuning": tuning, "miou_all": m["miou_all"], "miou_day": m["miou_day"],
                         "miou_night": m["miou_night"], **counts(s, tuning), "iters": iters,
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

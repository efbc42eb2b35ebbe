"""`python -m ivt.plot RUN_DIR [RUN_DIR ...] --out curves.png`: how training went, from the logs.

Reads each run's `log.jsonl` (a RUN_DIR may also be the log file itself), as the training scripts
write it (`ivt.engine.JSONLLogger`): a `start` or `resume` record {iter, config}, `train` records
{iter, loss, lr, time, elapsed} and `eval` records {iter, <metrics>} of the validation split
(an optional `split` field names another). Draws, on one figure, the training loss and the
learning rate against the iteration, then one panel per scalar validation metric the logs hold
(mIoU, mAcc, S, MAE, mAP, ...; per-class dictionaries are left out), one line per run (named by
its folder) and validation split.

Logs as they are found on disk:
* a run still in progress: whatever has been written so far is plotted;
* a resumed run: the `resume` record at iteration R drops the records after R written before it
  (the resumed run logs those iterations again), and a later record replaces an earlier one for
  the same iteration and split; a `start` record (a fresh run in the same folder) drops
  everything before it;
* a run killed mid-write: a line that is not valid JSON is skipped with a warning, and when the
  next record was appended to the same unterminated line, that record is recovered.

matplotlib is needed only here (`pip install matplotlib`); training and prediction do not use it.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

NOT_METRICS = {"event", "iter", "split", "timestamp", "time", "elapsed"}
RECORD_START = '{"event"'       # every record starts with its event name (JSONLLogger)


def parse_line(line: str, where: str, warnings: List[str]):
    """The record on one log line, or None (with a warning) when it is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    start = line.rfind(RECORD_START)
    if start > 0:       # a killed run's partial record, then the next run's record on one line
        try:
            record = json.loads(line[start:])
            warnings.append(f"{where}: skipped a truncated record (kept the one after it)")
            return record
        except json.JSONDecodeError:
            pass
    warnings.append(f"{where}: skipped a line that is not valid JSON (truncated by a killed "
                    f"run?): {line[:60]!r}")
    return None


def read_log(path: Path, warnings: List[str]) -> List[dict]:
    """The records of one log.jsonl, in order, invalid lines skipped (reported in `warnings`)."""
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if line.strip():
            record = parse_line(line, f"{path}:{number}", warnings)
            if isinstance(record, dict):
                records.append(record)
    return records


def scalar(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def curves(records: List[dict]) -> Dict[str, Dict[int, float]]:
    """{'loss': {iter: value}, 'lr': ..., '<split>/<metric>': ...} after replaying the log's
    restarts and resumes (see the module docstring)."""
    train: Dict[int, dict] = {}
    evals: Dict[Tuple[int, str], dict] = {}
    for r in records:
        event, it = r.get("event"), r.get("iter")
        if event in ("start", "resume"):
            last = it if event == "resume" and scalar(it) else 0
            train = {i: v for i, v in train.items() if i <= last}
            evals = {k: v for k, v in evals.items() if k[0] <= last}
        elif event == "train" and scalar(it):
            train[it] = r
        elif event == "eval" and scalar(it):
            evals[(it, str(r.get("split", "val")))] = r
    out: Dict[str, Dict[int, float]] = {}
    for key in ("loss", "lr"):
        out[key] = {i: r[key] for i, r in sorted(train.items()) if scalar(r.get(key))}
    for (it, split), r in sorted(evals.items()):
        for key, value in r.items():
            if key not in NOT_METRICS and (scalar(value) or value is None):
                out.setdefault(f"{split}/{key}", {})[it] = math.nan if value is None else value
    return out


def run_name(path: Path) -> str:
    return (path.parent if path.name.endswith(".jsonl") else path).resolve().name


def log_path(run: Path) -> Path:
    path = run if run.is_file() else run / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run}: no log.jsonl (is this a run folder?)")
    return path


def import_matplotlib():
    """matplotlib's Figure, or SystemExit saying how to install it."""
    try:
        from matplotlib.figure import Figure    # no pyplot: no GUI backend, no global state
    except ImportError:
        raise SystemExit("python -m ivt.plot needs matplotlib, which is not installed: "
                         "pip install matplotlib") from None
    return Figure


def plot(runs: Dict[str, Dict[str, Dict[int, float]]], out: Path, log_loss: bool = False
         ) -> List[str]:
    """One figure: training loss, learning rate, then a panel per metric with a line per run
    (one colour each) and split (one line style each). Returns the panel titles in order."""
    Figure = import_matplotlib()
    keys = {k for c in runs.values() for k, points in c.items()
            if any(not math.isnan(v) for v in points.values())}
    splits = sorted({k.split("/", 1)[0] for k in keys if "/" in k},
                    key=lambda split: (split != "val", split))          # val drawn solid
    metrics = sorted({k.split("/", 1)[1] for k in keys if "/" in k})
    panels = ["loss", "lr"] + metrics
    styles = ["-", "--", ":", "-."]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5 * cols, 3.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels):
        for colour, (name, series) in enumerate(runs.items()):
            lines = ([(name, "-", series.get(panel, {}))] if panel in ("loss", "lr") else
                     [(name if len(splits) == 1 else f"{name} ({split})",
                       styles[k % len(styles)], series.get(f"{split}/{panel}", {}))
                      for k, split in enumerate(splits)])
            for label, style, points in lines:
                if any(not math.isnan(v) for v in points.values()):
                    its = sorted(points)
                    ax.plot(its, [points[i] for i in its], style, color=f"C{colour % 10}",
                            label=label, marker=None if panel in ("loss", "lr") else "o",
                            markersize=3)
        title = {"loss": "training loss", "lr": "learning rate"}.get(panel, panel)
        ax.set_title(title if panel in ("loss", "lr") or len(splits) != 1
                     else f"{panel} ({splits[0]})")
        ax.set_xlabel("iteration")
        ax.xaxis.get_major_locator().set_params(integer=True)
        if panel == "loss" and log_loss:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return panels


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ivt.plot",
        description="Plot training loss, learning rate and every scalar validation metric "
                    "against the iteration, from the log.jsonl of one or more runs (runs in "
                    "progress, resumed and killed runs included). Needs matplotlib "
                    "(pip install matplotlib).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders holding log.jsonl (or log files); each is named by its "
                        "folder in the legend")
    p.add_argument("--out", default="curves.png", metavar="FILE",
                   help="image to write; the suffix picks the format, e.g. .png, .pdf, .svg "
                        "(default: %(default)s)")
    p.add_argument("--log-loss", action="store_true", help="logarithmic loss axis")
    return p


def main(argv=None) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    formats = import_matplotlib()().canvas.get_supported_filetypes()   # before reading anything
    suffix = Path(args.out).suffix.lower().lstrip(".")
    if suffix not in formats:
        parser.error(f"--out {args.out}: the suffix picks the image format; expected one of "
                     f"{', '.join('.' + f for f in sorted(formats))}")
    warnings: List[str] = []
    runs: Dict[str, Dict[str, Dict[int, float]]] = {}
    for run in map(Path, args.runs):
        try:
            path = log_path(run)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
        name = run_name(path)
        while name in runs:         # two runs with the same folder name
            name += "'"
        runs[name] = curves(read_log(path, warnings))
        last = max(runs[name]["loss"], default=0)
        n_eval = len({i for k, c in runs[name].items() if k not in ("loss", "lr") for i in c})
        print(f"{name}: training logged up to iteration {last}, {n_eval} evaluation(s)")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not any(c for run in runs.values() for c in run.values()):
        raise SystemExit(f"error: no training or evaluation records in {', '.join(args.runs)}: "
                         f"nothing to plot (a run's log.jsonl holds them once it has trained "
                         f"--log-every iterations)")
    panels = plot(runs, Path(args.out), args.log_loss)
    print(f"wrote {args.out}: {', '.join(panels)}")


if __name__ == "__main__":
    main()

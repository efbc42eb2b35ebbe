"""python -m ivt.plot on hand-written logs in the trainer's format: evaluation records of two
tasks on one figure, a resumed run (stale records dropped, re-logged ones replacing), a run killed
mid-write (truncated line, with and without a record appended to it), and missing matplotlib."""
import builtins
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivt import plot

ROOT = Path(__file__).resolve().parents[1]


def line(event, **record):
    return json.dumps({"event": event, **record, "timestamp": 0.0})


def seg_log(path: Path) -> None:
    """Run killed during iteration 7 (checkpoint at 4), resumed from 4, still in progress at 6."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [line("start", iter=0, config={"backbone": "swin_nano"})]
    lines += [line("train", iter=i, loss=10.0 - i, lr=0.1 / i, time=0.1, elapsed=0.1 * i)
              for i in range(1, 7)]
    lines += [line("eval", iter=4, split="val", mIoU=30.0, mAcc=40.0, IoU={"car": 1.0}),
              line("eval", iter=6, split="val", mIoU=99.0, mAcc=99.0, IoU={"car": 1.0})]
    text = "\n".join(lines) + "\n" + '{"event": "train", "iter": 7, "lo'     # killed mid-write
    lines = [line("resume", iter=4, config={"backbone": "swin_nano"}),
             line("train", iter=5, loss=0.5, lr=0.01, time=0.1, elapsed=0.5),
             line("eval", iter=5, split="val", mIoU=35.0, mAcc=45.0, IoU={"car": None}),
             line("eval", iter=5, split="test", mIoU=33.0, mAcc=None, IoU={})]
    path.write_text(text + "\n".join(lines) + "\n")    # the resume record lands on that line


def test_resumed_and_killed_log(tmp_path):
    seg_log(tmp_path / "seg" / "log.jsonl")
    warnings = []
    records = plot.read_log(tmp_path / "seg" / "log.jsonl", warnings)
    assert len(warnings) == 1 and "log.jsonl:10" in warnings[0]
    c = plot.curves(records)
    assert c["loss"] == {1: 9.0, 2: 8.0, 3: 7.0, 4: 6.0, 5: 0.5}   # 6 was logged before resume
    assert c["lr"][5] == 0.01 and c["lr"][2] == 0.05
    assert c["val/mIoU"] == {4: 30.0, 5: 35.0} and c["val/mAcc"] == {4: 40.0, 5: 45.0}
    assert c["test/mIoU"] == {5: 33.0} and np.isnan(c["test/mAcc"][5])
    assert not any("IoU" == k.split("/")[-1] for k in c)            # per-class dicts left out


def test_start_record_begins_a_new_run(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join([line("start", iter=0, config={}),
                              line("train", iter=1, loss=5.0, lr=1.0),
                              line("start", iter=0, config={}),
                              line("train", iter=2, loss=3.0, lr=1.0)]) + "\n")
    assert plot.curves(plot.read_log(log, []))["loss"] == {2: 3.0}


def test_figure_of_two_runs_with_truncated_last_line(tmp_path, capsys):
    seg_log(tmp_path / "seg" / "log.jsonl")
    sod = tmp_path / "sod" / "log.jsonl"
    sod.parent.mkdir()
    sod.write_text("\n".join([line("start", iter=0, config={}),
                              line("train", iter=10, loss=1.0, lr=5e-5),
                              line("eval", iter=10, split="val", S=0.5, MAE=0.2, maxF=0.4),
                              line("train", iter=20, loss=0.8, lr=5e-5)])
                   + '\n{"event": "eval", "iter": 20, "split": "val", "S": 0.')
    out = tmp_path / "figs" / "curves.png"
    plot.main([str(tmp_path / "seg"), str(sod), "--out", str(out)])
    captured = capsys.readouterr()
    assert "sod.jsonl" not in captured.out and "sod: training logged up to iteration 20" in \
        captured.out and "seg: training logged up to iteration 5" in captured.out
    assert "log.jsonl:5: skipped a line" in captured.err
    panels = captured.out.split("wrote", 1)[1].split(":", 1)[1].strip().split(", ")
    assert panels == ["loss", "lr", "MAE", "S", "mAcc", "mIoU", "maxF"]   # a panel per metric
    with Image.open(out) as im:
        im.load()
        assert im.width > 1000 and im.height > 500


def test_a_folder_without_log_is_named(tmp_path):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path), "--out", str(tmp_path / "x.png")])
    assert str(tmp_path) in str(e.value) and "log.jsonl" in str(e.value)


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    seg_log(tmp_path / "seg" / "log.jsonl")
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "seg"), "--out", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in str(e.value)
    assert not (tmp_path / "x.png").exists()


def test_prediction_and_training_do_not_import_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; sys.path.insert(0, '.'); "
            "import predict, train_seg, ivt.visualize, ivt.plot; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_an_unknown_image_format_or_a_log_without_records_is_refused(tmp_path, capsys):
    seg_log(tmp_path / "seg" / "log.jsonl")
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "seg"), "--out", str(tmp_path / "x.jpgg")])
    assert e.value.code == 2 and "x.jpgg: the suffix picks the image format" in \
        capsys.readouterr().err and not (tmp_path / "x.jpgg").exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("not a log\n")
    with pytest.raises(SystemExit, match="no training or evaluation records in .*notes.txt"):
        plot.main([str(notes), "--out", str(tmp_path / "n.png")])
    assert not (tmp_path / "n.png").exists()


def drawn_figure(monkeypatch):
    """Patch `plot`'s matplotlib import so that the Figure it draws is kept for inspection."""
    from matplotlib.figure import Figure
    figures = []

    class Kept(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(plot, "import_matplotlib", lambda: Kept)
    return figures


def test_figure_panels_lines_styles_and_colours(tmp_path, monkeypatch):
    """What the docstrings promise, read off the drawn Figure: a panel per metric (one with a
    missing value included), every panel drawn and the spare axes hidden, one colour per run,
    one line style per split with val solid, points in iteration order, --log-loss on the loss
    axis only."""
    from matplotlib.colors import to_rgba
    figures = drawn_figure(monkeypatch)
    nan = float("nan")
    runs = {"a": {"loss": {2: 1.0, 1: 2.0}, "lr": {1: 0.1, 2: 0.05},
                  "val/mIoU": {4: 20.0, 2: 10.0}, "test/mIoU": {2: 8.0},
                  "val/S": {1: nan, 2: 0.5}},
            "b": {"loss": {1: 3.0}, "lr": {1: 0.1}, "val/mIoU": {2: 12.0}}}
    panels = plot.plot(runs, tmp_path / "c.png", log_loss=True)
    assert panels == ["loss", "lr", "S", "mIoU"]
    (fig,) = figures
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(fig.axes) == 6 and len(shown) == 4        # 3 columns, 2 rows
    assert [ax.get_title() for ax in shown] == ["training loss", "learning rate", "S", "mIoU"]
    assert [ax.get_yscale() for ax in shown] == ["log", "linear", "linear", "linear"]
    lines = {line.get_label(): line for line in shown[3].get_lines()}
    legend = shown[3].get_legend()                       # the lines are named in a legend
    assert legend is not None and {t.get_text() for t in legend.get_texts()} == set(lines)
    assert set(lines) == {"a (val)", "a (test)", "b (val)"}
    assert lines["a (val)"].get_linestyle() == lines["b (val)"].get_linestyle() == "-"
    assert lines["a (test)"].get_linestyle() == "--"
    colour = {k: to_rgba(line.get_color()) for k, line in lines.items()}
    assert colour["a (val)"] == colour["a (test)"] != colour["b (val)"]
    assert list(lines["a (val)"].get_xdata()) == [2, 4]
    assert list(lines["a (val)"].get_ydata()) == [10.0, 20.0]
    loss = {line.get_label(): line for line in shown[0].get_lines()}
    assert list(loss["a"].get_xdata()) == [1, 2] and list(loss["a"].get_ydata()) == [2.0, 1.0]


def test_trainer_eval_records_are_the_validation_split(tmp_path, monkeypatch, capsys):
    """The trainer logs its validation results as `eval` records without a split
    (`logger.log("eval", iter=it, **task.evaluate(...))`): they are the val split's, one panel
    each titled with it. Runs with the same folder name get a ' each, and the summary line counts
    the iterations evaluated."""
    from ivt.engine import JSONLLogger
    figures = drawn_figure(monkeypatch)
    for parent in ("x", "y", "z"):
        (tmp_path / parent / "run").mkdir(parents=True)
        logger = JSONLLogger(str(tmp_path / parent / "run" / "log.jsonl"), True)
        logger.log("start", iter=0, config={})
        logger.log("train", iter=2, loss=1.5, lr=0.1, time=0.1, elapsed=0.2)
        logger.log("eval", iter=2, mIoU=10.0, mAcc=20.0, aAcc=30.0)
        logger.log("eval", iter=4, mIoU=12.0, mAcc=22.0, aAcc=32.0)
        logger.close()
    assert "val/mIoU" in plot.curves(plot.read_log(tmp_path / "x" / "run" / "log.jsonl", []))
    plot.main([str(tmp_path / p / "run") for p in "xyz"] + ["--out", str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    for name in ("run", "run'", "run''"):
        assert f"\n{name}: training logged up to iteration 2, 2 evaluation(s)\n" in "\n" + out
    fig = figures[-1]                   # main's first Figure only lists the image formats
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["training loss", "learning rate", "aAcc (val)", "mAcc (val)", "mIoU (val)"]
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["run", "run'", "run''"]

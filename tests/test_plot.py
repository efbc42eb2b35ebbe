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

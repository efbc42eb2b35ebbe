"""train_det.py and evaluate.py --task det end to end: a tiny detector (swin_nano, hidden 16)
on synthetic M3FD data for a few iterations, exact resumption after a kill, evaluation on the
real M3FD sample pair with --json and --save-vis, and --help showing the recipe."""
import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train_det  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import write_m3fd  # noqa: E402
from script_runs import read_log, run_killed_after_first_checkpoint  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "m3fd_sample"


pytestmark = pytest.mark.usefixtures("script_env")


def tiny_args(data, out, iters=6, *extra):
    return ["--data", str(data), "--split-dir", str(data), "--out", str(out),
            "--backbone", "swin_nano", "--d2", "8", "--size", "64", "--hidden-dim", "16",
            "--num-queries", "8", "--dec-layers", "2", "--batch-size", "2",
            "--iters", str(iters), "--eval-every", "3", "--log-every", "1", "--workers", "0",
            "--device", "cpu", "--kernels", "torch", *extra]



@pytest.fixture(scope="module")
def m3fd(tmp_path_factory):
    root = tmp_path_factory.mktemp("m3fd")
    write_m3fd(root, 10, size=(48, 64))
    return root


def test_help_shows_the_recipe(capsys):
    with pytest.raises(SystemExit):
        train_det.main(["--help"])
    text = capsys.readouterr().out
    for piece in ("0.0001", "36", "640", "--clip-grad", "adamw", "--split-dir", "train+val",
                  "--no-denoising", "--bad-boxes", "CO-DETR"):
        assert piece in text, piece
    for action in train_det.get_parser()._actions:
        assert action.help, action.option_strings


def test_train_resume_and_evaluate(m3fd, tmp_path):
    full = train_det.main(tiny_args(m3fd, tmp_path / "full"))
    reference = {r["iter"]: r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl")
                 if r["event"] == "train"}
    assert sorted(reference) == list(range(1, 7))
    assert all(v > 0 for v in reference.values())

    out = tmp_path / "killed"
    run_killed_after_first_checkpoint("train_det.py", tiny_args(m3fd, out), out)
    assert load_checkpoint(str(out / "last.pt"))["iter"] in (3, 6)
    summary = train_det.main(tiny_args(m3fd, out, 6, "--resume"))
    records = read_log(out / "log.jsonl")
    last = max(i for i, r in enumerate(records) if r["event"] in ("start", "resume"))
    for r in records[last:]:
        if r["event"] == "train":
            assert r["loss"] == pytest.approx(reference[r["iter"]], rel=1e-5), r["iter"]
    assert summary["metrics"]["mAP"] == pytest.approx(full["metrics"]["mAP"], abs=1e-6)

    # The real M3FD sample pair (1024x768, its own boxes), with a one-line split list.
    data = tmp_path / "sample"
    shutil.copytree(SAMPLE, data)
    (data / "test.txt").write_text("00471\n")
    metrics, vis = tmp_path / "m.json", tmp_path / "vis"
    result = evaluate.main(["--task", "det", "--checkpoint", full["last"], "--data", str(data),
                            "--split-dir", str(data), "--split", "test", "--json", str(metrics),
                            "--save-vis", str(vis), "--device", "cpu", "--workers", "0"])
    saved = json.loads(metrics.read_text())
    assert saved["task"] == "det" and saved["num_images"] == 1
    for key in ("mAP", "mAP50", "mAP75", "mAP_s", "mAP_m", "mAP_l"):
        assert key in saved and saved[key] == pytest.approx(result[key], nan_ok=True)
    assert len(list(vis.glob("*.png"))) == 1

"""`python -m ivt.demo` plumbing in its --smoke setting (tiny images, a few iterations, seconds).

The demo's claim (IV-tuning beats visible-only full fine-tuning at night by 10+ mIoU points)
needs the full run (`make demo`, a few minutes); here only the pipeline, the outputs' structure
and the determinism are checked.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ivt import demo

METRICS = ("miou_all", "miou_day", "miou_night")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    returned = demo.main(["--out", str(out), "--smoke", "--seed", "3"])
    return out, returned


def test_summary_structure(smoke_run):
    out, returned = smoke_run
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["full_vis", "ivt", "ivt_ir_missing"]
    for name, r in summary.items():
        for key in METRICS:
            assert isinstance(r[key], float) and 0.0 <= r[key] <= 100.0, (name, key, r[key])
            assert r[key] == pytest.approx(returned[name][key])
        assert isinstance(r["trainable_params"], int) and r["trainable_params"] > 0
        assert 0.0 < r["trainable_fraction"] <= 1.0
    full, ivt, missing = summary["full_vis"], summary["ivt"], summary["ivt_ir_missing"]
    assert full["tuning"] == "full" and full["trainable_fraction"] == 1.0
    assert full["trainable_params"] == full["visible_params"]
    assert ivt["tuning"] == missing["tuning"] == "ivt"
    assert missing["variant"] == "ir_missing" and ivt["variant"] == "ivt"
    assert full["variant"] is None                        # full fine-tuning has no variant
    # IV-tuning trains a small share of the backbone; the IR-missing variant the same modules.
    assert ivt["trainable_fraction"] < 0.1
    assert ivt["trainable_params"] == missing["trainable_params"] < full["trainable_params"]


def test_figure_and_info(smoke_run):
    out, _ = smoke_run
    info = json.loads((out / "demo_info.json").read_text())
    s = demo.PRESETS["smoke"]
    with Image.open(out / "night_predictions.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        # 6 columns (visible, thermal, ground truth, 3 runs) at 2x, one row per night scene.
        assert im.width == 6 * s.size[1] * 2
        assert im.height == len(info["figure_scenes"]) * s.size[0] * 2 + 16
    assert 1 <= len(info["figure_scenes"]) <= s.figure_scenes
    assert all(name.endswith("N") for name in info["figure_scenes"])
    summary = json.loads((out / "summary.json").read_text())
    assert info["night_margin_ivt_minus_full_vis"] == pytest.approx(
        summary["ivt"]["miou_night"] - summary["full_vis"]["miou_night"])
    assert (out / f"{demo.BACKBONE}_visible_pretrained.pth").is_file()
    assert set(info["timings_s"]) == {"data", "pretrain", *demo.RUNS, "figure", "total"}


def test_deterministic_given_seed(smoke_run, tmp_path):
    out, first = smoke_run
    again = demo.main(["--out", str(tmp_path / "again"), "--smoke", "--seed", "3"])
    for name in demo.RUNS:
        for key in METRICS + ("trainable_params",):
            assert again[name][key] == first[name][key], (name, key)


def test_run_again_into_its_folder_continues_its_runs(smoke_run, capsys):
    """`make demo` after a Ctrl-C, or `make demo-sod` after `make demo` (one --out, one
    pre-training): the runs found are continued (--resume; a finished one trains no more) and
    score the same (they stopped at 'already holds a run'). Another preset or seed into that
    folder is refused by name, and so is --methods with another --task."""
    out, first = smoke_run
    (out / "ivt" / "last.pt").unlink()                    # as if stopped before its first save
    again = demo.main(["--out", str(out), "--smoke", "--seed", "3"])
    for name in demo.RUNS:
        for key in METRICS:
            assert again[name][key] == first[name][key], (name, key)
    assert "resuming" in capsys.readouterr().out
    for argv, message in [(["--smoke", "--seed", "4"], "holds a demo made with {'preset': "
                           "'smoke', 'seed': 3}, not {'preset': 'smoke', 'seed': 4}"),
                          (["--fast", "--seed", "3"], "'preset': 'fast'"),
                          (["--methods", "--task", "det"], "--task det does not apply")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            demo.main(["--out", str(out), *argv])


def test_every_flag_has_help():
    for action in demo.get_parser()._actions:
        assert action.help, action.option_strings


@pytest.mark.parametrize("task, keys", [("sod", ("S", "maxF", "maxE", "MAE")),
                                        ("det", ("mAP", "mAP50", "mAP75"))])
def test_task_demo_smoke(tmp_path, task, keys):
    returned = demo.main(["--task", task, "--out", str(tmp_path), "--smoke"])
    saved = json.loads((tmp_path / f"{task}_summary.json").read_text())
    assert list(saved["runs"]) == list(returned) == ["full_vis", "ivt", "ivt_ir_missing"]
    for name, r in saved["runs"].items():
        for part in ("day", "night"):
            for key in keys:
                value = r[part][key]
                assert value is None or value == pytest.approx(returned[name][part][key]), \
                    (name, part, key)
    assert saved["runs"]["ivt"]["trainable_fraction"] < 0.1
    with Image.open(tmp_path / f"{task}_night_predictions.png") as im:
        assert im.mode == "RGB" and im.width > im.height


class _Built(Exception):
    """Raised by a stand-in dataset class with the keyword arguments it was built with."""


@pytest.mark.parametrize("task, dataset", [("seg", "MFNetDataset"), ("sod", "VTDataset"),
                                           ("det", "M3FDDataset")])
def test_night_figures_read_images_with_the_checkpoints_normalisation(task, dataset, tmp_path,
                                                                      monkeypatch):
    """A demo's night figure feeds its models images normalised as they trained (the
    configuration's `normalization`, CLIP's for EVA02), not the datasets' ImageNet default."""
    import importlib

    from ivt.data.transforms import CLIP
    module = importlib.import_module(f"ivt.demo.{task}")
    config = {"size": 32, "normalization": CLIP.as_dict()}
    monkeypatch.setattr(module, "load_trained",
                        lambda path, pretrained=None: (task, None, {"config": config}))

    def built(*args, **kwargs):
        raise _Built(kwargs, args)

    monkeypatch.setattr(module, dataset, built)
    data = {"downstream": tmp_path / "d", "night": tmp_path / "n", "m3fd": tmp_path / "m"}
    with pytest.raises(_Built) as e:
        module.night_figure(data, {"run": tmp_path / "last.pt"}, tmp_path / "w.pt",
                            tmp_path / "fig.png", 1)
    kwargs, args = e.value.args
    assert kwargs["norm"] == CLIP
    # the night test scenes (docs/demos.md: "a figure of night scenes")
    assert {"seg": args == (tmp_path / "d", "test_night"), "sod": args == (tmp_path / "n",),
            "det": kwargs.get("split") == "test_night"}[task], (args, kwargs)


# -- the demo's pieces, against docs/demos.md -----------------------------------------------------
# docs/demos.md (and README's "validation every 50 iterations"): each run's training settings.
DOCUMENTED = {"seg": dict(iters=300, lr=0.05, batch_size=8, size=96, eval_every=50),
              "sod": dict(iters=200, lr=1e-3, batch_size=8, size=96),
              "det": dict(iters=300, lr=1e-3, batch_size=8, size=128, hidden_dim=32,
                          encoder="hybrid", num_queries=20, dec_layers=3, ffn_dim=256,
                          dn_number=10, backbone_lr_mult=1.0)}
RUN_FLAGS = {"full_vis": dict(tuning="full"),
             "ivt": dict(tuning="ivt", variant="ivt", d2=8),
             "ivt_ir_missing": dict(tuning="ivt", variant="ir_missing", d2=8)}


@pytest.mark.parametrize("task", ["seg", "sod", "det"])
def test_runs_train_with_the_documented_settings(task):
    """Each run's command line, read back by its training script's parser: the documented
    tuning, variant and d2 = 8, iterations, learning rate and sizes, starting from the visible
    pre-trained model."""
    from ivt.demo.stages import repo_script
    module = demo.TASKS[task]
    parser = repo_script(module.TASK.script).get_parser()
    for name, flags in RUN_FLAGS.items():
        args = module.train_args(module.TASK.presets["default"], demo.PRESETS["default"],
                                 Path("data"), Path("out"), 0, name, Path("pre.pth"))
        parsed = vars(parser.parse_args([str(a) for a in args]))
        want = {**DOCUMENTED[task], **flags, "pretrained": "pre.pth"}
        assert {k: parsed[k] for k in want} == want, (task, name)


def test_demo_counts_are_the_documented_ones():
    """backbone_counts gives docs/demos.md's table: ivt (d2 = 8) trains 90,308 parameters, 4.0%
    of the visible model's 2,278,366 (full_vis trains them all)."""
    from ivt.demo.stages import backbone_counts
    s = demo.PRESETS["default"]
    for tuning, variant, trainable in (("full", "ivt", 2_278_366), ("ivt", "ivt", 90_308),
                                       ("ivt", "ir_missing", 90_308)):
        c = backbone_counts(s, tuning, variant)
        assert (c["trainable_params"], c["visible_params"]) == (trainable, 2_278_366)
        assert c["trainable_fraction"] == pytest.approx(trainable / 2_278_366, rel=1e-12)


def test_pretraining_scenes_are_day_only_and_not_downstream_ones(tmp_path):
    """The pre-training data is day-only visible scenes, none of them a downstream scene; the
    downstream set is half night."""
    from ivt.demo.stages import write_seg_data
    data = write_seg_data(tmp_path, demo.PRESETS["smoke"], 0)
    pre = sorted((data["pretrain"] / "images").glob("*.png"))
    down = sorted((data["downstream"] / "images").glob("*.png"))
    assert pre and all(p.stem.endswith("D") for p in pre)
    assert sum(p.stem.endswith("N") for p in down) == len(down) // 2
    seen = {np.asarray(Image.open(p))[..., :3].tobytes() for p in down}
    assert not any(np.asarray(Image.open(p))[..., :3].tobytes() in seen for p in pre)


def test_sod_demo_data_keeps_its_test_scenes_apart(monkeypatch):
    """sod.make_data: half-night training scenes, a day-only and a night-only test set, and no
    scene index (the scene's seed) shared between any two of them."""
    from ivt.demo import sod
    calls = []
    monkeypatch.setattr(sod, "write_vt_set", lambda folder, n, size, seed, night_fraction,
                        first_index=1: calls.append((folder.name, n, night_fraction,
                                                     first_index)))
    monkeypatch.setattr(sod, "write_pretrain_data", lambda out, s, seed: out / "pre")
    t = sod.SOD_PRESETS["default"]
    sod.make_data(Path("out"), demo.PRESETS["default"], t, 0)
    assert [(c[0], c[1], c[2]) for c in calls] == [
        ("vt_train", t.n_train, 0.5), ("vt_test_day", t.n_test, 0.0),
        ("vt_test_night", t.n_test, 1.0)]
    indices = [set(range(first, first + n)) for _, n, _, first in calls]
    assert sum(map(len, indices)) == len(set.union(*indices))


class _Evaluate:
    """A stand-in for evaluate.py: each set's metrics name the set they came from."""

    @staticmethod
    def main(argv):
        if "--split" in argv:                                # detection: one split per call
            part = argv[argv.index("--split") + 1]
            return {k: part for k in ("mAP", "mAP50", "mAP75")}
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--data"]
        return {"sets": {s: {"S": s} for s in sets}}


@pytest.mark.parametrize("task", ["sod", "det"])
def test_scores_keep_day_and_night_apart(task, monkeypatch, tmp_path):
    """sod/det `score`: the "day" metrics are the day test set's and the "night" ones the
    night test set's (evaluate.py replaced by a stand-in that labels its results)."""
    module = demo.TASKS[task]
    monkeypatch.setattr(module, "repo_script", lambda name: _Evaluate)
    data = {"day": tmp_path / "day", "night": tmp_path / "night", "m3fd": tmp_path}
    m = module.score(data, tmp_path / "last.pt", tmp_path / "w.pth", tmp_path)
    if task == "sod":
        assert m == {"day": {"S": data["day"].as_posix()}, "night": {"S": data["night"].as_posix()}}
    else:
        assert m == {p: dict.fromkeys(("mAP", "mAP50", "mAP75"), f"test_{p}")
                     for p in ("day", "night")}


def test_det_figure_draws_each_models_top_detections(monkeypatch, tmp_path):
    """The detection figure draws, per model, its TOP_K highest-scoring detections with their
    scores (a stand-in model and dataset; draw_boxes recorded)."""
    import torch

    from ivt.data.transforms import CLIP
    from ivt.demo import det

    class Model:
        def predict(self, vis, ir, sizes):
            return [{"scores": torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2]),
                     "boxes": torch.arange(24.0).view(6, 4), "labels": torch.zeros(6, dtype=int)}]

    class Dataset:
        classes = ["car"]

        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return i

        def collate_fn(self, items):
            return {"vis": None, "ir": None, "targets": [{"orig_size": (8, 8)}]}

        def read_images(self, i):
            return np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)

        def gt(self, i):
            return [[0, 0, 4, 4]], [0], None

    drawn = []
    monkeypatch.setattr(det, "load_trained", lambda path, pretrained=None: (
        "det", Model(), {"config": {"size": 8, "normalization": CLIP.as_dict()}}))
    monkeypatch.setattr(det, "M3FDDataset", Dataset)
    monkeypatch.setattr(det, "draw_boxes", lambda image, boxes, names, scores=None:
                        drawn.append(None if scores is None else list(scores))
                        or np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(det, "titled_grid", lambda *args, **kwargs: None)
    det.night_figure({"m3fd": tmp_path}, {"a": tmp_path, "b": tmp_path}, tmp_path,
                     tmp_path / "fig.png", 1)
    top = pytest.approx([0.9, 0.7, 0.5, 0.3][:det.TOP_K])
    assert drawn[0] is None and drawn[1:] == [top, top]


def test_run_table_and_quiet_log(capsys):
    """format_runs prints each run's trainable parameters with their share of the visible model
    as docs/demos.md's table does ("90,308 (4.0%)"); a quiet StageLog prints nothing."""
    from ivt.demo.stages import StageLog, format_runs
    runs = {"ivt": {"tuning": "ivt", "ir_input": "thermal", "trainable_params": 90_308,
                    "trainable_fraction": 90_308 / 2_278_366, "S": 0.5}}
    header, row = format_runs(runs, [("S", 6, lambda r: r["S"], ".3f")]).splitlines()
    assert header.split()[-1] == "S"
    assert row.split() == ["ivt", "ivt", "thermal", "90,308", "(4.0%)", "0.500"]
    StageLog("demo", quiet=True)("hidden")
    StageLog("demo")("shown")
    out = capsys.readouterr().out
    assert "hidden" not in out and re.fullmatch(r"\[demo +\d+s\] shown\n", out)


@pytest.mark.parametrize("task, key, metric", [
    ("sod", "night_S_margin_ivt_minus_full_vis", "S"),
    ("det", "night_AP50_margin_ivt_minus_full_vis", "mAP50")])
def test_task_summary_margin_is_the_night_metric(task, key, metric, monkeypatch, tmp_path):
    """<task>_summary.json's margin is ivt's night metric minus full_vis's (docs/demos.md: night
    S-measure for SOD, night AP50 for detection), from the runs' results (run_task stubbed)."""
    from ivt.demo.stages import DemoResult
    module = demo.TASKS[task]
    # run k's value of m: k x (10 for the margin's metric, else 3) x (2 at night, else 1)
    runs = {name: {"tuning": "ivt", "ir_input": "thermal", "trainable_params": 1,
                   "trainable_fraction": 0.5, "train_seconds": 1.0,
                   **{part: {m: k * (10.0 if m == metric else 3.0) * (2 if part == "night" else 1)
                             for m in ("S", "maxF", "MAE", "mAP", "mAP50")}
                      for part in ("day", "night")}}
            for k, name in enumerate(demo.RUNS)}
    monkeypatch.setattr(module, "run_task", lambda *args: DemoResult(
        runs, {"total": 1.0}, tmp_path / "w.pth", tmp_path / "fig.png", None))
    module.run(tmp_path, 0, "smoke")
    saved = json.loads((tmp_path / f"{task}_summary.json").read_text())
    assert saved[key] == pytest.approx(20.0)            # 1 x 10 x 2 - 0


def test_fast_preset_halves_the_data_and_iterations():
    """--fast: "half the data and iterations" (the flag's help, docs/demos.md) of every task."""
    from ivt.demo.det import DET_PRESETS
    from ivt.demo.sod import SOD_PRESETS
    for presets, fields in ((demo.PRESETS, ("n_pretrain", "n_train", "n_test", "pretrain_iters",
                                            "full_iters", "ivt_iters")),
                            (SOD_PRESETS, ("n_train", "n_test", "iters")),
                            (DET_PRESETS, ("n_images", "iters"))):
        for field in fields:
            default, fast = getattr(presets["default"], field), getattr(presets["fast"], field)
            assert 2 * fast == default, field


def test_threads_flag_sets_torch_threads(monkeypatch, tmp_path):
    """--threads N runs the demo with N torch threads (the task's run stubbed)."""
    import torch
    seen = []

    class Task:
        @staticmethod
        def run(out, seed, preset):
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    monkeypatch.setitem(demo.TASKS, "seg", Task)
    try:
        demo.main(["--out", str(tmp_path), "--smoke", "--threads", "2"])
    finally:
        torch.set_num_threads(before)
    assert seen == [2]


def test_titled_grid_names_each_column(monkeypatch, tmp_path):
    """titled_grid: the rows enlarged `scale` times under a 16-pixel header, each title at the
    left of its column."""
    from PIL import ImageDraw

    from ivt.demo.stages import titled_grid
    texts = []
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, **k: texts.append((xy[0], text)))
    rows = [np.zeros((5, 3 * 7, 3), np.uint8), np.full((5, 3 * 7, 3), 9, np.uint8)]
    titled_grid(rows, ["a", "b", "c"], tmp_path / "g.png", scale=2)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (3 * 7 * 2, 2 * 5 * 2 + 16)
        assert np.asarray(im)[16 + 10, 0].tolist() == [9, 9, 9]
    assert [(x - 3, t) for x, t in texts] == [(0, "a"), (14, "b"), (28, "c")]


def test_methods_demo_fine_tunes_the_pretrained_model_in_every_mode(monkeypatch, tmp_path):
    """`--methods`: one train_seg.py run per mode of Table 4, each from the visible pre-trained
    model, 300 iterations at lr 0.05 (docs/demos.md), IV-tuning with d2 = 8 (data, training and
    scoring stubbed; the command lines read back by train_seg.py's parser)."""
    from ivt.demo import methods
    from ivt.demo.stages import repo_script
    runs = []
    monkeypatch.setattr(methods, "write_seg_data", lambda out, s, seed: {
        "pretrain": tmp_path / "pre", "downstream": tmp_path / "down"})
    monkeypatch.setattr(methods, "pretrain_stage", lambda *args: tmp_path / "w.pth")
    monkeypatch.setattr(methods, "train_run", lambda script, args, folder: runs.append(
        (script, folder.name, args)))
    monkeypatch.setattr(methods, "score_seg", lambda *args: dict.fromkeys(METRICS, 1.0))
    monkeypatch.setattr(methods, "backbone_counts", lambda s, tuning: {
        "trainable_params": 1, "trainable_fraction": 0.5})
    methods.run(tmp_path, 0, quiet=True, settings=demo.PRESETS["default"])
    parser = repo_script("train_seg").get_parser()
    assert [name for _, name, _ in runs] == list(methods.RUNS)
    for script, name, args in runs:
        a = parser.parse_args([str(x) for x in args])
        assert script == "train_seg" and a.pretrained == str(tmp_path / "w.pth"), name
        assert (a.tuning, a.iters, a.lr) == ("full" if name == "full_vis" else name, 300, 0.05)
        assert name != "ivt" or a.d2 == 8


def test_seg_margin_is_the_night_miou(monkeypatch, tmp_path):
    """demo_info.json's night margin is ivt's night mIoU minus full_vis's (run_task stubbed with
    runs whose day, night and overall mIoU differ)."""
    from ivt.demo import seg
    from ivt.demo.stages import DemoResult
    runs = {name: {"tuning": "ivt", "ir_input": "thermal", "trainable_params": 1,
                   "trainable_fraction": 0.5, "train_seconds": 1.0,
                   "miou_all": 3.0 * k, "miou_day": 5.0 * k, "miou_night": 7.0 * k}
            for k, name in enumerate(demo.RUNS)}
    monkeypatch.setattr(seg, "run_task", lambda *args: DemoResult(
        runs, {"total": 1.0}, tmp_path / "w.pth", tmp_path / "fig.png", []))
    seg.run(tmp_path, 0, "smoke")
    info = json.loads((tmp_path / "demo_info.json").read_text())
    assert info["night_margin_ivt_minus_full_vis"] == pytest.approx(7.0)

"""`python -m ivt.demo` plumbing in its --smoke setting (tiny images, a few iterations, seconds).

The demo's claim (IV-tuning beats visible-only full fine-tuning at night by 10+ mIoU points)
needs the full run (`make demo`, a few minutes); here only the pipeline, the outputs' structure
and the determinism are checked.
"""
import json
import re

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
    assert missing["variant"] == "ir_missing"
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
        raise _Built(kwargs)

    monkeypatch.setattr(module, dataset, built)
    data = {"downstream": tmp_path, "night": tmp_path, "m3fd": tmp_path}
    with pytest.raises(_Built) as e:
        module.night_figure(data, {"run": tmp_path / "last.pt"}, tmp_path / "w.pt",
                            tmp_path / "fig.png", 1)
    assert e.value.args[0]["norm"] == CLIP

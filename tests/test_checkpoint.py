"""Checkpoints: atomic writes, delta state (trained tensors + persistent buffers), the pretrained
file's SHA-256, RNG capture, and loading for evaluation."""
import hashlib
import os
import pickle
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the scripts live at the root
import evaluate  # noqa: E402
import train_seg  # noqa: E402
from ivt.checkpoint import (atomic_link, atomic_save, check_pretrained, load_checkpoint,
                            load_model_state, model_state, rng_state, saved_score, set_rng_state,
                            sha256_file)
from ivt.data.synthetic import write_mfnet
from ivt.models import CheckpointError, build_backbone
from ivt.models.segmentor import build_segmentor


pytestmark = pytest.mark.usefixtures("script_env")


def write_pretrained(path, seed):
    """A swin_nano visible-model checkpoint (what a user downloads), random weights."""
    torch.manual_seed(seed)
    bb = build_backbone("swin_nano", tuning="freeze")
    keys = set(bb.visible_state_keys())
    torch.save({k: v for k, v in bb.state_dict().items() if k in keys}, path)
    return path


def test_atomic_save_replaces_whole_file_or_nothing(tmp_path):
    path = tmp_path / "ck.pt"
    atomic_save({"a": torch.ones(3)}, str(path))
    with pytest.raises(Exception):
        atomic_save({"a": lambda: 0}, str(path))              # cannot be pickled: write fails
    assert torch.equal(torch.load(path)["a"], torch.ones(3))  # the old file is intact
    assert os.listdir(tmp_path) == ["ck.pt"]                   # no temporary file left behind


def test_atomic_link_keeps_the_linked_state_after_the_source_is_saved_again(tmp_path):
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"it": 1}, str(last))
    atomic_link(str(last), str(best))
    assert os.stat(best).st_ino == os.stat(last).st_ino           # one copy on disk
    atomic_save({"it": 2}, str(last))                              # a later save of last.pt ...
    assert torch.load(best)["it"] == 1 and torch.load(last)["it"] == 2   # ... leaves best.pt
    atomic_link(str(last), str(best))                              # replaces an existing best.pt
    assert torch.load(best)["it"] == 2
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]  # no temporary file left


def test_saved_score_reads_best_without_the_tensors_and_none_for_a_bad_file(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save({"best": 0.25, "model": {"w": torch.ones(4)}}, str(path))
    assert saved_score(str(path)) == 0.25
    legacy = tmp_path / "legacy.pt"                                  # mmap refuses this format
    torch.save({"best": 0.5, "model": {}}, legacy, _use_new_zipfile_serialization=False)
    assert saved_score(str(legacy)) == 0.5
    assert saved_score(str(tmp_path / "no.pt")) is None
    path.write_bytes(path.read_bytes()[:40])                        # truncated
    with pytest.warns(UserWarning, match="unreadable"):
        assert saved_score(str(path)) is None


def test_atomic_link_copies_where_hard_links_fail(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    atomic_save({"it": 1}, str(last))
    atomic_link(str(last), str(best))
    assert os.stat(best).st_ino != os.stat(last).st_ino
    assert best.read_bytes() == last.read_bytes()
    assert os.stat(best).st_mode & 0o777 == os.stat(last).st_mode & 0o777
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "last.pt"]


def test_model_state_delta_holds_trained_tensors_and_buffers():
    model = build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=16)
    delta = model_state(model, include_frozen=False)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert trained <= set(delta) and not frozen & set(delta)
    assert "head.fusion_conv.bn.running_mean" in delta               # head BatchNorm
    assert any(k.endswith("ho.bn.running_var") for k in delta)        # adapters' BatchNorms
    assert set(model_state(model, include_frozen=True)) == set(model.state_dict())


def test_load_model_state_names_bad_keys():
    model = build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=16)
    delta = model_state(model, include_frozen=False)
    other = build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=16)
    load_model_state(other, delta, delta=True, source="x.pt")
    for k in delta:
        assert torch.equal(other.state_dict()[k], delta[k])
    with pytest.raises(CheckpointError, match=r"missing keys \(125\): backbone\.layers"):
        load_model_state(other, delta, delta=False, source="x.pt")  # a full one needs all
    bad = dict(delta, **{"head.extra.weight": torch.zeros(1)})
    bad.pop("head.conv_seg.bias")
    with pytest.raises(CheckpointError, match=r"x\.pt(.|\n)*head\.conv_seg\.bias(.|\n)*"
                                              r"head\.extra\.weight"):
        load_model_state(other, bad, delta=True, source="x.pt")
    wrong = dict(delta, **{"head.conv_seg.bias": torch.zeros(3)})
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_model_state(other, wrong, delta=True, source="x.pt")


def test_rng_state_round_trip(tmp_path):
    state = rng_state()
    draws = (random.random(), np.random.rand(), torch.rand(3))
    atomic_save({"rng": state}, str(tmp_path / "r.pt"))
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    assert random.random() == draws[0] and np.random.rand() == draws[1]
    assert torch.equal(torch.rand(3), draws[2])


def test_rng_state_of_more_gpus_than_are_visible(monkeypatch):
    """A run saved on a machine with more GPUs (one generator state each) resumes where fewer
    are visible: the visible ones get theirs (all of them at once was an IndexError). On
    stand-ins for CUDA's calls (no GPU here)."""
    state, restored = rng_state(), []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda states: (_ for _ in ()).throw(IndexError("list index")))
    gpus = [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]
    set_rng_state({**state, "cuda": gpus})
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], gpus[0])


def test_sha256_and_pretrained_check(tmp_path):
    a = write_pretrained(tmp_path / "a.pt", 0)
    b = write_pretrained(tmp_path / "b.pt", 1)
    ha, hb = sha256_file(str(a)), sha256_file(str(b))
    assert ha == hashlib.sha256(a.read_bytes()).hexdigest() and ha != hb
    ckpt = {"pretrained_sha256": ha}
    check_pretrained(ckpt, str(a), "c.pt")
    with pytest.raises(CheckpointError) as e:
        check_pretrained(ckpt, str(b), "c.pt")
    assert ha in str(e.value) and hb in str(e.value) and str(b) in str(e.value)
    with pytest.raises(CheckpointError, match="--pretrained"):
        check_pretrained(ckpt, None, "c.pt")
    check_pretrained({"pretrained_sha256": None}, None, "c.pt")      # a full checkpoint


class NotATensor:
    pass


def test_unreadable_files_are_named_with_the_reason_in_one_line(tmp_path):
    junk, objects = tmp_path / "junk.pt", tmp_path / "objects.pt"
    junk.write_bytes(b"junk junk")
    torch.save({"config": NotATensor()}, objects)
    with pytest.raises(CheckpointError, match=r"checkpoint .*junk\.pt: not a PyTorch checkpoint"):
        load_checkpoint(str(junk))
    # torch 2.6+ lists the objects, which then load as placeholders (the next test)
    said = ("does not hold a state dict of tensors$" if hasattr(
        torch.serialization, "get_unsafe_globals_in_checkpoint") else ": it holds Python objects")
    with pytest.raises(CheckpointError, match=f"{re.escape(str(objects))} ?{said}"):
        build_backbone("swin_nano", pretrained=str(objects))
    # a text file (a split list given by mistake): not a checkpoint, with torch's actual reason
    # (it was called "Python objects", its reason torch's request to file an issue)
    text = tmp_path / "train.txt"
    text.write_text("00001D\n00002N\n")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(str(text))
    message = str(e.value)
    assert message.startswith(f"cannot read checkpoint {text}: not a PyTorch checkpoint (")
    assert "file an issue" not in message and "\n" not in message, message


class Recorded:
    """Pickled by reference to a module that the loading process does not have (as mmengine's
    HistoryBuffer in a released checkpoint's `message_hub`)."""

    def __init__(self, values):
        self.values = values


class Runs:
    """An object whose unpickling would run a command (pickle's REDUCE of os.system)."""

    def __init__(self, flag):
        self.flag = flag

    def __reduce__(self):
        return os.system, (f"touch {self.flag}",)


@pytest.mark.skipif(not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"),
                    reason="torch < 2.6 lists no checkpoint's globals: such files are refused")
def test_a_released_checkpoints_python_objects_are_not_read(tmp_path, monkeypatch):
    """An mmengine release keeps `meta` (numpy values) and `message_hub` beside `state_dict`:
    its tensors load exactly, the objects as inert placeholders (no class imported, no call
    made: a pickled os.system does not run)."""
    fake = types.ModuleType("mmengine_stand_in")
    Recorded.__module__ = fake.__name__
    fake.Recorded = Recorded
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    torch.manual_seed(0)
    sd = build_backbone("swin_nano", tuning="freeze").state_dict()
    torch.save({"meta": {"seed": np.int64(3), "scale": np.float32(0.5), "hist": np.zeros(3),
                         "dtype": np.dtype("float32")},
                "message_hub": {"log": Recorded(np.arange(4))}, "state_dict": sd},
               tmp_path / "release.pth")
    monkeypatch.delitem(sys.modules, fake.__name__)
    with pytest.raises(pickle.UnpicklingError, match="Unsupported global"):  # torch's own load
        torch.load(tmp_path / "release.pth", weights_only=True)
    model = build_backbone("swin_nano", tuning="ivt", pretrained=str(tmp_path / "release.pth"))
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    # what torch never loads (os, sys, subprocess ...) stays refused, the global named
    flag = tmp_path / "ran"
    torch.save({"meta": {"hook": Runs(flag)}, "state_dict": sd}, tmp_path / "hostile.pth")
    with pytest.raises(CheckpointError) as e:
        build_backbone("swin_nano", pretrained=str(tmp_path / "hostile.pth"))
    message = str(e.value)
    assert message.startswith(f"cannot read pretrained checkpoint {tmp_path / 'hostile.pth'}: "
                              f"it holds Python objects") and "system" in message, message
    assert "\n" not in message and not flag.exists()


@pytest.fixture(scope="module")
def delta_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("delta")
    data = tmp / "mfnet"
    write_mfnet(data, n_train=4, n_val=2, n_test=2, size=(32, 48))
    pretrained = write_pretrained(tmp / "swin_nano_pretrained.pt", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = train_seg.main([
            "--data", str(data), "--out", str(tmp / "run"), "--backbone", "swin_nano",
            "--d2", "8", "--head-dim", "16", "--crop", "32", "--iters", "2", "--eval-every", "2",
            "--workers", "0", "--device", "cpu", "--pretrained", str(pretrained)])
    finally:
        torch.set_num_threads(threads)
    return tmp, data, pretrained, summary


def test_delta_checkpoint_is_small_and_names_pretrained_hash(delta_run, tmp_path):
    tmp, data, pretrained, summary = delta_run
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["delta"] and ckpt["pretrained_sha256"] == sha256_file(str(pretrained))
    assert ckpt["iter"] == 2 and ckpt["config"]["pretrained"] == str(pretrained)
    full = tmp_path / "full.pt"
    model = build_segmentor("swin_nano", 9, tuning="ivt", d2=8, head_dim=16)
    torch.save(model.state_dict(), full)
    assert os.path.getsize(summary["last"]) < 0.2 * os.path.getsize(full)
    assert os.path.getsize(summary["last"]) < os.path.getsize(pretrained)


def test_evaluate_loads_pretrained_and_rejects_another(delta_run, tmp_path, capsys):
    tmp, data, pretrained, summary = delta_run
    args = ["--data", str(data), "--checkpoint", summary["last"], "--split", "val",
            "--device", "cpu", "--workers", "0"]
    result = evaluate.main(args)                                       # path from the config
    assert result["miou_all"] == pytest.approx(summary["metrics"]["mIoU"], abs=1e-9)
    moved = tmp_path / "moved.pt"
    moved.write_bytes(pretrained.read_bytes())
    again = evaluate.main(args + ["--pretrained", str(moved)])         # override the path
    assert again["miou_all"] == result["miou_all"]

    other = write_pretrained(tmp_path / "other.pt", 1)
    with pytest.raises(SystemExit) as e:
        evaluate.main(args + ["--pretrained", str(other)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]          # after the progress bars
    assert err.startswith("error: ") and str(other) in err
    assert sha256_file(str(other)) in err and sha256_file(str(pretrained)) in err


def test_resume_with_another_pretrained_fails(delta_run, tmp_path, capsys):
    tmp, data, pretrained, summary = delta_run
    other = write_pretrained(tmp_path / "other.pt", 1)
    with pytest.raises(SystemExit) as e:
        train_seg.main(["--data", str(data), "--out", str(tmp / "run"), "--backbone",
                        "swin_nano", "--d2", "8", "--head-dim", "16", "--crop", "32", "--iters",
                        "4", "--eval-every", "2", "--workers", "0", "--device", "cpu",
                        "--pretrained", str(other), "--resume"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert sha256_file(str(other)) in err and sha256_file(str(pretrained)) in err


def test_saved_score_of_a_missing_file_is_none_without_a_warning(tmp_path):
    """A folder without best.pt (a new --out) is no unreadable file: None, and no warning."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert saved_score(str(tmp_path / "best.pt")) is None


def test_load_checkpoint_refuses_a_file_that_is_no_training_checkpoint(tmp_path):
    """`load_checkpoint` reads only what `make_checkpoint` wrote: a visible-model file (a dict
    of tensors, e.g. given to --resume by mistake) is a CheckpointError naming the expected
    format, not a KeyError later; a folder or a missing file is named as such."""
    path = write_pretrained(tmp_path / "pre.pt", 1)
    with pytest.raises(CheckpointError, match=r"pre\.pt is not an ivt training checkpoint "
                                              r"\(expected format 'ivt-checkpoint-1'\)"):
        load_checkpoint(str(path))
    with pytest.raises(FileNotFoundError, match="is a folder"):
        load_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "no.pt"))

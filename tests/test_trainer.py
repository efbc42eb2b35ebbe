"""The shared trainer's guarantees, through train_seg.py on tiny synthetic MFNet data:
refused resumes that would silently change the run, errors raised before the model is built,
a corrupt image met mid-training (also inside a DataLoader worker) named with last.pt intact,
and the lr schedules."""
import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_seg  # noqa: E402
from ivt import engine, trainer  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import write_mfnet  # noqa: E402
from ivt.fast.swin import FastSwinBlock  # noqa: E402
from ivt.models.swin import SwinBlock  # noqa: E402
from ivt.tasks import load_trained  # noqa: E402
from ivt.tasks.seg import SegTask  # noqa: E402
from script_runs import fake_validation_scores, run_torchrun, tiny_seg_args  # noqa: E402
from test_checkpoint import write_pretrained  # noqa: E402


pytestmark = pytest.mark.usefixtures("script_env")


def tiny_args(data, out, iters=4, *extra):
    return tiny_seg_args(data, out, iters, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mfnet")
    write_mfnet(root, n_train=6, n_val=2, n_test=2, size=(32, 48))
    return root


def fails_with(argv, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        train_seg.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]                 # after any progress bars
    assert last.startswith("error: "), err
    return last


def test_resume_refuses_changed_settings(data, tmp_path, capsys):
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    err = fails_with(tiny_args(data, out, 4, "--resume", "--lr", "0.5", "--amp"), capsys)
    assert "iters: checkpoint 2 vs now 4" in err and "lr: checkpoint 0.001 vs now 0.5" in err
    assert "amp: checkpoint False vs now True" in err and "--allow-changes" in err
    err = fails_with(tiny_args(data, out, 2, "--resume", "--crop", "64", "--batch-size", "3",
                               "--weight-decay", "0"), capsys)
    for key in ("size", "batch_size", "weight_decay"):
        assert re.search(rf"(^|[^_]){key}: checkpoint", err, re.M), key   # not batch_size's line
    # A run of another task is named as such (not as a list of differing settings).
    import train_det
    with pytest.raises(SystemExit):
        train_det.main(["--data", str(data), "--resume", str(out / "last.pt"), "--out",
                        str(tmp_path / "det"), "--device", "cpu"])
    assert "it is a run of train_seg.py (task seg), not of train_det.py" in \
        capsys.readouterr().err
    # The model's settings never change, even with --allow-changes.
    err = fails_with(tiny_args(data, out, 2, "--resume", "--allow-changes", "--d2", "16"), capsys)
    assert "d2: checkpoint 8 vs now 16" in err
    # --allow-changes accepts a training setting and logs it; how the run executes may change.
    summary = train_seg.main(tiny_args(data, out, 4, "--resume", "--allow-changes",
                                       "--log-every", "2"))
    assert summary["iters"] == 4
    assert "iters: checkpoint 2 vs now 4" in capsys.readouterr().out
    # ... and the optimizer trains with the changed setting, not the checkpoint's.
    train_seg.main(tiny_args(data, out, 5, "--resume", "--allow-changes", "--weight-decay",
                             "0.5", "--momentum", "0"))
    assert "weight_decay: checkpoint 0.01 vs now 0.5" in capsys.readouterr().out
    groups = load_checkpoint(str(out / "last.pt"))["optimizer"]["param_groups"]
    assert {(g["weight_decay"], g["momentum"]) for g in groups} == {(0.5, 0.0)}


def test_resume_takes_the_flags_left_out_from_the_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2, "--lr", "0.002", "--amp"))
    saved = load_checkpoint(str(out / "last.pt"))["config"]
    # Only the folder, one accepted change and how this process runs.
    own = ["--out", str(out), "--resume", "--allow-changes", "--device", "cpu", "--workers", "0"]
    train_seg.main(own + ["--iters", "3"])
    assert "changed setting, iters: checkpoint 2 vs now 3" in capsys.readouterr().out
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter"] == 3
    this_call = ("iters", "total_iters", "resume", "allow_changes", "kernels")
    assert {k: v for k, v in ckpt["config"].items() if k not in this_call} == \
        {k: v for k, v in saved.items() if k not in this_call}
    assert (saved["lr"], saved["amp"], saved["d2"], saved["size"]) == (0.002, True, 8, 32)
    # A store_true setting can be turned off again (--no-amp), as a change.
    train_seg.main(own + ["--iters", "4", "--no-amp"])
    assert "amp: checkpoint True vs now False" in capsys.readouterr().out
    assert load_checkpoint(str(out / "last.pt"))["config"]["amp"] is False
    # A flag that is given still must equal the run's.
    err = fails_with(["--out", str(out), "--resume", "--device", "cpu", "--lr", "0.5"], capsys)
    assert "lr: checkpoint 0.002 vs now 0.5" in err
    # Without --resume, --data is required.
    err = fails_with(["--out", str(tmp_path / "new"), "--device", "cpu"], capsys)
    assert "--data is required" in err and not (tmp_path / "new").exists()


def test_a_moved_dataset_is_named_with_the_way_to_continue(data, tmp_path, capsys):
    moved = tmp_path / "mf"
    shutil.copytree(data, moved)
    out = tmp_path / "run"
    train_seg.main(tiny_args(moved, out, 2))
    moved.rename(tmp_path / "mf2")
    own = ["--out", str(out), "--resume", "--device", "cpu", "--workers", "0"]
    err = fails_with(own + ["--iters", "3"], capsys)
    assert (f"the run's --data {moved} (saved in {out / 'last.pt'}) is not on this machine; if "
            f"it moved, give its new place: --data NEW --allow-changes") in err, err
    own += ["--data", str(tmp_path / "mf2"), "--allow-changes"]
    assert train_seg.main(own + ["--iters", "3"])["iters"] == 3


def test_a_run_resumes_from_another_working_directory(data, tmp_path, monkeypatch):
    """--data is saved as an absolute path: a run started with a relative one continues from
    anywhere with only --out and --resume, and stating the folder either way is no change (also
    for a run saved before paths were absolute, resumed from its own directory)."""
    monkeypatch.chdir(data.parent)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data.name, out, 2))
    assert load_checkpoint(str(out / "last.pt"))["config"]["data"] == str(data)
    monkeypatch.chdir(tmp_path)
    own = ["--out", str(out), "--resume", "--device", "cpu", "--workers", "0"]
    assert train_seg.main(own + ["--iters", "3", "--allow-changes"])["iters"] == 3
    ckpt = load_checkpoint(str(out / "last.pt"))
    ckpt["config"]["data"] = data.name                     # as an older version saved it
    torch.save(ckpt, out / "last.pt")
    monkeypatch.chdir(data.parent)
    assert train_seg.main(own + ["--iters", "3", "--data", str(data)])["iters"] == 3


def test_a_relative_pretrained_file_is_saved_absolute(data, tmp_path, monkeypatch):
    """--pretrained FILE given relative is found from anywhere on resume (and by evaluate.py)."""
    monkeypatch.chdir(tmp_path)
    write_pretrained(tmp_path / "pre.pt", 1)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2, "--pretrained", "pre.pt"))
    assert load_checkpoint(str(out / "last.pt"))["config"]["pretrained"] == str(tmp_path / "pre.pt")
    monkeypatch.chdir(data)
    assert train_seg.main(["--out", str(out), "--resume", "--iters", "3", "--allow-changes",
                           "--device", "cpu", "--workers", "0"])["iters"] == 3


def test_resume_with_impl_reference_drops_the_runs_memory_mode(data, tmp_path):
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2, "--impl", "fast", "--memory", "recompute"))
    assert train_seg.main(["--out", str(out), "--resume", "--impl", "reference", "--iters", "3",
                           "--allow-changes", "--device", "cpu", "--workers", "0"])["iters"] == 3
    assert load_checkpoint(str(out / "last.pt"))["config"]["memory"] == "keep"


def test_best_checkpoint_restarts_for_other_validation_images_or_a_new_folder(
        data, tmp_path, monkeypatch, capsys):
    """The saved best score stands for its validation images and its folder's best.pt only:
    continuing into a new --out writes a best.pt there at the first evaluation, and a changed
    --val-split (--allow-changes) chooses best.pt anew (a lower score on the new images still
    becomes best)."""
    fake_validation_scores(monkeypatch, 0.5, 0.3, 0.2, 0.1)
    out, moved = tmp_path / "run", tmp_path / "moved"
    train_seg.main(tiny_args(data, out, 2))                                     # 0.5 at 2
    own = ["--resume", "--allow-changes", "--device", "cpu", "--workers", "0"]
    train_seg.main(["--out", str(out), "--iters", "4", *own])                 # 0.3 at 4
    assert load_checkpoint(str(out / "best.pt"))["iter"] == 2
    train_seg.main(["--out", str(moved), "--resume", str(out / "last.pt"), "--iters", "6",
                    *own[1:]])                                                 # 0.2 at 6
    assert load_checkpoint(str(moved / "best.pt"))["iter"] == 6
    train_seg.main(["--out", str(moved), "--iters", "8", "--val-split", "test", *own])
    assert "the validation changed (val_split): best.pt is chosen anew" in capsys.readouterr().out
    assert (load_checkpoint(str(moved / "best.pt"))["iter"],
            load_checkpoint(str(moved / "best.pt"))["best"]) == (8, 0.1)


def test_a_finished_run_says_so_and_ctrl_c_outside_the_loop_is_no_traceback(
        data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "my run"                               # a space: the command quotes it
    train_seg.main(tiny_args(data, out, 2))
    capsys.readouterr()
    own = ["--out", str(out), "--resume", "--device", "cpu", "--workers", "0"]
    train_seg.main(own)
    text = capsys.readouterr().out
    assert "the run is complete (iteration 2 of 2): nothing to train" in text
    assert "--epochs" not in text                           # segmentation has no --epochs

    def first_ctrl_c(*args, **kwargs):                      # a Ctrl-C the loop did not catch
        raise KeyboardInterrupt

    def second_ctrl_c(*args, stop, **kwargs):               # the loop caught the first one
        stop.signum = signal.SIGINT
        raise KeyboardInterrupt

    command = f"python train_seg.py --out '{out}' --resume"
    for fake, says in ((first_ctrl_c, f"error: interrupted; {out / 'last.pt'} is the last "
                                      f"checkpoint written: {command} continues from it"),
                       (second_ctrl_c, "stopped at once by a Ctrl-C after SIGINT; the last good "
                                       f"checkpoint is {out / 'last.pt'} (iteration 2): "
                                       f"{command} continues from it")):
        monkeypatch.setattr(trainer.engine, "train_loop", fake)
        with pytest.raises(SystemExit) as e:
            train_seg.main(own + ["--iters", "4", "--allow-changes"])
        text = capsys.readouterr()
        assert e.value.code == 130 and "Traceback" not in text.err
        assert says in text.out + text.err
    # a new run stopped before its first checkpoint: nothing to resume, and it says so
    monkeypatch.setattr(trainer.engine, "train_loop", first_ctrl_c)
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(data, tmp_path / "new", 2))
    assert e.value.code == 130
    assert "error: interrupted; no checkpoint was written" in capsys.readouterr().err


def test_resume_commands_name_the_script_and_the_torchrun_shape(monkeypatch):
    task, out = SegTask(), "runs/my run"
    monkeypatch.setattr(sys, "argv", ["pytest"])
    assert trainer.resume_command(task, out) == "python train_seg.py --out 'runs/my run' --resume"
    monkeypatch.setattr(sys, "argv", ["../ivt/train_seg.py", "--data", "x"])
    assert trainer.resume_command(task, out).startswith("python ../ivt/train_seg.py --out")
    for env, shape, launcher in (({}, (1, 1), "python "),
                                 ({"WORLD_SIZE": "2"}, (2, 1), "torchrun --nproc_per_node=2 "),
                                 ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}, (8, 2),
                                  "torchrun (with this job's flags) ")):
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert trainer.torchrun_shape() == shape
        assert trainer.resume_command(task, out, *shape).startswith(launcher), env


def rewrite_last(out, config=(), **fields):
    """Change `out`/last.pt's saved fields and configuration, leaving best.pt (linked to it) as
    it is: a run stopped at a moment no test can reach by timing."""
    ckpt = load_checkpoint(str(out / "last.pt"))
    ckpt.update(fields)
    ckpt["config"].update(config)
    os.remove(out / "last.pt")                                 # best.pt keeps the linked file
    torch.save(ckpt, out / "last.pt")


def test_a_validation_change_not_yet_evaluated_still_chooses_best_pt_anew(data, tmp_path,
                                                                           monkeypatch):
    """--val-split changed, and the run stopped before its first evaluation on the new split
    (last.pt: best -inf, best.pt: 0.5 on val): the next resume must not hold 0.1 on test
    against best.pt's val score."""
    fake_validation_scores(monkeypatch, 0.5, 0.1)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    rewrite_last(out, {"val_split": "test"}, best=-math.inf)
    train_seg.main(["--out", str(out), "--resume", "--iters", "4", "--allow-changes",
                    "--device", "cpu", "--workers", "0"])
    best = load_checkpoint(str(out / "best.pt"))
    assert (best["iter"], best["best"], best["config"]["val_split"]) == (4, 0.1, "test")


def test_resume_keeps_the_score_best_pt_holds(data, tmp_path, monkeypatch):
    """last.pt's best score (0.5) above the one best.pt holds (0.1), and last.pt's own
    evaluation not that best (so last.pt is not the best state): the resumed run must beat what
    best.pt holds, so 0.3 becomes best.pt."""
    fake_validation_scores(monkeypatch, 0.1, 0.3)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    rewrite_last(out, best=0.5)
    train_seg.main(["--out", str(out), "--resume", "--iters", "4", "--allow-changes",
                    "--device", "cpu", "--workers", "0"])
    best = load_checkpoint(str(out / "best.pt"))
    assert (best["iter"], best["best"]) == (4, 0.3)


def test_resume_links_best_pt_to_a_new_best_last_pt_the_run_stopped_before_linking(
        data, tmp_path, monkeypatch):
    """Killed between writing last.pt at a new best score (0.5, iteration 2) and linking best.pt
    to it (still 0.1): the resumed state is the best, so best.pt becomes it at once, and a later
    0.3 does not replace it (the uninterrupted run's best.pt is iteration 2's 0.5)."""
    fake_validation_scores(monkeypatch, 0.1, 0.3)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    rewrite_last(out, best=0.5, metrics={"mIoU": 0.5})
    train_seg.main(["--out", str(out), "--resume", "--iters", "4", "--allow-changes",
                    "--device", "cpu", "--workers", "0"])
    best = load_checkpoint(str(out / "best.pt"))
    assert (best["iter"], best["best"], best["metrics"]) == (2, 0.5, {"mIoU": 0.5})
    assert load_checkpoint(str(out / "last.pt"))["best"] == 0.5


def test_resume_applies_this_commands_kernels_to_the_runs_impl(data, tmp_path, monkeypatch):
    """--kernels is this command's: resuming a --impl fast run without stating --impl (taken
    from the run) still selects the kernels' backend by this command's --kernels (auto)."""
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2, "--impl", "fast"))
    monkeypatch.setenv("IVT_KERNELS", "torch")
    train_seg.main(["--out", str(out), "--resume", "--iters", "3", "--allow-changes",
                    "--device", "cpu", "--workers", "0"])
    assert os.environ["IVT_KERNELS"] == "auto"


def test_resume_without_pretrained_refuses_a_pretrained_file(data, tmp_path, capsys):
    """A run started without pretrained weights holds its random frozen backbone; continuing it
    from a pretrained file would save deltas claiming that file, which evaluate.py would then
    rebuild into another model."""
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    err = fails_with(tiny_args(data, out, 4, "--resume", "--allow-changes", "--pretrained",
                               str(write_pretrained(tmp_path / "pre.pt", 1))), capsys)
    assert "trained from no pretrained weights" in err and "leave --pretrained out" in err
    assert load_checkpoint(str(out / "last.pt"))["iter"] == 2


def test_resume_on_more_processes(data, tmp_path):
    """A one-process run continued by two (--allow-changes: the effective batch changes): the
    new rank takes the saved rank's random state."""
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    run_torchrun("train_seg.py", tiny_args(data, out, 4, "--resume", "--allow-changes"))
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter"] == 4 and ckpt["config"]["world_size"] == 2 and len(ckpt["rng"]) == 2


def test_new_run_refuses_a_folder_holding_a_run(data, tmp_path, capsys):
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    log = (out / "log.jsonl").read_text()
    err = fails_with(tiny_args(data, out, 2), capsys)
    assert "already holds a run" in err and "--resume" in err
    assert (out / "log.jsonl").read_text() == log                  # nothing appended
    # Continuing another run's checkpoint there would mix the two runs.
    other = tmp_path / "other"
    train_seg.main(tiny_args(data, other, 2))
    shutil.copyfile(other / "last.pt", tmp_path / "iter2.pt")
    err = fails_with(tiny_args(data, out, 4, "--resume", str(other / "last.pt"),
                               "--allow-changes"), capsys)
    assert "holds a run" in err and str(other / "last.pt") in err
    assert f"--out {out} --resume continues the run there" in err
    assert "leave --out out to continue it in its folder" in err   # other/last.pt is that file
    assert (out / "log.jsonl").read_text() == log
    # Without --out, --resume FILE continues in FILE's folder.
    args = tiny_args(data, out, 4, "--resume", str(other / "last.pt"), "--allow-changes")
    del args[args.index("--out"):args.index("--out") + 2]
    assert train_seg.main(args)["out"] == str(other)
    assert load_checkpoint(str(other / "last.pt"))["iter"] == 4
    # --resume of another checkpoint of a run (a best.pt of iteration 2, older than its last.pt)
    # without --out: its folder's last.pt would be overwritten; the message says what to give.
    os.replace(tmp_path / "iter2.pt", other / "best.pt")
    args = tiny_args(data, out, 8, "--resume", str(other / "best.pt"), "--allow-changes")
    del args[args.index("--out"):args.index("--out") + 2]
    err = fails_with(args, capsys)
    assert "give a new --out" in err and "leave --out out" not in err
    # ... and with an --out holding a run, leaving --out out is not offered either.
    err = fails_with(tiny_args(data, out, 8, "--resume", str(other / "best.pt"),
                               "--allow-changes"), capsys)
    assert "choose another --out" in err and "leave --out out" not in err


def test_errors_while_the_model_is_built_leave_no_folder(data, tmp_path, capsys):
    err = fails_with(tiny_args(data, tmp_path / "a", 2, "--layers", "99"), capsys)
    assert "layers=[99]" in err
    assert not (tmp_path / "a").exists()


def test_errors_before_the_model_is_built(data, tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the error was found")
    monkeypatch.setattr(SegTask, "build_model", no_model)
    err = fails_with(tiny_args(data, tmp_path / "a", 2, "--batch-size", "7"), capsys)
    assert "--batch-size 7" in err and "has 6" in err
    assert not (tmp_path / "a").exists()                 # a refused run leaves no folder behind
    err = fails_with(tiny_args(data, tmp_path / "b", 2, "--pretrained", str(tmp_path / "x.pth")),
                     capsys)
    assert "x.pth" in err and "not found" in err
    args = tiny_args(data, tmp_path / "c", 2)
    args[args.index("swin_nano")] = "eva02_b"
    err = fails_with(args + ["--crop", "40"], capsys)
    assert "multiple of 16" in err and "40x40" in err
    err = fails_with(tiny_args(data, tmp_path / "c", 2, "--patch-size", "14"), capsys)
    assert "--patch-size applies to the ViTs" in err and "not swin_nano" in err
    (tmp_path / "file").write_text("")
    err = fails_with(tiny_args(data, tmp_path / "file", 2), capsys)
    assert "--out" in err and "is a file" in err
    err = fails_with(tiny_args(data, tmp_path / "file" / "run", 2), capsys)
    assert "--out" in err and "nothing can be written under it" in err
    for device, expected in [("gpu", "expected auto, cpu, cuda or cuda:N"),
                             ("cuda:7", "cuda:7")]:
        err = fails_with(tiny_args(data, tmp_path / "d", 2, "--device", device), capsys)
        assert f"--device {device}" in err and expected in err
    # a method's option with another --tuning, or out of range, named by its flag
    for flags, expected in [(["--tuning", "vpt", "--adapter-scale", "0.5"],
                             "options --adapter-scale do not apply to tuning='vpt'"),
                            (["--tuning", "vpt", "--prompt-length", "0"],
                             "--prompt-length must be positive, got 0"),
                            (["--tuning", "rein", "--rein-tokens", "1"], "--rein-tokens must"),
                            (["--tuning", "adaptformer", "--layers", "1"],
                             "options --layers only apply to tuning='ivt'"),
                            (["--ir-embed"], "option --ir-embed applies to tuning 'full' or "
                                             "'freeze'")]:
        err = fails_with(tiny_args(data, tmp_path / "e", 2, "--d2", "64", *flags), capsys)
        assert expected in err, (flags, err)
        assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("method,recorded", [("vpt", {"prompt_length": 10}),
                                             ("adaptformer", {"bottleneck": 64,
                                                              "adapter_scale": 0.1})])
def test_a_compared_method_records_its_defaults_and_resumes_with_them_stated(
        data, tmp_path, method, recorded):
    """A run of a compared method records the option values it trained with (they were saved as
    None, rebuilt with whatever the defaults were at load time), and resuming with a default
    stated (`--prompt-length 10`) is no change; a checkpoint that saved None resumes too."""
    out = tmp_path / "run"
    method = [method, "--d2", "64"]                  # tiny_args' --d2 8 back to the default
    train_seg.main(tiny_args(data, out, 2, "--tuning", *method))
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert {k: ckpt["config"][k] for k in recorded} == recorded
    stated = [f for k, v in recorded.items() for f in (f"--{k.replace('_', '-')}", str(v))]
    train_seg.main(tiny_args(data, out, 3, "--tuning", *method, "--resume", "--allow-changes",
                             *stated))
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter"] == 3
    ckpt["config"].update({k: None for k in recorded})         # as saved before
    torch.save(ckpt, out / "last.pt")
    summary = train_seg.main(tiny_args(data, out, 4, "--tuning", *method, "--resume",
                                       "--allow-changes"))
    assert summary["iters"] == 4


def test_validation_images_that_are_training_images_are_warned_about(data, tmp_path, capsys):
    """The paper's protocol trains on train+val: validating on val then picks best.pt on
    training data, which the run says (and trains)."""
    train_seg.main(tiny_args(data, tmp_path / "a", 1, "--train-split", "train+val"))
    err = capsys.readouterr().err
    assert "warning: 2 of the 2 validation images are training images too, or" in err, err
    train_seg.main(tiny_args(data, tmp_path / "b", 1))
    assert "training images too" not in capsys.readouterr().err


class FakeStop:
    """A StopRequest whose signal arrives during iteration `at`."""

    def __init__(self, at):
        self.at, self.seen, self.signum = at, 0, None

    def step(self, batch, lr):
        self.seen += 1
        if self.seen == self.at:
            self.signum = signal.SIGTERM
        return torch.tensor(1.0)


def test_loop_saves_every_n_and_on_a_stop_request_without_evaluating():
    dist = engine.DistInfo(0, 1, 0, torch.device("cpu"))
    logger = engine.JSONLLogger(None, False)
    model = torch.nn.Linear(1, 1)
    saved, evaluated = [], []

    def run(iters, stop, save_every, signal_in_evaluation=None):
        saved.clear()
        evaluated.clear()

        def evaluate(it):
            if it == signal_in_evaluation:
                stop.signum = signal.SIGINT
            evaluated.append(it)
            return {"it": it}

        save = lambda it, r: saved.append((it, r and r["it"]))               # noqa: E731
        engine.train_loop(model, iter(range(100)), stop.step, dist=dist, start_iter=0,
                          iters=iters, lr_at=lambda it: 0.1, log_every=50, eval_every=4,
                          evaluate=evaluate, save=save, logger=logger, save_every=save_every,
                          stop=stop)
        return saved, evaluated

    # None: saved without an evaluation (the checkpoint keeps the last result).
    assert run(10, FakeStop(None), 3) == ([(3, None), (4, 4), (6, None), (8, 8), (9, None),
                                           (10, 10)], [4, 8, 10])
    with pytest.raises(engine.RunInterrupted, match="SIGTERM after iteration 6") as e:
        run(10, FakeStop(6), 0)
    assert e.value.iteration == 6 and e.value.signum == signal.SIGTERM
    assert saved == [(4, 4), (6, None)]
    # a signal during the last iteration, or during its evaluation: the run completes
    # (evaluated and saved), then stops, so that a caller chaining runs (the demo) stops too
    for stop, in_evaluation, name in [(FakeStop(10), None, "SIGTERM"),
                                      (FakeStop(None), 10, "SIGINT")]:
        with pytest.raises(engine.RunInterrupted, match=f"{name} after iteration 10"):
            run(10, stop, 0, in_evaluation)
        assert (saved, evaluated) == ([(4, 4), (8, 8), (10, 10)], [4, 8, 10])
    # during an evaluation mid-run: stops once that iteration is saved, with no further one
    with pytest.raises(engine.RunInterrupted, match="SIGINT after iteration 4"):
        run(10, FakeStop(None), 0, signal_in_evaluation=4)
    assert (saved, evaluated) == ([(4, 4)], [4])


def test_corrupt_image_mid_training_is_named_and_last_checkpoint_kept(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    write_mfnet(bad, n_train=4, n_val=2, n_test=0, size=(32, 48))
    out = tmp_path / "run"
    train_seg.main(tiny_args(bad, out, 2))                          # last.pt at iteration 2
    saved = load_checkpoint(str(out / "last.pt"))
    for name in (bad / "train.txt").read_text().split():           # truncate every training image
        path = bad / "images" / f"{name}.png"
        path.write_bytes(path.read_bytes()[:200])
    for workers in ("0", "1"):
        args = tiny_args(bad, out, 6, "--resume", "--allow-changes")
        args[args.index("--workers") + 1] = workers
        err = fails_with(args, capsys)
        assert str(bad / "images") in err and ".png" in err
        assert "last good checkpoint" in err and "iteration 2" in err
        assert "Original Traceback" not in err
        assert load_checkpoint(str(out / "last.pt"))["iter"] == saved["iter"] == 2


def test_verify_images_names_a_corrupt_training_file_before_training(data, tmp_path, capsys):
    bad = tmp_path / "bad"
    write_mfnet(bad, n_train=4, n_val=2, n_test=0, size=(32, 48))
    name = (bad / "train.txt").read_text().split()[1]
    path = bad / "images" / f"{name}.png"
    path.write_bytes(path.read_bytes()[:200])                       # header intact, pixels cut
    err = fails_with(tiny_args(bad, tmp_path / "run", 2, "--verify-images"), capsys)
    assert str(path) in err
    assert not (tmp_path / "run" / "log.jsonl").exists()
    # validation images are decoded up front without --verify-images too (its help, the docs)
    val = bad / "images" / f"{(bad / 'val.txt').read_text().split()[0]}.png"
    val.write_bytes(val.read_bytes()[:200])
    err = fails_with(tiny_args(bad, tmp_path / "run", 2), capsys)
    assert str(val) in err
    assert not (tmp_path / "run" / "log.jsonl").exists()


def test_schedules():
    seg = SegTask()
    args = trainer.get_parser(seg).parse_args(["--data", "x", "--iters", "10", "--lr", "0.1",
                                               "--poly-power", "0.9", "--min-lr", "0"])
    iters, lr_at = trainer.schedule(seg, args, per_epoch=3)
    assert iters == 10
    for it in (0, 3, 9):
        assert lr_at(it) == pytest.approx(0.1 * (1 - it / 10) ** 0.9)
    from ivt.tasks.sod import SODTask
    sod = SODTask()
    args = trainer.get_parser(sod).parse_args(["--data", "x", "--epochs", "4",
                                               "--lr-drop-epoch", "2", "--lr", "1.0"])
    iters, lr_at = trainer.schedule(sod, args, per_epoch=5)
    assert iters == 20 and [lr_at(i) for i in (0, 9, 10, 19)] == [1.0, 1.0, 0.1, 0.1]
    # --iters overrides --epochs; the drop moves proportionally (half-way here).
    args = trainer.get_parser(sod).parse_args(["--data", "x", "--epochs", "4",
                                               "--lr-drop-epoch", "2", "--iters", "8"])
    iters, lr_at = trainer.schedule(sod, args, per_epoch=5)
    assert iters == 8 and lr_at(3) == args.lr and lr_at(4) == pytest.approx(0.1 * args.lr)
    # Detection: the authors' MultiStepLR, x0.1 at epochs 27 and 33 of 36.
    from ivt.tasks.det import DetTask
    det = DetTask()
    args = trainer.get_parser(det).parse_args(["--data", "x", "--lr", "1.0"])
    assert args.lr_drop_epoch == [27, 33] and args.epochs == 36
    iters, lr_at = trainer.schedule(det, args, per_epoch=2)
    assert iters == 72 and [lr_at(i) for i in (53, 54, 65, 66, 71)] == pytest.approx(
        [1.0, 0.1, 0.1, 0.01, 0.01])


def test_fast_impl_trains_like_the_reference(data, tmp_path, capsys):
    """--impl fast (every block checkpointed, or the first 3, or the frozen sub-layers
    recomputed) and --impl fused (on the CPU: the fast path, Triton needing a GPU) train like the
    reference."""
    runs = {"reference": ["--impl", "reference"],
            "fast": ["--impl", "fast", "--memory", "checkpoint"],
            "fast_3": ["--impl", "fast", "--memory", "checkpoint:3"],
            "lean": ["--impl", "fast", "--memory", "recompute"],
            "fused": ["--impl", "fused"]}
    logs = {}
    for name, extra in runs.items():
        train_seg.main(tiny_args(data, tmp_path / name, 2, *extra))
        logs[name] = [r for r in map(json.loads,
                                     (tmp_path / name / "log.jsonl").read_text().splitlines())
                      if r["event"] == "train"]
    for a, b, c, d, e in zip(logs["reference"], logs["fast"], logs["fast_3"], logs["fused"],
                             logs["lean"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) == c["loss"] == d["loss"]
        assert d["loss"] == e["loss"]
    for name, fast, checkpointed in (("reference", False, 0), ("fast_3", True, 3)):
        _, model, _ = load_trained(str(tmp_path / name / "last.pt"))   # evaluate.py, predict.py
        blocks = [b for stage in model.backbone.block_stages() for b in stage]
        assert all(type(b) is (FastSwinBlock if fast else SwinBlock) for b in blocks)
        if fast:
            assert [b.checkpoint for b in blocks] == [True] * checkpointed + [False] * 5
    err = fails_with(tiny_args(data, tmp_path / "x", 2, "--memory", "checkpoint"), capsys)
    assert "--memory checkpoint needs --impl fast" in err
    err = fails_with(tiny_args(data, tmp_path / "x", 2, "--memory", "recompute", "--impl",
                               "fast", "--tuning", "full"), capsys)
    assert "--memory recompute needs --impl fast (or fused) and --tuning ivt" in err
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(data, tmp_path / "x", 2, "--impl", "fast",
                                 "--memory", "checkpoint:0"))
    assert e.value.code == 2
    assert "a number of blocks >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("flags, checkpointed, recompute",
                         [([], None, None),
                          (["--impl", "fast", "--memory", "checkpoint:3"], 3, False),
                          (["--impl", "fused", "--memory", "recompute"], 0, True)])
def test_impl_and_memory_settings_reach_the_backbone(flags, checkpointed, recompute):
    """The task builds the paper's model (the builders get no impl or memory); `speed_up`
    applies the run's --impl and --memory to it (`ivt.fast.make_fast`)."""
    task = SegTask()
    cfg = vars(trainer.get_parser(task).parse_args(["--data", "x", "--backbone", "swin_nano",
                                                    "--d2", "8", "--head-dim", "16", *flags]))
    assert not {"impl", "memory"} & set(trainer.backbone_kwargs(cfg))
    model = task.build_model(cfg, None)
    blocks = [b for stage in model.backbone.block_stages() for b in stage]
    assert all(type(b) is SwinBlock for b in blocks)
    assert trainer.speed_up(model, cfg) is model
    if not flags:
        assert all(type(b) is SwinBlock for b in blocks)
        return
    assert all(type(b) is FastSwinBlock for b in blocks)
    assert [b.checkpoint for b in blocks] == [True] * checkpointed + [False] * (8 - checkpointed)
    assert all(b.recompute == recompute for b in blocks)
    adapters = [b.adapters for b in blocks if b.adapters is not None]
    assert adapters and all(a.fused == (cfg["impl"] == "fused") for a in adapters)


def test_impl_memory_and_kernels_do_not_change_the_run():
    """A run resumes with another implementation, memory option or kernel backend: the same
    weights and results."""
    assert {"impl", "memory", "kernels"} <= set(trainer.RUN_ONLY)


# docs/training.md, "Training runs": the flags of the run (how it executes), of the optimisation
# and of the model (never changed on resume, even with --allow-changes), as argparse names; the
# seg task's own model setting is its head's width.
RUN_FLAGS = ("impl", "memory", "device", "kernels", "workers", "out", "resume", "eval_every",
             "save_every", "log_every", "verify_images", "cuda_graph")
TRAINING_SETTINGS = ("iters", "batch_size", "size", "lr", "weight_decay", "momentum",
                     "clip_grad", "clip_grad_value", "amp", "seed", "world_size")
MODEL_SETTINGS = ("backbone", "tuning", "variant", "d1", "d2", "d3", "layers", "patch_size",
                  "prompt_length", "bottleneck", "adapter_scale", "rein_tokens", "rein_rank",
                  "ir_embed", "head_dim")


def resume_with_one_setting_changed(key, *flags):
    """`resume_checkpoint` on a checkpoint whose configuration differs from this invocation's in
    `key` alone: (accepted changes, logged lines)."""
    task = SegTask()
    args = trainer.get_parser(task).parse_args(["--data", "/data", "--out", "/run", "--resume",
                                                *flags])
    config = {"task": "seg", **vars(args), "world_size": 1}
    logged = []
    _, changes = trainer.resume_checkpoint(task, args, config, logged.append,
                                           {"config": {**config, key: "old"}})
    return changes, logged


@pytest.mark.parametrize("key", RUN_FLAGS)
def test_resume_accepts_another_way_of_running_as_no_change(key):
    assert resume_with_one_setting_changed(key) == ([], [])


@pytest.mark.parametrize("key", TRAINING_SETTINGS)
def test_resume_refuses_a_changed_training_setting_unless_allowed(key):
    with pytest.raises(ValueError, match=rf"differs \(pass --allow-changes.*: {key}: checkpoint"):
        resume_with_one_setting_changed(key)
    changes, logged = resume_with_one_setting_changed(key, "--allow-changes")
    assert len(changes) == 1 and changes[0].startswith(f"{key}: checkpoint 'old' vs now")
    assert logged == [f"resuming with a changed setting, {changes[0]}"]


@pytest.mark.parametrize("key", MODEL_SETTINGS)
def test_resume_never_changes_a_model_setting(key):
    with pytest.raises(ValueError, match=rf"differs: {key}: checkpoint 'old' vs now"):
        resume_with_one_setting_changed(key, "--allow-changes")


def test_resume_takes_the_runs_flags_but_this_commands_own():
    """docs/training.md: a flag left out takes the run's value, but --device, --workers,
    --kernels, --cuda-graph and --verify-images are this command's; --epochs given drops the
    run's --iters, --impl given drops the run's --memory."""
    from ivt.tasks.sod import SODTask
    saved = {"task": "sod", "device": "cuda:1", "workers": 3, "kernels": "triton",
             "cuda_graph": True, "verify_images": True, "lr": 0.5, "iters": 7, "epochs": 9,
             "impl": "fast", "memory": "recompute"}
    for extra, taken in (([], ("lr", "iters", "epochs", "impl", "memory")),
                         (["--epochs", "5"], ("lr", "impl", "memory")),
                         (["--impl", "fused"], ("lr", "iters", "epochs"))):
        parser = trainer.get_parser(SODTask())
        argv = ["--out", "/run", "--resume", *extra]
        args, default = parser.parse_args(argv), vars(parser.parse_args(argv))
        trainer.flags_from_run(SODTask(), args, saved, trainer.given_flags(parser, argv),
                               "/run/last.pt")
        for key in set(saved) - {"task"}:
            want = saved[key] if key in taken else default[key]
            assert getattr(args, key) == want, (extra, key)


def test_eva02_runs_get_clip_normalisation(data, tmp_path, monkeypatch):
    """The backbone decides the input statistics: CLIP's for EVA02, saved in the configuration
    (which evaluate.py and predict.py read) and used by the datasets."""
    from ivt.data import CLIP, IMAGENET
    from ivt.tasks import config_normalization
    seen = {}

    class Built(Exception):
        pass

    real = SegTask.build_datasets

    def capture_datasets(self, args, norm, out, is_main):
        train, val = real(self, args, norm, out, is_main)
        seen["train"], seen["val"] = train.transform.norm, val.transform.norm
        return train, val

    def stop(self, config, pretrained):
        seen["config"] = config
        raise Built

    monkeypatch.setattr(SegTask, "build_datasets", capture_datasets)
    monkeypatch.setattr(SegTask, "build_model", stop)
    for backbone, expected in (("eva02_b", CLIP), ("swin_nano", IMAGENET)):
        args = tiny_args(data, tmp_path / backbone, 2, "--pretrained", "none")
        args[args.index("swin_nano")] = backbone
        with pytest.raises(Built):
            trainer.train(SegTask(), train_seg.get_parser().parse_args(args),
                          engine.setup_distributed("cpu"))
        assert seen["train"] == seen["val"] == expected, backbone
        assert config_normalization(seen["config"]) == expected
        assert seen["config"]["normalization"]["mean"] == list(expected.mean)
    assert CLIP.mean == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP.std == (0.26862954, 0.26130258, 0.27577711)


def test_evaluate_names_a_corrupt_test_image(tmp_path, capsys):
    import evaluate
    bad = tmp_path / "bad"
    write_mfnet(bad, n_train=4, n_val=2, n_test=2, size=(32, 48))
    summary = train_seg.main(tiny_args(bad, tmp_path / "run", 2))
    name = (bad / "test.txt").read_text().split()[0]
    path = bad / "images" / f"{name}.png"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--data", str(bad), "--checkpoint", summary["last"], "--split", "test",
                       "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"error: {path}")


def test_readme_commands_use_existing_flags():
    """Every --flag the README and docs/ pass to a script exists in that script's parser."""
    import re

    import evaluate
    import predict
    import train_det
    import train_sod
    parsers = {"train_seg.py": train_seg.get_parser(), "train_sod.py": train_sod.get_parser(),
               "train_det.py": train_det.get_parser(), "evaluate.py": evaluate.get_parser(),
               "predict.py": predict.get_parser()}
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(p.read_text() for p in docs).replace("\\\n", " ")
    checked = 0
    for line in text.splitlines():
        for script, parser in parsers.items():
            if f"python {script}" in line or f"python -m {script}" in line:
                known = {o for a in parser._actions for o in a.option_strings}
                command = line.split(script, 1)[1].split("#")[0]
                for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", command):
                    assert flag in known, (script, flag, line)
                    checked += 1
    assert checked > 20


@pytest.mark.parametrize("task_name, graphed", [("seg", True), ("sod", True), ("det", False)])
def test_cuda_graph_is_not_tried_for_a_task_that_waits_for_the_host(task_name, graphed,
                                                                    monkeypatch):
    """--cuda-graph captures seg's and sod's steps; detection's loss copies its matching costs
    to the CPU, which a capture refuses (a CUDA error, not the ValueError the fallback catches),
    so its step stays eager with the reason said, and no capture is attempted."""
    import torch
    from ivt.tasks import task_module

    task = {"seg": SegTask, "sod": task_module("sod").SODTask,
            "det": task_module("det").DetTask}[task_name]()
    captured = []
    monkeypatch.setattr("ivt.graph_step.GraphedTrainStep",
                        lambda *a, **k: captured.append(a) or (lambda batch, lr: "graphed"))
    net = torch.nn.Linear(2, 2)
    args = type("Args", (), {"cuda_graph": True, "clip_grad": 0.0, "clip_grad_value": 0.0})
    said = []
    step = trainer.training_step(task, args, net, torch.optim.SGD(net.parameters(), lr=0.1),
                                 lambda: None, engine.DistInfo(0, 1, 0, torch.device("cpu")),
                                 said.append)
    assert bool(captured) == graphed
    assert isinstance(step, engine.EagerStep) != graphed
    assert said == ([] if graphed else [f"--cuda-graph: {task.eager_only}; using eager steps"])
    if not graphed:
        assert "Hungarian" in task.eager_only


STUCK_WORKER = """
import sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from ivt.engine import own_process_group
class Stuck(Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, i):
        if i > 0:
            time.sleep(1000)                    # a worker stuck reading a file
        return i
batches = iter(DataLoader(Stuck(), num_workers=1, worker_init_fn=own_process_group))
assert next(batches).item() == 0
batches._shutdown_workers()                     # joins, then terminates the stuck worker
"""


def test_the_dataloader_still_terminates_a_stuck_worker():
    """The workers leave Ctrl-C to the main process (`engine.own_process_group`) but still end
    on the SIGTERM the DataLoader sends a worker that does not exit: the process then exits
    instead of waiting for the worker forever."""
    run = subprocess.run([sys.executable, "-c", STUCK_WORKER], cwd=ROOT, timeout=60,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]


SIGNALLED_RUN = """
import os, signal, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from ivt.engine import StopRequest, own_process_group
class Slow(Dataset):
    def __len__(self):
        return 6
    def __getitem__(self, i):
        time.sleep(0.2)
        return torch.tensor([i, os.getpid()])
with StopRequest() as stop:
    loader = DataLoader(Slow(), num_workers=1, worker_init_fn=own_process_group)
    for i, batch in enumerate(loader):
        if i == 0:
            print(os.getpid(), int(batch[0, 1]), flush=True)  # the main process and its worker
            while stop.signum is None:
                time.sleep(0.05)
    print("all", i + 1, "batches", flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "sigwaitinfo"), reason="needs sigwaitinfo (not macOS)")
def test_a_sigterm_sent_to_every_process_of_the_run_leaves_the_workers_running():
    """systemd (KillMode=control-group) and batch schedulers stop a job by sending SIGTERM to
    each of its processes: the main process's StopRequest takes it, and the workers, which
    exit only on their parent's SIGTERM (`own_process_group`), keep serving the batches until
    the main process is done (a worker killed mid-run makes the DataLoader raise)."""
    proc = subprocess.Popen([sys.executable, "-c", SIGNALLED_RUN], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        main, worker = map(int, proc.stdout.readline().split())
        assert main == proc.pid and worker != main
        os.kill(worker, signal.SIGTERM)
        os.kill(main, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert out.split() == ["all", "6", "batches"]


def test_eager_step_scales_each_groups_lr_by_its_lr_mult():
    """SGD without momentum: p <- p - lr * lr_mult * grad, for each parameter group."""
    model = torch.nn.Module()
    model.fast = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    model.slow = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [model.fast], "lr_mult": 1.0},
                                 {"params": [model.slow], "lr_mult": 0.1}], lr=1.0)
    step = engine.EagerStep(model, lambda m, b: (m.fast * b["g"]).sum() + (m.slow * b["g"]).sum(),
                            optimizer, contextlib.nullcontext)
    g = torch.tensor([1.0, -2.0, 4.0], dtype=torch.float64)
    step({"g": g}, 0.5)
    torch.testing.assert_close(model.fast.detach(), 1 - 0.5 * g, rtol=0, atol=1e-15)
    torch.testing.assert_close(model.slow.detach(), 1 - 0.05 * g, rtol=0, atol=1e-15)


class CountingItems(torch.utils.data.Dataset):
    """Item i is {"i": i}; records the epochs `set_epoch` announces."""

    def __init__(self, n):
        self.n, self.epochs = n, []

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __getitem__(self, i):
        return {"i": torch.tensor(i)}


def test_evaluation_shards_cover_every_image_once():
    """Process r of w evaluates images r, r + w, r + 2w, ... in batches of one: over the
    processes, each of 7 images exactly once, with its own index."""
    items = CountingItems(7)
    seen = []
    for rank in range(3):
        dist = engine.DistInfo(rank, 3, rank, torch.device("cpu"))
        seen += [(index, batch["i"].item()) for index, batch in engine.shard(items, dist)]
    assert sorted(seen) == [(i, i) for i in range(7)]
    assert [i for i, _ in seen[:3]] == [0, 3, 6]


@pytest.mark.parametrize("start_iter", [0, 1, 2, 4, 8])
def test_infinite_batches_resume_mid_epoch_continues_the_stream(start_iter):
    """`InfiniteBatches(start_iter=k)` yields the batches of iterations k, k+1, ... of the
    uninterrupted run ("Resuming at iteration k skips straight to the k-th batch"), also in the
    middle of an epoch. Reference: the definition written out with torch's own DistributedSampler
    (seed, set_epoch(epoch), drop_last), the epoch's order cut into full batches (10 items in
    batches of 3: 3 per epoch, the 10th item dropped)."""
    dist = engine.DistInfo(0, 1, 0, torch.device("cpu"))
    n, bs, seed, total = 10, 3, 3, 11
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True,
                                                  seed=seed, drop_last=True)
    expected = []
    for epoch in range(total // 3 + 1):
        sampler.set_epoch(epoch)
        order = list(sampler)
        expected += [order[b * bs:(b + 1) * bs] for b in range(n // bs)]
    items = CountingItems(n)
    stream = iter(engine.InfiniteBatches(items, bs, dist, seed=seed, start_iter=start_iter))
    got = [next(stream)["i"].tolist() for _ in range(start_iter, total)]
    assert got == expected[start_iter:total]
    assert items.epochs[0] == start_iter // 3          # the resumed epoch's augmentation draws


def run_loop(losses, model=None, log_every=2, path=None, saved=None):
    """`engine.train_loop` over steps returning `losses` in turn (no evaluation until the end)."""
    logger = engine.JSONLLogger(path, path is not None)
    iters, losses = len(losses), iter(losses)
    try:
        engine.train_loop(model or torch.nn.Linear(1, 1), iter(range(100)),
                          lambda batch, lr: torch.tensor(next(losses)),
                          dist=engine.DistInfo(0, 1, 0, torch.device("cpu")), start_iter=0,
                          iters=iters, lr_at=lambda it: 0.1, log_every=log_every,
                          eval_every=0, evaluate=lambda it: {},
                          save=lambda it, r: (saved if saved is not None else []).append(it),
                          logger=logger)
    finally:
        logger.close()


def test_train_loop_logs_the_mean_loss_of_each_window(tmp_path):
    """Each `train` record's loss is the mean of the losses since the previous record (the
    loop's docstring), not a running total. Reference: the window means by hand."""
    path = tmp_path / "log.jsonl"
    run_loop([1.0, 3.0, 5.0, 7.0, 10.0, 20.0], path=str(path))
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]
    assert [(r["iter"], r["loss"]) for r in records] == [(2, (1 + 3) / 2), (4, (5 + 7) / 2),
                                                         (6, (10 + 20) / 2)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_train_loop_stops_on_a_non_finite_loss(bad):
    """A NaN or infinite (either sign) mean loss raises TrainingDiverged at the record that sees
    it, naming the window, and nothing is saved ("a non-finite loss raises TrainingDiverged")."""
    saved = []
    with pytest.raises(engine.TrainingDiverged, match=r"in iterations 1\.\.2") as e:
        run_loop([1.0, bad, 1.0, 1.0], saved=saved)
    assert str(bad) in str(e.value)
    assert saved == []


def test_non_finite_trainable_weights_are_never_saved():
    """`params_finite` is False when a trainable parameter holds a NaN (frozen ones are not its
    business), and the loop then raises TrainingDiverged instead of saving, so the last
    checkpoint written is the last finite one."""
    model = torch.nn.Linear(2, 2)
    assert engine.params_finite(model)
    with torch.no_grad():
        model.weight[0, 1] = float("nan")
    assert not engine.params_finite(model)
    saved = []
    with pytest.raises(engine.TrainingDiverged, match="not finite after iteration 4"):
        run_loop([1.0, 1.0, 1.0, 1.0], model=model, saved=saved)
    assert saved == []
    model.weight.requires_grad_(False)
    assert engine.params_finite(model)
    run_loop([1.0, 1.0, 1.0, 1.0], model=model, saved=saved)
    assert saved == [4]


@pytest.mark.parametrize("max_norm, max_value", [(0.1, 0.0), (1.0, 0.0), (100.0, 0.0),
                                                 (0.0, 0.5), (1.0, 0.5), (0.0, 0.0)])
def test_clip_gradients_clamps_values_then_scales_the_global_l2_norm(max_norm, max_value):
    """`clip_gradients`: every gradient value clamped to +-max_value, then all gradients scaled
    by min(1, max_norm / (||g||_2 + 1e-6)), ||g||_2 the L2 norm over all of them together
    (torch.nn.utils.clip_grad_norm_'s definition with norm_type=2, DINO's clip_max_norm); 0
    turns either off. Reference: the formula in float64."""
    grads = [torch.tensor([3.0, -0.2, 0.5, -4.0, 1.0], dtype=torch.float64),
             torch.tensor([[0.1, -0.7], [2.5, 0.3], [-0.05, 0.9]], dtype=torch.float64)]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    engine.clip_gradients(params, max_norm, max_value)
    want = [g.clamp(-max_value, max_value) if max_value > 0 else g for g in grads]
    if max_norm > 0:
        total = math.sqrt(sum(float((g * g).sum()) for g in want))
        want = [g * min(1.0, max_norm / (total + 1e-6)) for g in want]
    for p, w in zip(params, want):
        torch.testing.assert_close(p.grad, w, rtol=1e-12, atol=1e-15)


def test_a_chosen_cuda_device_becomes_the_current_one(monkeypatch):
    """`--device cuda:1` in one process: the Triton kernels, CUDA graphs and events launch on
    the current device, so cuda:1 must become it (it stayed cuda:0). On stand-ins for CUDA."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert engine.select_device("cuda:1") == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    engine.select_device("cuda")                       # no index: the current one, unchanged
    assert current == [torch.device("cuda", 1)]


def test_torchrun_on_gpus_reduces_cpu_tensors_too(monkeypatch):
    """Under torchrun on GPUs the evaluation's confusion matrices and the finiteness check before
    every save are reduced as CPU tensors, which nccl alone cannot (the first validation of a
    multi-GPU run crashed): the group has gloo for CPU tensors beside nccl. On stand-ins for
    CUDA and the process group."""
    backends = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(engine.torch_dist, "init_process_group",
                        lambda backend: backends.append(backend))
    dist = engine.setup_distributed("cuda")
    assert dist.device == torch.device("cuda", 0)
    assert backends == ["cpu:gloo,cuda:nccl"]


def test_flags_that_defeat_themselves_are_warned_about(data, tmp_path, capsys):
    """--val-split test chooses best.pt on test images (the docs: never); lr drops at or after
    the last epoch are never taken, also with --iters (which scales epoch e of --epochs E to
    iteration e / E of the run)."""
    import types

    from ivt.tasks.det import DetTask
    train_seg.main(tiny_args(data, tmp_path / "a", 1, "--val-split", "test"))
    assert "warning: --val-split test chooses best.pt on test images" in capsys.readouterr().err
    train_seg.main(tiny_args(data, tmp_path / "b", 1))
    assert "chooses best.pt" not in capsys.readouterr().err
    args = types.SimpleNamespace(val_split="val", iters=None, epochs=4, lr_drop_epoch=[3, 27])
    said = ("warning: --lr-drop-epoch 27 is at or after the last of --epochs 4: the lr never "
            "drops there (a drop is an epoch of --epochs, which --iters scales to the run's "
            "length)")
    assert trainer.selection_warnings(DetTask(), args) == [said]
    with_iters = types.SimpleNamespace(val_split="val", iters=40, epochs=4, lr_drop_epoch=[27])
    assert trainer.selection_warnings(DetTask(), with_iters) == [said]
    _, lr_at = trainer.schedule(DetTask(), types.SimpleNamespace(
        iters=40, epochs=4, lr_drop_epoch=[27], lr=1.0), per_epoch=10)
    assert {lr_at(it) for it in range(40)} == {1.0}                 # indeed never taken
    with_iters.lr_drop_epoch = [3]
    assert trainer.selection_warnings(DetTask(), with_iters) == []


def test_iters_moves_the_lr_drop_to_the_nearest_iteration():
    """--iters with a step schedule: "the lr drop moves proportionally, to the nearest
    iteration" (its help). A drop at epoch 1 of 3 epochs of 10 iterations lies at 1/3 of the
    run: iteration 7/3 = 2.33 -> 2 of a 7-iteration run, 8/3 = 2.67 -> 3 of an 8-iteration one."""
    import types

    from ivt.tasks.det import DetTask
    for iters, first_dropped in ((7, 2), (8, 3)):
        args = types.SimpleNamespace(iters=iters, epochs=3, lr_drop_epoch=[1], lr=1.0)
        total, lr_at = trainer.schedule(DetTask(), args, per_epoch=10)
        assert total == iters
        assert [lr_at(it) for it in range(iters)] == \
            [1.0] * first_dropped + [pytest.approx(0.1)] * (iters - first_dropped)


def test_a_validation_split_holding_test_images_or_an_lr_drop_at_the_last_epoch_is_warned():
    """--val-split: 'never select on the test split' (its help), also when a combined split holds
    it or it is one of MFNet's test subsets (test_day, test_night); an lr drop at epoch E of
    --epochs E starts at iteration E x (iterations an epoch), the run's length, after its last
    (0-based) iteration: never taken."""
    import types

    from ivt.tasks.det import DetTask
    for split in ("val+test", "test_night"):
        args = types.SimpleNamespace(val_split=split)
        assert [w.split(";")[0] for w in trainer.selection_warnings(SegTask(), args)] == \
            [f"warning: --val-split {split} chooses best.pt on test images"]
    args = types.SimpleNamespace(val_split="val", iters=None, epochs=4, lr_drop_epoch=[3, 4],
                                 lr=1.0)
    assert [w.split(": the lr")[0] for w in trainer.selection_warnings(DetTask(), args)] == \
        ["warning: --lr-drop-epoch 4 is at or after the last of --epochs 4"]
    _, lr_at = trainer.schedule(DetTask(), args, per_epoch=10)
    assert {lr_at(it) for it in range(30, 40)} == {0.1}              # drop 4 indeed never taken


def test_train_loop_also_logs_before_each_evaluation_and_at_a_stop(tmp_path):
    """A `train` record closes the window every `log_every` iterations, and also before every
    evaluation and when a stop request ends the run (the loop's docstring), so no iteration's
    loss goes unrecorded or unchecked before a checkpoint. log_every 10, an evaluation every 2
    iterations, a SIGTERM during iteration 5. Reference: the window means by hand."""
    path = tmp_path / "log.jsonl"
    logger = engine.JSONLLogger(str(path), True)
    losses, stop = iter([1.0, 3.0, 5.0, 7.0, 9.0]), FakeStop(5)

    def step(batch, lr):
        stop.step(batch, lr)
        return torch.tensor(next(losses))

    with pytest.raises(engine.RunInterrupted, match="SIGTERM after iteration 5"):
        engine.train_loop(torch.nn.Linear(1, 1), iter(range(100)), step,
                          dist=engine.DistInfo(0, 1, 0, torch.device("cpu")), start_iter=0,
                          iters=8, lr_at=lambda it: 0.1, log_every=10, eval_every=2,
                          evaluate=lambda it: {}, save=lambda it, r: None, logger=logger,
                          stop=stop)
    logger.close()
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]
    assert [(r["iter"], r["loss"]) for r in records] == [(2, (1 + 3) / 2), (4, (5 + 7) / 2),
                                                         (5, 9.0)]


def test_train_loop_averages_the_window_over_processes(monkeypatch, tmp_path):
    """Under DDP a record's loss is the mean over every process's iterations of the window: the
    window's sums are all-reduced, then divided by window * world_size. Two processes stood in
    for by an all-reduce that doubles (the other process had the same losses): losses 1, 2 in
    the window of 2 iterations give (1 + 2) * 2 / (2 * 2) = 1.5, the mean of 1, 2, 1, 2."""
    monkeypatch.setattr(engine, "all_reduce_sum_", lambda t: t.mul_(2))
    path = tmp_path / "log.jsonl"
    logger = engine.JSONLLogger(str(path), True)
    losses = iter([1.0, 2.0])
    engine.train_loop(torch.nn.Linear(1, 1), iter(range(100)),
                      lambda batch, lr: torch.tensor(next(losses)),
                      dist=engine.DistInfo(0, 2, 0, torch.device("cpu")), start_iter=0,
                      iters=2, lr_at=lambda it: 0.1, log_every=2, eval_every=0,
                      evaluate=lambda it: {}, save=lambda it, r: None, logger=logger)
    logger.close()
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]
    assert [(r["iter"], r["loss"]) for r in records] == [(2, 1.5)]


def test_train_loop_times_iterations_without_evaluations_and_saves(monkeypatch, tmp_path):
    """A `train` record's `time` is the mean wall time per iteration of its window, evaluation
    and checkpoint writing left out ("keep evaluation out of `time`"), and `elapsed` the time
    since the loop started. On a fake clock: a step takes 1 s, an evaluation 100 s, a save 10 s;
    4 iterations, a record every 2, evaluated and saved at 2 and 4. By hand: iteration 2 at
    t=2 (time 2/2, elapsed 2), then 110 s of evaluation and save, iteration 4 at t=114 (time
    (114 - 112)/2, elapsed 114)."""
    import types
    clock = [0.0]

    def spend(seconds):
        clock[0] += seconds

    monkeypatch.setattr(engine, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                              time=lambda: 0.0))
    path = tmp_path / "log.jsonl"
    logger = engine.JSONLLogger(str(path), True)
    engine.train_loop(torch.nn.Linear(1, 1), iter(range(100)),
                      lambda batch, lr: spend(1.0) or torch.tensor(1.0),
                      dist=engine.DistInfo(0, 1, 0, torch.device("cpu")), start_iter=0,
                      iters=4, lr_at=lambda it: 0.1, log_every=2, eval_every=2,
                      evaluate=lambda it: spend(100.0) or {}, save=lambda it, r: spend(10.0),
                      logger=logger)
    logger.close()
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]
    assert [(r["iter"], r["time"], r["elapsed"]) for r in records] == [(2, 1.0, 2.0),
                                                                       (4, 1.0, 114.0)]


def test_stop_request_takes_the_first_signal_and_lets_the_next_act():
    """`StopRequest`: the first SIGINT or SIGTERM only sets `signum`; the next acts as it would
    without it (here: the SIGINT handler installed before); leaving the block restores the
    previous handlers, also when no signal came; disabled (torchrun), it intercepts nothing."""
    caught = []

    def handler(signum, frame):
        caught.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    term = signal.getsignal(signal.SIGTERM)
    try:
        with engine.StopRequest():
            assert signal.getsignal(signal.SIGINT) is not handler
        assert signal.getsignal(signal.SIGINT) is handler
        assert signal.getsignal(signal.SIGTERM) == term
        with engine.StopRequest() as stop:
            signal.raise_signal(signal.SIGTERM)        # recorded, not acted on
            assert stop.signum == signal.SIGTERM and caught == []
            signal.raise_signal(signal.SIGINT)         # the second: its own handler
            assert caught == [signal.SIGINT] and stop.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is handler
        with engine.StopRequest(enabled=False) as stop:
            signal.raise_signal(signal.SIGINT)
        assert stop.signum is None and caught == [signal.SIGINT, signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_cuda_index_beyond_the_machines_devices_is_refused(monkeypatch):
    """`--device cuda:N` needs N below the device count: cuda:2 on a machine with 2 GPUs (cuda:0
    and cuda:1) is a ValueError naming the flag. On stand-ins for CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    with pytest.raises(ValueError, match="--device cuda:2: this machine has 2 CUDA"):
        engine.select_device("cuda:2")


def test_infinite_batches_split_an_epoch_between_processes_without_repeats():
    """7 images on 2 processes in batches of 1: each process takes 3 per epoch (the 7th image is
    left out, not one repeated to even out the processes), together 6 different images."""
    items, seen = CountingItems(7), []
    for rank in (0, 1):
        stream = engine.InfiniteBatches(items, 1, engine.DistInfo(rank, 2, rank,
                                                                  torch.device("cpu")), seed=0)
        assert stream.per_epoch == 3
        batches = iter(stream)
        seen += [next(batches)["i"].item() for _ in range(3)]
    assert len(set(seen)) == 6


def test_evaluation_mode_evaluates_and_restores_the_previous_mode():
    """`with evaluation_mode(model) as net:` net is the model in eval mode; afterwards the
    model is back in the mode it was in, training or not."""
    model = torch.nn.Sequential(torch.nn.Dropout(0.5))
    for training in (True, False):
        model.train(training)
        with engine.evaluation_mode(model) as net:
            assert net is model and not net.training and not net[0].training
        assert model.training == training and model[0].training == training


def test_jsonable_writes_non_finite_numbers_as_null():
    """JSON has no NaN or inf: `jsonable` makes them null (float, numpy float, tensor and numpy
    array elements), numpy integers ints, tensors and arrays numbers or nested lists, tuples
    lists and keys strings, so that the record is strict JSON (`allow_nan=False` accepts it)."""
    import numpy as np
    record = {"loss": float("nan"), 3: (np.float32(np.inf), np.int64(7)),
              "score": torch.tensor(2.5), "worst": torch.tensor(-float("inf")),
              "per_class": torch.tensor([float("nan"), 0.5]),
              "grid": np.array([[1.0, np.inf]], np.float32), "counts": np.array([2, 3])}
    out = engine.jsonable(record)
    assert out == {"loss": None, "3": [None, 7], "score": 2.5, "worst": None,
                   "per_class": [None, 0.5], "grid": [[1.0, None]], "counts": [2, 3]}
    assert json.loads(json.dumps(out, allow_nan=False)) == out


def test_the_log_is_appended_to_and_written_by_the_main_process_only(tmp_path):
    """log.jsonl is opened for appending: a resumed run continues the file of the run it
    continues; a logger that is not enabled (another rank) writes nothing."""
    path = tmp_path / "log.jsonl"
    for event in ("start", "resume"):
        logger = engine.JSONLLogger(str(path), True)
        logger.log(event, iter=0)
        logger.close()
    engine.JSONLLogger(str(path), False).log("other", iter=1)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["event"] for r in records] == ["start", "resume"]
    assert all(r["iter"] == 0 and "timestamp" in r for r in records)


@pytest.mark.parametrize("start_iter", [0, 2])
def test_train_loop_steps_with_the_lr_of_each_0_based_iteration(start_iter, tmp_path):
    """Iteration it + 1 (0-based it) steps with `lr_at(it)` and its record names that lr, from
    the first iteration of a new run or of a resumed one: the poly schedule's first step uses
    the base lr. Here lr_at(it) = 10 + it."""
    path = tmp_path / "log.jsonl"
    logger = engine.JSONLLogger(str(path), True)
    used = []
    engine.train_loop(torch.nn.Linear(1, 1), iter(range(100)),
                      lambda batch, lr: used.append(lr) or torch.tensor(1.0),
                      dist=engine.DistInfo(0, 1, 0, torch.device("cpu")), start_iter=start_iter,
                      iters=4, lr_at=lambda it: 10.0 + it, log_every=1, eval_every=0,
                      evaluate=lambda it: {}, save=lambda it, r: None, logger=logger)
    logger.close()
    records = [r for r in map(json.loads, path.read_text().splitlines()) if r["event"] == "train"]
    assert used == [10.0 + it for it in range(start_iter, 4)]
    assert [(r["iter"], r["lr"]) for r in records] == [(it + 1, 10.0 + it)
                                                       for it in range(start_iter, 4)]


def test_a_tie_with_the_best_score_keeps_the_earlier_best_pt(data, tmp_path, monkeypatch):
    """best.pt moves at a new best score only (`RunCheckpoints`: "at a new best validation
    score"): a later evaluation that ties it (0.5 at iterations 2 and 4) leaves best.pt at
    iteration 2, also when the run is resumed right after the tie (last.pt's own score then
    equals best.pt's: it is no best.pt the run failed to link)."""
    fake_validation_scores(monkeypatch, 0.5, 0.5, 0.1)
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 4))
    assert load_checkpoint(str(out / "best.pt"))["iter"] == 2
    train_seg.main(["--out", str(out), "--resume", "--iters", "6", "--allow-changes",
                    "--device", "cpu", "--workers", "0"])
    best = load_checkpoint(str(out / "best.pt"))
    assert (best["iter"], best["best"]) == (2, 0.5)


def test_a_checkpoint_written_between_evaluations_keeps_the_last_results(data, tmp_path,
                                                                         monkeypatch):
    """--save-every writes last.pt without evaluating: its `metrics` and `best` stay those of
    the last evaluation ("None: no evaluation this time; the checkpoint then keeps the last
    one"). Evaluations at 2 (0.5) and 4 (0.7), a save without one at 3."""
    fake_validation_scores(monkeypatch, 0.5, 0.7)
    written, save = [], trainer.atomic_save
    monkeypatch.setattr(trainer, "atomic_save", lambda state, path: written.append(
        (state["iter"], state["metrics"], state["best"])) or save(state, path))
    train_seg.main(tiny_args(data, tmp_path / "run", 4, "--save-every", "3"))
    assert written == [(2, {"mIoU": 0.5}, 0.5), (3, {"mIoU": 0.5}, 0.5),
                       (4, {"mIoU": 0.7}, 0.7)]


def test_a_batch_of_every_training_image_is_accepted(data, tmp_path):
    """--batch-size may equal the number of training images (6 here: one batch an epoch); only
    a larger one is refused (test_errors_before_the_model_is_built)."""
    args = tiny_args(data, tmp_path / "run", 1)
    args[args.index("--batch-size") + 1] = "6"
    assert train_seg.main(args)["iters"] == 1


def test_a_batch_on_every_process_needs_that_many_training_images(data, tmp_path):
    """--batch-size is images per iteration per process (its help): on 2 processes a batch of 4
    takes 8 of the 6 training images, refused before any model is built."""
    args = train_seg.get_parser().parse_args(tiny_args(data, tmp_path / "run", 1))
    args.batch_size, args.pretrained = 3, None
    two = engine.DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    trainer.prepare_run(SegTask(), args, two, None)
    args.batch_size = 4
    with pytest.raises(ValueError, match="--batch-size 4 on 2 process.* needs at least 8 .* has 6"):
        trainer.prepare_run(SegTask(), args, two, None)


def test_a_signal_in_the_last_iteration_says_the_run_is_complete(data, tmp_path, monkeypatch,
                                                                 capsys):
    """A SIGTERM caught during a run's last iteration: the run is evaluated and saved complete,
    the script says so (no command to continue it) and exits with 128 + 15 = 143 (`main`)."""
    loop = trainer.engine.train_loop

    def signalled_in_the_last_iteration(net, batches, step, *, stop, start_iter, iters, **kw):
        done = [start_iter]

        def last_signalled(batch, lr):
            done[0] += 1
            stop.signum = signal.SIGTERM if done[0] == iters else None
            return step(batch, lr)
        return loop(net, batches, last_signalled, stop=stop, start_iter=start_iter, iters=iters,
                    **kw)

    monkeypatch.setattr(trainer.engine, "train_loop", signalled_in_the_last_iteration)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(data, out, 2))
    assert e.value.code == 143
    said = capsys.readouterr().out
    assert (f"stopped by SIGTERM after iteration 2; {out / 'last.pt'} is written: the run is "
            f"complete") in said and "--resume" not in said
    assert load_checkpoint(str(out / "last.pt"))["iter"] == 2


def test_resume_never_changes_a_compared_methods_adapter_scale(data, tmp_path, capsys):
    """--adapter-scale scales the adapters' outputs without changing a tensor's shape: changed
    on resume, the saved weights would load silently into another model; so it is a setting of
    the model, refused even with --allow-changes."""
    out, method = tmp_path / "run", ["--tuning", "adaptformer", "--d2", "64"]
    train_seg.main(tiny_args(data, out, 1, *method))
    err = fails_with(tiny_args(data, out, 2, *method, "--resume", "--allow-changes",
                               "--adapter-scale", "0.5"), capsys)
    assert "adapter_scale: checkpoint 0.1 vs now 0.5" in err and "--allow-changes" not in err


def test_a_run_whose_every_score_is_nan_has_no_best(data, tmp_path, monkeypatch):
    """NaN is never best: a run whose evaluations score NaN writes last.pt but no best.pt, and
    its summary's best is None (no score), not -inf."""
    fake_validation_scores(monkeypatch, float("nan"))
    summary = train_seg.main(tiny_args(data, tmp_path / "run", 1))
    assert summary["best"] is None and summary["best_path"] is None
    assert load_checkpoint(summary["last"])["iter"] == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_an_evaluation_output_with_nan_or_inf_names_the_image(bad):
    """`check_finite_output`: any non-finite value, NaN or an infinity of either sign (argmax
    and thresholds would score either), is TrainingDiverged naming the image; a finite output
    passes."""
    dataset = type("Images", (), {"image_paths": ["a.png", "b.png"]})()
    output = torch.zeros(1, 3, 4, 4)
    engine.check_finite_output(output, dataset, 1, "class scores")
    output[0, 2, 1, 3] = bad
    with pytest.raises(engine.TrainingDiverged, match="b.png: NaN or inf in the model's class "
                                                      "scores"):
        engine.check_finite_output(output, dataset, 1, "class scores")


@pytest.mark.filterwarnings("ignore:Grad strides do not match bucket view strides")
def test_under_torchrun_a_signal_is_not_intercepted(data, tmp_path, monkeypatch):
    """Under torchrun the processes would have to agree on the iteration to stop after, so the
    run's StopRequest is disabled there (Ctrl-C then stops at once, from the last checkpoint).
    A one-process torchrun job in this process (its environment, gloo)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(key, value)
    made = []

    class Recorded(engine.StopRequest):
        def __init__(self, enabled=True):
            super().__init__(enabled)
            made.append(enabled)

    monkeypatch.setattr(trainer.engine, "StopRequest", Recorded)
    train_seg.main(tiny_args(data, tmp_path / "run", 1))
    assert made == [False]
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert start["world_size"] == 1


def test_after_the_cuda_graph_fallback_an_eager_error_is_raised_as_it_is(monkeypatch):
    """--cuda-graph: a batch the graph refuses (ValueError) moves the run to eager steps, once,
    with a message; a ValueError of an eager step after that is the step's own error: raised
    at once, not taken for the graph's (no second message, the step not run again)."""
    class Refusing:
        def __init__(self, *args):
            pass

        def __call__(self, batch, lr):
            raise ValueError("shapes differ")

    monkeypatch.setattr("ivt.graph_step.GraphedTrainStep", Refusing)
    calls, said = [], []

    def eager(batch, lr):
        calls.append(batch)
        if batch == "bad":
            raise ValueError("eager failed")
        return "loss"

    step = trainer.graphed_step(None, None, None, None, 0.0, 0.0, eager, said.append)
    assert step("a", 0.1) == "loss"
    assert said == ["--cuda-graph: shapes differ; continuing with eager steps"]
    with pytest.raises(ValueError, match="eager failed"):
        step("bad", 0.1)
    assert calls == ["a", "bad"] and len(said) == 1


def test_resume_may_change_how_often_the_run_evaluates_saves_and_logs(data, tmp_path, capsys):
    """--eval-every, --save-every and --log-every say how a run executes, not what it computes
    (`RUN_ONLY`): a resume may change them without --allow-changes, and none is a change. The
    run resumed here is complete: nothing trains, and its summary gives the run's last
    validation results, those last.pt holds."""
    out = tmp_path / "run"
    train_seg.main(tiny_args(data, out, 2))
    capsys.readouterr()
    summary = train_seg.main(tiny_args(data, out, 2, "--resume", "--eval-every", "1",
                                       "--save-every", "1", "--log-every", "2"))
    assert summary["iters"] == 2
    assert "changed setting" not in capsys.readouterr().out
    saved = load_checkpoint(str(out / "last.pt"))["metrics"]      # (per-class IoUs may be NaN)
    assert summary["metrics"] is not None and summary["metrics"].keys() == saved.keys()
    assert summary["metrics"]["mIoU"] == saved["mIoU"]

"""Flags the three training scripts share: one name for the input size, a number of data
workers that fits the machine, and the backbone's drop-path rate of the authors' runs."""
import os

import pytest
import torch

import train_det
import train_seg
import train_sod
from ivt import trainer
from ivt.models import build_backbone
from ivt.models.swin import DropPath
from ivt.tasks.det import DetTask
from ivt.tasks.seg import SegTask
from ivt.tasks.sod import SODTask

SCRIPTS = {"seg": (train_seg, 512), "sod": (train_sod, 384), "det": (train_det, 640)}
TASKS = {"seg": SegTask(), "sod": SODTask(), "det": DetTask()}


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_size_is_one_flag_in_all_three_scripts(task):
    module, default = SCRIPTS[task]
    parser = module.get_parser()
    assert parser.parse_args(["--data", "x"]).size == default
    assert parser.parse_args(["--data", "x", "--size", "96"]).size == 96
    assert not hasattr(parser.parse_args(["--data", "x"]), "crop")


def test_crop_is_train_segs_name_for_size():
    parser = train_seg.get_parser()
    assert parser.parse_args(["--data", "x", "--crop", "64"]).size == 64


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_workers_default_never_exceeds_the_cores(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert trainer.default_workers() == expected
    for module, _ in SCRIPTS.values():
        assert module.get_parser().parse_args(["--data", "x"]).workers == expected


@pytest.mark.parametrize("task, backbone, expected", [
    ("det", "swin_l", 0.2),       # the authors' DINO Swin-L config: drop_path_rate=0.2
    ("sod", "eva02_l", 0.2),      # the release's EVA02CPNet: drop_path_rate=0.2
    ("sod", "swin_l", None),      # the release's SwinTransformer default, 0.1: the model's own
    ("seg", "swin_l", None),      # no segmentation config was released
    ("det", "swin_nano", None)])
def test_drop_path_defaults_are_the_authors_runs(tmp_path, task, backbone, expected):
    args = SCRIPTS[task][0].get_parser().parse_args(
        ["--data", str(tmp_path), "--backbone", backbone, "--out", str(tmp_path)])
    trainer.check_args(TASKS[task], args)
    assert args.drop_path == expected
    assert trainer.backbone_kwargs(vars(args)).get("drop_path_rate") == expected


def drop_path_rates(model):
    return [m.p for m in model.modules() if isinstance(m, DropPath)]


def test_drop_path_flag_reaches_the_backbone(tmp_path):
    parse = train_det.get_parser().parse_args
    args = parse(["--data", str(tmp_path), "--backbone", "swin_nano", "--drop-path", "0.3",
                  "--out", str(tmp_path)])
    trainer.check_args(TASKS["det"], args)
    rates = drop_path_rates(build_backbone("swin_nano", **trainer.backbone_kwargs(vars(args))))
    assert rates[0] == 0 and rates[-1] == pytest.approx(0.3)      # linear in depth up to 0.3
    assert drop_path_rates(build_backbone("swin_nano"))[-1] == pytest.approx(0.1)   # own default
    # --drop-path 0 is a rate like any other: no stochastic depth, not the model's default 0.1
    args = parse(["--data", str(tmp_path), "--backbone", "swin_nano", "--drop-path", "0",
                  "--out", str(tmp_path)])
    trainer.check_args(TASKS["det"], args)
    rates = drop_path_rates(build_backbone("swin_nano", **trainer.backbone_kwargs(vars(args))))
    assert rates and all(rate == 0 for rate in rates)
    with pytest.raises(ValueError, match="--drop-path"):
        trainer.check_args(TASKS["det"], parse(["--data", str(tmp_path), "--drop-path", "1.0",
                                                "--out", str(tmp_path)]))


def test_kernels_flag_choices_are_the_kernels_backends():
    """The scripts' --kernels choices (kept in ivt.trainer so that importing ivt does not import
    `kernels`) are the backends `kernels.set_backend` takes."""
    import kernels
    assert trainer.KERNEL_BACKENDS == kernels.BACKENDS


def test_paths_and_numbers_are_named_by_their_flag(tmp_path, capsys):
    """A missing --data / --val-list / --split-dir, a non-positive --lr, a folder given as a
    checkpoint or as --pretrained: one line naming the flag (torch's or the OS's wording
    before), exit 2, nothing written."""
    import evaluate
    from ivt.data.synthetic import write_vt
    vt = tmp_path / "vt"
    write_vt(vt, n_train=4, n_test=0, n_vt1000=0, n_vt821=0, size=(32, 48))
    data = vt / "VT5000" / "Train"
    common = ["--backbone", "swin_nano", "--size", "32", "--iters", "1", "--device", "cpu",
              "--workers", "0", "--out", str(tmp_path / "out")]
    for script, argv, says in [
            (train_sod, ["--data", str(tmp_path / "gone")],
             f"--data {tmp_path / 'gone'}: not found"),
            (train_sod, ["--data", str(data), "--val-list", str(tmp_path / "v.txt")],
             f"--val-list {tmp_path / 'v.txt'}: not found"),
            (train_det, ["--data", str(data), "--split-dir", str(tmp_path / "s")],
             f"--split-dir {tmp_path / 's'}: not found"),
            (train_sod, ["--data", str(data), "--lr", "-1"], "--lr must be positive"),
            (train_sod, ["--data", str(data), "--pretrained", str(tmp_path)],
             f"{tmp_path} is a folder; give the pretrained checkpoint file in it"),
            (evaluate, ["--checkpoint", str(tmp_path), "--data", str(data)],
             f"checkpoint {tmp_path} is a folder; give a file in it, e.g. "
             f"{tmp_path / 'best.pt'}")]:
        with pytest.raises(SystemExit) as e:
            script.main((argv + common) if script is not evaluate else argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert says in err.strip().splitlines()[-1], err
        assert not (tmp_path / "out").exists()


def test_batch_one_below_size_64_is_refused_before_any_work(tmp_path, capsys):
    """At --size 32 the coarsest map (stride 32) is 1 x 1, and with one image per batch the
    Hybrid Adapter's BatchNorm sees one value per channel, which torch refuses in training (shown
    here on the Hybrid Operation itself). The scripts refuse it up front, naming the flags, exit
    2, nothing written, instead of failing at the first iteration; batch 2 at 32 and batch 1 at
    64 give BatchNorm more than one value and are accepted by the check."""
    from ivt.models.ivtuning import HybridOperation
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        HybridOperation(8).train()(torch.randn(1, 1, 8), (1, 1))       # one token, batch 1
    HybridOperation(8).train()(torch.randn(2, 1, 8), (1, 1))            # two: fine
    from ivt.data.synthetic import write_vt
    write_vt(tmp_path / "vt", n_train=4, n_test=0, n_vt1000=0, n_vt821=0, size=(32, 48))
    data = str(tmp_path / "vt" / "VT5000" / "Train")
    for script in (train_sod, train_seg, train_det):
        with pytest.raises(SystemExit) as e:
            script.main(["--data", data, "--backbone", "swin_nano", "--size", "32",
                         "--batch-size", "1", "--iters", "1", "--device", "cpu",
                         "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err, err
        assert err.strip().splitlines()[-1] == (
            "error: --batch-size 1 needs --size 64 or more, got 32: BatchNorm needs more than one "
            "value per channel in training, and below 64 the coarsest feature map (stride 32) "
            "holds one position per image"), err
        assert not (tmp_path / "out").exists()
    for size, batch in ((32, 2), (64, 1)):
        parser = trainer.get_parser(SODTask())
        args = parser.parse_args(["--data", data, "--backbone", "swin_nano", "--size", str(size),
                                  "--batch-size", str(batch), "--val-count", "2"])
        trainer.check_args(SODTask(), args)


@pytest.mark.parametrize("flags, says", [
    (["--lr", "0"], "--lr must be positive"),
    (["--weight-decay", "-0.1"], "--weight-decay not negative"),
    (["--save-every", "-1"], "--eval-every, --save-every and --workers must not be negative"),
    (["--eval-every", "-1"], "--eval-every, --save-every and --workers must not be negative"),
    (["--size", "16"], "--size must be at least 32, got 16"),
    (["--iters", "0"], "--iters must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--workers", "-1"], "--eval-every, --save-every and --workers must not be negative"),
    (["--clip-grad", "-1"], "--clip-grad and --clip-grad-value must not be negative"),
    (["--clip-grad-value", "-0.5"], "--clip-grad and --clip-grad-value must not be negative")])
def test_out_of_range_numbers_are_refused_before_the_run(tmp_path, flags, says):
    """`check_args`: --lr must be positive (0 included: a run that never moves), --weight-decay
    and the intervals must not be negative, --size at least 32; a run of no iterations, empty
    batches, a log never written, a negative worker count or clipping threshold are refused."""
    args = train_seg.get_parser().parse_args(["--data", str(tmp_path), "--out",
                                              str(tmp_path / "out"), *flags])
    with pytest.raises(ValueError, match=says):
        trainer.check_args(TASKS["seg"], args)


@pytest.mark.parametrize("task", ["sod", "det"])
def test_epochs_below_one_are_refused(tmp_path, task):
    """A schedule counted in --epochs (SOD, detection) needs at least one epoch."""
    args = SCRIPTS[task][0].get_parser().parse_args(["--data", str(tmp_path), "--out",
                                                     str(tmp_path / "out"), "--epochs", "0"])
    with pytest.raises(ValueError, match="--epochs must be at least 1, got 0"):
        trainer.check_args(TASKS[task], args)


def test_zero_intervals_are_accepted(tmp_path):
    """--eval-every 0 ("only at the end") and --save-every 0 ("only with evaluations") are the
    documented off values of the intervals (their --help), not errors."""
    args = train_seg.get_parser().parse_args(["--data", str(tmp_path), "--out",
                                              str(tmp_path / "out"), "--eval-every", "0",
                                              "--save-every", "0"])
    trainer.check_args(TASKS["seg"], args)
    assert (args.eval_every, args.save_every) == (0, 0)


def test_cuda_graph_is_refused_without_cuda(tmp_path, monkeypatch):
    """--cuda-graph's help: it needs CUDA; on a machine without it the run is refused up front."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = train_seg.get_parser().parse_args(["--data", str(tmp_path), "--out",
                                              str(tmp_path / "out"), "--cuda-graph"])
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        trainer.check_args(TASKS["seg"], args)


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_model_defaults_are_the_papers(task):
    """spec/method.md: IV-tuning on Swin-L with d1-d2-d3 = 8-64-8 and adapters in every block is
    the paper's default model; the readable reference forward, float32, no memory trade-off."""
    args = SCRIPTS[task][0].get_parser().parse_args(["--data", "x"])
    assert (args.backbone, args.tuning, args.variant, args.d1, args.d2, args.d3, args.layers,
            args.patch_size) == ("swin_l", "ivt", "ivt", 8, 64, 8, None, None)
    assert (args.impl, args.memory, args.amp, args.cuda_graph) == ("reference", "keep", False,
                                                                   False)


@pytest.mark.parametrize("task, optimizer", [("seg", "sgd"), ("sod", "adam"), ("det", "adamw")])
def test_lr_help_names_the_tasks_optimizer(task, optimizer):
    """docs/training.md's recipes: segmentation trains with SGD, SOD with Adam, detection with
    AdamW; --lr's help says whose base learning rate it is."""
    lr = next(a for a in SCRIPTS[task][0].get_parser()._actions if a.dest == "lr")
    assert lr.help.startswith(f"{optimizer} base learning rate")


def test_memory_flag_is_checked_when_parsed(capsys):
    """--memory takes keep, recompute, checkpoint, checkpoint:N and checkpoint:N+recompute (its
    metavar and help); anything else is an argparse error (exit 2) before any work."""
    parser = train_seg.get_parser()
    for value in ("keep", "recompute", "checkpoint", "checkpoint:2", "checkpoint:2+recompute"):
        assert parser.parse_args(["--data", "x", "--memory", value]).memory == value
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--data", "x", "--memory", "everything"])
    assert e.value.code == 2 and "--memory" in capsys.readouterr().err


def test_patch_size_reaches_the_vit_backbone(tmp_path):
    """--patch-size (EVA02, DINOv2, MAE) is a backbone option: a run's configuration hands it to
    `build_backbone`; left out, the backbone gets none (its own 16)."""
    parse = train_sod.get_parser().parse_args
    for flags, expected in ((["--patch-size", "14"], 14), ([], None)):
        args = parse(["--data", str(tmp_path), "--backbone", "eva02_b", "--size", "224",
                      "--out", str(tmp_path), *flags])
        trainer.check_args(TASKS["sod"], args)
        assert trainer.backbone_kwargs(vars(args)).get("patch_size") == expected


def test_an_ivt_configuration_holding_ir_embed_builds_ivt():
    """IV-tuning always has its own infrared embedding (spec/method.md; `--ir-embed` is for
    --tuning full / freeze): a saved IV-tuning configuration that holds ir_embed (check_args now
    refuses the flag with --tuning ivt) still builds IV-tuning's model, as one without it."""
    config = {"tuning": "ivt", "d2": 8, "ir_embed": True}
    assert "ir_embed" not in trainer.backbone_kwargs(config)
    built = build_backbone("swin_nano", "ivt", **trainer.backbone_kwargs(config))
    plain = build_backbone("swin_nano", "ivt", d2=8)
    assert [n for n, _ in built.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert trainer.backbone_kwargs({"tuning": "full", "ir_embed": True})["ir_embed"] is True

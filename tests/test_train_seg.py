"""train_seg.py and evaluate.py end to end on tiny synthetic MFNet data (swin_nano, 32x32 crops):
exact resumption after kill -9, torchrun with two CPU processes, clean errors, the NaN guard,
--help, and the evaluation outputs."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                    # the scripts live at the root
import evaluate  # noqa: E402
import train_seg  # noqa: E402
from ivt import trainer
from ivt.checkpoint import load_checkpoint
from ivt.data.synthetic import write_mfnet
from ivt.engine import TrainingDiverged  # noqa: E402
from ivt.tasks.seg import SegTask, seg_loss
from script_runs import (fake_validation_scores, read_log,  # noqa: E402
                         run_killed_after_first_checkpoint)


pytestmark = pytest.mark.usefixtures("script_env")


def tiny_args(data, out, iters=16, eval_every=4, *extra):
    return ["--data", str(data), "--out", str(out), "--backbone", "swin_nano", "--d2", "8",
            "--head-dim", "16", "--crop", "32", "--batch-size", "2", "--iters", str(iters),
            "--eval-every", str(eval_every), "--log-every", "1", "--workers", "0",
            "--device", "cpu", "--kernels", "torch", *extra]


def losses_after_last_start(records):
    """{iter: loss} of the train records written after the last start/resume record."""
    last = max(i for i, r in enumerate(records) if r["event"] in ("start", "resume"))
    return {r["iter"]: r["loss"] for r in records[last:] if r["event"] == "train"}


def child_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("mfnet")
    write_mfnet(root, n_train=6, n_val=2, n_test=4, size=(32, 48))
    return root


def test_help_explains_every_flag(capsys):
    parser = train_seg.get_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as e:
        train_seg.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--backbone", "--tuning", "--variant", "--d1", "--d2", "--d3", "--layers",
                 "--pretrained", "--data", "--train-split", "--val-split", "--iters",
                 "--batch-size", "--crop", "--lr", "--weight-decay", "--amp", "--device",
                 "--workers", "--seed", "--out", "--resume", "--eval-every", "--dataset",
                 "--kernels", "--log-every", "--head-dim", "--momentum", "--loss-average",
                 "--poly-power", "--min-lr"):
        assert flag in text, flag
    assert "train+val" in text                       # the paper's protocol is documented
    assert "mmseg's CrossEntropyLoss default" in " ".join(text.split())
    for action in evaluate.get_parser()._actions:
        assert action.help, action.option_strings
    # evaluate.py's documented defaults: the test split, and pycocotools' 100 detections per
    # image (docs/data.md; mmdet's 1000 only when asked for)
    defaults = evaluate.get_parser().parse_args(["--data", "d", "--checkpoint", "c.pt"])
    assert (defaults.split, defaults.max_dets) == ("test", 100)


def hand_ce_sum(logits, label):
    """float64 sum over the pixels with label != 255 of -log softmax(logits)[label], by hand."""
    logits, total = logits.double(), 0.0
    for b, i, j in (label != 255).nonzero().tolist():
        z = logits[b, :, i, j]
        total += (torch.log(torch.exp(z - z.max()).sum()) + z.max() - z[label[b, i, j]]).item()
    return total


def seg_batch(seed=0, k=4, h=6, w=5):
    """(B=2) logits at full size and labels with some pixels 255 (two padded rows and a few
    unlabelled pixels, as MFNet's 480x640 images padded to 512x512 crops)."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, k, h, w, generator=g, dtype=torch.float64)
    label = torch.randint(0, k, (2, h, w), generator=g)
    label[:, -2:] = 255
    label[0, 0, :3] = 255
    return logits, label


def test_loss_averages_over_all_pixels_by_default():
    """mmseg's CrossEntropyLoss default (avg_non_ignore=False): the sum over the valid pixels
    divided by ALL pixels; --loss-average valid divides by the valid ones (F.cross_entropy's
    ignore_index mean), through the task's flag, configuration and loss."""
    logits, label = seg_batch()
    n_all, n_valid = label.numel(), int((label != 255).sum())
    assert 0 < n_valid < n_all
    by_hand = hand_ce_sum(logits, label)
    assert seg_loss(logits, label).item() == pytest.approx(by_hand / n_all, rel=1e-12)
    assert seg_loss(logits, label, "valid").item() == pytest.approx(by_hand / n_valid, rel=1e-12)
    torch.testing.assert_close(seg_loss(logits, label, "valid"),
                               F.cross_entropy(logits, label, ignore_index=255))
    with pytest.raises(ValueError, match="'mean'"):
        seg_loss(logits, label, "mean")

    batch = {"vis": torch.zeros(2, 3, 6, 5), "ir": torch.zeros(2, 3, 6, 5), "label": label}
    full_size = lambda vis, ir: logits.float()                 # noqa: E731 (no resizing)
    for flags, want in (([], by_hand / n_all), (["--loss-average", "valid"], by_hand / n_valid)):
        task = SegTask()
        args = trainer.get_parser(task).parse_args(["--data", "x", "--backbone", "swin_nano",
                                                    "--head-dim", "8", *flags])
        assert args.loss_average == ("valid" if flags else "all")
        task.build_model(vars(args), None)                      # the run's configuration
        loss = task.loss(full_size, batch, torch.device("cpu"))
        assert loss.item() == pytest.approx(want, rel=1e-5), flags


def test_training_loss_upsamples_the_logits_with_half_pixel_bilinear():
    """mmseg's `loss_by_feat` resizes the stride-4 logits to the label's size bilinearly with the
    head's align_corners=False: logits of width 2 whose class-1 margin is (0, 4) become, at width
    4 (source x = (x + 0.5) / 2 - 0.5, clamped to [0, 1]), margins 0, 1, 3, 4; every pixel is
    class 1, so the loss is the mean of log(1 + e^-m) (align_corners=True: 0, 4/3, 8/3, 4)."""
    logits = torch.tensor([[[[0.0, 0.0]], [[0.0, 4.0]]]])            # (1, 2, 1, 2)
    batch = {"vis": torch.zeros(1, 3, 1, 4), "ir": torch.zeros(1, 3, 1, 4),
             "label": torch.ones(1, 1, 4, dtype=torch.int64)}
    want = sum(math.log1p(math.exp(-m)) for m in (0, 1, 3, 4)) / 4      # 0.268287
    loss = SegTask().loss(lambda vis, ir: logits, batch, torch.device("cpu"))
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_loss_of_an_all_ignored_batch_is_zero():
    logits, label = seg_batch()
    logits.requires_grad_(True)
    for average in ("all", "valid"):
        loss = seg_loss(logits, torch.full_like(label, 255), average)
        assert loss.item() == 0.0, average
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_lr_follows_mmseg_160k_poly_schedule():
    """mmseg's schedule_160k: PolyLR power 0.9, eta_min 1e-4, from the paper's lr 1e-3."""
    task = SegTask()
    for flags, total in (([], 160_000), (["--iters", "50", "--lr", "0.01"], 50)):
        args = trainer.get_parser(task).parse_args(["--data", "x", *flags])
        iters, lr_at = trainer.schedule(task, args, per_epoch=7)
        base = 0.01 if flags else 1e-3
        assert iters == total
        for it in (0, total // 3, total - 1):
            want = (base - 1e-4) * (1 - it / total) ** 0.9 + 1e-4
            assert lr_at(it) == pytest.approx(want, rel=1e-12), (flags, it)


def test_default_optimizer_is_sgd_with_momentum_and_coupled_weight_decay():
    """docs/training.md's segmentation recipe (the paper's, run in mmseg, whose SGD is torch's):
    SGD lr 1e-3, momentum 0.9, weight decay 1e-2, batch 2, 512 crops, 160k iterations. Three
    steps of the trainer's own optimizer and step on a linear loss equal heavy-ball SGD with L2
    weight decay added to the gradient, written out in float64 (no dampening, not Nesterov)."""
    from contextlib import nullcontext

    from ivt.engine import EagerStep
    args = train_seg.get_parser().parse_args(["--data", "unused"])
    assert (args.lr, args.momentum, args.weight_decay, args.batch_size, args.size,
            args.iters, args.clip_grad, args.clip_grad_value) == \
        (1e-3, 0.9, 1e-2, 2, 512, 160_000, 0.0, 0.0)
    model = torch.nn.Module()
    model.p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    start = model.p.detach().numpy().copy()
    optimizer = trainer.build_optimizer(SegTask(), model, args)
    assert type(optimizer) is torch.optim.SGD
    step = EagerStep(model, lambda m, b: (m.p * b["c"]).sum(), optimizer, nullcontext)
    slopes = [np.array([2.0, -0.3, -1.5, 0.1]), np.array([0.2, 0.9, -0.6, -3.0]),
              np.array([-1.0, 0.4, 0.25, 2.0])]
    lr, mu, wd = 1e-3, 0.9, 1e-2
    p, buf = start, None
    for c in slopes:                                   # d loss / d p = c
        step({"c": torch.from_numpy(c)}, lr)
        d = c + wd * p
        buf = d if buf is None else mu * buf + d
        p = p - lr * buf
    np.testing.assert_allclose(model.p.detach().numpy(), p, rtol=0, atol=1e-15)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
    """The 16-iteration run, in this process: (summary, {iter: loss}, its folder)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "full"
    with pytest.MonkeyPatch.context() as m:          # as the script_env fixture
        m.setenv("IVT_KERNELS", "auto")
        full = train_seg.main(tiny_args(data, out))
    reference = losses_after_last_start(read_log(out / "log.jsonl"))
    assert sorted(reference) == list(range(1, 17))
    return full, reference, out


def test_kill_and_resume_reproduces_losses(data, tmp_path, uninterrupted):
    full, reference, full_out = uninterrupted

    # The same run in a child, killed with SIGKILL at a random moment after its first checkpoint.
    out = tmp_path / "killed"
    run_killed_after_first_checkpoint("train_seg.py", tiny_args(data, out), out)
    killed_at = max(r["iter"] for r in read_log(out / "log.jsonl") if r["event"] == "train")
    assert killed_at < 16, "the child finished before it was killed"
    resumed_from = load_checkpoint(str(out / "last.pt"))["iter"]
    assert resumed_from in (4, 8, 12)

    # Only the folder and how this process runs: every other flag is the run's.
    summary = train_seg.main(["--out", str(out), "--resume", "--device", "cpu", "--workers", "0"])
    records = read_log(out / "log.jsonl")
    assert [r for r in records if r["event"] == "resume"][-1]["iter"] == resumed_from
    resumed = losses_after_last_start(records)
    assert sorted(resumed) == list(range(resumed_from + 1, 17))
    for it, loss in resumed.items():
        assert loss == pytest.approx(reference[it], abs=1e-6), it
    assert summary["metrics"]["mIoU"] == pytest.approx(full["metrics"]["mIoU"], abs=1e-6)
    a = load_checkpoint(str(full_out / "last.pt"))["model"]
    b = load_checkpoint(str(out / "last.pt"))["model"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_ctrl_c_writes_a_checkpoint_between_iterations_and_resume_continues(data, tmp_path,
                                                                             uninterrupted):
    """Ctrl-C as a terminal sends it, to the whole process group (the DataLoader workers too),
    between two evaluations: the run stops after its current iteration, writes last.pt there
    and exits with 130; --resume continues with the uninterrupted run's losses."""
    full, reference, _ = uninterrupted
    out = tmp_path / "interrupted"
    args = tiny_args(data, out, 16, 8)
    args[args.index("--workers") + 1] = "2"
    child = subprocess.Popen([sys.executable, str(ROOT / "train_seg.py"), *args], cwd=ROOT,
                             env=child_env(), start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "log.jsonl"
        while not (log.exists() and any(r["event"] == "train" and r["iter"] >= 9
                                        for r in read_log(log))):
            assert child.poll() is None, child.stdout.read()[-3000:]
            time.sleep(0.02)
        os.killpg(child.pid, signal.SIGINT)
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    assert child.returncode == 130, output[-3000:]
    assert "Traceback" not in output, output
    assert f"python {ROOT / 'train_seg.py'} --out {out} --resume continues it" in output, output
    stopped = [r for r in read_log(out / "log.jsonl") if r["event"] == "interrupted"]
    assert len(stopped) == 1 and stopped[0]["signal"] == "SIGINT"
    at = stopped[0]["iter"]
    assert 9 <= at < 16 and load_checkpoint(str(out / "last.pt"))["iter"] == at

    summary = train_seg.main(tiny_args(data, out, 16, 8, "--resume"))
    resumed = losses_after_last_start(read_log(out / "log.jsonl"))
    assert sorted(resumed) == list(range(at + 1, 17))
    for it, loss in resumed.items():
        assert loss == pytest.approx(reference[it], abs=1e-6), it
    assert summary["metrics"]["mIoU"] == pytest.approx(full["metrics"]["mIoU"], abs=1e-6)


def test_torchrun_two_cpu_processes_agree(data, tmp_path, capsys):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train_seg.py"), *tiny_args(data, out, 4, 2, "--save-rank-weights")]
    run = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = read_log(out / "log.jsonl")
    assert records[0]["world_size"] == 2
    assert [r["iter"] for r in records if r["event"] == "eval"] == [2, 4]
    ranks = [torch.load(out / f"trained_rank{r}.pt", weights_only=True) for r in (0, 1)]
    saved = load_checkpoint(str(out / "last.pt"))["model"]
    # Parameters are all-reduced; BatchNorm running statistics (updated per process) are
    # broadcast from rank 0 before each evaluation, the last one after the final step.
    assert ranks[0].keys() == ranks[1].keys() and set(ranks[0]) < set(saved)  # + frozen ones
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
        assert torch.equal(ranks[0][k], saved[k]), k
    # The sharded evaluation (confusion matrices all-reduced) equals one process evaluating
    # the saved checkpoint on the whole validation split.
    logged = [r for r in records if r["event"] == "eval"][-1]
    single = evaluate.main(["--data", str(data), "--checkpoint", str(out / "last.pt"),
                            "--split", "val", "--device", "cpu", "--workers", "0"])
    assert single["miou_all"] == pytest.approx(logged["mIoU"], abs=1e-9)
    # evaluate.py under torchrun: the same numbers, reported and written by rank 0 only
    metrics = tmp_path / "metrics.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "evaluate.py"), "--data", str(data), "--checkpoint", str(out / "last.pt"),
           "--split", "val", "--device", "cpu", "--workers", "0", "--json", str(metrics)]
    run = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("mIoU skips classes") == 1, run.stdout
    assert json.loads(metrics.read_text())["miou_all"] == pytest.approx(single["miou_all"],
                                                                         abs=1e-9)
    # One process would double the iterations per epoch and halve the effective batch.
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_seg.main(tiny_args(data, out, 4, 2, "--resume"))
    assert "world_size: checkpoint 2 vs now 1" in capsys.readouterr().err


def test_amp_bf16_runs(data, tmp_path, monkeypatch):
    """--amp trains and evaluates with the frozen weights stored in bf16 (`ivt.precision`); the
    checkpoint evaluated by evaluate.py (float32 model, its frozen weights stored in bf16 again,
    by default as the checkpoint trained) scores exactly what the run logged; --no-amp is float32
    and the --json file must not be a folder (an existing file is replaced)."""
    summary = train_seg.main(tiny_args(data, tmp_path / "amp", 2, 2, "--amp"))
    assert np.isfinite(summary["metrics"]["mIoU"])
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["config"]["amp"] is True
    assert ckpt["model"]["backbone.layers.0.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    common = ["--data", str(data), "--checkpoint", summary["last"], "--split", "val",
              "--device", "cpu", "--workers", "0"]
    single = evaluate.main(common)
    assert single["miou_all"] == pytest.approx(summary["metrics"]["mIoU"], abs=1e-9)
    assert evaluate.main(common + ["--amp"])["miou_all"] == single["miou_all"]
    metrics = tmp_path / "metrics.json"
    for _ in range(2):                     # an existing --json file is replaced, not refused
        evaluate.main(common + ["--json", str(metrics)])
    assert json.loads(metrics.read_text())["miou_all"] == single["miou_all"]
    stored = []
    monkeypatch.setattr(evaluate, "store_frozen_weights", lambda m, dtype: stored.append(dtype))
    evaluate.main(common + ["--no-amp"])
    assert stored == []                                            # float32 throughout
    (tmp_path / "file").write_text("")
    for bad in (["--json", str(tmp_path)], ["--json", str(tmp_path / "file" / "m.json")],
                ["--save-vis", str(tmp_path / "file" / "vis")]):
        evaluated = []                                  # refused before any evaluation
        monkeypatch.setattr(evaluate, "task_module", lambda task: evaluated.append(task))
        with pytest.raises(SystemExit) as e:
            evaluate.main(common + bad)
        assert e.value.code == 2 and evaluated == [], bad


def test_bad_data_fails_early_with_file_named(data, tmp_path):
    bad = tmp_path / "bad"
    write_mfnet(bad, n_train=4, n_val=2, n_test=2, size=(32, 48))
    name = (bad / "train.txt").read_text().split()[2]
    broken = bad / "images" / f"{name}.png"
    Image.new("RGB", (48, 32)).save(broken)                 # thermal channel lost
    run = subprocess.run([sys.executable, str(ROOT / "train_seg.py"),
                          *tiny_args(bad, tmp_path / "out")], cwd=ROOT, env=child_env(),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and str(broken) in run.stderr
    assert not (tmp_path / "out" / "log.jsonl").exists()    # failed before training


def test_missing_data_and_resume_file(data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(tmp_path / "nowhere", tmp_path / "out"))
    assert e.value.code == 2 and "nowhere" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(data, tmp_path / "out", 4, 4, "--resume"))
    assert e.value.code == 2 and "last.pt" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    real_loss = SegTask.loss

    def loss_turning_nan(self, model, batch, device):
        calls["n"] += 1
        loss = real_loss(self, model, batch, device)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(SegTask, "loss", loss_turning_nan)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as e:
        train_seg.main(tiny_args(data, out, 12, 4))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "loss is nan at iteration 6" in err and str(out / "last.pt") in err
    assert "iteration 4" in err
    ckpt = load_checkpoint(str(out / "last.pt"))
    assert ckpt["iter"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert read_log(out / "log.jsonl")[-1]["event"] == "diverged"


def test_best_checkpoint_is_the_best_validation_score(data, tmp_path, monkeypatch):
    """Validation mIoU 0.5, 0.7, 0.6 at iterations 4, 8, 12: best.pt holds iteration 8 (kept
    when last.pt is written again), last.pt iteration 12."""
    fake_validation_scores(monkeypatch, 0.5, 0.7, 0.6)
    out = tmp_path / "run"
    summary = train_seg.main(tiny_args(data, out, 12, 4))
    best, last = load_checkpoint(str(out / "best.pt")), load_checkpoint(str(out / "last.pt"))
    assert (best["iter"], best["best"], last["iter"], last["best"]) == (8, 0.7, 12, 0.7)
    assert summary["best"] == 0.7
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.jsonl"]


def test_evaluate_says_which_flags_a_segmentation_checkpoint_ignores(data, tmp_path, capsys,
                                                                     monkeypatch):
    summary = train_seg.main(tiny_args(data, tmp_path / "run", 2, 2))
    capsys.readouterr()
    common = ["--data", str(data), "--checkpoint", summary["last"], "--split", "test",
              "--device", "cpu", "--workers", "0"]
    evaluate.main(common + ["--max-dets", "5", "--split-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "warning: --max-dets applies to det checkpoints; ignored for this seg one" in err
    assert "warning: --split-dir applies to det" in err and "--split applies" not in err
    evaluate.main(common)
    assert "warning" not in capsys.readouterr().err
    for task in ("sod", "det"):        # the checkpoint says its task: another --task is refused
        with pytest.raises(SystemExit) as e:
            evaluate.main(common + ["--task", task])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"was trained for --task seg, not {task}" in err, err

    class Diverged:                    # a model whose outputs are not finite: status 1, not 2
        @staticmethod
        def evaluate_checkpoint(*args):
            raise TrainingDiverged("images/00001D.png: NaN or inf in the model's logits")

    monkeypatch.setattr(evaluate, "task_module", lambda task: Diverged)
    with pytest.raises(SystemExit) as e:
        evaluate.main(common)
    err = capsys.readouterr().err
    assert e.value.code == 1 and "error: images/00001D.png: NaN or inf" in err, err


def test_evaluate_outputs(data, tmp_path):
    summary = train_seg.main(tiny_args(data, tmp_path / "run", 2, 2))
    assert Path(summary["best_path"]).exists() and summary["best"] is not None
    metrics_file, vis_dir = tmp_path / "m.json", tmp_path / "vis"
    result = evaluate.main(["--task", "seg", "--data", str(data), "--checkpoint",
                            summary["last"], "--split", "test", "--json", str(metrics_file),
                            "--save-vis", str(vis_dir), "--device", "cpu", "--workers", "0"])
    saved = json.loads(metrics_file.read_text())
    assert saved["num_images"] == 4 == saved["num_day"] + saved["num_night"]
    for key in ("miou_all", "miou_day", "miou_night"):
        assert saved[key] == pytest.approx(result[key])
    assert saved["miou_all"] == pytest.approx(saved["all"]["mIoU"])
    # both averaging conventions, the RTFNet one <= mmseg's
    for part in ("all", "day", "night"):
        assert saved[part]["mIoU_nan0"] <= saved[part]["mIoU"] + 1e-9
    assert set(saved["all"]["IoU"]) == {"unlabeled", "car", "person", "bike", "curve", "car_stop",
                                        "guardrail", "color_cone", "bump"}
    # Day and night confusion matrices partition the whole set's pixels.
    assert saved["all"]["num_pixels"] == saved["day"]["num_pixels"] + saved["night"]["num_pixels"]
    assert saved["all"]["num_pixels"] == 4 * 32 * 48                # native resolution
    pngs = sorted(vis_dir.glob("*.png"))
    assert len(pngs) == 4
    with Image.open(pngs[0]) as im:
        assert im.size == (4 * 48, 32) and im.mode == "RGB"
    # Evaluating the validation split reproduces the training script's final evaluation.
    val = evaluate.main(["--data", str(data), "--checkpoint", summary["last"], "--split", "val",
                         "--device", "cpu", "--workers", "0"])
    assert val["miou_all"] == pytest.approx(summary["metrics"]["mIoU"], abs=1e-9)

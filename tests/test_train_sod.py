"""train_sod.py and evaluate.py --task sod end to end on tiny synthetic VT data (swin_nano):
a short run, the saved validation list, exact resumption after kill -9, two test sets in one
evaluate call with --json and --save-vis, --help showing the recipe, the default optimizer
(Adam without weight decay on gradients clamped to +-0.5) against Adam written out by hand, and
--taps as a saved model setting."""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train_sod  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import write_vt  # noqa: E402
from ivt.engine import EagerStep  # noqa: E402
from ivt.graph_step import _make_capture_safe  # noqa: E402
from ivt.tasks import load_trained  # noqa: E402
from ivt.tasks.sod import SODTask  # noqa: E402
from ivt.trainer import build_optimizer, schedule  # noqa: E402
from script_runs import read_log, run_killed_after_first_checkpoint  # noqa: E402


pytestmark = pytest.mark.usefixtures("script_env")


def tiny_args(data, out, iters=8, *extra):
    return ["--data", str(data), "--out", str(out), "--backbone", "swin_nano", "--d2", "8",
            "--size", "32", "--batch-size", "2", "--iters", str(iters), "--val-count", "2",
            "--eval-every", "4", "--log-every", "1", "--workers", "0", "--device", "cpu",
            "--kernels", "torch", "--lr", "1e-3", *extra]


@pytest.fixture(scope="module")
def vt(tmp_path_factory):
    root = tmp_path_factory.mktemp("vt")
    write_vt(root, n_train=8, n_test=3, n_vt1000=2, n_vt821=2, size=(32, 40))
    return root


def test_help_shows_the_recipe(capsys):
    with pytest.raises(SystemExit):
        train_sod.main(["--help"])
    text = capsys.readouterr().out
    for piece in ("5e-05", "0.1", "199", "384", "--lr-drop-epoch", "99", "adam", "grayscale",
                  "--val-count", "--resume", "--pretrained", "--variant", "--kernels", "--amp",
                  "--weight-decay 0.1", "clamped to +-0.5", "--augment", "--taps",
                  "SOD-IV-tuning/data.py"):
        assert piece in text, piece
    for action in train_sod.get_parser()._actions:
        assert action.help, action.option_strings


def test_train_resume_after_kill_and_evaluate_two_sets(vt, tmp_path):
    train = vt / "VT5000" / "Train"
    full = train_sod.main(tiny_args(train, tmp_path / "full"))
    val = (tmp_path / "full" / "val_list.txt").read_text().split()
    assert len(val) == 2 and set(val) <= {p.stem for p in (train / "GT").iterdir()}
    reference = {r["iter"]: r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl")
                 if r["event"] == "train"}
    assert sorted(reference) == list(range(1, 9))

    out = tmp_path / "killed"
    run_killed_after_first_checkpoint("train_sod.py", tiny_args(train, out), out)
    resumed_from = load_checkpoint(str(out / "last.pt"))["iter"]
    assert resumed_from in (4, 8)
    summary = train_sod.main(tiny_args(train, out, 8, "--resume"))
    records = read_log(out / "log.jsonl")
    last = max(i for i, r in enumerate(records) if r["event"] in ("start", "resume"))
    for r in records[last:]:
        if r["event"] == "train":
            assert r["loss"] == pytest.approx(reference[r["iter"]], abs=1e-6), r["iter"]
    assert summary["metrics"]["S"] == pytest.approx(full["metrics"]["S"], abs=1e-6)

    metrics, vis = tmp_path / "m.json", tmp_path / "vis"
    sets = [vt / "VT1000", vt / "VT821"]
    result = evaluate.main(["--task", "sod", "--checkpoint", full["last"], "--data",
                            str(sets[0]), "--data", str(sets[1]), "--json", str(metrics),
                            "--save-vis", str(vis), "--device", "cpu", "--workers", "0"])
    saved = json.loads(metrics.read_text())
    assert saved["task"] == "sod" and len(saved["sets"]) == 2
    for key in ("S", "wF", "adpE", "meanE", "maxE", "adpF", "meanF", "maxF", "MAE"):
        for name in saved["sets"]:
            assert saved["sets"][name][key] == pytest.approx(result["sets"][name][key])
            assert 0.0 <= saved["sets"][name]["MAE"] <= 1.0
    pngs = sorted(vis.glob("*/*.png"))
    assert len(pngs) == 4
    gt = sets[0] / "GT" / f"{pngs[0].stem}.png"
    with Image.open(pngs[0]) as p, Image.open(gt) as g:
        assert p.size == g.size and p.mode == "L"                 # 8-bit, at GT size
    assert len(list(vis.glob("*/figures/*.png"))) == 4
    # The printed numbers are PySODMetrics' on the saved maps (when the test extra is installed).
    pytest.importorskip("py_sod_metrics")
    from test_sod_metric import reference
    for root in sets:
        name = root.as_posix()
        pairs = [(np.array(Image.open(png)),
                  np.array(Image.open(next((root / "GT").glob(f"{png.stem}.*"))).convert("L")))
                 for png in sorted((vis / name.replace("/", "_").lstrip("._")).glob("*.png"))]
        assert len(pairs) == 2
        for key, value in reference(pairs)[0].items():
            assert result["sets"][name][key] == pytest.approx(value, abs=1e-9), (name, key)


def test_torchrun_two_cpu_processes_gather_the_whole_validation_set(vt, tmp_path):
    out = tmp_path / "ddp"
    train = vt / "VT5000" / "Train"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", str(ROOT / "train_sod.py"),
                          *tiny_args(train, out, 2, "--val-count", "3", "--taps", "release")],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # --taps release: stage 4 feeds no output, so nothing in it may be left trainable (DDP
    # refuses parameters that get no gradient)
    logged = [r for r in read_log(out / "log.jsonl") if r["event"] == "eval"][-1]
    # The validation images were split over two processes and gathered; one process scoring
    # the same list with the saved checkpoint gets the same metrics.
    val = tmp_path / "val"
    for sub in ("RGB", "T", "GT"):
        (val / sub).mkdir(parents=True)
    for stem in (out / "val_list.txt").read_text().split():
        for sub in ("RGB", "T", "GT"):
            src = next((train / sub).glob(f"{stem}.*"))
            (val / sub / src.name).write_bytes(src.read_bytes())
    single = evaluate.main(["--checkpoint", str(out / "last.pt"), "--data", str(val),
                            "--device", "cpu", "--workers", "0"])
    (name, result), = single["sets"].items()
    assert result["num_images"] == 3
    for key in ("S", "maxF", "MAE", "wF"):
        assert result[key] == pytest.approx(logged[key], abs=1e-6), key


def test_default_optimizer_is_adam_without_weight_decay_on_clamped_gradients():
    """The SOD defaults (SOD-IV-tuning/CPNet_train.py: `torch.optim.Adam(params, lr)`, batch 8,
    `clip_gradient(optimizer, 0.5)` before each step): two steps of the trainer's own optimizer
    and step on a linear loss whose gradient values lie on both sides of +-0.5 equal Adam written
    out in float64 on the clamped gradients, with no weight-decay term."""
    args = train_sod.get_parser().parse_args(["--data", "unused"])
    assert (args.lr, args.weight_decay, args.clip_grad_value, args.clip_grad) == \
        (5e-5, 0.0, 0.5, 0.0)
    assert (args.augment, args.taps) == ("release", "stages")
    assert (args.batch_size, args.size) == (8, 384)          # docs/training.md's SOD recipe
    model = nn.Module()
    model.p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5, -0.25], dtype=torch.float64))
    start = model.p.detach().numpy().copy()
    optimizer = build_optimizer(SODTask(), model, args)
    assert type(optimizer) is torch.optim.Adam
    step = EagerStep(model, lambda m, b: (m.p * b["c"]).sum(), optimizer, contextlib.nullcontext,
                     args.clip_grad, args.clip_grad_value)
    slopes = [np.array([2.0, -0.3, -1.5, 0.1, 0.7]), np.array([0.2, 0.9, -0.6, -3.0, 0.45])]
    for c in slopes:                                   # d loss / d p = c
        step({"c": torch.from_numpy(c)}, args.lr)

    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 5e-5           # torch.optim.Adam's defaults
    p, m, v = start, 0.0, 0.0
    for t, c in enumerate(slopes, start=1):
        g = np.minimum(np.maximum(c, -0.5), 0.5)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(model.p.detach().numpy(), p, rtol=0, atol=1e-15)


def test_release_taps_are_saved_used_by_evaluate_and_fixed_on_resume(vt, tmp_path, capsys):
    train = vt / "VT5000" / "Train"
    out = tmp_path / "release"
    summary = train_sod.main(tiny_args(train, out, 2, "--taps", "release",
                                       "--eval-every", "0"))
    ckpt = load_checkpoint(summary["last"])
    assert ckpt["config"]["taps"] == "release" and ckpt["config"]["augment"] == "release"
    _, model, _ = load_trained(summary["last"])
    assert model.backbone.taps == "release"
    stage4 = [p for n, p in model.backbone.named_parameters() if n.startswith("layers.3.blocks.")]
    assert stage4 and not any(p.requires_grad for p in stage4)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        train_sod.main(tiny_args(train, out, 4, "--taps", "stages", "--eval-every", "0",
                                 "--resume", "--allow-changes"))
    assert "taps: checkpoint 'release' vs now 'stages'" in capsys.readouterr().err


def test_a_cuda_graph_runs_checkpoint_resumes_with_eager_steps(vt, tmp_path):
    """A --cuda-graph run saves Adam's groups in their capture-safe form (capturable, a tensor
    lr); resumed without the graph (here on the CPU, where capturable Adam refuses to step) the
    run's eager settings apply."""
    train = vt / "VT5000" / "Train"
    out = tmp_path / "run"
    summary = train_sod.main(tiny_args(train, out, 2, "--eval-every", "0"))
    ckpt = load_checkpoint(summary["last"])
    groups = [{**g, "params": [nn.Parameter(torch.zeros(1)) for _ in g["params"]]}
              for g in ckpt["optimizer"]["param_groups"]]
    graphed = torch.optim.Adam(groups)
    graphed.load_state_dict(ckpt["optimizer"])
    _make_capture_safe(graphed, torch.device("cpu"))          # what GraphedTrainStep does
    ckpt["optimizer"] = graphed.state_dict()
    assert all(g["capturable"] for g in ckpt["optimizer"]["param_groups"])
    torch.save(ckpt, summary["last"])
    summary = train_sod.main(tiny_args(train, out, 3, "--eval-every", "0", "--resume",
                                       "--allow-changes"))
    groups = load_checkpoint(summary["last"])["optimizer"]["param_groups"]
    assert not any(g["capturable"] for g in groups)
    assert all(isinstance(g["lr"], float) for g in groups)


def test_weight_decay_flag_is_adams_coupled_l2():
    """docs/training.md: `--weight-decay 0.1` gives the paper's literal reading, coupled L2 in
    Adam: the decay term wd * p is added to the gradient before Adam's moments (torch.optim.Adam's
    algorithm), written out in float64 for two steps; decoupled decay (AdamW: p (1 - lr wd)) or
    none would leave p almost where it was."""
    args = train_sod.get_parser().parse_args(["--data", "unused", "--weight-decay", "0.1",
                                              "--clip-grad-value", "0"])
    model = nn.Module()
    model.p = nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64))
    start = model.p.detach().numpy().copy()
    optimizer = build_optimizer(SODTask(), model, args)
    step = EagerStep(model, lambda m, b: (m.p * b["c"]).sum(), optimizer, contextlib.nullcontext,
                     args.clip_grad, args.clip_grad_value)
    slopes = [np.array([0.0, 0.0, 0.0, 0.0]), np.array([0.2, -0.4, 0.1, -0.05])]
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 5e-5, 0.1   # torch.optim.Adam's defaults
    p, m, v = start, 0.0, 0.0
    for t, c in enumerate(slopes, start=1):
        step({"c": torch.from_numpy(c)}, lr)
        g = c + wd * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(model.p.detach().numpy(), p, rtol=0, atol=1e-15)


def test_default_schedule_is_the_releases_epoch_loop():
    """SOD-IV-tuning/CPNet_train.py: `for epoch in range(1, opt.epoch)` with opt.epoch 200, each
    epoch at `adjust_lr`'s lr * decay_rate ** (epoch // decay_epoch), decay 0.1 every 100."""
    args = train_sod.get_parser().parse_args(["--data", "unused"])
    per_epoch = 3
    iters, lr_at = schedule(SODTask(), args, per_epoch)
    release = [5e-5 * 0.1 ** (epoch // 100) for epoch in range(1, 200)]
    assert iters == len(release) * per_epoch
    for i, lr in enumerate(release):
        for it in range(i * per_epoch, (i + 1) * per_epoch):
            assert lr_at(it) == pytest.approx(lr, rel=1e-12), (i, it)


def test_validation_split_is_fixed_on_resume_and_val_count_checked(vt, tmp_path, capsys):
    """A resumed run keeps its validation images (val_list.txt): --val-count or --val-list
    changed on resume is refused, even with --allow-changes, not accepted and then ignored."""
    train = vt / "VT5000" / "Train"
    out = tmp_path / "run"
    train_sod.main(tiny_args(train, out, 2, "--eval-every", "0"))
    held = (out / "val_list.txt").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_sod.main(tiny_args(train, out, 4, "--eval-every", "0", "--resume",
                                 "--allow-changes", "--val-count", "3"))
    assert e.value.code == 2
    assert "val_count: checkpoint 2 vs now 3" in capsys.readouterr().err
    assert (out / "val_list.txt").read_text() == held
    with pytest.raises(SystemExit) as e:
        train_sod.main(tiny_args(train, tmp_path / "neg", 2, "--val-count", "-3"))
    assert e.value.code == 2 and "--val-count must not be negative" in capsys.readouterr().err
    assert not (tmp_path / "neg").exists()


def test_a_run_continued_into_a_new_folder_keeps_its_validation_split(vt, tmp_path):
    """The list beside the continued checkpoint is the split, also with another --seed (which
    draws another split), and is copied into the new --out; a run continued in its own folder
    reads its list and leaves the file as it is (other processes read it at that moment)."""
    train = vt / "VT5000" / "Train"
    out, moved = tmp_path / "run", tmp_path / "moved"
    train_sod.main(tiny_args(train, out, 2, "--eval-every", "0", "--val-count", "3"))
    held = (out / "val_list.txt").read_text()
    train_sod.main(tiny_args(train, moved, 4, "--eval-every", "0", "--val-count", "3",
                             "--resume", str(out / "last.pt"), "--seed", "5",
                             "--allow-changes"))
    assert (moved / "val_list.txt").read_text() == held
    written = (moved / "val_list.txt").stat().st_mtime_ns
    train_sod.main(tiny_args(train, moved, 6, "--eval-every", "0", "--val-count", "3",
                             "--resume", "--seed", "5", "--allow-changes"))
    assert (moved / "val_list.txt").stat().st_mtime_ns == written


def test_resume_refuses_another_epoch_length_for_a_schedule_in_epochs(vt, tmp_path, capsys):
    """The step schedule counts epochs: a checkpoint after 1 of 2 epochs of 3 iterations
    (batch 2) resumed at batch 3 (2 iterations an epoch) would read its 3 iterations as 1.5
    epochs (it trained a quarter of an epoch less, the lr dropped mid-epoch): refused, naming the
    way on, --iters 6 (the run's length in its iterations), which keeps the lr drop at 3."""
    train = vt / "VT5000" / "Train"
    out = tmp_path / "run"
    args = tiny_args(train, out, 0, "--eval-every", "0", "--epochs", "1", "--lr-drop-epoch", "1")
    args = args[:args.index("--iters")] + args[args.index("--iters") + 2:]
    first = train_sod.main(args)
    ckpt = load_checkpoint(first["last"])
    assert (ckpt["iter"], ckpt["config"]["per_epoch"]) == (3, 3)
    more = ["--resume", "--epochs", "2", "--batch-size", "3", "--allow-changes"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_sod.main(args + more)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert ("stopped after iteration 3, epoch 1 of epochs of 3 iterations; an epoch is now 2 "
            "(--batch-size 3 on 1 process(es)), which would read it as epoch 1.5") in err, err
    assert "--iters 6 --allow-changes keeps its length and lr drops" in err, err
    assert load_checkpoint(str(out / "last.pt"))["iter"] == 3
    train_sod.main(args + more + ["--iters", "6"])
    lrs = {r["iter"]: r["lr"] for r in read_log(out / "log.jsonl") if r["event"] == "train"}
    assert lrs[4] == pytest.approx(1e-4) and lrs[6] == pytest.approx(1e-4)
    assert load_checkpoint(str(out / "last.pt"))["iter"] == 6


def test_val_count_zero_resumes_and_a_list_of_every_image_is_refused(vt, tmp_path, capsys):
    """--val-count 0 trains on every image and selects on them: no list is saved, and the run
    resumes (it read its all-stems list back as held-out images: 'empty stem list'). A
    --val-list naming every image leaves none to train on: said so, up front."""
    train = vt / "VT5000" / "Train"
    out = tmp_path / "all"
    train_sod.main(tiny_args(train, out, 2, "--val-count", "0", "--eval-every", "0"))
    assert not (out / "val_list.txt").exists()
    summary = train_sod.main(tiny_args(train, out, 4, "--val-count", "0", "--eval-every", "0",
                                       "--resume", "--allow-changes"))
    assert load_checkpoint(summary["last"])["iter"] == 4
    every = tmp_path / "every.txt"
    every.write_text("\n".join(p.stem for p in (train / "GT").iterdir()))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_sod.main(tiny_args(train, tmp_path / "none", 2, "--val-list", str(every)))
    assert e.value.code == 2
    assert "lists every one of the 8 images" in capsys.readouterr().err


def test_evaluate_reads_every_set_before_scoring_any(vt, tmp_path, capsys, monkeypatch):
    """A misspelt last --data (or two naming the same set) stops evaluate.py before the first
    set's evaluation, not after the others were scored and thrown away."""
    import ivt.tasks.sod as sod
    run = train_sod.main(tiny_args(vt / "VT5000" / "Train", tmp_path / "run", 2,
                                   "--eval-every", "0"))

    def scored(*args, **kwargs):
        raise AssertionError("a set was evaluated before every --data was checked")

    monkeypatch.setattr(sod, "evaluate_sod", scored)
    for second, message in [(vt / "VT8210", "VT8210/RGB not found"),
                            (f"{vt / 'VT1000'}/", "name the same set")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--task", "sod", "--checkpoint", run["last"], "--data",
                           str(vt / "VT1000"), "--data", str(second), "--device", "cpu",
                           "--workers", "0"])
        assert e.value.code == 2
        assert message in capsys.readouterr().err


def test_resume_with_epochs_given_drops_the_runs_iterations(vt, tmp_path, capsys):
    """A run of --iters 2 continued with only --epochs 2 (--allow-changes): --iters, which would
    take precedence, is not taken from the run, so the run trains 2 epochs (3 iterations each:
    6 training images, batch 2) instead of accepting a change that does nothing."""
    out = tmp_path / "run"
    train_sod.main(tiny_args(vt / "VT5000" / "Train", out, 2))
    summary = train_sod.main(["--out", str(out), "--resume", "--epochs", "2", "--allow-changes",
                              "--device", "cpu", "--workers", "0"])
    assert summary["iters"] == 6 and load_checkpoint(str(out / "last.pt"))["iter"] == 6
    assert "iters: checkpoint 2 vs now None" in capsys.readouterr().out


def test_a_changed_size_chooses_best_pt_anew(vt, tmp_path, capsys):
    """SOD evaluates at --size: a score at 64 px is not compared with one at 32 px."""
    out = tmp_path / "run"
    train_sod.main(tiny_args(vt / "VT5000" / "Train", out, 4))
    capsys.readouterr()
    train_sod.main(["--out", str(out), "--resume", "--iters", "8", "--size", "64",
                    "--allow-changes", "--device", "cpu", "--workers", "0"])
    assert "the validation changed (size): best.pt is chosen anew" in capsys.readouterr().out
    assert load_checkpoint(str(out / "best.pt"))["iter"] == 8

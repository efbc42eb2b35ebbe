"""train_det.py and evaluate.py --task det end to end: a tiny detector (swin_nano, hidden 16)
on synthetic M3FD data for a few iterations, exact resumption after a kill, evaluation on the
real M3FD sample pair with --json and --save-vis, and --help showing the recipe."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train_det  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import write_m3fd  # noqa: E402
from ivt.models.detr import DetectorConfig, build_detector  # noqa: E402
from ivt.tasks.det import DetTask, detector_config  # noqa: E402
from script_runs import read_log, run_killed_after_first_checkpoint, run_torchrun  # noqa: E402

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
                  "--no-denoising", "--bad-boxes", "CO-DETR", "--dn-number", "--box-noise 1.0",
                  "--label-noise", "--encoder", "hybrid", "--ffn-dim", "mmdet"):
        assert piece in text, piece
    for action in train_det.get_parser()._actions:
        assert action.help, action.option_strings


def test_optimiser_defaults_are_the_papers_detection_recipe():
    """spec/method.md (detection) and the authors' DINO config: AdamW lr 1e-4, weight decay 1e-4,
    36 epochs, lr x0.1 at epochs 27 and 33, batch 2, 640 inputs, gradient norm clipped at 0.1,
    no clipping by value."""
    args = train_det.get_parser().parse_args(["--data", "M3FD"])
    assert (args.lr, args.weight_decay, args.epochs, args.lr_drop_epoch, args.batch_size,
            args.size, args.clip_grad, args.clip_grad_value) == \
        (1e-4, 1e-4, 36, [27, 33], 2, 640, 0.1, 0.0)


def test_the_optimiser_decays_weights_decoupled_as_adamw():
    """AdamW (Loshchilov & Hutter): on a zero gradient one step is p <- p (1 - lr wd), with the
    backbone's lr x0.1; Adam with L2 weight decay (coupled) would move p by about lr instead."""
    from contextlib import nullcontext

    from ivt.engine import EagerStep
    from ivt.trainer import build_optimizer
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2)
    model.head = torch.nn.Linear(2, 2)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = train_det.get_parser().parse_args(["--data", "x", "--lr", "0.1",
                                              "--weight-decay", "0.5"])
    optimizer = build_optimizer(DetTask(), model, args)
    step = EagerStep(model, lambda m, batch: sum((p * 0).sum() for p in m.parameters()),
                     optimizer, nullcontext)
    step({}, 0.1)
    for name, value in model.state_dict().items():
        mult = 0.1 if name.startswith("backbone.") else 1.0
        torch.testing.assert_close(value, start[name] * (1 - 0.1 * mult * 0.5), rtol=1e-6,
                                   atol=0)


def test_adamw_steps_are_torchs_published_algorithm_on_real_gradients():
    """torch.optim.AdamW's documented algorithm (betas 0.9/0.999, eps 1e-8, no amsgrad) written
    out in float64 over three steps of the trainer's own optimizer and step with non-zero
    gradients: decoupled decay p (1 - lr wd) first, then Adam's bias-corrected moments; the
    backbone at lr x --backbone-lr-mult. The gradients shrink after the first step so that
    amsgrad's running maximum of the second moment would differ."""
    from contextlib import nullcontext

    from ivt.engine import EagerStep
    from ivt.trainer import build_optimizer
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    model.head = torch.nn.Parameter(torch.tensor([3.0, -0.25], dtype=torch.float64))
    args = train_det.get_parser().parse_args(["--data", "x", "--lr", "0.01",
                                              "--weight-decay", "0.5",
                                              "--backbone-lr-mult", "0.2"])
    optimizer = build_optimizer(DetTask(), model, args)
    step = EagerStep(model, lambda m, b: (m.backbone.p * b["a"]).sum() + (m.head * b["b"]).sum(),
                     optimizer, nullcontext)
    slopes = [([2.0, -1.0, 3.0], [4.0, -0.5]), ([0.01, 0.02, -0.03], [0.0, 0.001]),
              ([-0.02, 0.0, 0.01], [0.03, -0.002])]
    b1, b2, eps, lr, wd = 0.9, 0.999, 1e-8, 0.01, 0.5
    want = {"a": (model.backbone.p.detach().clone(), 0.2), "b": (model.head.detach().clone(), 1.0)}
    moments = {k: (0.0, 0.0) for k in want}
    for t, (a, b) in enumerate(slopes, start=1):
        grads = {"a": torch.tensor(a, dtype=torch.float64),
                 "b": torch.tensor(b, dtype=torch.float64)}
        step(grads, lr)
        for k, g in grads.items():
            p, mult = want[k]
            m, v = moments[k]
            p = p * (1 - lr * mult * wd)
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p = p - lr * mult * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
            want[k], moments[k] = (p, mult), (m, v)
    torch.testing.assert_close(model.backbone.p.detach(), want["a"][0], rtol=0, atol=1e-15)
    torch.testing.assert_close(model.head.detach(), want["b"][0], rtol=0, atol=1e-15)


def test_detector_flags_reach_the_config():
    """Defaults: RT-DETR's hybrid encoder (6 deformable layers with --encoder deformable), and
    DINO's FFN 2048, 100 denoising queries, label noise 0.5, box noise 0.4; --no-denoising is
    --dn-number 0."""
    parser = train_det.get_parser()
    args = vars(parser.parse_args(["--data", "M3FD"]))
    cfg = detector_config(args)
    assert (cfg.encoder, cfg.enc_layers, cfg.ffn_dim) == ("hybrid", 6, 2048)
    assert (cfg.dn_number, cfg.label_noise_ratio, cfg.box_noise_scale) == (100, 0.5, 0.4)
    args = vars(parser.parse_args(["--data", "M3FD", "--encoder", "deformable", "--dn-number", "30",
                                   "--box-noise", "1.0", "--label-noise", "0.2",
                                   "--ffn-dim", "64"]))
    cfg = detector_config(args)
    assert (cfg.encoder, cfg.dn_number, cfg.box_noise_scale, cfg.label_noise_ratio,
            cfg.ffn_dim) == ("deformable", 30, 1.0, 0.2, 64)
    assert detector_config(vars(parser.parse_args(["--data", "M3FD",
                                                   "--no-denoising"]))).dn_number == 0


@pytest.mark.parametrize("tuning", ["ivt", "full"])
def test_every_backbone_parameter_that_trains_gets_the_backbone_lr_mult(tuning):
    """The authors' mmdet config:
    `paramwise_cfg=dict(custom_keys=dict(backbone=dict(lr_mult=0.1)))`, which mmengine matches as
    the substring 'backbone' in a parameter's name; their IV-tuning modules were built inside the
    Swin backbone, so they trained at 0.1x as well."""
    ivt_options = ["--d2", "8"] if tuning == "ivt" else []
    args = train_det.get_parser().parse_args(["--data", "x", "--backbone", "swin_nano",
                                              *ivt_options, "--hidden-dim", "16", "--ffn-dim", "16",
                                              "--size", "64", "--tuning", tuning])
    assert args.backbone_lr_mult == 0.1
    task = DetTask()
    model = task.build_model({"task": "det", **vars(args)}, None)
    mult = {id(p): g["lr_mult"] for g in task.param_groups(model, args) for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(mult) == len(trained)
    in_backbone = [n for n, _ in trained if "backbone" in n]
    assert any("adapter" in n or "prompt" in n for n in in_backbone) == (tuning == "ivt")
    assert len(in_backbone) > 0 and len(in_backbone) < len(trained)
    for name, p in trained:
        assert mult[id(p)] == (0.1 if "backbone" in name else 1.0), name


def test_a_frozen_backbone_leaves_its_group_empty_and_the_detector_trains():
    """--tuning freeze (the paper's baseline: only the head trains): the backbone's parameter
    group is empty, which is no error while any group has parameters; only a model with nothing
    to train is refused."""
    from ivt.trainer import build_optimizer
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 2).requires_grad_(False)
    model.head = torch.nn.Linear(2, 2)
    args = train_det.get_parser().parse_args(["--data", "x"])
    optimizer = build_optimizer(DetTask(), model, args)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 0]
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(DetTask(), model, args)


def test_ignored_boxes_are_not_training_targets():
    """`DetTask.loss` drops boxes marked ignore (VOC difficult, COCO iscrowd), as mmdet's
    PackDetInputs drops gt_ignore_flags instances: the loss equals that of the batch without
    them (same denoising noise), not that of training them as objects."""
    torch.manual_seed(0)
    model = build_detector("swin_nano", DetectorConfig(
        num_classes=6, hidden_dim=16, num_queries=8, encoder="deformable", enc_layers=1,
        dec_layers=1, num_heads=2, num_points=2, ffn_dim=32, dn_number=4), tuning="ivt").train()
    g = torch.Generator().manual_seed(0)
    vis, ir = torch.randn(2, 3, 64, 64, generator=g), torch.randn(2, 3, 64, 64, generator=g)
    boxes, labels = (torch.tensor([[4.0, 4, 30, 40], [20, 10, 60, 30], [0, 40, 20, 60]]),
                     torch.tensor([0, 1, 2]))
    marked = [{"boxes": boxes, "labels": labels, "ignore": torch.tensor([False, True, False])},
              {"boxes": boxes[:1], "labels": labels[:1], "ignore": torch.tensor([True])}]
    kept = [{"boxes": boxes[[0, 2]], "labels": labels[[0, 2]]},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    trained_all = [{"boxes": t["boxes"], "labels": t["labels"]} for t in marked]

    def task_loss(targets):
        torch.manual_seed(1)
        batch = {"vis": vis, "ir": ir, "targets": targets}
        return DetTask().loss(model, batch, torch.device("cpu")).item()

    def model_loss(targets):
        torch.manual_seed(1)
        return model.loss(model(vis, ir, targets), targets)["loss"].item()

    assert task_loss(marked) == pytest.approx(model_loss(kept), rel=1e-6)
    assert task_loss(marked) != pytest.approx(model_loss(trained_all), rel=1e-3)


def test_train_resume_and_evaluate(m3fd, tmp_path, capsys):
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
    capsys.readouterr()
    result = evaluate.main(["--task", "det", "--checkpoint", full["last"], "--data", str(data),
                            "--split-dir", str(data), "--split", "test", "--json", str(metrics),
                            "--save-vis", str(vis), "--device", "cpu", "--workers", "0"])
    saved = json.loads(metrics.read_text())
    assert saved["task"] == "det" and saved["num_images"] == 1
    assert "warning" not in capsys.readouterr().err    # --split and --split-dir are det flags
    assert saved["max_dets"] == 100            # pycocotools' default limit (docs/data.md)
    assert saved.keys() == result.keys()      # --json holds every returned entry
    for key in ("mAP", "mAP50", "mAP75", "mAP_s", "mAP_m", "mAP_l"):
        assert key in saved and saved[key] == pytest.approx(result[key], nan_ok=True)
    assert len(list(vis.glob("*.png"))) == 1
    # The run's split folder (saved absolute) absent where evaluate runs: named, with the flag.
    ckpt = load_checkpoint(full["last"])
    ckpt["config"]["split_dir"] = str(tmp_path / "elsewhere")
    torch.save(ckpt, tmp_path / "moved.pt")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--task", "det", "--checkpoint", str(tmp_path / "moved.pt"), "--data",
                       str(data), "--split", "test", "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(tmp_path / "elsewhere") in err and "--split-dir" in err


def test_torchrun_resume_gives_each_rank_its_own_random_state(m3fd, tmp_path):
    """Denoising draws noise per box, so the two ranks' RNG streams part after the first step:
    resumed from iteration 2, each rank continues its own stream and the losses repeat the
    uninterrupted run's (no lr drop within 4 iterations, so --iters changes nothing else)."""
    common = ("--lr-drop-epoch", "100", "--eval-every", "2")
    run_torchrun("train_det.py", tiny_args(m3fd, tmp_path / "full", 4, *common))
    run_torchrun("train_det.py", tiny_args(m3fd, tmp_path / "cut", 2, *common))
    run_torchrun("train_det.py", tiny_args(m3fd, tmp_path / "cut", 4, *common, "--resume",
                                           "--allow-changes"))
    full = {r["iter"]: r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl")
            if r["event"] == "train"}
    records = read_log(tmp_path / "cut" / "log.jsonl")
    start = max(i for i, r in enumerate(records) if r["event"] == "resume")
    resumed = {r["iter"]: r["loss"] for r in records[start:] if r["event"] == "train"}
    assert sorted(resumed) == [3, 4]
    for it, loss in resumed.items():
        assert loss == pytest.approx(full[it], abs=1e-6), it


def test_size_must_be_a_multiple_of_32(m3fd, tmp_path, capsys):
    """Each feature level is read as spanning the whole image: at 100x100 the stride-32 level's
    4 cells would cover 128 pixels."""
    args = tiny_args(m3fd, tmp_path / "run", 2)
    args[args.index("--size") + 1] = "100"
    with pytest.raises(SystemExit) as e:
        train_det.main(args)
    assert e.value.code == 2
    assert "--size must be a multiple of 32 for det, got 100" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_never_changes_the_detectors_settings(m3fd, tmp_path, capsys):
    """--num-queries (and the detector's other sizes) define the model: --allow-changes accepts
    training settings only."""
    out = tmp_path / "run"
    train_det.main(tiny_args(m3fd, out, 1))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        train_det.main(tiny_args(m3fd, out, 2, "--resume", "--allow-changes", "--num-queries", "4"))
    assert e.value.code == 2
    assert "num_queries: checkpoint 8 vs now 4" in capsys.readouterr().err


def test_evaluation_scores_the_detectors_300_best_per_image_limited_per_class(tmp_path):
    """As DINO and mmdet evaluate: the detector keeps its 300 best (query, class) pairs per
    image, then the metric its `max_dets` per image AND class (pycocotools). On the real M3FD
    sample (7 Car, 1 Lamp), a detector whose 242 best pairs are Car boxes on empty ground
    (score 0.2) and whose 8 next are the ground truth itself (0.1): the Lamp is found (AP 100;
    a cut at 100 per image across classes lost it), no Car is (100 Car detections per image are
    scored, all empty ground)."""
    from ivt.data import M3FDDataset
    from ivt.engine import DistInfo
    from ivt.tasks.det import evaluate_det
    sample = ROOT / "tests" / "data" / "m3fd_sample"
    (tmp_path / "one.txt").write_text("00471\n")
    ds = M3FDDataset(sample, split="one", split_dir=tmp_path, train=False, size=64)
    boxes, labels, _ = ds.gt(0)
    (h0, w0), K = ds[0]["orig_size"], len(ds.classes)
    assert sorted(ds.classes[int(c)] for c in labels) == ["Car"] * 7 + ["Lamp"]
    xyxy = torch.as_tensor(boxes, dtype=torch.float32) / torch.tensor([w0, h0, w0, h0])
    truth = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
    junk = 242
    logits = torch.full((1, 8 + junk, K), -30.0)
    logits[0, :junk, ds.classes.index("Car")] = torch.logit(torch.tensor(0.2))
    logits[0, junk + torch.arange(8), torch.as_tensor(labels)] = torch.logit(torch.tensor(0.1))
    pred_boxes = torch.cat([torch.tensor([[0.995, 0.005, 0.004, 0.004]]).expand(junk, 4), truth])
    model = build_detector("swin_nano", DetectorConfig(num_classes=K, hidden_dim=32,
                                                       num_queries=12, enc_layers=1,
                                                       dec_layers=1, ffn_dim=32))
    model.forward = lambda vis, ir, targets=None: {"pred_logits": logits,
                                                   "pred_boxes": pred_boxes[None]}
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    r = evaluate_det(model, ds, single, lambda: torch.autocast("cpu", enabled=False)).compute()
    assert r["AP_per_class"]["Lamp"] == pytest.approx(100.0) and r["AP_per_class"]["Car"] == 0.0


def test_evaluation_refuses_boxes_with_nan(tmp_path):
    """A diverged detector's NaN boxes are named as a divergence (the metric would refuse them
    as bad input, and evaluate.py exit with a usage error's status)."""
    from ivt.data import M3FDDataset
    from ivt.engine import DistInfo, TrainingDiverged
    from ivt.tasks.det import evaluate_det
    (tmp_path / "one.txt").write_text("00471\n")
    ds = M3FDDataset(ROOT / "tests" / "data" / "m3fd_sample", split="one", split_dir=tmp_path,
                     train=False, size=64)
    K = len(ds.classes)
    model = build_detector("swin_nano", DetectorConfig(num_classes=K, hidden_dim=32,
                                                       num_queries=4, enc_layers=1,
                                                       dec_layers=1, ffn_dim=32))
    boxes = torch.full((1, 4, 4), 0.5)
    boxes[0, 2, 1] = float("nan")
    model.forward = lambda vis, ir, targets=None: {"pred_logits": torch.zeros(1, 4, K),
                                                   "pred_boxes": boxes}
    single = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(TrainingDiverged, match="00471.png: NaN or inf in the model's predicted "
                                               "boxes"):
        evaluate_det(model, ds, single, lambda: torch.autocast("cpu", enabled=False))

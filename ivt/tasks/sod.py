"""Salient object detection (VT5000 / VT1000 / VT821): the CPNet decoder, BCE + IoU, S/F/E/MAE.

What the task adds to the shared trainer (`ivt.trainer`): its flags, datasets, model, loss and
evaluation. Recipe, as the authors' SOD release trained the runs behind the paper's Table 1
(SOD-IV-tuning/CPNet_train.py, options.py, utils.py): Adam lr 5e-5 without weight decay, every
gradient value clamped to +-0.5 before the step (`clip_gradient`), 199 epochs (its `--epoch 200`
runs `range(1, 200)`), batch 8, 384x384 input, lr x0.1 after 99 epochs (`decay_rate ** (epoch //
100)` on its 1-based epochs); the release's augmentation with soft GTs (`--augment release`,
`ivt.data.vt.SODReleaseTransform`). The paper's "weight decay 1e-1" is the release's lr decay factor
(`decay_rate`); `--weight-decay 0.1` gives the text's literal reading (coupled L2 in Adam). The
decoder reads the standard Swin taps (stage outputs); `--taps release` reads the release's (patch
embedding and stages 1-3 after merging), those of the runs behind Table 1. Train on VT5000/Train,
test on VT5000/Test, VT1000 and VT821. The paper does not say how it chose its checkpoint (the
release chose it on the test set); here best.pt is chosen on a validation list carved from
VT5000/Train by a seeded, saved list.
"""
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from ..data.vt import AUGMENTATIONS, VTDataset, list_vt_stems, split_train_val
from ..engine import (DistInfo, autocast_context, check_finite_output, evaluation_mode,
                      gather_metric, shard)
from ..metrics import SODMetric
from ..models.saliency import build_saliency_model, sod_loss
from ..models.swin import TAPS
from ..trainer import Recipe, Task, backbone_kwargs, resume_path

DESCRIPTION = """\
Train a salient object detection model (IV-tuning backbone + CPNet decoder) on VT5000.

    python train_sod.py --data VT5000/Train --backbone swin_l
    python evaluate.py --checkpoint runs/sod/best.pt --data VT5000/Test --data VT1000 --data VT821

Defaults are the recipe of the authors' SOD release, which trained the paper's Table 1 (Adam lr 5e-5
without weight decay, gradient values clamped to +-0.5, 199 epochs, batch 8, 384x384, lr x0.1 after
99 epochs, as its `range(1, 200)` epoch loop; the release's augmentation with soft GTs; loss:
BCE-with-logits + IoU on the main and three side outputs). The paper's "weight decay 1e-1" is the
release's lr decay factor; --weight-decay 0.1 reproduces the text literally (coupled L2 in Adam).
The thermal image (a colour-mapped .jpg in the VT datasets) is converted to grayscale and repeated
to 3 channels, as the authors' code does. --val-count images of --data are held out (a seeded list,
saved as <out>/val_list.txt; --resume reuses the list beside the checkpoint it continues) to
choose best.pt by S-measure; the test sets are never used for selection.
"""

METRIC_KEYS = ("S", "maxF", "meanF", "adpF", "wF", "maxE", "meanE", "adpE", "MAE")
TABLE_HEADER = ("S", "adpF", "maxF", "meanF", "wF", "adpE", "meanE", "maxE", "MAE")


def build_model(config: dict, pretrained: Optional[str] = None) -> nn.Module:
    """The saliency model a `train_sod.py` configuration describes (backbone + CPNet decoder)."""
    size = config["size"]
    return build_saliency_model(config["backbone"], tuning=config["tuning"],
                                pretrained=pretrained, img_size=(size, size),
                                taps=config["taps"], **backbone_kwargs(config))


def saliency_map(pred: np.ndarray) -> np.ndarray:
    """(H, W) float in [0, 1] -> (H, W) uint8, min-max normalised: the saved saliency map."""
    lo, hi = float(pred.min()), float(pred.max())
    scaled = (pred - lo) / (hi - lo) if hi > lo else pred
    return np.round(scaled * 255).astype(np.uint8)


@torch.no_grad()
def evaluate_sod(model: nn.Module, dataset: Dataset, dist: DistInfo, autocast: Callable,
                 workers: int = 0, on_prediction: Optional[Callable] = None) -> SODMetric:
    """S/F/E/MAE of the main output over `dataset` (an evaluation `VTDataset`).

    Per image: sigmoid of the main output at the input size (size x size), resized bilinearly to
    the ground truth's size and scored as the 8-bit map `saliency_map` saves (toolboxes read
    saved maps as uint8 / 255, docs/data.md), so the numbers are those of any toolbox run on the
    saved maps. Each process scores every world_size-th image; the per-image records are
    gathered so every rank returns the whole set's metric. `on_prediction(index, map (H, W)
    uint8)` is called per image.
    """
    metric = SODMetric()
    with evaluation_mode(model) as net:
        for index, item in shard(dataset, dist, workers):
            vis = item["vis"].to(dist.device, non_blocking=True)
            ir = item["ir"].to(dist.device, non_blocking=True)
            gt = item["gt"][0].numpy()                                # (H, W) uint8 0/255
            with autocast():
                prob = net.predict(vis, ir).float()                   # (1, 1, S, S)
            check_finite_output(prob, dataset, index, "saliency map")
            prob = F.interpolate(prob, size=gt.shape, mode="bilinear", align_corners=False)
            pred = saliency_map(prob[0, 0].clamp(0, 1).cpu().numpy())  # (H, W) uint8
            metric.update(pred, gt)
            if on_prediction is not None:
                on_prediction(index, pred)
    metric = gather_metric(metric, SODMetric)
    return metric


class SODTask(Task):
    name = "sod"
    metric = "S"
    # SOD-IV-tuning/CPNet_train.py: torch.optim.Adam(params, lr) (no weight decay),
    # clip_gradient(optimizer, 0.5) clamps every gradient value before the step; options.py:
    # lr 5e-5, --epoch 200, batch 8, 384, decay_rate 0.1, decay_epoch 100; the loop
    # `for epoch in range(1, opt.epoch)` trains 199 epochs, at lr * 0.1 ** (epoch // 100): the
    # lr drops after the 99th (its logs: "Epoch [100/200]" is the first at 5e-6).
    recipe = Recipe(optimizer="adam", lr=5e-5, weight_decay=0.0, batch_size=8, size=384,
                    epochs=199, schedule="step", lr_drop_epochs=(99,), clip_grad_value=0.5,
                    eval_every=2000,
                    drop_path={"eva02_l": 0.2})     # the release's EVA02CPNet (Swin: 0.1)
    description = DESCRIPTION
    size_help = "square input size of training and evaluation in pixels"
    path_keys = ("data", "val_list")
    validation_keys = ("data", "size")                 # evaluated at --size
    model_keys = ("taps", "val_count", "val_list")   # a resumed run keeps its validation split

    def add_arguments(self, p) -> None:
        g = p.add_argument_group("salient object detection")
        g.add_argument("--data", metavar="DIR",
                       help="training folder holding RGB/, T/, GT/ (VT5000/Train; required, "
                            "except with --resume: the run's)")
        g.add_argument("--val-count", type=int, default=250,
                       help="images of --data held out to choose best.pt (a seeded list saved "
                            "as <out>/val_list.txt); 0 trains on all and selects on the "
                            "training images themselves, no list saved (default: "
                            "%(default)s)")
        g.add_argument("--val-list", default=None, metavar="FILE",
                       help="use the stems in FILE (one per line) as the validation images "
                            "instead of drawing --val-count of them")
        g.add_argument("--augment", default="release", choices=AUGMENTATIONS,
                       help="training augmentation. release: the authors' SOD release's "
                            "(SOD-IV-tuning/data.py): flip, centred crop up to 30 px smaller, "
                            "rotation by an integer angle in [-15, 15) degrees with probability "
                            "0.2, colour enhancement, salt-and-pepper on 0.15%% of the GT pixels, "
                            "bilinear resize; the GT becomes a soft target in [0, 1]. standard: "
                            "flip, random crop with scale and aspect jitter, rotation up to +-10 "
                            "degrees, photometric jitter; binary GT (default: %(default)s)")
        g.add_argument("--taps", default="stages", choices=TAPS,
                       help="backbone features the decoder reads. stages: the four stage "
                            "outputs before patch merging (strides 4-32), the standard Swin taps "
                            "every other task uses and what the paper's text describes. release: "
                            "the authors' SOD release's (SOD-IV-tuning/models/"
                            "SwinTransformers_ivt.py): the prompted patch embedding Z0 and "
                            "stages 1-3 after patch merging; stage 4 never reaches the "
                            "decoder, so its adapters (Swin-L: 0.99M of the 6.06M) cannot "
                            "train: its blocks are skipped and frozen. These are the taps of "
                            "the runs behind Table 1. The ViTs: both read blocks 8/12/16/24, as "
                            "the release does for EVA02 (default: %(default)s)")

    def build_datasets(self, args, norm, out: Path, is_main: bool):
        if args.val_count < 0:
            raise ValueError(f"--val-count must not be negative, got {args.val_count}")
        stems = list_vt_stems(args.data)
        saved = out / "val_list.txt"
        # a resumed run keeps its split: the list beside the checkpoint it continues
        kept = Path(resume_path(args)).parent / "val_list.txt" if args.resume else None
        path = (Path(args.val_list) if args.val_list
                else kept if kept and args.val_count > 0 and kept.is_file() else None)
        if path is not None:
            val = [s for s in path.read_text().split()]
            unknown = sorted(set(val) - set(stems))
            if unknown:
                raise ValueError(f"{path}: stems not in {args.data}: {', '.join(unknown[:10])}")
            train = [s for s in stems if s not in set(val)]
            if not train:
                raise ValueError(f"{path} lists every one of the {len(stems)} images of "
                                 f"{args.data}: none left to train on")
        elif args.val_count > 0:
            if args.val_count >= len(stems):
                raise ValueError(f"--val-count {args.val_count} leaves no training images "
                                 f"({len(stems)} in {args.data})")
            train, val = split_train_val(stems, args.val_count, args.seed)
        else:
            train, val = stems, stems
        if is_main and not args.val_list and args.val_count > 0 and not (
                path and saved.is_file() and path.samefile(saved)):   # never rewritten as read
            saved.write_text("".join(f"{s}\n" for s in val))
        size = args.size
        return (VTDataset(args.data, train=True, size=size, seed=args.seed, norm=norm,
                          stems=train, augment=args.augment),
                VTDataset(args.data, train=False, size=size, seed=args.seed, norm=norm,
                          stems=val))

    def build_model(self, config, pretrained):
        return build_model(config, pretrained)

    def loss(self, model, batch, device) -> torch.Tensor:
        """BCE-with-logits + IoU loss (paper Sec. 3.5) on the main and three side outputs."""
        vis = batch["vis"].to(device, non_blocking=True)              # (B, 3, S, S)
        ir = batch["ir"].to(device, non_blocking=True)                # (B, 3, S, S)
        mask = batch["mask"].to(device, non_blocking=True)            # (B, 1, S, S) in [0, 1]
        return sod_loss([o.float() for o in model(vis, ir)], mask)

    def evaluate(self, model, dataset, dist, autocast, workers) -> dict:
        r = evaluate_sod(model, dataset, dist, autocast, workers).compute()
        return {k: r[k] for k in METRIC_KEYS}

    def format_eval(self, r: dict) -> str:
        return f"S {r['S']:.4f}  maxF {r['maxF']:.4f}  maxE {r['maxE']:.4f}  MAE {r['MAE']:.4f}"


# -- evaluate.py ---------------------------------------------------------------------------------
def figure(vis: np.ndarray, ir: np.ndarray, gt: np.ndarray, pred: Image.Image) -> Image.Image:
    """RGB | T | GT | prediction side by side, (H, 4W, 3)."""
    grey = lambda a: np.repeat(a[..., None], 3, axis=2)                 # noqa: E731
    return Image.fromarray(np.concatenate(
        [vis, grey(ir), grey(gt), grey(np.asarray(pred))], axis=1).astype(np.uint8))


def format_table(results: dict) -> str:
    """Paper Table 1's columns, one row per test set."""
    lines = [f"{'set':<24}" + "".join(f"{k:>8}" for k in TABLE_HEADER)]
    for name, r in results.items():
        lines.append(f"{name:<24}" + "".join(f"{r[k]:8.4f}" for k in TABLE_HEADER))
    return "\n".join(lines)


def evaluate_checkpoint(args, model: nn.Module, ckpt: dict, dist: DistInfo, norm) -> dict:
    """evaluate.py for a SOD checkpoint: every --data folder (RGB/, T/, GT/) in turn."""
    size = ckpt["config"]["size"]
    autocast = autocast_context(dist.device, args.amp)
    # every set is read (and with --verify-images decoded) before any is evaluated: a bad
    # folder stops the run before the others' evaluation, not after it
    names = [Path(root).as_posix().rstrip("/") for root in args.data]
    folders = [name.replace("/", "_").lstrip("._") for name in names]   # --save-vis's
    for i, root in enumerate(args.data):
        if folders[i] in folders[:i]:
            raise ValueError(f"--data {root} and --data {args.data[folders.index(folders[i])]} "
                             f"name the same set ({folders[i]})")
    datasets = {name: VTDataset(root, train=False, size=size, norm=norm)
                for name, root in zip(names, args.data)}
    if args.verify_images:
        for dataset in datasets.values():
            dataset.verify()
    sets = {}
    for (name, dataset), folder in zip(datasets.items(), folders):
        folder = Path(args.save_vis or ".") / folder

        def save_maps(index: int, pred: np.ndarray, dataset=dataset, folder=folder) -> None:
            png = Image.fromarray(pred)
            stem = dataset.stems[index]
            png.save(folder / f"{stem}.png")
            figure(*dataset.read_images(index), png).save(folder / "figures" / f"{stem}.png")

        if args.save_vis:
            (folder / "figures").mkdir(parents=True, exist_ok=True)
        r = evaluate_sod(model, dataset, dist, autocast, args.workers,
                         save_maps if args.save_vis else None).compute()
        sets[name] = {"num_images": len(dataset), **{k: r[k] for k in METRIC_KEYS}}
    return {"task": "sod", "checkpoint": args.checkpoint, "iter": ckpt["iter"], "sets": sets}


def print_report(result: dict) -> None:
    """Print `evaluate_checkpoint`'s result: one row of scores per set."""
    print(f"{result['checkpoint']} (iteration {result['iter']}): main output, per-image "
          f"min-max, at ground-truth size")
    print(format_table(result["sets"]))

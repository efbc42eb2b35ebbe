"""Object detection (M3FD): a DETR-style detector on the IV-tuning backbone, COCO mAP.

What the task adds to the shared trainer (`ivt.trainer`): its flags, datasets, model, loss and
evaluation. Recipe (the paper's where it applies: DINO / CO-DETR in mmdet): AdamW lr 1e-4,
weight decay 1e-4, 36 epochs with lr x0.1 at epochs 27 and 33 (the authors' mmdet DINO Swin-L
config), batch 2, 640 input, gradient clipping 0.1; every backbone parameter that trains gets 0.1x
the lr (the config's `custom_keys={'backbone': lr_mult 0.1}`, which in the authors' runs covered
IV-tuning's modules, built inside their Swin backbone, as well as fully fine-tuned weights); the
detector (neck, encoder, decoder, heads) gets 1x.

The detector's settings (`DetectorConfig` lists them all). DINO's: 6 decoder layers, FFN 2048,
dropout 0, denoising with about 100 positive and 100 negative queries per image, label noise 0.5
and box noise 0.4 (config/DINO/DINO_4scale.py; `--box-noise 1.0` is what DINO's training scripts
and mmdet's DINO config use), and with `--encoder deformable` its 6-layer deformable encoder.
Ours: RT-DETR's hybrid encoder by default (higher AP than 6 deformable layers at the same
iterations on the CPU demo, in less time), 300 queries (DINO: 900), four levels at strides 4-32
(DINO 4-scale: 8-64). Boxes marked ignore (VOC `difficult`, COCO `iscrowd`) are left out of the
training targets, as mmdet's PackDetInputs leaves out its gt_ignore_flags instances; the metric
treats them as ignore regions.
"""
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import Dataset

from ..data.m3fd import M3FD_CLASSES, M3FDDataset
from ..engine import (DistInfo, autocast_context, check_finite_output, evaluation_mode,
                      gather_metric, shard, unwrap)
from ..metrics import DetMetric
from ..metrics.det import format_det_table
from ..models.detr import DetectorConfig, build_detector
from ..models.detr.detector import ENCODERS
from ..trainer import Recipe, Task, backbone_kwargs
from ..visualize import draw_boxes

DESCRIPTION = """Train a detector (IV-tuning backbone + DETR-style detector) on M3FD.

    python train_det.py --data M3FD --backbone swin_l --pretrained dino_swin_l
    python evaluate.py --checkpoint runs/det/best.pt --data M3FD --split test

The detector is this repository's own small DINO/RT-DETR-style model (multi-scale deformable
attention written with grid_sample, two-stage query selection, iterative box refinement,
contrastive denoising), not the COCO-trained DINO / CO-DETR the paper started from: expect lower
numbers than the paper's Table 3 unless you start from a detection-trained backbone. Defaults are
the paper's recipe where it applies (AdamW lr 1e-4, weight decay 1e-4, 36 epochs, lr x0.1 at
epochs 27 and 33, batch 2, 640x640 input, gradient clipping 0.1) and DINO's detector settings
(FFN 2048, 100 denoising queries, label noise 0.5, box noise 0.4 as in DINO's config; DINO's
training scripts and mmdet use --box-noise 1.0; --encoder deformable: DINO's 6-layer deformable
encoder). Ours: RT-DETR's hybrid encoder by default, 300 queries (DINO: 900), strides 4-32. Boxes
marked difficult (VOC) or iscrowd (COCO) are not trained on and are ignored by the metric. The split
lists default to the public scene-aware split shipped in ivt/data/splits/m3fd (2727 train / 633
val / 840 test); the paper trains on 3360 images (--train-split train+val). best.pt is chosen by
mAP on --val-split.
"""


def detector_config(config: dict) -> DetectorConfig:
    """The `DetectorConfig` of a `train_det.py` configuration."""
    return DetectorConfig(num_classes=len(config.get("class_names") or M3FD_CLASSES),
                          hidden_dim=config["hidden_dim"], num_queries=config["num_queries"],
                          encoder=config["encoder"], enc_layers=config["enc_layers"],
                          dec_layers=config["dec_layers"], ffn_dim=config["ffn_dim"],
                          dn_number=config["dn_number"], label_noise_ratio=config["label_noise"],
                          box_noise_scale=config["box_noise"])


def build_model(config: dict, pretrained: Optional[str] = None) -> nn.Module:
    """The detector a `train_det.py` configuration describes."""
    size = config["size"]
    return build_detector(config["backbone"], detector_config(config), tuning=config["tuning"],
                          pretrained=pretrained, img_size=(size, size), **backbone_kwargs(config))


@torch.no_grad()
def evaluate_det(model: nn.Module, dataset: Dataset, dist: DistInfo, autocast: Callable,
                 workers: int = 0, max_dets: int = 100,
                 on_prediction: Optional[Callable] = None) -> DetMetric:
    """COCO-style AP of `dataset` (an evaluation `M3FDDataset`), boxes in original pixels.

    The detector keeps its 300 best (query, class) pairs per image (`DETECTIONS_PER_IMAGE`, as
    DINO and mmdet); the metric scores at most `max_dets` of them per image and class. Each
    process scores every world_size-th image; the per-image records are gathered so every rank
    returns the whole set's metric. `on_prediction(index, prediction dict)` per image.
    """
    new_metric = lambda: DetMetric(len(dataset.classes), max_dets=max_dets,  # noqa: E731
                                   class_names=dataset.classes)
    metric = new_metric()
    with evaluation_mode(model) as net:
        for index, batch in shard(dataset, dist, workers, dataset.collate_fn):
            vis = batch["vis"].to(dist.device, non_blocking=True)
            ir = batch["ir"].to(dist.device, non_blocking=True)
            target = batch["targets"][0]
            with autocast():
                pred = net.predict(vis, ir, [target["orig_size"]])[0]         # DINO's 300
            pred = {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                    for k, v in pred.items()}
            for key in ("boxes", "scores"):
                check_finite_output(pred[key], dataset, index, f"predicted {key}")
            boxes, labels, ignore = dataset.gt(index)
            metric.update(target["image_id"], pred["boxes"], pred["scores"], pred["labels"],
                          boxes, labels, ignore)
            if on_prediction is not None:
                on_prediction(index, pred)
    metric = gather_metric(metric, new_metric)
    return metric


class DetTask(Task):
    name = "det"
    metric = "mAP"
    # The authors' mmdet config (their release's mmdetection-IVT/IVtuning_config/
    # dino-5scale_swin-l_8xb2-36e_coco.py): AdamW 1e-4, weight decay 1e-4, backbone lr x0.1,
    # gradient norm clipped at 0.1, MultiStepLR x0.1 at epochs 27 and 33 of 36.
    recipe = Recipe(optimizer="adamw", lr=1e-4, weight_decay=1e-4, batch_size=2, size=640,
                    epochs=36, schedule="step",
                    lr_drop_epochs=(27, 33), clip_grad=0.1, eval_every=5000,
                    drop_path={"swin_l": 0.2})      # the authors' DINO Swin-L config
    description = DESCRIPTION
    size_help = "images are resized to size x size pixels, a multiple of 32"
    # The detector reads each feature level as spanning the whole image: with a side that is not
    # a multiple of the coarsest stride, the backbone's padding would shift the levels apart.
    size_multiple = 32
    eager_only = ("the detection loss matches queries to boxes on the CPU (Hungarian matching) "
                  "and its targets vary in number per image, which a CUDA graph cannot capture")
    path_keys = ("data", "split_dir")
    validation_keys = ("data", "val_split", "split_dir", "size")     # evaluated at --size
    model_keys = ("hidden_dim", "num_queries", "encoder", "enc_layers", "dec_layers", "ffn_dim")

    def add_arguments(self, p) -> None:
        g = p.add_argument_group("detection")
        g.add_argument("--data", metavar="DIR",
                       help="M3FD root folder holding Vis/, Ir/, Annotation/ (required, except "
                            "with --resume: the run's)")
        g.add_argument("--split-dir", default=None, metavar="DIR",
                       help="folder holding train.txt, val.txt, test.txt of image ids (default: "
                            "the public scene-aware split in ivt/data/splits/m3fd)")
        g.add_argument("--train-split", default="train",
                       help="training list; the paper trains on 3360 images = 'train+val' "
                            "(default: %(default)s)")
        g.add_argument("--val-split", default="val",
                       help="list evaluated every --eval-every iterations to choose best.pt; "
                            "never the test list (default: %(default)s)")
        g.add_argument("--bad-boxes", default="skip", choices=("skip", "error"),
                       help="boxes that are degenerate, have no area inside the image or are "
                            "of an unknown class: reported with file and object index, then "
                            "skipped or refused; a box reaching past the border is clipped to "
                            "the image and kept either way, as DINO does (default: %(default)s)")
        g.add_argument("--hidden-dim", type=int, default=256,
                       help="detector width (neck, encoder, decoder) (default: %(default)s)")
        g.add_argument("--num-queries", type=int, default=300,
                       help="object queries selected from the encoder (default: %(default)s)")
        g.add_argument("--encoder", default="hybrid", choices=ENCODERS,
                       help="hybrid: RT-DETR's hybrid encoder (AIFI self-attention on the "
                            "stride-32 level, then CCFM's top-down and bottom-up conv fusion of "
                            "all levels); deformable: DINO's deformable encoder (--enc-layers "
                            "layers). hybrid gave the higher AP at the same iterations on the CPU "
                            "demo, in less time (default: %(default)s)")
        g.add_argument("--enc-layers", type=int, default=6,
                       help="deformable encoder layers, as DINO (--encoder deformable only) "
                            "(default: %(default)s)")
        g.add_argument("--dec-layers", type=int, default=6,
                       help="decoder layers, each refining the boxes (default: %(default)s)")
        g.add_argument("--ffn-dim", type=int, default=2048,
                       help="hidden width of the encoder's and decoder's FFNs, as DINO "
                            "(RT-DETR: 1024) (default: %(default)s)")
        g.add_argument("--dn-number", type=int, default=100,
                       help="contrastive denoising: about this many positive and as many negative "
                            "queries per image, in groups of the batch's largest object count "
                            "(DINO's dn_number); 0 trains without denoising (default: %(default)s)")
        g.add_argument("--no-denoising", dest="dn_number", action="store_const", const=0,
                       help="train without DINO's contrastive denoising queries (= --dn-number 0)")
        g.add_argument("--box-noise", type=float, default=0.4,
                       help="denoising box noise scale: positive queries move each corner by less "
                            "than this times half the box size, negatives by one to two times "
                            "that; DINO's config value (DN-DETR's). DINO's training scripts and "
                            "mmdet's DINO config use --box-noise 1.0 (default: %(default)s)")
        g.add_argument("--label-noise", type=float, default=0.5,
                       help="denoising label noise: each query's label is replaced by a random "
                            "class with probability half this, as DINO (default: %(default)s)")
        g.add_argument("--backbone-lr-mult", type=float, default=0.1,
                       help="lr factor of every backbone parameter that trains: IV-tuning's "
                            "modules, the infrared embedding, or with --tuning full the visible "
                            "weights, as the authors' mmdet config (custom_keys backbone "
                            "lr_mult 0.1); the detector (neck, encoder, decoder, heads) gets 1x "
                            "(default: %(default)s)")

    def build_datasets(self, args, norm, out: Path, is_main: bool):
        common = dict(split_dir=args.split_dir, size=args.size, seed=args.seed, norm=norm,
                      bad_boxes=args.bad_boxes)
        return (M3FDDataset(args.data, split=args.train_split, train=True, **common),
                M3FDDataset(args.data, split=args.val_split, train=False, **common))

    def build_model(self, config, pretrained):
        return build_model(config, pretrained)

    def param_groups(self, model, args) -> list:
        """The backbone's parameters that train: `--backbone-lr-mult`; the detector's: 1x."""
        slow, fast = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (slow if name.startswith("backbone.") else fast).append(p)
        return [{"params": fast, "lr_mult": 1.0},
                {"params": slow, "lr_mult": args.backbone_lr_mult}]

    def loss(self, model, batch, device) -> torch.Tensor:
        """Eq. 17: focal classification + L1 + GIoU after Hungarian matching, on every decoder
        layer, the encoder proposals and the denoising queries. Boxes marked 'ignore' (VOC
        difficult, COCO iscrowd) are dropped from the targets first, as mmdet's PackDetInputs
        drops its gt_ignore_flags instances: neither matched nor used as denoising targets."""
        vis = batch["vis"].to(device, non_blocking=True)              # (B, 3, S, S)
        ir = batch["ir"].to(device, non_blocking=True)
        targets = [{"boxes": t["boxes"][~t["ignore"]].to(device),
                    "labels": t["labels"][~t["ignore"]].to(device)} for t in batch["targets"]]
        outputs = model(vis, ir, targets)
        return unwrap(model).loss(outputs, targets)["loss"]

    def evaluate(self, model, dataset, dist, autocast, workers) -> dict:
        r = evaluate_det(model, dataset, dist, autocast, workers).compute()
        return {k: r[k] for k in ("mAP", "mAP50", "mAP75", "mAP_s", "mAP_m", "mAP_l")}

    def format_eval(self, r: dict) -> str:
        return f"mAP {r['mAP']:.4f}  AP50 {r['mAP50']:.4f}  AP75 {r['mAP75']:.4f}"


# -- evaluate.py ---------------------------------------------------------------------------------
def evaluate_checkpoint(args, model: nn.Module, ckpt: dict, dist: DistInfo, norm) -> dict:
    """evaluate.py for a detection checkpoint: one --data folder, one --split."""
    cfg = ckpt["config"]
    if len(args.data) != 1:
        raise ValueError("detection evaluates one --data folder at a time")
    split_dir = args.split_dir or cfg["split_dir"]
    if not args.split_dir and split_dir and not os.path.isdir(split_dir):
        raise FileNotFoundError(f"the run's split folder {split_dir} (its --split-dir, saved in "
                                f"{args.checkpoint}) is not on this machine: pass --split-dir")
    dataset = M3FDDataset(args.data[0], split=args.split, split_dir=split_dir, train=False,
                          size=cfg["size"], norm=norm, bad_boxes=cfg["bad_boxes"])
    if args.verify_images:
        dataset.verify()
    folder = Path(args.save_vis or ".")

    def save_boxes(index: int, pred: dict) -> None:
        """Detections scoring >= 0.3 on the visible and the thermal image, side by side."""
        vis, ir = dataset.read_images(index)
        keep = pred["scores"] >= 0.3
        boxes, scores = pred["boxes"][keep].numpy(), pred["scores"][keep].numpy()
        names = [dataset.classes[int(c)] for c in pred["labels"][keep]]
        panels = [np.asarray(draw_boxes(img, boxes, names, scores))
                  for img in (vis, np.repeat(ir[..., None], 3, axis=2))]
        Image.fromarray(np.concatenate(panels, axis=1)).save(folder / f"{dataset.names[index]}.png")

    if args.save_vis:
        folder.mkdir(parents=True, exist_ok=True)
    metric = evaluate_det(model, dataset, dist, autocast_context(dist.device, args.amp),
                          args.workers, args.max_dets, save_boxes if args.save_vis else None)
    return {"task": "det", "checkpoint": args.checkpoint, "split": args.split,
            "iter": ckpt["iter"], "num_images": len(dataset), **metric.compute()}


def print_report(result: dict) -> None:
    """Print `evaluate_checkpoint`'s result: mAP, AP50, AP75, AP by size and AP per class."""
    print(f"{result['checkpoint']} (iteration {result['iter']}) on {result['split']} "
          f"({result['num_images']} images)")
    print(format_det_table(result))

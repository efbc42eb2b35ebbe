"""Train a segmentation model (IV-tuning backbone + Segformer head) on MFNet or MSRS.

    python train_seg.py --data data/MFNet --backbone swin_l --pretrained swin_large_22k.pth
    torchrun --nproc_per_node=4 train_seg.py --data data/MFNet ...        # DDP, same flags
    python train_seg.py --data data/MFNet ... --resume                    # continue <out>/last.pt

Defaults are the paper's recipe (SGD lr 1e-3, weight decay 1e-2, momentum 0.9, poly schedule,
160k iterations, batch 2, 512x512 crops). Writes to --out: log.jsonl (configuration, training
steps, evaluations), last.pt (resumable; every --eval-every iterations and at the end) and best.pt
(best validation mIoU). With --pretrained, checkpoints hold only the trained tensors plus the
pretrained file's SHA-256.
"""
import argparse
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import kernels
from ivt import engine
from ivt.tasks.seg import evaluate_seg
from ivt.checkpoint import (atomic_save, check_pretrained, load_checkpoint, load_model_state,
                            make_checkpoint, model_state, set_rng_state, sha256_file)
from ivt.data import CLASSES, SEG_DATASETS, build_seg_dataset
from ivt.models import BACKBONES, TUNINGS, VARIANTS, CheckpointError
from ivt.models.segmentor import build_from_config, describe

# Configuration keys that define the model or the data stream: a resumed run must match them.
RESUME_MUST_MATCH = ("backbone", "tuning", "variant", "d1", "d2", "d3", "layers", "head_dim",
                     "dataset", "train_split", "crop", "batch_size", "seed")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--backbone", default="swin_l", choices=BACKBONES,
                   help="visible-light backbone (swin_nano is a tiny CPU demo size) "
                        "(default: %(default)s)")
    g.add_argument("--tuning", default="ivt", choices=TUNINGS,
                   help="ivt: train only IV-tuning's modules + head; full: the visible model "
                        "alone, all trainable (the paper's baseline); freeze: the visible model "
                        "alone, only the head trains (default: %(default)s)")
    g.add_argument("--variant", default="ivt", choices=VARIANTS,
                   help="IV-tuning ablation variant (only with --tuning ivt) (default: %(default)s)")
    g.add_argument("--d1", type=int, default=8, help="EMPG hidden width (default: %(default)s)")
    g.add_argument("--d2", type=int, default=64,
                   help="Hybrid Adapter hidden width (default: %(default)s)")
    g.add_argument("--d3", type=int, default=8,
                   help="Internal Prompt Adapter hidden width (default: %(default)s)")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="0-based block indices that get adapters (default: all blocks)")
    g.add_argument("--head-dim", type=int, default=256,
                   help="Segformer head width; the paper does not state it, 256 follows "
                        "mmsegmentation for large backbones, the original Segformer-B5 uses 768 "
                        "(default: %(default)s)")
    g.add_argument("--pretrained", default=None, metavar="FILE",
                   help="visible-model checkpoint (original release or timm layout) loaded into "
                        "the frozen part; checkpoints then store only trained tensors and this "
                        "file's SHA-256 (default: none, random init, frozen weights saved too)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="mfnet", choices=sorted(SEG_DATASETS),
                   help="on-disk layout of --data (default: %(default)s)")
    g.add_argument("--data", required=True, metavar="DIR", help="dataset root folder")
    g.add_argument("--train-split", default="train",
                   help="training split; the paper's protocol trains on 'train+val' (1176 MFNet "
                        "images) and reports on 'test' with evaluate.py. The default keeps 'val' "
                        "held out for checkpoint selection (default: %(default)s)")
    g.add_argument("--val-split", default="val",
                   help="split evaluated every --eval-every iterations to pick best.pt; never "
                        "select on the test split; MSRS ships only train and test lists, so hold "
                        "out your own list there (default: %(default)s)")
    g.add_argument("--crop", type=int, default=512,
                   help="square training crop size in pixels (default: %(default)s)")
    g.add_argument("--workers", type=int, default=4,
                   help="data-loading worker processes per training process (default: %(default)s)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--iters", type=int, default=160_000,
                   help="training iterations (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=2,
                   help="images per iteration per process (default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3,
                   help="SGD base learning rate, decayed by the poly schedule every iteration "
                        "(default: %(default)s)")
    g.add_argument("--poly-power", type=float, default=1.0,
                   help="poly schedule: lr = base * (1 - it/iters)^power (default: %(default)s)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=1e-2,
                   help="SGD weight decay (default: %(default)s)")
    g.add_argument("--amp", action="store_true",
                   help="bf16 autocast for forward and loss (default: off, float32)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of weights, shuffling and augmentation (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda or cuda:N; under torchrun each "
                        "process uses cuda:LOCAL_RANK, or the CPU with gloo (default: %(default)s)")
    g.add_argument("--kernels", default="auto", choices=kernels.BACKENDS,
                   help="SimAM / partial-conv implementation: auto (Triton on CUDA), torch "
                        "(reference), triton (default: %(default)s)")
    g.add_argument("--out", default="runs/seg", metavar="DIR",
                   help="output folder for log.jsonl, last.pt, best.pt (default: %(default)s)")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="FILE",
                   help="continue from a checkpoint: FILE, or <out>/last.pt when given alone; "
                        "reproduces the uninterrupted run (weights, optimizer, schedule, RNG)")
    g.add_argument("--eval-every", type=int, default=8000,
                   help="evaluate on --val-split and write last.pt (and best.pt) every N "
                        "iterations; 0: only at the end (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=50,
                   help="write a training record to log.jsonl every N iterations "
                        "(default: %(default)s)")
    g.add_argument("--save-rank-weights", action="store_true",
                   help="test aid: at the end every process also writes its trainable weights "
                        "to <out>/trained_rank<RANK>.pt (to check that DDP ranks agree)")
    return p


def seg_loss(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """Cross-entropy (ignore 255) of the logits upsampled from stride 4 to the crop size."""
    vis = batch["vis"].to(device, non_blocking=True)               # (B, 3, H, W)
    ir = batch["ir"].to(device, non_blocking=True)                 # (B, 3, H, W)
    label = batch["label"].to(device, non_blocking=True)           # (B, H, W)
    logits = model(vis, ir)                                        # (B, K, H/4, W/4)
    logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(logits.float(), label, ignore_index=255)


def resume_checkpoint(args, config: dict) -> dict:
    path = os.path.join(args.out, "last.pt") if args.resume == "last" else args.resume
    ckpt = load_checkpoint(path)
    differ = [f"{k}: checkpoint {ckpt['config'].get(k)!r} vs now {config[k]!r}"
              for k in RESUME_MUST_MATCH if ckpt["config"].get(k) != config[k]]
    if differ:
        raise ValueError(f"cannot resume from {path}, the configuration differs: "
                         + "; ".join(differ))
    check_pretrained(ckpt, args.pretrained, path)
    ckpt["path"] = path
    return ckpt


def check_args(args) -> None:
    for name in ("iters", "batch_size", "crop", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.eval_every < 0 or args.workers < 0:
        raise ValueError("--eval-every and --workers must not be negative")


def train(args, dist: engine.DistInfo) -> dict:
    check_args(args)
    config = dict(vars(args))
    out = Path(args.out)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
    engine.seed_everything(args.seed)
    crop = (args.crop, args.crop)
    train_set = build_seg_dataset(args.dataset, args.data, args.train_split, train=True,
                                  crop=crop, seed=args.seed)
    val_set = build_seg_dataset(args.dataset, args.data, args.val_split, train=False,
                                seed=args.seed)
    ckpt = resume_checkpoint(args, config) if args.resume else None
    pretrained_sha256 = sha256_file(args.pretrained) if args.pretrained else None

    model = build_from_config(config, train_set.num_classes, args.pretrained)
    if ckpt is not None:
        load_model_state(model, ckpt["model"], ckpt["delta"], ckpt["path"])
    model.to(dist.device)
    optimizer = engine.build_sgd(model, args.lr, args.momentum, args.weight_decay)
    start_iter, best_miou, result = 0, -math.inf, None
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        start_iter, best_miou, result = ckpt["iter"], ckpt["best_miou"], ckpt["metrics"]
    net = (DistributedDataParallel(model, device_ids=[dist.device.index]
                                   if dist.device.type == "cuda" else None)
           if dist.distributed else model)
    autocast = engine.autocast_context(dist.device, args.amp)
    batches = iter(engine.InfiniteBatches(train_set, args.batch_size, dist, args.seed,
                                          args.workers, start_iter))
    logger = engine.JSONLLogger(str(out / "log.jsonl"), dist.is_main)
    logger.log("resume" if ckpt else "start", iter=start_iter, config=config,
               world_size=dist.world_size, device=str(dist.device),
               train_images=len(train_set), val_images=len(val_set))
    if dist.is_main:
        print(describe(model))
        print(f"{len(train_set)} training images ({args.train_split}), {len(val_set)} "
              f"validation ({args.val_split}); {dist.world_size} process(es) on {dist.device}"
              + (f"; resuming at iteration {start_iter}" if ckpt else ""))
    last_path, best_path = out / "last.pt", out / "best.pt"
    saved_iter = start_iter if ckpt else None

    def evaluate(it: int) -> dict:
        r = evaluate_seg(net, val_set, dist, autocast, args.workers)["all"].compute()
        logger.log("eval", iter=it, split=args.val_split, mIoU=r["mIoU"], mAcc=r["mAcc"],
                   aAcc=r["aAcc"], IoU=dict(zip(CLASSES, r["IoU"])))
        if dist.is_main:
            print(f"\niter {it}: {args.val_split} mIoU {r['mIoU']:.2f}  mAcc {r['mAcc']:.2f}")
        return r

    def save(it: int, r: dict) -> None:
        nonlocal best_miou, saved_iter
        is_best = r["mIoU"] > best_miou          # NaN (nothing to score) is never best
        best_miou = max(best_miou, r["mIoU"]) if is_best else best_miou
        if dist.is_main:
            state = make_checkpoint(model, optimizer, it, config, args.pretrained,
                                    pretrained_sha256, task="seg", best_miou=best_miou,
                                    metrics=r)
            atomic_save(state, str(last_path))
            if is_best:
                atomic_save(state, str(best_path))
        saved_iter = it

    # Restored last, so that nothing between here and the first iteration draws from it.
    if ckpt is not None:
        set_rng_state(ckpt["rng"])
    try:
        result = engine.train_loop(
            net, batches, lambda m, b: seg_loss(m, b, dist.device), optimizer, dist=dist,
            autocast=autocast, start_iter=start_iter, iters=args.iters, base_lr=args.lr,
            lr_power=args.poly_power, log_every=args.log_every, eval_every=args.eval_every,
            evaluate=evaluate, save=save, logger=logger) or result
    except engine.TrainingDiverged as e:
        kept = (f"the last good checkpoint is {last_path} (iteration {saved_iter})"
                if saved_iter is not None else "no checkpoint was written")
        logger.log("diverged", message=str(e))
        raise engine.TrainingDiverged(f"{e}; {kept}") from None
    finally:
        logger.close()
    if args.save_rank_weights:
        torch.save(model_state(model, include_frozen=False), out / f"trained_rank{dist.rank}.pt")
    return {"iters": args.iters, "metrics": result,
            "best_miou": best_miou if math.isfinite(best_miou) else None,
            "out": str(out), "last": str(last_path),
            "best": str(best_path) if best_path.exists() else None,
            "log": str(out / "log.jsonl")}


def main(argv=None) -> dict:
    """Parse `argv` (default: sys.argv), train, return a summary: final validation metrics,
    best mIoU and the paths written. Bad data or configuration exits with status 2 and an
    `error:` line; a diverged run (NaN loss) exits with status 1."""
    args = get_parser().parse_args(argv)
    kernels.set_backend(args.kernels)
    try:
        dist = engine.setup_distributed(args.device)
        try:
            return train(args, dist)
        finally:
            engine.cleanup_distributed()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except engine.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()

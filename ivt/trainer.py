"""One training run, for any task: flags, checks, resume, checkpoints, the loop.

`train_seg.py`, `train_sod.py` and `train_det.py` are thin: each hands `main` a `Task`, the object
that knows its datasets, model, loss, optimizer recipe and evaluation. Everything else lives here,
once: the shared flags (backbone, tuning, optimisation, run), the checks made before anything
expensive starts, the resume rules, delta checkpoints (`ivt.checkpoint`), best-checkpoint
selection on a validation split, the training loop (`ivt.engine`), DDP, and the `error:` exits.

Files written to `--out`: `log.jsonl` (configuration, training records, evaluations), `last.pt`
(resumable; every `--eval-every` and `--save-every` iterations, at the end, and when Ctrl-C or
SIGTERM stops a one-process run) and `best.pt` (best validation score).
"""
import argparse
import math
import os
import re
import shlex
import shutil
import signal
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from . import engine
from .checkpoint import (atomic_link, atomic_save, check_pretrained, every_rank_rng_state,
                         load_checkpoint, load_model_state, make_checkpoint, model_state,
                         saved_score, set_rng_state, sha256_file)
from .data.io import BadImageError
from .models import (BACKBONES, TUNINGS, VARIANTS, VIT_BACKBONES, CheckpointError, PETLConfig,
                     make_ivt_config, make_petl_config, normalization_for)
from .models.petl import METHOD_OPTIONS
from .precision import store_frozen_weights
from .weights import RELEASES, cache_dir, resolve_pretrained, saved_pretrained

# Settings that only say how a run is executed; anything else in the configuration changes the
# run, so `--resume` refuses to change it (unless --allow-changes).
RUN_ONLY = ("device", "workers", "out", "resume", "allow_changes", "log_every", "kernels",
            "pretrained",      # a moved file is fine: its SHA-256 is checked against the run's
            "pretrained_source",            # so is the same file named another way
            "verify_images", "save_rank_weights", "eval_every", "save_every", "total_iters",
            "per_epoch", "cuda_graph", "impl", "memory")
# Settings of one invocation, never taken from the run `--resume` continues (the others left out
# of the command are: `flags_from_run`); `pretrained` has its own rule (`pretrained_weights`).
OWN_FLAGS = ("device", "workers", "out", "resume", "allow_changes", "kernels", "cuda_graph",
             "verify_images", "pretrained")
KERNEL_BACKENDS = ("auto", "torch", "triton")     # `kernels.BACKENDS`, without importing it
# Settings the saved weights depend on: never changeable on resume (with a task's `model_keys`).
MODEL_KEYS = ("task", "backbone", "tuning", "variant", "d1", "d2", "d3", "layers", "patch_size",
              "prompt_length", "bottleneck", "adapter_scale", "rein_tokens", "rein_rank",
              "ir_embed")


@dataclass
class Recipe:
    """A task's defaults (the recipe of the runs behind the paper's tables), shown in `--help`."""
    optimizer: str                      # 'sgd', 'adam' or 'adamw'
    lr: float
    weight_decay: float
    batch_size: int
    size: int                           # square training input (crop or resize) side
    iters: Optional[int] = None         # iteration-based schedule (segmentation) ...
    epochs: Optional[int] = None        # ... or epoch-based (SOD, detection)
    schedule: str = "poly"              # 'poly' or 'step'
    poly_power: float = 1.0             # 'poly': (lr - min_lr) * (1 - it/iters)^power + min_lr
    min_lr: float = 0.0
    lr_drop_epochs: Tuple[int, ...] = ()   # 'step': lr x0.1 from each of these epochs on
    momentum: float = 0.9
    clip_grad: float = 0.0              # gradient-norm clipping (0: off)
    clip_grad_value: float = 0.0        # gradient-value clamping (0: off)
    eval_every: int = 8000
    # the backbone's stochastic depth (its last block's drop-path rate) where the authors' runs
    # set one, by backbone name; any other backbone keeps its model's default
    drop_path: Dict[str, float] = field(default_factory=dict)


class Task:
    """What one task adds to the shared trainer. Subclasses set the class attributes and
    implement the methods; see `ivt/tasks/seg.py` for a complete example.

    name        'seg', 'sod' or 'det' (saved in checkpoints; `evaluate.py` and `predict.py` use it)
    metric      the validation score that selects best.pt (higher is better)
    recipe      the defaults
    size_help   what `--size` means for the task
    size_aliases  other spellings of `--size` the task accepts
    size_multiple  what `--size` must be a multiple of
    eager_only  why the task's step cannot be captured in a CUDA graph (`--cuda-graph` then runs
                eager steps, saying this), or None where it can
    model_keys  the task's settings that define its model, or the run's validation split (never
                changeable on resume)
    path_keys   the task's flags that name files or folders: saved as absolute paths, so that a
                run resumes from any working directory
    validation_keys  the settings the validation score depends on (its images, and the input
                size for a task evaluated at --size): one changed on resume (--allow-changes)
                restarts the choice of best.pt
    """
    name: str
    metric: str
    recipe: Recipe
    description: str = ""
    size_help: str = "square input size in pixels"
    size_aliases: Tuple[str, ...] = ()
    size_multiple: int = 1
    eager_only: Optional[str] = None
    model_keys: Tuple[str, ...] = ()
    path_keys: Tuple[str, ...] = ("data",)
    validation_keys: Tuple[str, ...] = ("data",)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Task flags (data layout, splits, head)."""
        raise NotImplementedError

    def build_datasets(self, args, norm, out: Path, is_main: bool):
        """(train set, validation set); may write split lists into `out` (main process only)."""
        raise NotImplementedError

    def build_model(self, config: dict, pretrained: Optional[str]) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, dataset, dist: engine.DistInfo, autocast: Callable,
                 workers: int) -> dict:
        """Validation metrics as a flat dict of numbers holding `self.metric`."""
        raise NotImplementedError

    def format_eval(self, result: dict) -> str:
        return f"{self.metric} {result[self.metric]:.4f}"

    def param_groups(self, model: nn.Module, args) -> list:
        """Optimizer parameter groups (trainable parameters only); `lr_mult` scales the lr."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_mult": 1.0}]


# -- flags ---------------------------------------------------------------------------------------
# The compared methods' flags (default None: the method's own) -> `PETLConfig`'s names.
METHOD_FLAGS = {"prompt_length": "prompt_length", "bottleneck": "bottleneck",
                "adapter_scale": "scale", "rein_tokens": "rein_tokens", "rein_rank": "rein_rank"}


def backbone_kwargs(config: dict) -> dict:
    """`build_backbone` options a run's configuration describes (the paper's model; the run's
    --impl and --memory are applied to the built model by `speed_up`)."""
    kw = {k: config[k] for k in ("d1", "d2", "d3", "variant", "layers") if k in config}
    # The compared methods' options: None (not given) is left to the method's default.
    for key, option in METHOD_FLAGS.items():
        if config.get(key) is not None:
            kw[option] = config[key]
    if config.get("ir_embed") and config.get("tuning") != "ivt":   # ivt: refused, see below
        kw["ir_embed"] = True
    if config.get("patch_size") is not None:
        kw["patch_size"] = config["patch_size"]
    if config.get("drop_path") is not None:
        kw["drop_path_rate"] = config["drop_path"]
    return kw


def speed_up(model: nn.Module, config: dict) -> nn.Module:
    """The model a task built from a run's configuration (`Task.build_model`), with the run's
    --impl and --memory applied in place (`ivt.fast.make_fast`; ValueError where --memory is
    not 'keep' without --impl fast/fused and --tuning ivt); returns it. The training loop and
    `ivt.tasks.load_trained` (evaluate.py, predict.py) both call it. `ivt.fast`, and with it
    `kernels` (and Triton, where installed), is imported only for a fast or fused model."""
    impl, memory = config.get("impl", "reference"), config.get("memory", "keep")
    if (impl, memory) == ("reference", "keep"):
        return model
    from .fast import make_fast
    return make_fast(model, impl, memory)


def _memory(text: str) -> str:
    """--memory's value, checked (`ivt.fast.parse_memory`)."""
    if text != "keep":
        from .fast import parse_memory
        try:
            parse_memory(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return text


def default_workers() -> int:
    """Data-loading workers per process: 4, or fewer on a machine with fewer cores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows
        cores = os.cpu_count() or 1
    return max(0, min(4, cores))


def get_parser(task: Task) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=task.description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(p.add_argument_group("model"), task.recipe)
    _method_arguments(p.add_argument_group("compared methods (paper Table 4)"))
    _implementation_arguments(p.add_argument_group("implementation (the same results)"))
    task.add_arguments(p)
    p.add_argument("--size", *task.size_aliases, dest="size", type=int, default=task.recipe.size,
                   help=task.size_help + " (default: %(default)s)")
    _optimisation_arguments(p.add_argument_group("optimisation (defaults: the paper's recipe)"),
                            task.recipe)
    _run_arguments(p.add_argument_group("run"), task)
    return p


def _model_arguments(g, r: Recipe) -> None:
    g.add_argument("--backbone", default="swin_l", choices=BACKBONES,
                   help="visible-light backbone (swin_nano is a tiny CPU demo size) "
                        "(default: %(default)s)")
    g.add_argument("--tuning", default="ivt", choices=TUNINGS,
                   help="ivt: train only IV-tuning's modules + head; full: the visible model "
                        "alone, all trainable (the paper's baseline); freeze: the visible model "
                        "alone, only the head trains; the other modes are the PETL methods "
                        "the paper compares (Table 4) (default: %(default)s)")
    g.add_argument("--variant", default="ivt", choices=VARIANTS,
                   help="IV-tuning ablation variant (only with --tuning ivt) "
                        "(default: %(default)s)")
    g.add_argument("--d1", type=int, default=8, help="EMPG hidden width (default: %(default)s)")
    g.add_argument("--d2", type=int, default=64,
                   help="Hybrid Adapter hidden width (default: %(default)s)")
    g.add_argument("--d3", type=int, default=8,
                   help="Internal Prompt Adapter hidden width (default: %(default)s)")
    g.add_argument("--layers", type=int, nargs="+", default=None,
                   help="0-based block indices that get adapters (default: all blocks)")
    g.add_argument("--patch-size", type=int, default=None,
                   help="EVA02, DINOv2, MAE only: patch size, 16 as the paper runs EVA02 (the "
                        "EVA02 and DINOv2 releases' 14 is resized on loading; MAE's is 16) "
                        "(default: 16)")
    recipe_rates = ", ".join(f"{name} {rate}" for name, rate in r.drop_path.items())
    g.add_argument("--drop-path", type=float, default=None, metavar="RATE",
                   help="the backbone's stochastic depth: the drop-path rate of its last block, "
                        "rising linearly from 0 at the first; the frozen blocks drop paths in "
                        "training too, as in the authors' runs (default: "
                        + (f"{recipe_rates} as the authors' runs; otherwise " if recipe_rates
                           else "") + "the model's own, 0.1)")
    g.add_argument("--pretrained", default=None, metavar="FILE|NAME|URL",
                   help="visible-model weights loaded into the frozen part: a checkpoint file "
                        "(original release, timm or, for Swin, an mmdet/detrex detector's "
                        "layout), the name of a released checkpoint ("
                        + ", ".join(RELEASES) + "), an http(s) URL (optionally ending in "
                        "#sha256=HEX), or 'none' (random init; checkpoints then also store the "
                        "frozen weights). Names and URLs are downloaded once into $IVT_CACHE "
                        f"(here {cache_dir()}). Checkpoints store only the trained tensors and "
                        "this file's SHA-256 (default: the release named like --backbone; none "
                        "for swin_nano; with --resume, the checkpoint's own)")


def _method_arguments(g) -> None:
    g.add_argument("--prompt-length", type=int, default=None,
                   help="--tuning vpt: prompt tokens per block (default: 10)")
    g.add_argument("--bottleneck", type=int, default=None,
                   help="--tuning adaptformer / bi_adaptformer: bottleneck width "
                        "(default: 64 / 32)")
    g.add_argument("--adapter-scale", type=float, default=None,
                   help="--tuning adaptformer / bi_adaptformer: the scale s of the adapter's "
                        "output (default: 0.1 / 1.0)")
    g.add_argument("--rein-tokens", type=int, default=None,
                   help="--tuning rein: learnable tokens per block (default: 100)")
    g.add_argument("--rein-rank", type=int, default=None,
                   help="--tuning rein: rank of the token factorisation (default: 16)")
    g.add_argument("--ir-embed", action="store_true",
                   help="--tuning full / freeze: add the independent infrared patch embedding "
                        "(its tokens added to the visible ones, paper Sec. 4.5), so the "
                        "baselines see the thermal image too (the PETL methods always have it)")


def _implementation_arguments(g) -> None:
    g.add_argument("--impl", default="reference", choices=("reference", "fast", "fused"),
                   help="how IV-tuning's forward runs, the same parameters and results either "
                        "way (ivt/fast/): reference, the readable paper path; fast, the prompt "
                        "adapters that read one prompt computed together, folded affines, SimAM "
                        "and the partial conv as Triton kernels on a GPU; fused, fast with every "
                        "Hybrid Adapter as Triton kernels on a GPU (kernels/hybrid_adapter.py; "
                        "fast elsewhere). With --tuning full or freeze, fast and fused give the "
                        "backbone's fast forward (EVA02's rotary attention as one complex "
                        "multiplication); the compared PETL methods (--tuning vpt, "
                        "adaptformer, bi_adaptformer, rein) run their one forward whatever it "
                        "says (default: %(default)s)")
    g.add_argument("--memory", default="keep", type=_memory,
                   metavar="keep|recompute|checkpoint|checkpoint:N[+recompute]",
                   help="with --impl fast or fused and --tuning ivt, what the backward pass "
                        "recomputes instead of storing: keep, nothing; recompute, the frozen "
                        "attention and MLP sub-layers keep only their inputs and are rerun up "
                        "to their last Linear (a few operators a block); checkpoint, every "
                        "block keeps only its inputs (one more forward of compute); "
                        "checkpoint:N, the first N blocks (on Swin the high-resolution ones: "
                        "Swin-L's first 4 hold 40%% of its block activations); "
                        "checkpoint:N+recompute, that and "
                        "recompute for the other blocks. With --impl fused and --amp, "
                        "recompute holds under half of full fine-tuning's activations on Swin "
                        "(CPU proxies, docs/benchmarks.md) "
                        "(default: %(default)s)")
    g.add_argument("--kernels", default="auto", choices=KERNEL_BACKENDS,
                   help="SimAM, partial conv and Hybrid Adapter kernels of --impl fast / "
                        "fused: auto (Triton on CUDA), torch (reference), triton "
                        "(default: %(default)s)")


def _optimisation_arguments(g, r: Recipe) -> None:
    if r.epochs is not None:
        g.add_argument("--epochs", type=int, default=r.epochs,
                       help="training epochs (default: %(default)s)")
        g.add_argument("--lr-drop-epoch", type=int, nargs="+", metavar="EPOCH",
                       default=list(r.lr_drop_epochs),
                       help="learning rate x0.1 from this epoch on, again from each further "
                            f"one given (default: {' '.join(map(str, r.lr_drop_epochs))})")
    g.add_argument("--iters", type=int, default=r.iters,
                   help="training iterations" + (" (default: %(default)s)" if r.iters else
                                                 "; overrides --epochs when given, the lr drop "
                                                 "moves proportionally, to the nearest iteration "
                                                 "(default: from --epochs)"))
    g.add_argument("--batch-size", type=int, default=r.batch_size,
                   help="images per iteration per process (default: %(default)s)")
    g.add_argument("--lr", type=float, default=r.lr,
                   help=f"{r.optimizer} base learning rate"
                        + (", decayed by the poly schedule every iteration" if r.schedule == "poly"
                           else "") + " (default: %(default)s)")
    if r.schedule == "poly":
        g.add_argument("--poly-power", type=float, default=r.poly_power,
                       help="poly schedule: lr = (base - min) * (1 - it/iters)^power + min "
                            "(default: %(default)s)")
        g.add_argument("--min-lr", type=float, default=r.min_lr,
                       help="poly schedule: the learning rate it decays to (default: %(default)s)")
    if r.optimizer == "sgd":
        g.add_argument("--momentum", type=float, default=r.momentum,
                       help="SGD momentum (default: %(default)s)")
    g.add_argument("--weight-decay", type=float, default=r.weight_decay,
                   help=f"{r.optimizer} weight decay (default: %(default)s)")
    g.add_argument("--clip-grad", type=float, default=r.clip_grad,
                   help="clip the gradient norm to this value; 0: no clipping "
                        "(default: %(default)s)")
    g.add_argument("--clip-grad-value", type=float, default=r.clip_grad_value,
                   help="clamp every gradient value to +-this (before any norm clipping); 0: "
                        "no clamping (default: %(default)s)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast for forward and loss; the frozen Linear and conv weights "
                        "are then stored in bf16, which gives the same results with less "
                        "memory (ivt/precision.py) (default: off, float32)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of weights, shuffling and augmentation (default: %(default)s)")


def _run_arguments(g, task: Task) -> None:
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda or cuda:N; under torchrun each "
                        "process uses cuda:LOCAL_RANK, or the CPU with gloo (default: %(default)s)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture the whole training step (forward, backward, optimizer) once in "
                        "a CUDA graph and replay it: removes the host overhead of IV-tuning's "
                        "many small kernels. Needs CUDA and fixed input shapes; falls back to "
                        "eager steps with a message when a batch's shapes differ, under "
                        "torchrun, and for a task whose loss waits for the host (detection)")
    g.add_argument("--workers", type=int, default=default_workers(),
                   help="data-loading worker processes per training process (default: 4, or the "
                        "number of cores if fewer: %(default)s here)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help=f"output folder for log.jsonl, last.pt, best.pt (default: runs/{task.name}"
                        f", or with --resume FILE the folder of FILE)")
    g.add_argument("--resume", nargs="?", const="last", default=None, metavar="FILE",
                   help="continue from a checkpoint: FILE, or <out>/last.pt when given alone; "
                        "reproduces the uninterrupted run (weights, optimizer, schedule, RNG). "
                        "A flag left out takes the run's value (not --device, --workers, "
                        "--kernels, --cuda-graph, --verify-images); one given must equal it, "
                        "except how the run executes (device, workers, implementation, kernels, "
                        "memory, logging, evaluation interval)")
    g.add_argument("--allow-changes", action="store_true",
                   help="with --resume: accept changed training settings (iterations, lr, ...); "
                        "each change is printed and logged. The model's settings never change")
    g.add_argument("--eval-every", type=int, default=task.recipe.eval_every,
                   help="evaluate on the validation split and write last.pt (and best.pt) every "
                        "N iterations; 0: only at the end (default: %(default)s)")
    g.add_argument("--save-every", type=int, default=0,
                   help="also write last.pt every N iterations without evaluating, bounding "
                        "what a crash or kill -9 loses; 0: only with evaluations. Ctrl-C or "
                        "SIGTERM (one process) stops after the current iteration and writes "
                        "last.pt for --resume (default: %(default)s)")
    g.add_argument("--log-every", type=int, default=50,
                   help="write a training record (mean loss since the last one) to log.jsonl "
                        "every N iterations; the loss is read from the device only then "
                        "(default: %(default)s)")
    g.add_argument("--verify-images", action="store_true",
                   help="decode every training image before training starts, so a corrupt file "
                        "is named now rather than mid-run (validation images are always "
                        "decoded up front)")
    # a test aid (tests/test_train_seg.py): every process also writes its trainable weights to
    # <out>/trained_rank<RANK>.pt at the end, to check that DDP ranks agree
    g.add_argument("--save-rank-weights", action="store_true", help=argparse.SUPPRESS)


# -- checks made before anything expensive ------------------------------------------------------
def with_method_defaults(config: dict) -> dict:
    """`config` with the options of its compared method (--tuning vpt, adaptformer,
    bi_adaptformer, rein) that were left out (None) set to the method's defaults: what a run
    records, so that its checkpoint names the values it trained with (a run saved before these
    were recorded compares equal to one that gives them)."""
    own = METHOD_OPTIONS.get(config.get("tuning"), ())
    if not own:
        return dict(config)
    defaults = PETLConfig(method=config["tuning"])
    return {**config, **{key: getattr(defaults, name) for key, name in METHOD_FLAGS.items()
                         if name in own and config.get(key) is None}}


def check_method_options(args) -> None:
    """IV-tuning's and the compared methods' options as `build_backbone` will check them, before
    any data is read, with the flags named: e.g. --adapter-scale with --tuning vpt."""
    flags = {name: f"--{key.replace('_', '-')}" for key, name in METHOD_FLAGS.items()}
    flags.update({k: f"--{k.replace('_', '-')}" for k in ("d1", "d2", "d3", "layers",
                                                          "ir_embed")})
    try:
        # --ir-embed with --tuning ivt too, which backbone_kwargs drops (saved ivt runs may hold it)
        given = {**backbone_kwargs(vars(args)), **({"ir_embed": True} if args.ir_embed else {})}
        _, options = make_ivt_config(args.tuning, given)
        make_petl_config(args.tuning, options)
    except (TypeError, ValueError) as error:
        message = str(error)
        for name, flag in flags.items():
            message = re.sub(rf"\b{name}\b", flag, message)
        raise ValueError(message) from None


def check_args(task: Task, args) -> None:
    if args.data is None:
        raise ValueError("--data is required (with --resume, it is the run's)")
    for key in task.path_keys:
        if getattr(args, key) is not None:
            setattr(args, key, os.path.abspath(getattr(args, key)))
            if not os.path.exists(getattr(args, key)):
                raise FileNotFoundError(f"--{key.replace('_', '-')} {getattr(args, key)}: "
                                        f"not found")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ValueError(f"--lr must be positive and --weight-decay not negative, got "
                         f"{args.lr} and {args.weight_decay}")
    for name in ("batch_size", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, "
                             f"got {getattr(args, name)}")
    if args.iters is not None and args.iters < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    if getattr(args, "epochs", 1) < 1:
        raise ValueError(f"--epochs must be at least 1, got {args.epochs}")
    if args.eval_every < 0 or args.save_every < 0 or args.workers < 0:
        raise ValueError("--eval-every, --save-every and --workers must not be negative")
    if args.size < 32:
        raise ValueError(f"--size must be at least 32, got {args.size}")
    if args.batch_size == 1 and args.size < 64:
        raise ValueError(f"--batch-size 1 needs --size 64 or more, got {args.size}: BatchNorm "
                         f"needs more than one value per channel in training, and below 64 the "
                         f"coarsest feature map (stride 32) holds one position per image")
    if args.size % task.size_multiple:
        raise ValueError(f"--size must be a multiple of {task.size_multiple} for {task.name}, "
                         f"got {args.size}")
    if args.clip_grad < 0 or args.clip_grad_value < 0:
        raise ValueError("--clip-grad and --clip-grad-value must not be negative")
    if args.cuda_graph and not torch.cuda.is_available():
        raise ValueError("--cuda-graph needs a CUDA device")
    if args.memory != "keep" and (args.impl == "reference" or args.tuning != "ivt"):
        raise ValueError(f"--memory {args.memory} needs --impl fast (or fused) and --tuning ivt")
    check_method_options(args)
    vars(args).update(with_method_defaults(vars(args)))
    if args.drop_path is None:          # None: the model's own default
        args.drop_path = task.recipe.drop_path.get(args.backbone)
    if args.drop_path is not None and not 0 <= args.drop_path < 1:
        raise ValueError(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.patch_size is not None and args.backbone not in VIT_BACKBONES:
        raise ValueError(f"--patch-size applies to the ViTs ({', '.join(VIT_BACKBONES)}), not "
                         f"{args.backbone}")
    if args.backbone in VIT_BACKBONES:
        patch = args.patch_size or 16
        if args.size % patch:
            raise ValueError(f"{args.backbone} with patch {patch} needs an input size that is a "
                             f"multiple of {patch}; the training input is {args.size}x{args.size}")
    out_given, args.out = args.out is not None, out_folder(task, args)
    engine.check_output(args.out, "--out", folder=True)
    last = Path(args.out) / "last.pt"
    if not args.resume and last.exists():
        raise ValueError(f"{args.out} already holds a run ({last}); continue it with --resume, "
                         f"or choose another --out")
    if args.resume not in (None, "last") and last.exists() and not last.samefile(args.resume):
        if out_given:
            own_last = Path(os.path.dirname(args.resume) or ".") / "last.pt"
            own_folder = (", or leave --out out to continue it in its folder"
                          if not own_last.exists() or own_last.samefile(args.resume) else "")
            raise ValueError(f"--out {args.out} holds a run ({last}); continuing "
                             f"{args.resume} there would mix the two runs' logs and "
                             f"checkpoints: {resume_command(task, args.out, 1)} continues the "
                             f"run there; choose another --out to continue "
                             f"{args.resume}{own_folder}")
        raise ValueError(f"continuing {args.resume} in its own folder would overwrite that "
                         f"folder's {last.name} and mix the logs: give a new --out to continue "
                         f"{args.resume} there, or --resume {last} to continue the latest")


def resume_command(task: Task, out, nproc: int = 1, nodes: int = 1) -> str:
    """The command that continues the run in `out` (on `nproc` processes per node, `nodes`
    nodes): the script as this process was started (when it is the task's script)."""
    script = f"train_{task.name}.py"
    if os.path.basename(sys.argv[0]) == script:
        script = shlex.quote(sys.argv[0])
    rest = f"{script} --out {shlex.quote(str(out))} --resume"
    if nodes > 1:
        return f"torchrun (with this job's flags) {rest}"
    return f"torchrun --nproc_per_node={nproc} {rest}" if nproc > 1 else f"python {rest}"


def torchrun_shape() -> Tuple[int, int]:
    """(processes per node, nodes) of this torchrun job, from its environment; (1, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    return local, max(world // max(local, 1), 1)


def out_folder(task: Task, args) -> str:
    """--out, or when not given: runs/<task>, or with --resume FILE the folder of FILE."""
    if args.out is not None:
        return args.out
    resumed_file = args.resume is not None and args.resume != "last"
    return (os.path.dirname(args.resume) or ".") if resumed_file else f"runs/{task.name}"


def flags_from_run(task: Task, args, saved: dict, given: Optional[frozenset], path: str) -> None:
    """--resume: every flag left out of the command (not in `given`; None: every flag counts as
    given) takes the value of the run being continued (`saved`, its configuration), except this
    invocation's own (`OWN_FLAGS`)."""
    if saved.get("task") != task.name:
        raise ValueError(f"cannot resume from {path}: it is a run of train_{saved.get('task')}.py "
                         f"(task {saved.get('task')}), not of train_{task.name}.py")
    if given is None:
        return
    # --epochs given: the run's --iters (which would take precedence) is not kept; --impl given:
    # nor is its --memory (which --impl reference refuses)
    kept_out = (given | set(OWN_FLAGS) | ({"iters"} if "epochs" in given else set())
                | ({"memory"} if "impl" in given else set()))
    for key, value in saved.items():
        if key in vars(args) and key not in kept_out:
            setattr(args, key, value)
    for key in task.path_keys:               # a dataset moved since: say how to point at it
        value = getattr(args, key, None)
        if key not in kept_out and isinstance(value, str) and not os.path.exists(value):
            flag = "--" + key.replace("_", "-")
            raise FileNotFoundError(f"the run's {flag} {value} (saved in {path}) is not on this "
                                    f"machine; if it moved, give its new place: {flag} NEW "
                                    f"--allow-changes")


def given_flags(parser: argparse.ArgumentParser, argv) -> frozenset:
    """The settings (argparse destinations) that `argv` states, rather than leaves at their
    defaults: `argv` parsed once more with every default suppressed."""
    defaults = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in defaults:
            action.default = argparse.SUPPRESS
        return frozenset(vars(parser.parse_args(argv)))
    finally:
        for action, default in defaults:
            action.default = default


def pretrained_weights(args, resumed: Optional[dict],
                       progress: bool) -> Tuple[str, Optional[str]]:
    """(what `--pretrained` names, the local file it resolves to or None), downloading if needed.

    Not given, it means: with --resume, the weights the checkpoint was trained from (its saved
    file, or its release name or URL when that file is not on this machine); else the release
    named like the backbone ('swin_l' for --backbone swin_l), or 'none' for a backbone without
    one (swin_nano)."""
    if args.pretrained is None and resumed is not None:
        saved = resumed["config"]
        source = saved.get("pretrained_source") or saved.get("pretrained") or "none"
        return source, saved_pretrained(saved, progress)
    source = args.pretrained
    if source is None:
        source = args.backbone if args.backbone in RELEASES else "none"
    return source, resolve_pretrained(source, progress)


def random_backbone_warning(args) -> Optional[str]:
    """The warning for a frozen backbone left at its random init (None when there is none)."""
    if args.pretrained is not None or args.tuning == "full":
        return None
    why = ("--pretrained none" if args.backbone in RELEASES
           else f"{args.backbone} has no released checkpoint")
    return (f"warning: no pretrained weights ({why}): the frozen backbone stays random, so "
            f"this run (--tuning {args.tuning}) tunes its adapters and head around random "
            f"features and its results mean nothing for the paper")


def selection_warnings(task: Task, args) -> list:
    """Warnings for a run whose flags defeat themselves: a validation split of test images
    (best.pt then chosen on test), lr drops at or after the last epoch (never taken)."""
    found = []
    val_split = getattr(args, "val_split", None) or ""
    if any(part.startswith("test") for part in val_split.split("+")):
        found.append(f"warning: --val-split {val_split} chooses best.pt on test images; report "
                     f"last.pt, or hold out a validation split")
    if task.recipe.schedule == "step":
        late = [e for e in args.lr_drop_epoch if e >= args.epochs]
        if late:
            found.append(f"warning: --lr-drop-epoch {' '.join(map(str, late))} is at or after "
                         f"the last of --epochs {args.epochs}: the lr never drops there (a drop "
                         f"is an epoch of --epochs, which --iters scales to the run's length)")
    return found


def overlap_warning(train_set, val_set) -> Optional[str]:
    """The warning for validation images that are training images too, or whose copies are
    (None when there are none): best.pt is then chosen on training data. A dataset whose items
    may be copies of others (MFNet's flipped `_flip` files) says which image each shows in
    `source_paths`."""
    shown = getattr(train_set, "source_paths", train_set.image_paths)
    shared = set(shown) & set(val_set.image_paths)
    if not shared:
        return None
    return (f"warning: {len(shared)} of the {len(val_set)} validation images are training images "
            f"too, or copies of them are (e.g. {min(shared)}): best.pt is then chosen on "
            f"training data; with the paper's train+val protocol report last.pt")


def resume_checkpoint(task: Task, args, config: dict, log: Callable[[str], None],
                      ckpt: dict) -> Tuple[dict, list]:
    """Compare the configuration with the checkpoint's (read by `train`) and check its
    pretrained file; returns (checkpoint, the accepted changes as 'key: old -> new' strings)."""
    path = resume_path(args)
    if ckpt.get("pretrained_sha256") is None and args.pretrained is not None:
        raise CheckpointError(f"checkpoint {path} was trained from no pretrained weights (it holds "
                              f"the random frozen backbone it trained with); it cannot continue "
                              f"from --pretrained {args.pretrained_source}: leave --pretrained "
                              f"out to continue it, or start a new run from those weights")
    check_pretrained(ckpt, args.pretrained, path)
    saved = with_method_defaults(ckpt["config"])
    for key in task.path_keys:          # a run saved before paths were absolute: as from here
        if isinstance(saved.get(key), str):
            saved[key] = os.path.abspath(saved[key])
    differ = [k for k in sorted(set(saved) | set(config))
              if k not in RUN_ONLY and saved.get(k) != config.get(k)]
    changes = [f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in differ]
    fixed = [c for k, c in zip(differ, changes) if k in MODEL_KEYS + task.model_keys]
    if fixed or (changes and not args.allow_changes):
        hint = "" if fixed else " (pass --allow-changes to accept them)"
        raise ValueError(f"cannot resume from {path}, the configuration differs{hint}: "
                         + "; ".join(fixed or changes))
    for c in changes:
        log(f"resuming with a changed setting, {c}")
    ckpt["path"], ckpt["changed"] = path, differ
    return ckpt, changes


def short_error(e: BaseException) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker, just its last line
    (the original exception) instead of the worker's traceback."""
    text = str(e)
    if "Original Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


# -- the run -------------------------------------------------------------------------------------
def build_optimizer(task: Task, model: nn.Module, args) -> torch.optim.Optimizer:
    groups = task.param_groups(model, args)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    kind = task.recipe.optimizer
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)
    if kind == "adam":        # weight decay here is coupled L2, added to the gradient
        return torch.optim.Adam(groups, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)


def schedule(task: Task, args, per_epoch: int) -> Tuple[int, Callable[[int], float]]:
    """(total iterations, lr at a 0-based iteration)."""
    r = task.recipe
    if r.schedule == "poly":
        iters = args.iters
        return iters, lambda it: engine.poly_lr(args.lr, it, iters, args.poly_power, args.min_lr)
    epochs_iters = args.epochs * per_epoch
    iters = args.iters or epochs_iters
    drops = [round(epoch * per_epoch * iters / epochs_iters) for epoch in args.lr_drop_epoch]
    return iters, lambda it: args.lr * 0.1 ** sum(it >= drop for drop in drops)


def check_epoch_length(task: Task, args, ckpt: dict, per_epoch: int, world_size: int) -> None:
    """A schedule counted in epochs (the step schedule without --iters) continues at the
    iteration the checkpoint saved, an epoch position only at the epoch length it trained with:
    refuse another length (batch size, process count, training set), which would read it as
    another epoch and move the lr drops and the end."""
    saved = ckpt["config"].get("per_epoch")
    if task.recipe.schedule != "step" or args.iters or saved in (None, per_epoch):
        return
    it = ckpt["iter"]
    raise ValueError(f"{ckpt['path']} stopped after iteration {it}, epoch {it / saved:.4g} of "
                     f"epochs of {saved} iterations; an epoch is now {per_epoch} (--batch-size "
                     f"{args.batch_size} on {world_size} process(es)), which would read it as "
                     f"epoch {it / per_epoch:.4g}: resume with the run's batch size, process "
                     f"count and training images, or count the schedule in iterations: --iters "
                     f"{args.epochs * saved} --allow-changes keeps its length and lr drops")


def graphed_step(model, loss_fn, optimizer, autocast, clip_grad: float, clip_value: float,
                 eager: Callable, say: Callable) -> Callable:
    """`--cuda-graph`: the step captured in a CUDA graph (`ivt.graph_step`), or the eager step
    from the first batch whose shapes differ from the captured ones, with a message."""
    from .graph_step import GraphedTrainStep
    try:
        graphed = GraphedTrainStep(model, loss_fn, optimizer, autocast, clip_grad, clip_value)
    except ValueError as e:                     # e.g. under DDP
        say(f"--cuda-graph: {e}; using eager steps")
        return eager
    state = {"step": graphed}

    def step(batch: dict, lr: float) -> torch.Tensor:
        try:
            return state["step"](batch, lr)
        except ValueError as e:
            if state["step"] is eager:
                raise
            say(f"--cuda-graph: {e}; continuing with eager steps")
            state["step"] = eager
            return eager(batch, lr)
    return step


def resume_path(args, out: Optional[str] = None) -> str:
    """The checkpoint --resume names (<out>/last.pt when given alone; `out` default: --out)."""
    return os.path.join(out or args.out, "last.pt") if args.resume == "last" else args.resume


@contextmanager
def new_folder_removed_on_error(folder: Path, create: bool):
    """Create `folder` (when `create`); if it did not exist and the block fails, remove it
    again, so that a refused run leaves nothing behind."""
    new = create and not folder.exists()
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def check_run(task: Task, args, dist: engine.DistInfo,
              given: Optional[frozenset] = None) -> Optional[dict]:
    """The checks, the pretrained weights and the checkpoint to resume (None for a new run);
    with --resume, the flags not `given` are first taken from the run (`flags_from_run`)."""
    resumed = None
    if args.resume:
        if args.resume != "last" and not os.path.isfile(args.resume):
            raise FileNotFoundError(f"--resume {args.resume}: file not found")
        path = resume_path(args, out_folder(task, args))
        resumed = load_checkpoint(path)
        flags_from_run(task, args, resumed["config"], given, path)
    check_args(task, args)
    # The pretrained weights are found (and downloaded) now, before any data is read or model
    # built: a machine without network stops here, naming the URL and where to put the file.
    args.pretrained_source, args.pretrained = pretrained_weights(args, resumed, dist.is_main)
    return resumed


def prepare_run(task: Task, args, dist: engine.DistInfo, resumed: Optional[dict]
                ) -> Tuple[dict, Optional[dict], list, tuple]:
    """The run's configuration, the resumed checkpoint checked against it, and its datasets:
    (config, checkpoint or None, accepted changes, (train set, validation set))."""
    # the process count sets the effective batch and an epoch's iterations: a training setting
    config = {"task": task.name, **vars(args), "world_size": dist.world_size}
    norm = normalization_for(args.backbone)
    config["normalization"] = norm.as_dict()
    say = print if dist.is_main else (lambda *a, **k: None)
    ckpt, changes = (resume_checkpoint(task, args, config, say, resumed) if args.resume
                     else (None, []))
    engine.seed_everything(args.seed)
    train_set, val_set = task.build_datasets(args, norm, Path(args.out), dist.is_main)
    if args.verify_images:
        train_set.verify()
    val_set.verify()
    for warning in (random_backbone_warning(args), overlap_warning(train_set, val_set),
                    *selection_warnings(task, args)):
        if warning and dist.is_main:
            print(warning, file=sys.stderr)
    if len(train_set) < args.batch_size * dist.world_size:
        raise ValueError(f"--batch-size {args.batch_size} on {dist.world_size} process(es) "
                         f"needs at least {args.batch_size * dist.world_size} training "
                         f"images; the training set has {len(train_set)}")
    return config, ckpt, changes, (train_set, val_set)


def build_training(task: Task, args, config: dict, ckpt: Optional[dict],
                   dist: engine.DistInfo) -> Tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """(model, optimizer, the model as the loop runs it: DDP-wrapped when distributed), on the
    device, restored from `ckpt` when resuming."""
    model = speed_up(task.build_model(config, args.pretrained), config)
    if ckpt is not None:
        load_model_state(model, ckpt["model"], ckpt["delta"], ckpt["path"])
    model.to(dist.device)
    if args.amp:                    # every forward runs under bf16 autocast: cast them once
        store_frozen_weights(model, torch.bfloat16)
    optimizer = build_optimizer(task, model, args)
    if ckpt is not None:
        # load_state_dict also restores each group's settings (weight decay, momentum, lr_mult,
        # a CUDA-graph run's capturable); this run's flags decide them (--allow-changes)
        settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
    net = (DistributedDataParallel(model, device_ids=[dist.device.index]
                                   if dist.device.type == "cuda" else None)
           if dist.distributed else model)
    return model, optimizer, net


def training_step(task: Task, args, net: nn.Module, optimizer: torch.optim.Optimizer,
                  autocast: Callable, dist: engine.DistInfo, say: Callable) -> Callable:
    """`step(batch, lr) -> loss`: eager, or with --cuda-graph captured (`graphed_step`)."""
    loss_fn = lambda m, b: task.loss(m, b, dist.device)                   # noqa: E731
    step = engine.EagerStep(net, loss_fn, optimizer, autocast, args.clip_grad,
                            args.clip_grad_value)
    if args.cuda_graph and task.eager_only:
        say(f"--cuda-graph: {task.eager_only}; using eager steps")
    elif args.cuda_graph:
        step = graphed_step(net, loss_fn, optimizer, autocast, args.clip_grad,
                            args.clip_grad_value, step, say)
    return step


class RunCheckpoints:
    """A run's last.pt (written at every save) and best.pt (at a new best validation score)."""

    def __init__(self, task: Task, model: nn.Module, optimizer: torch.optim.Optimizer,
                 config: dict, args, dist: engine.DistInfo, ckpt: Optional[dict],
                 say: Callable = print):
        self.task, self.model, self.optimizer, self.config = task, model, optimizer, config
        self.pretrained = args.pretrained
        self.pretrained_sha256 = sha256_file(args.pretrained) if args.pretrained else None
        self.is_main = dist.is_main
        self.last, self.best_path = Path(args.out) / "last.pt", Path(args.out) / "best.pt"
        # A resumed run's next best.pt must beat the score best.pt holds (read from that file),
        # unless the validation changed (--allow-changes), which chooses best.pt anew, as does a
        # folder without best.pt (a checkpoint continued into a new --out).
        changed = sorted(set(ckpt.get("changed", ())) & set(task.validation_keys)) if ckpt else []
        if changed:
            say(f"the validation changed ({', '.join(changed)}): best.pt is chosen anew from "
                f"this run's evaluations")
        held = saved_score(str(self.best_path)) if ckpt is not None and not changed else None
        # the lower of the two: last.pt's best is -inf after a validation change not evaluated
        # yet (best.pt still holds the old validation's score). A run stopped between writing
        # last.pt at a new best and linking best.pt to it gets the link now.
        self.best = min(ckpt["best"], held) if held is not None else -math.inf
        if ckpt is not None and not changed and self.unlinked_best(ckpt, held):
            self.best = ckpt["best"]
            if self.is_main:
                atomic_link(str(self.last), str(self.best_path))
        self.metrics = ckpt["metrics"] if ckpt is not None else None
        self.saved_iter = ckpt["iter"] if ckpt is not None else None

    def unlinked_best(self, ckpt: dict, held: Optional[float]) -> bool:
        """Whether the run stopped after writing this folder's last.pt at a new best score and
        before linking best.pt to it: the resumed state is then the best one."""
        scored = (ckpt["metrics"] or {}).get(self.task.metric)
        return (scored == ckpt["best"] and (held is None or scored > held)
                and self.last.is_file() and self.last.samefile(ckpt["path"]))

    def save(self, it: int, r: Optional[dict]) -> None:
        """After iteration `it`, with the validation result `r` (None: no evaluation this time;
        the checkpoint then keeps the last one)."""
        is_best = r is not None and r[self.task.metric] > self.best    # NaN is never best
        self.best = r[self.task.metric] if is_best else self.best
        self.metrics = r if r is not None else self.metrics
        rng = every_rank_rng_state()
        if self.is_main:
            state = make_checkpoint(self.model, self.optimizer, it, self.config, self.pretrained,
                                    self.pretrained_sha256, rng, task=self.task.name,
                                    metric=self.task.metric, best=self.best, metrics=self.metrics)
            atomic_save(state, str(self.last))
            if is_best:                          # the same state: best.pt links to last.pt
                atomic_link(str(self.last), str(self.best_path))
        self.saved_iter = it

    def kept(self) -> str:
        """What a failed run leaves, for its error message."""
        return (f"the last good checkpoint is {self.last} (iteration {self.saved_iter})"
                if self.saved_iter is not None else "no checkpoint was written")


def train(task: Task, args, dist: engine.DistInfo, given: Optional[frozenset] = None) -> dict:
    """The run of `args` (`given`: the flags its command states, see `check_run`)."""
    resumed = check_run(task, args, dist, given)
    if args.kernels != "auto" or args.impl != "reference":     # --impl may be the resumed run's
        import kernels                    # only the fast and fused paths use the kernels
        kernels.set_backend(args.kernels)
        kernels.check_backend(dist.device)
    with new_folder_removed_on_error(Path(args.out), dist.is_main):
        config, ckpt, changes, (train_set, val_set) = prepare_run(task, args, dist, resumed)
        model, optimizer, net = build_training(task, args, config, ckpt, dist)
    start_iter, result = (ckpt["iter"], ckpt["metrics"]) if ckpt is not None else (0, None)
    say = print if dist.is_main else (lambda *a, **k: None)
    autocast = engine.autocast_context(dist.device, args.amp)
    stream = engine.InfiniteBatches(train_set, args.batch_size, dist, args.seed, args.workers,
                                    start_iter)
    iters, lr_at = schedule(task, args, stream.per_epoch)
    if ckpt is not None:
        check_epoch_length(task, args, ckpt, stream.per_epoch, dist.world_size)
    config["total_iters"], config["per_epoch"] = iters, stream.per_epoch
    batches = iter(stream)
    out = Path(args.out)
    logger = engine.JSONLLogger(str(out / "log.jsonl"), dist.is_main)
    logger.log("resume" if ckpt else "start", iter=start_iter, config=config,
               world_size=dist.world_size, device=str(dist.device),
               train_images=len(train_set), val_images=len(val_set), changes=changes)
    say(engine.describe_parameters(model))
    say(f"{len(train_set)} training images, {len(val_set)} validation; {iters} iterations "
        f"({stream.per_epoch} per epoch); {dist.world_size} process(es) on {dist.device}"
        + (f"; resuming at iteration {start_iter}" if ckpt else ""))
    checkpoints = RunCheckpoints(task, model, optimizer, config, args, dist, ckpt, say)
    if ckpt is not None and start_iter >= iters:
        longer = "--iters or --epochs" if task.recipe.schedule == "step" else "--iters"
        say(f"the run is complete (iteration {start_iter} of {iters}): nothing to train; "
            f"{longer} with --allow-changes extends it")

    def evaluate(it: int) -> dict:
        r = task.evaluate(net, val_set, dist, autocast, args.workers)
        logger.log("eval", iter=it, **r)
        say(f"\niter {it}: validation {task.format_eval(r)}")
        return r

    step = training_step(task, args, net, optimizer, autocast, dist, say)
    # Restored last, so that nothing between here and the first iteration draws from it.
    if ckpt is not None:
        rng = ckpt["rng"]                   # a list by rank (a dict: one state for every rank)
        # more processes than saved (--allow-changes): the new ranks take the saved ones' in turn
        set_rng_state(rng[dist.rank % len(rng)] if isinstance(rng, list) else rng)
    stop = engine.StopRequest(enabled=not dist.distributed)
    try:
        with stop:
            result = engine.train_loop(
                net, batches, step, dist=dist, start_iter=start_iter, iters=iters, lr_at=lr_at,
                log_every=args.log_every, eval_every=args.eval_every, evaluate=evaluate,
                save=checkpoints.save, logger=logger, save_every=args.save_every,
                stop=stop) or result
    except engine.RunInterrupted as e:
        logger.log("interrupted", iter=e.iteration, signal=signal.Signals(e.signum).name)
        say(f"{e}; {checkpoints.last} is written: the run is complete" if e.iteration >= iters
            else f"{e}; {checkpoints.last} is written: {resume_command(task, out, 1)} "
                 f"continues it")
        raise
    except KeyboardInterrupt:
        if stop.signum is None:         # not a second signal (under torchrun: the first)
            raise
        logger.log("interrupted", iter=checkpoints.saved_iter, signal="SIGINT", at_once=True)
        say(f"\nstopped at once by a Ctrl-C after {signal.Signals(stop.signum).name}; "
            f"{checkpoints.kept()}" + (f": {resume_command(task, out, 1)} continues from it"
                                       if checkpoints.saved_iter is not None else ""))
        raise engine.RunInterrupted(checkpoints.saved_iter or 0, signal.SIGINT) from None
    except (engine.TrainingDiverged, BadImageError) as e:
        logger.log("diverged" if isinstance(e, engine.TrainingDiverged) else "bad_image",
                   message=short_error(e))
        raise type(e)(f"{short_error(e)}; {checkpoints.kept()}") from None
    finally:
        logger.close()
    if args.save_rank_weights:
        torch.save(model_state(model, include_frozen=False), out / f"trained_rank{dist.rank}.pt")
    best = checkpoints.best
    return {"iters": iters, "metrics": result, "best": best if math.isfinite(best) else None,
            "out": str(out), "last": str(checkpoints.last),
            "best_path": str(checkpoints.best_path) if checkpoints.best_path.exists() else None,
            "log": str(out / "log.jsonl")}


def main(task: Task, argv=None) -> dict:
    """Parse `argv` (default: sys.argv), train, return a summary: final validation metrics, the
    best score and the paths written. Bad data or configuration exits with status 2 and an
    `error:` line; a diverged run (NaN loss) exits with status 1; a run stopped by Ctrl-C or
    SIGTERM, its checkpoint written, with 128 + the signal's number (130, 143)."""
    parser = get_parser(task)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv) if args.resume else None
    try:
        dist = engine.setup_distributed(args.device)
        try:
            return train(task, args, dist, given)
        finally:
            engine.cleanup_distributed()
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {short_error(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except engine.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except engine.RunInterrupted as e:
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:               # Ctrl-C before or after the loop, or under torchrun
        if int(os.environ.get("RANK", "0")) == 0:
            out = args.out or out_folder(task, args)
            saved = (f"{Path(out) / 'last.pt'} is the last checkpoint written: "
                     f"{resume_command(task, out, *torchrun_shape())} "
                     f"continues from it" if (Path(out) / "last.pt").is_file()
                     else "no checkpoint was written")
            print(f"error: interrupted; {saved}", file=sys.stderr)
        raise SystemExit(130) from None

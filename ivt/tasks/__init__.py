"""The three tasks (segmentation, salient object detection, detection): per task, its datasets,
model, loss, evaluation and report, plugged into the shared engine and trainer.

Each task module (`seg`, `sod`, `det`) provides `build_model(config, pretrained) -> nn.Module`,
rebuilding the model a training configuration (the dict saved in every checkpoint) describes.
"""
import argparse
import importlib
import warnings
from typing import Optional, Tuple

import torch.nn as nn

from ..checkpoint import check_pretrained, load_checkpoint, load_model_state
from ..data.transforms import Normalization
from ..trainer import KERNEL_BACKENDS, speed_up
from ..weights import resolve_pretrained, saved_pretrained

TASK_NAMES = ("seg", "sod", "det")


def task_module(name: str):
    """The module `ivt.tasks.<name>` for a task name in TASK_NAMES."""
    if name not in TASK_NAMES:
        raise ValueError(f"unknown task {name!r}; expected one of {', '.join(TASK_NAMES)}")
    return importlib.import_module(f"{__name__}.{name}")


def add_kernels_flag(parser: argparse.ArgumentParser) -> None:
    """`--kernels` of the scripts that run a trained checkpoint (evaluate.py, predict.py); the
    script calls `kernels.set_backend(args.kernels)`."""
    parser.add_argument("--kernels", default="auto", choices=KERNEL_BACKENDS,
                        help="SimAM, partial conv and (runs trained with --impl fused) Hybrid "
                             "Adapter implementation: auto (Triton on CUDA), torch (reference), "
                             "triton (default: %(default)s)")


def config_normalization(config: dict) -> Normalization:
    """The input normalisation saved in a run's configuration (the backbone's, see
    `ivt.models.normalization_for`)."""
    return Normalization.from_dict(config["normalization"])


def load_trained(path: str, pretrained: Optional[str] = None) -> Tuple[str, nn.Module, dict]:
    """Rebuild a trained model from a checkpoint written by a training script.

    Returns (task name, model in eval mode on the CPU, the checkpoint dict). `pretrained` (FILE,
    NAME or URL, as `--pretrained` of the training scripts) overrides the pretrained file saved
    in the configuration; a delta checkpoint checks the file's SHA-256 against its own.
    """
    ckpt = load_checkpoint(path)
    task = ckpt["task"]
    cfg = ckpt["config"]
    if ckpt["delta"]:
        pretrained = saved_pretrained(cfg) if pretrained is None else resolve_pretrained(pretrained)
    elif pretrained is not None:
        warnings.warn(f"--pretrained {pretrained} is not used: checkpoint {path} holds the whole "
                      f"trained backbone", stacklevel=2)
        pretrained = None
    check_pretrained(ckpt, pretrained, path)
    model = task_module(task).build_model(cfg, pretrained if ckpt["delta"] else None)
    model = speed_up(model, cfg)          # the run's --impl and --memory (`ivt.fast.make_fast`)
    load_model_state(model, ckpt["model"], ckpt["delta"], path)
    return task, model.eval(), ckpt

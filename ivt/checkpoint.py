"""Resumable training state: delta checkpoints, the pretrained file's hash, atomic writes.

A checkpoint is a dict saved with `torch.save` and read back with `weights_only=True` (tensors and
plain Python values only):

    format              CHECKPOINT_FORMAT
    config              the full flat configuration of the run (argparse's namespace as a dict)
    iter                iterations completed
    model               tensors of the model (see `model_state`)
    delta               True when `model` holds only what was trained (a pretrained file exists)
    pretrained          path of the pretrained visible-model file (None without one)
    pretrained_sha256   its SHA-256 (None without one)
    optimizer           the optimizer's state_dict
    rng                 every process's python, numpy, torch (and cuda) RNG states at the moment
                        of saving, in rank order
    task                'seg', 'sod' or 'det'
    metric, best        the validation score that selects best.pt, and its best value so far
    metrics             the latest validation results

With a pretrained file, only the parameters that train plus every persistent buffer are stored
(tens of MB for Swin-L instead of 800 MB); loading re-reads the pretrained file and checks its hash.
Without one, the frozen (randomly initialised) weights are stored too.
"""
import hashlib
import os
import random
import shutil
import tempfile
import warnings
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn

from .models.backbone import CheckpointError, _key_list, load_tensors
from .weights import renamed_into_place

CHECKPOINT_FORMAT = "ivt-checkpoint-1"


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj, path: str) -> None:
    """`torch.save` to a temporary file in the same folder, fsync, then `os.replace`: a reader (or
    a run killed mid-write) sees either the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    with renamed_into_place(tmp, path), os.fdopen(fd, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_link(src: str, dst: str) -> None:
    """Make `dst` the same file as `src` (a hard link: no second copy on disk; a later
    `atomic_save` to `src` replaces its name, not its content, so `dst` keeps it), atomically like
    `atomic_save`. Where the file system has no hard links, `dst` becomes a copy."""
    folder = os.path.dirname(os.path.abspath(dst))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(dst) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    with renamed_into_place(tmp, dst):
        os.remove(tmp)                            # the name only: the link takes it
        try:
            os.link(src, tmp)
        except OSError:
            with open(src, "rb") as s, open(tmp, "wb") as d:
                shutil.copyfileobj(s, d, 1 << 24)
                d.flush()
                os.fsync(d.fileno())              # on disk before the rename, as atomic_save


# -- model tensors ---------------------------------------------------------------------------
def model_state(model: nn.Module, include_frozen: bool) -> Dict[str, torch.Tensor]:
    """Every parameter with requires_grad plus every persistent buffer (BatchNorm running stats
    of the adapters and the head); with `include_frozen`, the whole state_dict."""
    sd = model.state_dict()
    if include_frozen:
        return {k: v.detach().clone() for k, v in sd.items()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return {k: v.detach().clone() for k, v in sd.items() if k not in frozen}


def load_model_state(model: nn.Module, state: Dict[str, torch.Tensor], delta: bool,
                     source: str) -> None:
    """Load `state` into `model`. Unexpected keys are an error; so are missing keys, except the
    frozen parameters of a delta checkpoint (they come from the pretrained file)."""
    own = model.state_dict()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing = set(own) - set(state) - (frozen if delta else set())
    unexpected = set(state) - set(own)
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in set(state) & set(own) if state[k].shape != own[k].shape]
    if missing or unexpected or bad:
        lines = [f"checkpoint {source} does not match the model built from its configuration:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_key_list(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
        if bad:
            lines.append(f"  shape mismatches ({len(bad)}): " + "; ".join(sorted(bad)[:20]))
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=False)


def check_pretrained(ckpt: dict, pretrained: Optional[str], source: str) -> None:
    """A delta checkpoint is only meaningful with the very pretrained file it was trained on."""
    expected = ckpt.get("pretrained_sha256")
    if expected is None:
        return
    if pretrained is None:
        raise CheckpointError(f"checkpoint {source} holds only the trained weights; it needs the "
                              f"pretrained file it was trained on (SHA-256 {expected}), "
                              f"e.g. --pretrained FILE")
    if not os.path.isfile(pretrained):
        raise FileNotFoundError(f"pretrained file {pretrained} (needed by checkpoint {source}) not "
                                f"found; pass --pretrained FILE")
    actual = sha256_file(pretrained)
    if actual != expected:
        raise CheckpointError(f"pretrained file {pretrained} has SHA-256 {actual}, but checkpoint "
                              f"{source} was trained with a pretrained file of SHA-256 {expected}")


# -- RNG ---------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Python, numpy, torch and (when present) CUDA generator states, as plain values/tensors."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def every_rank_rng_state() -> list:
    """`rng_state()` of every process, in rank order (one process: a list of one); called by all
    processes together. The ranks' streams part as soon as a task draws differently on each
    (detection's denoising draws per box), so each rank resumes its own."""
    state = rng_state()
    if not torch_dist.is_initialized():
        return [state]
    states = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(states, state)
    return states


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # one state per GPU the saving process saw: where fewer are visible now, theirs
        for index, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, index)


# -- whole checkpoints -------------------------------------------------------------------------
def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, iteration: int,
                    config: dict, pretrained: Optional[str], pretrained_sha256: Optional[str],
                    rng: Optional[list] = None, **extra) -> dict:
    """The state to resume exactly after `iteration` iterations (call it at that moment: the RNG
    states are captured now, or passed as `rng`, `every_rank_rng_state()`, in a distributed run).
    `pretrained_sha256` is computed once per run by the caller."""
    return {"format": CHECKPOINT_FORMAT, "config": dict(config), "iter": iteration,
            "model": model_state(model, include_frozen=pretrained is None),
            "delta": pretrained is not None, "pretrained": pretrained,
            "pretrained_sha256": pretrained_sha256, "optimizer": optimizer.state_dict(),
            "rng": rng if rng is not None else [rng_state()], **extra}


def saved_score(path: str) -> Optional[float]:
    """The validation score a checkpoint was saved with (its `best`: for best.pt, its own), read
    without loading its tensors (memory-mapped where the file's format allows); None for a
    missing file, and, with a warning, for an unreadable one."""
    if not os.path.isfile(path):
        return None
    try:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:                # e.g. torch's legacy format, which mmap refuses
            saved = torch.load(path, map_location="cpu", weights_only=True)
        score = saved.get("best")
    except Exception as e:                  # truncated, not a checkpoint
        warnings.warn(f"{path}: unreadable ({type(e).__name__}); its score is not counted",
                      stacklevel=2)
        return None
    return float(score) if isinstance(score, (int, float)) else None


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint written by `make_checkpoint` + `atomic_save` (no code is unpickled)."""
    if os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} is a folder; give a file in it, e.g. "
                                f"{os.path.join(path, 'best.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    ckpt = load_tensors(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an ivt training checkpoint "
                              f"(expected format {CHECKPOINT_FORMAT!r})")
    return ckpt

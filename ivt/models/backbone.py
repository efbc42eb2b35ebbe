"""What every IV-tuning backbone shares: the tuning modes, the freezing rule, input checks and
checkpoint loading. The families (`swin.py`; `eva02.py`, `dinov2.py`, `mae.py` on the ViT of
`vit.py`) define their layers and a pure `checkpoint_filter_fn` for foreign state dicts.

Tuning modes: `full` and `freeze` (the visible model alone, all or nothing trainable), `ivt`
(IV-tuning) and the PETL methods of Table 4 (`vpt`, `adaptformer`, `bi_adaptformer`, `rein`,
see `petl/`). One rule decides what trains: `full` trains everything, every other mode exactly the
modules it added to the visible model (`added_module_names`).
"""
import os
import pickle
import warnings
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from .ivtuning import IVTConfig
from .petl import METHOD_OPTIONS, PETLConfig, attach
from .petl import METHODS as PETL_METHODS

TUNINGS = ("full", "freeze", "ivt") + PETL_METHODS
StateDict = Dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint file that does not fit the model; the message lists the offending keys."""


class Unread:
    """Stands in for a Python object that a checkpoint pickled beside its tensors (mmengine's
    `meta` and `message_hub`: numpy values, `HistoryBuffer`s): made and given its state without
    importing or running anything of the object's own; what it held is not read."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def weights_only_load(path: str):
    """`torch.load(path, weights_only=True)` on the CPU, where Python objects beside the tensors
    other than weights_only's own types load as `Unread` placeholders (with torch 2.6+, which
    lists them; before, they are refused)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e) or not hasattr(torch.serialization,
                                                             "get_unsafe_globals_in_checkpoint"):
            raise
    names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    with torch.serialization.safe_globals([(Unread, name) for name in names]):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_tensors(path: str, what: str):
    """`torch.load(path, weights_only=True)` on the CPU (`weights_only_load`); a file that is not
    such a checkpoint is a CheckpointError naming `what` and the path, with the reason in one
    line."""
    try:
        return weights_only_load(path)
    except pickle.UnpicklingError as e:
        # torch's message: advice, then the cause: after "WeightsUnpickler error:" (on that
        # line or the next), or a line of its own naming a global it will not load
        text = str(e)
        after = text.split("WeightsUnpickler error:", 1)[-1]
        lines = [line.strip() for line in after.splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line),
                      lines[0] if lines else text.splitlines()[0])
        reason = (f"it holds Python objects, not only tensors ({detail})"
                  if "GLOBAL" in detail or "Unsupported class" in detail
                  else f"not a PyTorch checkpoint ({detail})")
    except Exception as e:  # a truncated file, not a checkpoint at all
        reason = f"not a PyTorch checkpoint, or truncated ({type(e).__name__}: {e})"
    raise CheckpointError(f"cannot read {what} {path}: {reason}")


def read_state_dict(path: str) -> StateDict:
    """Load a checkpoint's tensors without unpickling code.

    `.safetensors` through safetensors; anything else through `torch.load(weights_only=True)`.
    A wrapping dict (`{'model': ...}` as in the Swin and MAE releases, `{'module': ...}` (EVA02),
    `{'state_dict': ...}`) is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            sd = load_file(path, device="cpu")
        except Exception as error:          # SafetensorError: truncated, not safetensors, ...
            raise CheckpointError(f"cannot read pretrained checkpoint {path}: "
                                  f"{type(error).__name__}: {error}") from None
    else:
        sd = load_tensors(path, "pretrained checkpoint")
    if isinstance(sd, dict) and str(sd.get("format", "")).startswith("ivt-checkpoint"):
        raise CheckpointError(f"{path} is a checkpoint of a training run here, not a visible "
                              f"model's pretrained weights: continue the run with --out DIR "
                              f"--resume, or run it with evaluate.py / predict.py")
    for wrapper in ("model", "module", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def _key_list(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:20])
    return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")


class IVTBackbone(nn.Module):
    """Base class: `forward(vis, ir=None)` returns feature maps; tuning decides what trains.

    Subclasses set `self.ivt_cfg` (None unless tuning == 'ivt'), build their layers, register
    their IV-tuning modules under the names listed by `ivt_module_names()`, and implement
    `block_stages()`, `checkpoint_filter_fn(state_dict) -> state_dict` (pure, no I/O) and
    `forward`. A PETL method's modules (and the independent IR patch embedding) are added after
    construction by `add_petl` (`build_backbone` does it).
    """

    tuning: str
    ivt_cfg: Optional[IVTConfig]
    petl_cfg: Optional[PETLConfig] = None
    petl_names: Tuple[str, ...] = ()
    input_multiple: int = 1             # input sides must be multiples of it (a ViT: its patch)

    def ivt_module_names(self) -> List[str]:
        """Names (prefixes) of the modules IV-tuning adds; everything else is the visible model."""
        raise NotImplementedError

    def block_stages(self) -> List[List[nn.Module]]:
        """The transformer blocks grouped by stage (one group for a plain ViT)."""
        raise NotImplementedError

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        raise NotImplementedError

    # -- which parameters train -------------------------------------------------------------
    def add_petl(self, cfg: PETLConfig) -> None:
        """Add a PETL method's modules and/or the independent IR patch embedding (Sec. 4.5)."""
        self.petl_cfg = cfg
        self.petl_names = tuple(attach(self, cfg))
        self.apply_tuning()

    def added_module_names(self) -> List[str]:
        """Names (prefixes) of what the tuning mode added to the visible model: IV-tuning's
        modules, or a PETL method's plus the IR patch embedding; everything else is visible."""
        return self.ivt_module_names() if self.tuning == "ivt" else list(self.petl_names)

    def is_added_name(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.added_module_names())

    def apply_tuning(self) -> None:
        """Freeze by one rule: `full` trains everything, every other mode exactly what it added
        (`freeze`: nothing, or only the IR patch embedding; `ivt`: IR patch embedding, EMPG with
        its LayerNorm, every HA and IPA; a PETL method: its modules and the IR patch embedding)."""
        for name, p in self.named_parameters():
            p.requires_grad = self.tuning == "full" or self.is_added_name(name)

    def visible_state_keys(self) -> List[str]:
        """State-dict keys of the visible model (a checkpoint provides them)."""
        return [k for k in self.state_dict() if not self.is_added_name(k)]

    def optional_visible_keys(self) -> List[str]:
        """Visible keys a checkpoint may lack (they then keep their initial values; a file with
        only some of them is warned about, naming the others)."""
        return []

    # -- pretrained weights -----------------------------------------------------------------
    def load_pretrained(self, path: str) -> None:
        """Load a visible-model checkpoint (original release or timm layout) into the frozen part.

        Any key that the model expects and the file lacks, or that the file has and the model
        does not know, is an error listing the keys; so is a shape mismatch, and anything the
        family's `checkpoint_filter_fn` refuses (the message then names the file).
        """
        sd = read_state_dict(path)
        try:
            sd = self.checkpoint_filter_fn(sd)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
        self.load_visible_state(sd, f"checkpoint {path}")

    def load_visible_state(self, sd: StateDict, source: str) -> None:
        """Load a state dict already in this model's names into the visible (frozen) part:
        exactly the visible keys, with their shapes, else a CheckpointError listing the keys."""
        expected = self.visible_state_keys()
        optional = set(self.optional_visible_keys())
        missing = set(expected) - set(sd) - optional
        unexpected = set(sd) - set(expected)
        if missing or unexpected:
            lines = [f"{source} does not match {type(self).__name__} "
                     f"({getattr(self, 'name', '')}):"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {_key_list(missing)}")
            if unexpected:
                lines.append(f"  unexpected keys ({len(unexpected)}): {_key_list(unexpected)}")
            raise CheckpointError("\n".join(lines))
        own = self.state_dict()
        bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
               for k in expected if k in sd and sd[k].shape != own[k].shape]
        if bad:
            raise CheckpointError(f"{source} has shape mismatches "
                                  f"({len(bad)}): " + "; ".join(bad[:20]))
        absent = optional - set(sd)
        if absent and absent != optional:           # a file with some of them: say which not
            warnings.warn(f"{source} has only some of the keys it may leave out; these "
                          f"{len(absent)} keep their initial values: {_key_list(absent)}",
                          stacklevel=2)
        self.load_state_dict(sd, strict=False)

    # -- input checks -----------------------------------------------------------------------
    def check_inputs(self, vis: torch.Tensor, ir: Optional[torch.Tensor]
                     ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Validate (vis, ir) and return the infrared input the model will use (or None).

        vis: (B, 3, H, W). ir: (B, 3, H, W) or (B, 1, H, W) (one thermal channel is repeated).
        ir is required whenever the model has an IR patch embedding (`ivt`, the PETL methods,
        `full`/`freeze` built with ir_embed=True), except for IV-tuning's `ir_missing` variant,
        which uses vis; the visible model alone ignores it.
        """
        if not torch.is_tensor(vis) or vis.dim() != 4 or vis.shape[1] != 3:
            raise ValueError(f"vis must be a (B, 3, H, W) tensor, got "
                             f"{tuple(vis.shape) if torch.is_tensor(vis) else type(vis).__name__}")
        if getattr(self, "ir_patch_embed", None) is None:
            return vis, None                       # the visible model alone ignores infrared
        if self.tuning == "ivt" and self.ivt_cfg.ir_from_visible:           # Fig. 4(h)
            return vis, vis
        if ir is None:
            if self.tuning == "ivt":
                raise ValueError("IV-tuning needs the infrared image: call forward(vis, ir) "
                                 "(or build with variant='ir_missing' to feed vis instead)")
            raise ValueError(f"tuning={self.tuning!r} with an infrared patch embedding needs the "
                             f"infrared image: call forward(vis, ir)")
        if not torch.is_tensor(ir) or ir.dim() != 4 or ir.shape[1] not in (1, 3):
            raise ValueError(f"ir must be a (B, 1 or 3, H, W) tensor, got "
                             f"{tuple(ir.shape) if torch.is_tensor(ir) else type(ir).__name__}")
        if ir.shape[0] != vis.shape[0] or ir.shape[2:] != vis.shape[2:]:
            raise ValueError(f"ir {tuple(ir.shape)} and vis {tuple(vis.shape)} must have the same "
                             f"batch size and spatial size")
        if ir.shape[1] == 1:
            ir = ir.expand(-1, 3, -1, -1)
        return vis, ir


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def make_ivt_config(tuning: str, options: dict) -> Tuple[Optional[IVTConfig], dict]:
    """Split build options into an IVTConfig (for tuning='ivt') and the family's own options.

    IV-tuning options passed with tuning 'full'/'freeze' are an error unless they equal the
    defaults (so scripts may pass their defaults through unconditionally).
    """
    if tuning not in TUNINGS:
        raise ValueError(f"tuning must be one of {', '.join(TUNINGS)}, got {tuning!r}")
    names = ("d1", "d2", "d3", "variant", "layers", "dropout", "lam", "zero_init_up")
    ivt_opts = {k: options.pop(k) for k in names if k in options}
    if tuning == "ivt":
        return IVTConfig(**ivt_opts), options
    default = IVTConfig()
    changed = [k for k, v in ivt_opts.items() if v is not None and v != getattr(default, k)]
    if changed:
        raise ValueError(f"options {', '.join(changed)} only apply to tuning='ivt' "
                         f"(got tuning={tuning!r})")
    return None, options


PETL_OPTIONS = ("prompt_length", "bottleneck", "scale", "rein_tokens", "rein_rank", "ir_embed")


def make_petl_config(tuning: str, options: dict) -> Tuple[Optional[PETLConfig], dict]:
    """Split build options into a PETLConfig and the family's own options.

    The PETL methods always have the IR patch embedding; `full`/`freeze` have it with
    `ir_embed=True`; `ivt` has its own. A method's options (`prompt_length` for vpt,
    `bottleneck`/`scale` for (bi_)adaptformer, `rein_tokens`/`rein_rank` for rein) passed with
    another mode are an error unless None.
    """
    opts = {k: options.pop(k) for k in PETL_OPTIONS if k in options}
    opts = {k: v for k, v in opts.items() if v is not None}
    ir_embed = opts.pop("ir_embed", None)
    own = METHOD_OPTIONS.get(tuning, ())
    stray = [k for k in opts if k not in own]
    if stray:
        raise ValueError(f"options {', '.join(stray)} do not apply to tuning={tuning!r}")
    if tuning in PETL_METHODS:
        if ir_embed is False:
            raise ValueError(f"tuning={tuning!r} always has the IR patch embedding (Sec. 4.5); "
                             f"ir_embed=False is not available")
        return PETLConfig(method=tuning, **opts), options
    if tuning == "ivt":
        if ir_embed is False:
            raise ValueError("IV-tuning always has its IR patch embedding; ir_embed=False is not "
                             "available (variant='ir_missing' feeds the visible image instead)")
        if ir_embed:
            raise ValueError("option ir_embed applies to tuning 'full' or 'freeze': IV-tuning "
                             "has its own IR patch embedding (EMPG)")
        return None, options
    return (PETLConfig(method=None) if ir_embed else None), options

"""Model entry points: `build_backbone(name, tuning=..., pretrained=..., img_size=..., **options)`.

The models here are the paper's, with its readable forwards; the speed-ups (`ivt.fast`, a layer
above this package) are applied to a built model by `ivt.fast.make_fast(model, impl, memory)`."""
from typing import Union

from ..data.transforms import CLIP, IMAGENET, Normalization
from ..weights import RELEASES, resolve_pretrained

from .backbone import (TUNINGS, CheckpointError, IVTBackbone, count_parameters, make_ivt_config,
                       make_petl_config)
from .dinov2 import DINOV2_CONFIGS, DINOv2Backbone
from .eva02 import EVA02_CONFIGS, EVA02Backbone
from .ivtuning import VARIANTS, IVTConfig
from .mae import MAE_CONFIGS, MAEBackbone
from .petl import METHODS as PETL_METHODS
from .petl import PETLConfig
from .swin import SWIN_CONFIGS, build_swin
from .vit import vit_config

__all__ = ["build_backbone", "normalization_for", "BACKBONES", "VIT_BACKBONES", "TUNINGS",
           "VARIANTS", "IVTConfig", "IVTBackbone", "CheckpointError", "count_parameters",
           "PETL_METHODS", "PETLConfig"]

# The plain ViT families: name -> (backbone class, configuration).
VITS = {**{n: (EVA02Backbone, c) for n, c in EVA02_CONFIGS.items()},
        **{n: (DINOv2Backbone, c) for n, c in DINOV2_CONFIGS.items()},
        **{n: (MAEBackbone, c) for n, c in MAE_CONFIGS.items()}}
VIT_BACKBONES = tuple(VITS)     # patch-based: inputs are multiples of the patch, --patch-size
BACKBONES = tuple(SWIN_CONFIGS) + VIT_BACKBONES


def normalization_for(name: str) -> Normalization:
    """The input normalisation a backbone family was pre-trained with (timm's `pretrained_cfg`
    mean/std): ImageNet's for Swin (ImageNet-22K), DINOv2 (LVD-142M) and MAE (ImageNet-1K),
    OpenAI CLIP's for EVA02 (the EVA release and timm's `eva02_*.mim_m38m`). A frozen backbone
    cannot adapt to inputs scaled otherwise."""
    if name in EVA02_CONFIGS:
        return CLIP
    if name in BACKBONES:
        return IMAGENET
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")


def build_backbone(name: str, tuning: str = "ivt", pretrained: Union[str, bool, None] = None,
                   img_size=None, **options) -> IVTBackbone:
    """Build a backbone whose `forward(vis, ir=None)` returns four NCHW maps (strides 4-32).

    name: one of `BACKBONES` ('swin_t', 'swin_s', 'swin_b', 'swin_l', 'eva02_b', 'eva02_l',
        'dinov2_b', 'dinov2_l', 'dinov2_b_reg', 'dinov2_l_reg' (4 register tokens), 'mae_b',
        'mae_l').
    tuning: 'full' (visible model alone, all trainable: the paper's baseline), 'freeze'
        (visible model alone, nothing trainable), 'ivt' (IV-tuning; only its modules train), or
        one of the compared PETL methods of Table 4, 'vpt', 'adaptformer', 'bi_adaptformer',
        'rein' (only the method's modules and an independent IR patch embedding train; see
        `ivt.models.petl`).
    pretrained: a visible-model checkpoint loaded into the frozen part: a file (the original
        release's or timm's layout, .pth/.pt/.safetensors; for Swin also mmdet's, or a whole
        mmdet / detrex detector's), or a name in `ivt.weights.RELEASES` or an http(s) URL,
        downloaded once into the cache (`ivt.weights.resolve_pretrained`); True: the
        backbone's own release (`RELEASES[name]`, the training scripts' default); None, False
        or 'none': random init.
    img_size: nominal input size (int or (H, W)); Swin accepts any size, so it is recorded only;
        the ViTs (EVA02, DINOv2, MAE) build their position-embedding grid for it (default 224)
        and resize it for other sizes (multiples of the patch).
    options: IV-tuning's `d1`, `d2`, `d3`, `layers`, `variant`, `dropout`, `zero_init_up`, and the
        family's own (`window_size`, `drop_path_rate`, `attention` ('sdpa', the default, or
        'math': the window attention as explicit matmuls and softmax, as timm's Swin computes it;
        the same function), `out_norms` (mmseg's and mmdet's LayerNorm on each stage output,
        as the segmentation and detection tasks build it) for Swin; `patch_size` (16; the
        EVA02 and DINOv2 releases' 14 is resized on loading), `drop_path_rate` for the ViTs);
        the PETL methods' `prompt_length` (vpt), `bottleneck`, `scale` ((bi_)adaptformer),
        `rein_tokens`, `rein_rank` (rein);
        `ir_embed=True` gives 'full'/'freeze' the independent IR patch embedding of Sec. 4.5
        (then forward needs ir).
    After building, exactly the trainable set has requires_grad=True.

    This builds the paper's model only, on the readable reference forward.
    `ivt.fast.make_fast(model, impl, memory)` applies the speed-ups to a built model (this
    backbone, or a task model holding one): impl 'fast' or 'fused' (IV-tuning's faster forwards
    of the same modules: same parameters and state dict, equal outputs and gradients) and the
    memory options ('recompute', 'checkpoint', 'checkpoint:N', 'checkpoint:N+recompute').
    """
    if isinstance(pretrained, bool):
        if pretrained and name not in RELEASES:
            raise ValueError(f"pretrained=True: no released checkpoint of {name!r} (released: "
                             f"{', '.join(RELEASES)}); pass a file or URL")
        pretrained = name if pretrained else None
    ivt_cfg, family_options = make_ivt_config(tuning, dict(options))
    petl_cfg, family_options = make_petl_config(tuning, family_options)
    if name in SWIN_CONFIGS:
        model = build_swin(name, tuning, ivt_cfg, **family_options)
    elif name in VITS:
        cls, cfg = VITS[name]
        model = cls(name, vit_config(cfg, img_size=img_size, **family_options), tuning, ivt_cfg)
    else:
        raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
    model.img_size = img_size
    if petl_cfg is not None:
        model.add_petl(petl_cfg)
    path = resolve_pretrained(pretrained)
    if path is not None:
        model.load_pretrained(path)
    return model

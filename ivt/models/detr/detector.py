"""The detector: IV-tuning backbone -> neck -> encoder (DINO's deformable one or RT-DETR's hybrid
one) -> two-stage query selection -> decoder with iterative box refinement (+ contrastive
denoising queries in training); the DINO / RT-DETR family in plain PyTorch, trained with
`SetCriterion` (Eq. 17)."""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import build_backbone
from ..backbone import IVTBackbone
from ..swin import mmlab_options
from .box_ops import box_cxcywh_to_xyxy, normalize_boxes
from .criterion import build_criterion, check_targets
from .decoder import build_decoder
from .deformable_attention import MultiScaleDeformableAttention
from .denoising import build_denoising
from .encoder import build_encoder
from .hybrid_encoder import build_hybrid_encoder
from .neck import build_neck
from .position_encoding import map_position_embedding
from .query_selection import build_query_selection


ENCODERS = ("deformable", "hybrid")
# Detections kept per image at inference: DINO's `num_select`, mmdet's DINO `max_per_img`. The
# metric's own limit (per image and class, `DetMetric(max_dets=)`) applies to these.
DETECTIONS_PER_IMAGE = 300


@dataclass
class DetectorConfig:
    """Hyperparameters of the detector (the backbone is chosen separately).

    DINO's (Zhang et al. 2023; its config/DINO/DINO_4scale.py): hidden 256, 8 heads, 4 points
    per head and level, 6 decoder layers, FFN 2048, dropout 0; with `encoder='deformable'`, its
    deformable encoder of enc_layers = 6 layers; denoising with dn_number 100, label noise 0.5 and
    box noise 0.4 (that config's value; DINO's published training scripts
    and mmdet's DINO config use box noise 1.0, mmdet noting 0.4 as DN-DETR's); focal loss alpha
    0.25, gamma 2; loss weights 1 / 5 / 2 and matching costs 2 / 5 / 2.
    Ours: the encoder is RT-DETR's hybrid encoder by default (hybrid_encoder.py; its AIFI's FFN is
    ffn_dim, RT-DETR's 1024, and each CSP block has `hybrid_blocks` RepVGG blocks, RT-DETR's 3;
    enc_layers is then unused): on the CPU demo's scenes it gave a clearly higher AP than 6
    deformable layers at the same iterations, in less time. 300 queries (DINO: 900); four levels
    at strides 4-32 from the four backbone levels (first_backbone_level 0; DINO 4-scale: strides
    8-64, see neck.py). dn_number 0 trains without denoising queries.
    """
    num_classes: int
    hidden_dim: int = 256
    num_queries: int = 300
    encoder: str = "hybrid"           # or "deformable" (DINO's)
    enc_layers: int = 6               # deformable encoder layers (DINO)
    dec_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 2048
    dropout: float = 0.0
    num_feature_levels: int = 4
    first_backbone_level: int = 0     # 0: strides 4-32 from the four backbone levels; see neck.py
    hybrid_blocks: int = 3
    dn_number: int = 100              # about this many positive (and as many negative) DN queries
    label_noise_ratio: float = 0.5
    box_noise_scale: float = 0.4
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    cls_weight: float = 1.0           # Eq. 17, DINO's weights
    l1_weight: float = 5.0
    giou_weight: float = 2.0
    match_cost_class: float = 2.0     # matching costs (DINO)
    match_cost_bbox: float = 5.0
    match_cost_giou: float = 2.0
    aux_loss: bool = True

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.encoder == "deformable" and self.enc_layers < 1:
            raise ValueError(f"the deformable encoder needs enc_layers >= 1, got {self.enc_layers}")
        if self.dn_number < 0:
            raise ValueError(f"dn_number must be >= 0 (0: no denoising), got {self.dn_number}")
        if not 0.0 <= self.label_noise_ratio <= 1.0:
            raise ValueError(f"label noise must lie in [0, 1], got {self.label_noise_ratio}")
        if self.box_noise_scale < 0:
            raise ValueError(f"box noise must be >= 0, got {self.box_noise_scale}")


class Detector(nn.Module):
    """`forward(vis, ir, targets)` -> raw outputs, `loss(outputs, targets)` -> named losses,
    `predict(vis, ir, orig_sizes)` -> boxes in original pixels.

    The backbone's tuning mode decides which of its parameters train; everything else always does.
    """

    def __init__(self, backbone: IVTBackbone, cfg: DetectorConfig):
        super().__init__()
        self.backbone, self.cfg = backbone, cfg
        self.neck = build_neck(backbone.out_channels, cfg)
        if cfg.encoder == "deformable":       # the deformable encoder's level embedding (DINO)
            self.level_embed = nn.Parameter(torch.randn(cfg.num_feature_levels, cfg.hidden_dim))
            self.encoder = build_encoder(cfg)
        else:
            self.register_parameter("level_embed", None)
            self.encoder = build_hybrid_encoder(cfg)
        self.query_selection = build_query_selection(cfg)
        self.decoder = build_decoder(cfg)
        self.denoising = build_denoising(cfg)
        self.criterion = build_criterion(cfg)
        self.reset_transformer_parameters()
        for name, p in self.named_parameters():
            if not name.startswith("backbone."):
                p.requires_grad = True

    def reset_transformer_parameters(self) -> None:
        """DINO's transformer init (its DeformableTransformer._reset_parameters, mmdet's
        DINO.init_weights): xavier-uniform on every weight matrix of the deformable encoder, the
        decoder layers, the decoder's query position MLP, the proposal projection and the content
        queries, then each deformable attention's own init. The class and box heads keep theirs
        (prior probability 0.01, a zero last box layer); RT-DETR's hybrid encoder keeps PyTorch's
        defaults, as RT-DETR does."""
        parts = [self.decoder.layers, self.decoder.query_pos_head, self.query_selection.proj,
                 self.query_selection.content]
        if self.cfg.encoder == "deformable":
            parts.append(self.encoder)
        for part in parts:
            for p in part.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        for part in parts:
            for m in part.modules():
                if isinstance(m, MultiScaleDeformableAttention):
                    m.reset_parameters()

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None,
                targets: Optional[Sequence[Dict[str, torch.Tensor]]] = None) -> Dict:
        """
        vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) (None for the visible model alone).
        targets (training only, for the denoising queries): B dicts with 'boxes' (n, 4) float xyxy
            in pixels of this (H, W) input and 'labels' (n,) int64 in [0, K).
        Returns {'pred_logits': (B, Q, K), 'pred_boxes': (B, Q, 4) cxcywh in [0, 1] of (H, W),
        'aux_outputs': the earlier decoder layers' dicts, 'enc_outputs': the selected proposals,
        'image_size': (H, W)}, plus 'dn_outputs' (same layout) and 'dn_meta' when denoising ran.
        """
        H, W = vis.shape[-2:]
        memory, shapes = self.encode(self.neck(self.backbone(vis, ir)))
        tgt, boxes_unact, enc_outputs = self.query_selection(memory, shapes)

        dn = None
        if self.training and targets is not None and self.denoising is not None:
            check_targets(targets, vis.shape[0], self.cfg.num_classes)
            dn = self.denoising([{"labels": t["labels"].long(),
                                  "boxes": normalize_boxes(t["boxes"].float(), (H, W))}
                                 for t in targets],
                                self.cfg.num_queries)
        attn_mask, pad = None, 0
        if dn is not None:
            tgt = torch.cat([dn.content.to(tgt.dtype), tgt], dim=1)
            boxes_unact = torch.cat([dn.boxes_unact.to(boxes_unact.dtype), boxes_unact], dim=1)
            attn_mask, pad = dn.attn_mask, dn.meta["pad_size"]
        elif self.training and self.denoising is not None:
            # A batch without objects: keep the label embedding in the graph (DDP expects every
            # trainable parameter to receive a gradient).
            tgt = tgt + 0.0 * self.denoising.label_embed.weight.sum()
        logits, boxes = self.decoder(tgt, boxes_unact, memory, shapes, attn_mask)

        def split(lo: int, hi: Optional[int]) -> List[Dict[str, torch.Tensor]]:
            return [{"pred_logits": l[:, lo:hi], "pred_boxes": b[:, lo:hi]}
                    for l, b in zip(logits, boxes)]

        layers = split(pad, None)
        out = dict(layers[-1], aux_outputs=layers[:-1] if self.cfg.aux_loss else [],
                   enc_outputs=enc_outputs, image_size=(H, W))
        if dn is not None:
            dn_layers = split(0, pad)
            out["dn_outputs"] = dict(dn_layers[-1],
                                     aux_outputs=dn_layers[:-1] if self.cfg.aux_loss else [])
            out["dn_meta"] = dn.meta
        return out

    def encode(self, feats: List[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """The neck's L maps (B, C, H_l, W_l) -> the encoder memory (B, S, C), levels flattened
        and concatenated finest first (S = sum H_l W_l), and the shapes [(H_l, W_l)]."""
        shapes = [tuple(f.shape[-2:]) for f in feats]
        if self.cfg.encoder == "hybrid":         # maps in, maps out; AIFI has its own positions
            return flatten_levels(self.encoder(feats)), shapes
        src = flatten_levels(feats)                                            # (B, S, C)
        pos = torch.cat([map_position_embedding(s, self.cfg.hidden_dim, src.device)
                         + self.level_embed[l]
                         for l, s in enumerate(shapes)])[None].to(src.dtype)   # (1, S, C)
        return self.encoder(src, pos, shapes), shapes

    def loss(self, outputs: Dict,
             targets: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Named loss terms and their weighted total under 'loss' (see `SetCriterion`)."""
        return self.criterion(outputs, targets)

    @torch.no_grad()
    def predict(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None,
                orig_sizes: Optional[Sequence[Tuple[int, int]]] = None,
                score_threshold: float = 0.0, max_dets: int = DETECTIONS_PER_IMAGE
                ) -> List[Dict[str, torch.Tensor]]:
        """Detections per image, as DINO's post-processing: the top `max_dets` (query, class)
        pairs by sigmoid score, each query may appear with several classes, those scoring at
        least `score_threshold`.

        orig_sizes: (H0, W0) per image, the size before the whole image was resized to the input
            tensor (aspect may change); None means the input size. Boxes come back xyxy in those
            original pixels, clipped to the image: {'boxes' (n, 4), 'scores' (n,), 'labels' (n,)}.
        """
        out = self(vis, ir)
        prob = out["pred_logits"].float().sigmoid()                        # (B, Q, K)
        B, Q, K = prob.shape
        if orig_sizes is None:
            orig_sizes = [tuple(vis.shape[-2:])] * B
        if len(orig_sizes) != B:
            raise ValueError(f"orig_sizes has {len(orig_sizes)} entries for a batch of {B}")
        scores, index = prob.flatten(1).topk(min(max_dets, Q * K), dim=1)   # (B, k)
        query, labels = index // K, index % K
        boxes = box_cxcywh_to_xyxy(out["pred_boxes"].float()).clamp(0.0, 1.0)
        boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))         # (B, k, 4)
        results = []
        for b, (h0, w0) in enumerate(orig_sizes):
            keep = scores[b] >= score_threshold
            scale = boxes.new_tensor([w0, h0, w0, h0])
            results.append({"boxes": boxes[b][keep] * scale, "scores": scores[b][keep],
                            "labels": labels[b][keep]})
        return results


def flatten_levels(feats: List[torch.Tensor]) -> torch.Tensor:
    """L maps (B, C, H_l, W_l) -> (B, sum H_l W_l, C), each level row-major, finest first."""
    return torch.cat([f.flatten(2).transpose(1, 2) for f in feats], dim=1)


def build_detector(backbone: str, cfg: DetectorConfig, tuning: str = "ivt",
                   pretrained: Optional[str] = None, img_size=None, **backbone_options) -> Detector:
    """Backbone `backbone` (a name in `ivt.models.BACKBONES`, built by `build_backbone` with
    `tuning`, `pretrained`, `img_size` and `backbone_options`) + the detector of `cfg`. A Swin
    is mmdet's, with a LayerNorm on each output (`out_norms`), unless `out_norms=False` is
    given."""
    bb = build_backbone(backbone, tuning=tuning, pretrained=pretrained, img_size=img_size,
                        **mmlab_options(backbone, backbone_options))
    return Detector(bb, cfg)

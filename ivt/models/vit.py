"""The plain Vision Transformer that EVA02, DINOv2 and MAE share, with IV-tuning wired in
(Sec. 3.1).

Bottom-up: configuration, 2-D rotary position embedding, patch embedding, attention, the two
MLPs, LayerScale, the block, the backbone, and the resizing of embeddings that checkpoints need.
The families differ only in options of the one block and in their checkpoints' names:

| option | EVA02 (`eva02.py`) | DINOv2 (`dinov2.py`) | MAE (`mae.py`) |
|---|---|---|---|
| attention projections | separate q/k/v (q, v biased) | fused qkv, biased | fused qkv, biased |
| rotary embedding on patch tokens | yes (reference grid 16) | no | no |
| MLP | SwiGLU with "subln" LayerNorm | GELU, ratio 4 | GELU, ratio 4 |
| LayerScale (`ls1`, `ls2`) | no | yes | no |
| register tokens | no | 4 in the `_reg` releases | no |
| release patch | 14 | 14 | 16 |
| its kernel to patch 16 | bicubic (EVA's tool) | pseudo-inverse (FlexiViT) | - |
| position-embedding resizes | plain bicubic (EVA's) | antialiased bicubic (timm's) | antialiased |

Every family: pre-norm blocks, LayerNorm eps 1e-6, a cls token and an absolute position
embedding with an entry for it, stored for `img_size` and resized bicubically to the input's
token grid. Parameter names are timm's (`Eva`, `VisionTransformer`).

Features: the outputs of blocks 8, 12, 16, 24 (1-based; d/3, d/2, 2d/3, d for depth d), patch
tokens only (no cls, no registers, no final norm), as maps resized bilinearly by x4, x2, x1, x0.5
(strides 4, 8, 16, 32 at patch 16).
"""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import CheckpointError, IVTBackbone, StateDict
from .ivtuning import EMPG, BlockAdapters, Grid, IVTConfig, tokens_to_map
from .shape_cache import ShapeCache
from .swin import DropPath

FEATURE_SCALES = (4.0, 2.0, 1.0, 0.5)       # bilinear resize of the four block outputs
Rope = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class ViTConfig:
    """A ViT's sizes and options (the defaults: a plain ViT as timm's `VisionTransformer`)."""
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int                          # MLP width (SwiGLU: int(embed_dim * 4 * 2 / 3))
    patch_size: int = 16
    img_size: Tuple[int, int] = (224, 224)   # sets the stored position-embedding grid
    rope_ref_grid: Optional[int] = None      # 2-D rotary embedding's reference grid; None: none
    drop_path_rate: float = 0.1
    qkv_fused: bool = True                   # one qkv Linear (biased), or q/k/v projections
    swiglu: bool = False                     # SwiGLU MLP with its "subln" norm, or GELU MLP
    layer_scale: Optional[float] = None      # LayerScale's initial gamma; None: no LayerScale
    registers: int = 0                       # register tokens after the cls token
    antialias: bool = True                   # position-embedding resizes: timm's antialiased
                                             # bicubic, or PyTorch's plain bicubic (False)

    def __post_init__(self):
        if self.depth < 3:
            raise ValueError(f"a ViT backbone needs 3 or more blocks for its features, "
                             f"got {self.depth}")
        if self.rope_ref_grid is not None and (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"the 2-D rotary embedding needs a head dim divisible by 4, "
                             f"got {self.embed_dim // self.num_heads}")
        if self.rope_ref_grid is not None and self.registers:
            raise ValueError("register tokens with the rotary embedding are not supported")
        if self.img_size[0] % self.patch_size or self.img_size[1] % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of the patch size "
                             f"{self.patch_size}")


def feature_blocks(depth: int) -> List[int]:
    """0-based indices of the blocks returned as features: 7, 11, 15, 23 for depth 24."""
    return [depth * k // 24 - 1 for k in (8, 12, 16, 24)]


# -- rotary position embedding (EVA02) ----------------------------------------------------------
def rope_sin_cos(hw: Grid, head_dim: int, ref_grid: int = 16, temperature: float = 10000.0,
                 device=None) -> Rope:
    """(N, head_dim) sin and cos of the 2-D rotary angles of an (H, W) grid, N = H*W.

    Half of the head dimension encodes the row, half the column (timm's RotaryEmbeddingCat with
    `ref_feat_shape`, the EVA02 release's VisionRotaryEmbeddingFast): frequencies
    f_j = temperature^(-j / (head_dim/4)), j < head_dim/4, positions i / H * ref_grid (rows) and
    j / W * ref_grid (columns). Angles are laid out as [row f_0..f_last, column f_0..f_last], each
    repeated twice for the interleaved pairs (x0, x1), (x2, x3), ... that `apply_rope` rotates.
    """
    n_bands = head_dim // 4
    bands = 1.0 / temperature ** (torch.arange(n_bands, dtype=torch.float32) / n_bands)
    axes = [torch.arange(s, dtype=torch.float32) / s * ref_grid for s in hw]
    grid = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)             # (H, W, 2)
    angles = (grid[..., None] * bands).flatten(2).flatten(0, 1)                # (N, head_dim/2)
    angles = angles.repeat_interleave(2, dim=-1).to(device)                    # (N, head_dim)
    return angles.sin(), angles.cos()


def apply_rope(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). x: (..., N, d)."""
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)
    return (x * cos + rotated * sin).to(x.dtype)


# -- layers -------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv k = s = patch, no norm. (B, 3, H, W) -> (B, N, C) tokens and their grid (H/p, W/p)."""

    def __init__(self, dim: int, patch: int):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        if x.shape[2] % self.patch or x.shape[3] % self.patch:
            raise ValueError(f"a ViT backbone needs input sides that are multiples of the patch "
                             f"size {self.patch}, got {tuple(x.shape[2:])}")
        x = self.proj(x)                                                     # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])         # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection (biased), or separate q/k/v
    projections (q and v biased, k not: EVA02); with rotary tables, q and k of the patch tokens
    are rotated (the cls token is not)."""

    def __init__(self, dim: int, num_heads: int, qkv_fused: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim) if qkv_fused else None
        if not qkv_fused:
            self.q_proj = nn.Linear(dim, dim)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Rope],
                extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, L, C) normed tokens, rope: (N, d) sin and cos of the L - 1 patch tokens or
        None -> (B, L, C): `heads`, then the output projection."""
        return self.proj(self.heads(x, rope, extra_kv))

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, L, C) -> (B, heads, L, d)."""
        return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of tokens x (B, P, C), each (B, heads, P, d)."""
        if self.qkv is None:
            return self.split_heads(self.k_proj(x)), self.split_heads(self.v_proj(x))
        C = x.shape[-1]
        kv = F.linear(x, self.qkv.weight[C:], self.qkv.bias[C:])               # (B, P, 2C)
        kv = kv.view(x.shape[0], x.shape[1], 2, self.num_heads, -1)           # (B, P, 2, h, d)
        return kv.permute(2, 0, 3, 1, 4).unbind(0)

    def heads(self, x: torch.Tensor, rope: Optional[Rope],
              extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention heads' outputs concatenated, before the output projection `proj`:
        x: (B, L, C) normed tokens, rope: (N, d) sin and cos or None -> (B, L, C).

        extra_kv: optional (B, P, C) extra tokens, already normed (VPT-deep prompts): their keys
        and values, projected with this attention's own weights and not rotated, join the
        sequence as extra columns; their outputs are not returned.
        """
        B, L, C = x.shape
        if self.qkv is None:
            q, k, v = (self.split_heads(self.q_proj(x)), self.split_heads(self.k_proj(x)),
                       self.split_heads(self.v_proj(x)))
        else:
            q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:                     # q, k, v: (B, heads, L, d); rotate patch tokens
            q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], *rope)], dim=2)
            k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], *rope)], dim=2)
        if extra_kv is not None:                                             # (B, h, L + P, d)
            k_extra, v_extra = self.keys_values(extra_kv)
            k, v = torch.cat([k, k_extra], dim=2), torch.cat([v, v_extra], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)                          # scale d^-0.5
        return x.transpose(1, 2).reshape(B, L, C)


class Mlp(nn.Module):
    """fc2(gelu(fc1(x))): the plain ViT's MLP (exact GELU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(.., C) -> (.., hidden): the MLP up to, not including, fc2."""
        return F.gelu(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class SwiGLU(nn.Module):
    """fc2(LN(silu(fc1_g(x)) * fc1_x(x))): SwiGLU with the "subln" LayerNorm before fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc2 = nn.Linear(hidden, dim)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(.., C) -> (.., hidden): the MLP up to, not including, fc2."""
        return self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))


class LayerScale(nn.Module):
    """x * gamma, a learned scale per channel on a residual branch (CaiT; DINOv2's ls1, ls2)."""

    def __init__(self, dim: int, init: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-norm attention and MLP, each scaled by LayerScale where configured, with residuals;
    IV-tuning's adapters after each act on the patch tokens only: the `prefix` tokens in front
    (cls and any registers) pass them unchanged."""

    def __init__(self, cfg: ViTConfig, drop_path: float):
        super().__init__()
        C = cfg.embed_dim
        self.prefix = 1 + cfg.registers
        self.norm1 = nn.LayerNorm(C, eps=1e-6)
        self.attn = Attention(C, cfg.num_heads, cfg.qkv_fused)
        self.ls1 = nn.Identity() if cfg.layer_scale is None else LayerScale(C, cfg.layer_scale)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.mlp = SwiGLU(C, cfg.mlp_hidden) if cfg.swiglu else Mlp(C, cfg.mlp_hidden)
        self.ls2 = nn.Identity() if cfg.layer_scale is None else LayerScale(C, cfg.layer_scale)
        self.drop_path = DropPath(drop_path)
        self.adapters: Optional[BlockAdapters] = None
        self.prompts: Optional[nn.Parameter] = None                      # VPT-deep's (P, C)

    def adapt(self, pos: int, z_in: torch.Tensor, z: torch.Tensor, prompt: torch.Tensor,
              hw: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """{HA, IPA} at `pos` on the patch tokens; z_in, z: (B, prefix + N, C)."""
        patches, prompt = self.adapters(pos, z_in[:, self.prefix:], z[:, self.prefix:], prompt, hw)
        return torch.cat([z[:, :self.prefix], patches], dim=1), prompt

    def forward(self, z: torch.Tensor, hw: Grid, rope: Optional[Rope],
                prompt: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z: (B, prefix + N, C); prompt: (B, N, C) or None -> (z, prompt for the next IPA)."""
        extra = (None if self.prompts is None                            # VPT-deep prompts
                 else self.norm1(self.prompts).expand(z.shape[0], -1, -1))
        z_in, z = z, z + self.drop_path(self.ls1(self.attn(self.norm1(z), rope, extra)))
        if self.adapters is not None:                                    # HA1, IPA1 (Eq. 5-6)
            z, prompt = self.adapt(0, z_in, z, prompt, hw)
        z_in, z = z, z + self.drop_path(self.ls2(self.mlp(self.norm2(z))))
        if self.adapters is not None:                                    # HA2, IPA2
            z, prompt = self.adapt(1, z_in, z, prompt, hw)
        return z, prompt


class ViTBackbone(IVTBackbone):
    """A ViT returning four NCHW maps (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w),
    (B, C, ceil(h/2), ceil(w/2)) for a (h, w) token grid: strides 4, 8, 16, 32 at patch 16.

    With tuning='ivt' (Sec. 3.1): Zv = PE_vis(vis), Zi = PE_ir(ir), P_E = EMPG(Zv, Zi),
    Z0 = Zv + P_E (Eq. 2) on the patch tokens, then the cls token is prepended, the position
    embedding added and any registers inserted after cls. Block 0's external prompt is P_E,
    block l > 0's is its input's patch tokens. The families (`EVA02Backbone`, `DINOv2Backbone`,
    `MAEBackbone`) add their checkpoint conversion.
    """

    def __init__(self, name: str, cfg: ViTConfig, tuning: str = "ivt",
                 ivt_cfg: Optional[IVTConfig] = None):
        super().__init__()
        self.name, self.cfg, self.tuning, self.ivt_cfg = name, cfg, tuning, ivt_cfg
        C, p = cfg.embed_dim, cfg.patch_size
        self.input_multiple = p
        self.pos_grid: Grid = (cfg.img_size[0] // p, cfg.img_size[1] // p)
        self.prefix = 1 + cfg.registers                                  # cls, registers
        self.feature_blocks = feature_blocks(cfg.depth)
        self.out_channels = [C] * 4
        self.out_strides = [int(p / s) if (p / s).is_integer() else p / s for s in FEATURE_SCALES]
        self.patch_embed = PatchEmbed(C, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], C))
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.registers, C)) if cfg.registers else None
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(ViTBlock(cfg, dpr[i]) for i in range(cfg.depth))
        self._rope = ShapeCache()
        self._init_visible()
        if tuning == "ivt":
            self._add_ivt_modules()
        self.apply_tuning()

    def _init_visible(self) -> None:
        """Random init of the visible model, timm's EVA init for every family (trunc-normal
        0.02 Linear weights and embeddings, residual projections scaled down with depth);
        pretrained weights overwrite it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.reg_token is not None:
            nn.init.trunc_normal_(self.reg_token, std=0.02)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):           # depth-scaled residual projections
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def _add_ivt_modules(self) -> None:
        c, C = self.ivt_cfg, self.cfg.embed_dim
        self.ir_patch_embed = PatchEmbed(C, self.cfg.patch_size)            # fresh, trainable
        self.empg = EMPG(C, c.d1, c.use_simam, c.empg_visible, c.lam)
        if c.layers and max(c.layers) >= self.cfg.depth:
            raise ValueError(f"layers={c.layers}: {self.name} has blocks 0..{self.cfg.depth - 1}")
        for index, block in enumerate(self.blocks):
            if c.block_has_adapters(index) and (c.has_ha or c.has_ipa):
                block.adapters = BlockAdapters(C, c)

    def block_stages(self) -> List[List[nn.Module]]:
        return [list(self.blocks)]

    def ivt_module_names(self) -> List[str]:
        return ["ir_patch_embed", "empg"] + [
            f"blocks.{i}.adapters" for i, b in enumerate(self.blocks) if b.adapters is not None]

    def embed(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, Grid, Optional[torch.Tensor]]:
        """The blocks' input (B, prefix + N, C), its (H/p, W/p) grid and, with IV-tuning, the
        external prompt P_E (B, N, C) (else None)."""
        vis, ir = self.check_inputs(vis, ir)
        z, hw = self.patch_embed(vis)                                    # (B, N, C)
        prompt = None
        if self.tuning == "ivt":
            zi, _ = self.ir_patch_embed(ir)
            prompt = self.empg(z, zi, hw)                                # P_E, Eq. 7
            z = z + prompt                                               # Eq. 2, patch tokens
        elif ir is not None:                          # PETL / ir_embed: Zv + PE_ir(ir), Sec. 4.5
            z = z + self.ir_patch_embed(ir)[0]
        z = torch.cat([self.cls_token.expand(z.shape[0], -1, -1), z], dim=1)
        z = z + resize_pos_embed(self.pos_embed, self.pos_grid, hw, self.cfg.antialias)
        if self.reg_token is None:
            return z, hw, prompt
        # DINOv2's registers go after cls, after the position embedding (they get none)
        registers = self.reg_token.expand(z.shape[0], -1, -1)
        return torch.cat([z[:, :1], registers, z[:, 1:]], dim=1), hw, prompt

    def rope_tables(self, hw: Grid, device: torch.device) -> Optional[Rope]:
        """(N, d) sin and cos of the grid's rotary angles (`rope_sin_cos`), cached; None
        without the rotary embedding."""
        if self.cfg.rope_ref_grid is None:
            return None
        return self._rope.get((hw, device), lambda: rope_sin_cos(
            hw, self.cfg.embed_dim // self.cfg.num_heads, self.cfg.rope_ref_grid, device=device))

    def forward_blocks(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
                       ) -> List[torch.Tensor]:
        """The feature blocks' outputs before any resize: four (B, C, H/p, W/p) maps."""
        z, hw, prompt = self.embed(vis, ir)
        rope = self.rope_tables(hw, z.device)
        maps = {}
        for index, block in enumerate(self.blocks):
            # Block l > 0 takes its input's patch tokens as the external prompt. With ipa_deep
            # (Fig. 4(e)) the chain of IPA outputs instead carries on across blocks, from P_E.
            if prompt is not None and index > 0 and not self.ivt_cfg.ipa_deep:
                prompt = z[:, self.prefix:]
            z, prompt = block(z, hw, rope, prompt)
            if index in self.feature_blocks:
                maps[index] = tokens_to_map(z[:, self.prefix:], hw).contiguous()  # (B, C, h, w)
        return [maps[i] for i in self.feature_blocks]

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) -> four (B, C, .., ..) maps, strides 4-32."""
        outs = []
        for x, scale in zip(self.forward_blocks(vis, ir), FEATURE_SCALES):
            size = (math.ceil(x.shape[2] * scale), math.ceil(x.shape[3] * scale))
            outs.append(x if scale == 1 else
                        F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return outs


# -- resizing the embeddings of a checkpoint ----------------------------------------------------
def resize_pos_embed(pos_embed: torch.Tensor, old: Grid, new: Grid,
                     antialias: bool = True) -> torch.Tensor:
    """(1, 1 + h*w, C) -> (1, 1 + H*W, C): the grid part bicubically, the cls entry kept.

    antialias=True is timm's resize (DINOv2, MAE), antialiased both ways: PyTorch's antialiased
    bicubic also upsamples with its own kernel, a = -0.5 instead of -0.75. False is PyTorch's plain
    bicubic, which EVA's and the IV-tuning authors' code use (EVA02).
    """
    if tuple(old) == tuple(new):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)     # (1, C, h, w)
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False,
                         antialias=antialias)                                  # (1, C, H, W)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def resize_patch_kernel(weight: torch.Tensor, size: int) -> torch.Tensor:
    """(C, 3, p, p) -> (C, 3, size, size) by the pseudo-inverse resize of FlexiViT (as in timm).

    With R the (size^2, p^2) bicubic resize of a p x p patch, the new kernel w' solves
    R^T w' = w in the least-squares sense, w' = pinv(R^T) w: a patch bicubically resized to
    size x size and embedded with w' gives the same token as the original patch with w.
    """
    p = weight.shape[-1]
    if p == size:
        return weight
    basis = torch.eye(p * p, dtype=torch.float64).reshape(p * p, 1, p, p)
    resized = F.interpolate(basis, size=(size, size), mode="bicubic", align_corners=False,
                            antialias=True)                                # (p*p, 1, size, size)
    R = resized.reshape(p * p, size * size).T                                # (size^2, p^2)
    new = weight.double().flatten(2) @ torch.linalg.pinv(R)                  # (C, 3, size^2)
    return new.reshape(*weight.shape[:2], size, size).to(weight.dtype)


def fit_embeddings(state_dict: StateDict, patch_size: int, pos_grid: Grid,
                   antialias: bool = True) -> StateDict:
    """A state dict in this module's names with its patch kernel resized to `patch_size`
    (`resize_patch_kernel`) and its position embedding (1, 1 + s*s, C), a square grid with a cls
    entry, bicubically to `pos_grid` (`resize_pos_embed` with `antialias`). Pure."""
    out = dict(state_dict)
    if "patch_embed.proj.weight" in out:
        out["patch_embed.proj.weight"] = resize_patch_kernel(out["patch_embed.proj.weight"],
                                                             patch_size)
    if "pos_embed" in out:
        side = square_side(out["pos_embed"])
        out["pos_embed"] = resize_pos_embed(out["pos_embed"], (side, side), pos_grid, antialias)
    return out


def square_side(pos_embed: torch.Tensor) -> int:
    """s of a checkpoint's (1, 1 + s*s, C) position embedding (a square grid with a cls entry);
    a CheckpointError if the grid is not square."""
    n = pos_embed.shape[1] - 1
    side = math.isqrt(n)
    if side * side != n:
        raise CheckpointError(f"pos_embed with {n} patch entries is not square")
    return side


def vit_config(cfg: ViTConfig, img_size: Union[None, int, Sequence[int]] = None,
               patch_size: Optional[int] = None, drop_path_rate: Optional[float] = None
               ) -> ViTConfig:
    """`cfg` with the build options given (not None) changed: img_size (int or (H, W)) sets the
    stored position-embedding grid, patch_size the patch (a release's kernel is resized on
    loading), drop_path_rate the stochastic depth of the last block."""
    changes = {}
    if img_size is not None:
        changes["img_size"] = ((int(img_size),) * 2 if isinstance(img_size, int)
                               else tuple(int(s) for s in img_size))
    if patch_size is not None:
        changes["patch_size"] = int(patch_size)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    return type(cfg)(**{**cfg.__dict__, **changes})

"""EVA-02 (Fang et al., 2023) in plain PyTorch, with IV-tuning wired in (Sec. 3.1).

Bottom-up: 2-D rotary position embedding, patch embedding, attention, SwiGLU MLP, block, backbone,
checkpoint conversion. The architecture is timm's `eva02_base_patch14_224.mim_in22k` /
`eva02_large_patch14_224.mim_m38m` (pre-norm blocks, LayerNorm eps 1e-6, no layer scale), and
parameter names are timm's, so timm files load as they are and the original release's after
`checkpoint_filter_fn`.

The paper runs EVA02-L with patch 16 (the released weights are patch 14: the kernel is resized on
loading). Any input whose sides are multiples of the patch works: the absolute position embedding
is resized bicubically to the token grid and the rotary positions are scaled to a reference grid
of 16, so the (H, W) grid spans the same angles as the 16 x 16 pre-training grid.

Features: the outputs of blocks 8, 12, 16, 24 (1-based; d/3, d/2, 2d/3, d for depth d), patch
tokens only, as maps resized bilinearly by x4, x2, x1, x0.5 (strides 4, 8, 16, 32 at patch 16).
"""
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import CheckpointError, IVTBackbone, StateDict
from .ivtuning import EMPG, BlockAdapters, Grid, IVTConfig, tokens_to_map
from .swin import DropPath

FEATURE_SCALES = (4.0, 2.0, 1.0, 0.5)       # bilinear resize of the four block outputs


@dataclass
class EVA02Config:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int                          # SwiGLU width: int(embed_dim * 4 * 2 / 3)
    patch_size: int = 16
    img_size: Tuple[int, int] = (224, 224)   # sets the stored position-embedding grid
    rope_ref_grid: int = 16                  # the rotary angles' pre-training grid (224 / 14)
    drop_path_rate: float = 0.1


EVA02_CONFIGS: Dict[str, EVA02Config] = {
    "eva02_b": EVA02Config(768, 12, 12, int(768 * 4 * 2 / 3)),      # 2048
    "eva02_l": EVA02Config(1024, 24, 16, int(1024 * 4 * 2 / 3)),    # 2730, the paper's model
}


def feature_blocks(depth: int) -> List[int]:
    """0-based indices of the blocks returned as features: 7, 11, 15, 23 for depth 24."""
    return [depth * k // 24 - 1 for k in (8, 12, 16, 24)]


# -- rotary position embedding ------------------------------------------------------------------
def rope_sin_cos(hw: Grid, head_dim: int, ref_grid: int = 16, temperature: float = 10000.0,
                 device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, head_dim) sin and cos of the 2-D rotary angles of an (H, W) grid, N = H*W.

    Half of the head dimension encodes the row, half the column (timm's RotaryEmbeddingCat with
    `ref_feat_shape`, the release's VisionRotaryEmbeddingFast): frequencies
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
            raise ValueError(f"EVA02 needs input sides that are multiples of the patch size "
                             f"{self.patch}, got {tuple(x.shape[2:])}")
        x = self.proj(x)                                                     # (B, C, H/p, W/p)
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])         # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (q and v biased, k not) and
    rotary position embedding on the patch tokens (the cls token is not rotated)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
                extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, 1 + N, C) normed tokens, rope: (N, d) sin and cos -> (B, 1 + N, C): `heads`,
        then the output projection."""
        return self.proj(self.heads(x, rope, extra_kv))

    def heads(self, x: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor],
              extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention heads' outputs concatenated, before the output projection `proj`:
        x: (B, 1 + N, C) normed tokens, rope: (N, d) sin and cos -> (B, 1 + N, C).

        extra_kv: optional (B, P, C) extra tokens, already normed (VPT-deep prompts): their keys
        and values, projected with this attention's own k/v weights and not rotated, join the
        sequence as extra columns; their outputs are not returned.
        """
        B, L, C = x.shape
        heads = lambda t: t.view(B, t.shape[1], self.num_heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        # q, k, v: (B, heads, L, d); rotate the patch tokens' q and k
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], *rope)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], *rope)], dim=2)
        if extra_kv is not None:                                             # (B, h, L + P, d)
            k = torch.cat([k, heads(self.k_proj(extra_kv))], dim=2)
            v = torch.cat([v, heads(self.v_proj(extra_kv))], dim=2)
        x = F.scaled_dot_product_attention(q, k, v)                          # scale d^-0.5
        return x.transpose(1, 2).reshape(B, L, C)

class SwiGLU(nn.Module):
    """fc2(LN(silu(fc1_g(x)) * fc1_x(x))): SwiGLU with the "subln" LayerNorm before fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(F.silu(self.fc1_g(x)) * self.fc1_x(x)))


class EVA02Block(nn.Module):
    """Pre-norm attention and SwiGLU MLP with residuals; IV-tuning's adapters after each act on
    the patch tokens only, the cls token passes them unchanged."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path)
        self.adapters: Optional[BlockAdapters] = None
        self.prompts: Optional[nn.Parameter] = None                      # VPT-deep's (P, C)

    def adapt(self, pos: int, z_in: torch.Tensor, z: torch.Tensor, prompt: torch.Tensor,
              hw: Grid) -> Tuple[torch.Tensor, torch.Tensor]:
        """{HA, IPA} at `pos` on the patch tokens z[:, 1:]; z_in, z: (B, 1 + N, C)."""
        patches, prompt = self.adapters(pos, z_in[:, 1:], z[:, 1:], prompt, hw)
        return torch.cat([z[:, :1], patches], dim=1), prompt

    def forward(self, z: torch.Tensor, hw: Grid, rope: Tuple[torch.Tensor, torch.Tensor],
                prompt: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """z: (B, 1 + N, C); prompt: (B, N, C) or None -> (z, prompt for the next IPA)."""
        extra = (None if self.prompts is None                            # VPT-deep prompts
                 else self.norm1(self.prompts).expand(z.shape[0], -1, -1))
        z_in, z = z, z + self.drop_path(self.attn(self.norm1(z), rope, extra))
        if self.adapters is not None:                                    # HA1, IPA1 (Eq. 5-6)
            z, prompt = self.adapt(0, z_in, z, prompt, hw)
        z_in, z = z, z + self.drop_path(self.mlp(self.norm2(z)))
        if self.adapters is not None:                                    # HA2, IPA2
            z, prompt = self.adapt(1, z_in, z, prompt, hw)
        return z, prompt


def resize_pos_embed(pos_embed: torch.Tensor, old: Grid, new: Grid) -> torch.Tensor:
    """(1, 1 + h*w, C) -> (1, 1 + H*W, C): the grid part bicubically (antialiased when shrinking,
    as timm does), the cls entry kept."""
    if tuple(old) == tuple(new):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    grid = grid.float().reshape(1, old[0], old[1], C).permute(0, 3, 1, 2)     # (1, C, h, w)
    grid = F.interpolate(grid, size=tuple(new), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


class EVA02Backbone(IVTBackbone):
    """EVA02-B/L returning four NCHW maps (B, C, 4h, 4w), (B, C, 2h, 2w), (B, C, h, w),
    (B, C, ceil(h/2), ceil(w/2)) for a (h, w) token grid: strides 4, 8, 16, 32 at patch 16.

    With tuning='ivt' (Sec. 3.1): Zv = PE_vis(vis), Zi = PE_ir(ir), P_E = EMPG(Zv, Zi),
    Z0 = Zv + P_E (Eq. 2) on the patch tokens, then the cls token is prepended and the position
    embedding added. Block 0's external prompt is P_E, block l > 0's is its input without cls.
    """

    def __init__(self, name: str, cfg: EVA02Config, tuning: str = "ivt",
                 ivt_cfg: Optional[IVTConfig] = None):
        super().__init__()
        self.name, self.cfg, self.tuning, self.ivt_cfg = name, cfg, tuning, ivt_cfg
        C, p = cfg.embed_dim, cfg.patch_size
        if cfg.depth < 3:
            raise ValueError(f"EVA02 needs 3 or more blocks for its features, got {cfg.depth}")
        if (C // cfg.num_heads) % 4:
            raise ValueError(f"the 2-D rotary embedding needs a head dim divisible by 4, "
                             f"got {C // cfg.num_heads}")
        if cfg.img_size[0] % p or cfg.img_size[1] % p:
            raise ValueError(f"img_size {cfg.img_size} is not a multiple of the patch size {p}")
        self.pos_grid: Grid = (cfg.img_size[0] // p, cfg.img_size[1] // p)
        self.feature_blocks = feature_blocks(cfg.depth)
        self.out_channels = [C] * 4
        self.out_strides = [int(p / s) if (p / s).is_integer() else p / s for s in FEATURE_SCALES]
        self.patch_embed = PatchEmbed(C, p)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.pos_grid[0] * self.pos_grid[1], C))
        dpr = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(EVA02Block(C, cfg.num_heads, cfg.mlp_hidden, dpr[i])
                                    for i in range(cfg.depth))
        self._rope: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._init_visible()
        if tuning == "ivt":
            self._add_ivt_modules()
        self.apply_tuning()

    def _init_visible(self) -> None:
        """timm's init for the visible model (overwritten by any pretrained checkpoint)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
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

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.patch_size, self.pos_grid)

    def embed(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
              ) -> Tuple[torch.Tensor, Grid, Optional[torch.Tensor]]:
        """The blocks' input (B, 1 + N, C), its (H/p, W/p) grid and, with IV-tuning, the external
        prompt P_E (B, N, C) (else None)."""
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
        return z + resize_pos_embed(self.pos_embed, self.pos_grid, hw), hw, prompt

    def rope_tables(self, hw: Grid, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(N, d) sin and cos of the grid's rotary angles (`rope_sin_cos`), cached."""
        key = (hw, device)
        if key not in self._rope:
            self._rope[key] = rope_sin_cos(hw, self.cfg.embed_dim // self.cfg.num_heads,
                                           self.cfg.rope_ref_grid, device=device)
        return self._rope[key]

    def forward_blocks(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None
                       ) -> List[torch.Tensor]:
        """The feature blocks' outputs before any resize: four (B, C, H/p, W/p) maps."""
        z, hw, prompt = self.embed(vis, ir)
        rope = self.rope_tables(hw, z.device)
        maps = {}
        for index, block in enumerate(self.blocks):
            # Block l > 0 takes its input tokens as the external prompt. With ipa_deep (Fig. 4(e))
            # the chain of IPA outputs instead carries on across blocks, from P_E at block 0.
            if prompt is not None and index > 0 and not self.ivt_cfg.ipa_deep:
                prompt = z[:, 1:]
            z, prompt = block(z, hw, rope, prompt)
            if index in self.feature_blocks:
                maps[index] = tokens_to_map(z[:, 1:], hw).contiguous()      # (B, C, H/p, W/p)
        return [maps[i] for i in self.feature_blocks]

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) -> four (B, C, .., ..) maps, strides 4-32."""
        outs = []
        for x, scale in zip(self.forward_blocks(vis, ir), FEATURE_SCALES):
            size = (math.ceil(x.shape[2] * scale), math.ceil(x.shape[3] * scale))
            outs.append(x if scale == 1 else
                        F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        return outs


# -- checkpoints --------------------------------------------------------------------------------
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


# Original release -> timm names (the EVA02 MIM checkpoints, `{'module': ...}`).
_RENAMES = ((r"\.mlp\.ffn_ln\.", ".mlp.norm."), (r"\.mlp\.w1\.", ".mlp.fc1_g."),
            (r"\.mlp\.w2\.", ".mlp.fc1_x."), (r"\.mlp\.w3\.", ".mlp.fc2."),
            (r"\.attn\.q_bias$", ".attn.q_proj.bias"), (r"\.attn\.v_bias$", ".attn.v_proj.bias"))
# Dropped on purpose: pre-training leftovers and the classifier path, which the features never use.
_DROPPED_PREFIXES = ("mask_token", "lm_head.", "norm.", "fc_norm.", "head.")


def checkpoint_filter_fn(state_dict: StateDict, patch_size: int, pos_grid: Grid) -> StateDict:
    """Map an EVA02 checkpoint (original release or timm) onto this module's names. Pure.

    Dropped on purpose: the rotary `rope.*` buffers (recomputed for every grid), the MIM
    pre-training leftovers `mask_token` and `lm_head.*`, and the final `norm`/`fc_norm`/`head`
    that only feed a classifier. The release's `q_bias`/`v_bias` become `q_proj.bias`/
    `v_proj.bias`, `mlp.w1/w2/w3` become `mlp.fc1_g/fc1_x/fc2`, `mlp.ffn_ln` becomes `mlp.norm`.
    The patch kernel is resized by `resize_patch_kernel` when its size differs from the model's
    patch, the position embedding bicubically to the model's grid (square checkpoint grid).
    """
    out = {}
    for k, v in state_dict.items():
        if k.startswith(_DROPPED_PREFIXES) or k.startswith("rope.") or ".rope." in k:
            continue
        for pattern, new in _RENAMES:
            k = re.sub(pattern, new, k)
        if k == "patch_embed.proj.weight":
            v = resize_patch_kernel(v, patch_size)
        elif k == "pos_embed":
            side = math.isqrt(v.shape[1] - 1)
            if side * side != v.shape[1] - 1:
                raise CheckpointError(f"pos_embed with {v.shape[1] - 1} patch entries is not square")
            v = resize_pos_embed(v, (side, side), pos_grid)
        out[k] = v
    return out


def build_eva02(name: str, tuning: str, ivt_cfg: Optional[IVTConfig],
                img_size: Union[None, int, Sequence[int]] = None, patch_size: Optional[int] = None,
                drop_path_rate: Optional[float] = None) -> EVA02Backbone:
    """img_size (int or (H, W), default 224) sets the stored position-embedding grid; patch_size
    16 (the paper's) or 14 (the release's); other input sizes work at run time."""
    cfg = EVA02_CONFIGS[name]
    changes = {}
    if img_size is not None:
        changes["img_size"] = ((int(img_size),) * 2 if isinstance(img_size, int)
                               else tuple(int(s) for s in img_size))
    if patch_size is not None:
        changes["patch_size"] = int(patch_size)
    if drop_path_rate is not None:
        changes["drop_path_rate"] = float(drop_path_rate)
    return EVA02Backbone(name, EVA02Config(**{**cfg.__dict__, **changes}), tuning, ivt_cfg)

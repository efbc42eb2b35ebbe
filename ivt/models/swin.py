"""Swin Transformer (Liu et al., 2021) in plain PyTorch, with IV-tuning wired in (Sec. 3.1).

Bottom-up: patch embedding, window attention with relative position bias, shifted-window block,
patch merging, stage, backbone, checkpoint conversion. Parameter names follow timm's layout
(patch merging at the start of stages 2-4), so timm files load as they are and the original
release's files after `checkpoint_filter_fn`.

Any input size works: the image is padded to a multiple of the patch size; every block pads its
grid to a multiple of its window and then shifts it cyclically, with the shifted-window mask
computed on the padded grid, as the mmseg/mmdet Swin that made the paper's segmentation and
detection numbers does (timm shifts before padding, which lets tokens from opposite edges of
the image attend to each other wherever padding occurs: timm issue #2438); a grid no larger than
the window in one dimension uses a window of the grid's size there and no shift (as timm does;
the classification Swin, which the authors' SOD release uses, does so in both dimensions once
the smaller side fits in the window: the same on the square grids that release runs). Where no
block pads, outputs equal timm's on identical weights.
"""
import math
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import IVTBackbone, StateDict
from .ivtuning import EMPG, BlockAdapters, Grid, IVTConfig, tokens_to_map
from .shape_cache import ShapeCache
from .swin_mmdet import OUTPUT_NORM, to_release_layout


@dataclass
class SwinConfig:
    embed_dim: int
    depths: Tuple[int, ...]
    num_heads: Tuple[int, ...]
    window_size: int
    mlp_ratio: float = 4.0
    patch_size: int = 4
    drop_path_rate: float = 0.1
    attention: str = "sdpa"          # how WindowAttention computes its heads: "sdpa" or "math"


SWIN_CONFIGS: Dict[str, SwinConfig] = {
    "swin_t": SwinConfig(96, (2, 2, 6, 2), (3, 6, 12, 24), 7),
    "swin_s": SwinConfig(96, (2, 2, 18, 2), (3, 6, 12, 24), 7),
    "swin_b": SwinConfig(128, (2, 2, 18, 2), (4, 8, 16, 32), 12),
    "swin_l": SwinConfig(192, (2, 2, 18, 2), (6, 12, 24, 48), 12),   # the paper's 384/22K model
    # Not a released model: a CPU-sized Swin for the demo and the tests (`make demo`).
    "swin_nano": SwinConfig(32, (2, 2, 2, 2), (1, 2, 4, 8), 4),
}
TAPS = ("stages", "release")      # which four maps SwinBackbone returns (see its docstring)


class DropPath(nn.Module):
    """Stochastic depth: per sample, the branch dropped or scaled by 1 / (1 - p) in training."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class PatchEmbed(nn.Module):
    """Conv k = s = patch, then LayerNorm. (B, 3, H, W) -> (B, N, C) tokens and their grid."""

    def __init__(self, dim: int, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Grid]:
        p = self.patch
        x = F.pad(x, (0, (-x.shape[3]) % p, 0, (-x.shape[2]) % p))   # right/bottom to the patch
        x = self.proj(x)                                                  # (B, C, H/4, W/4)
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw               # (B, N, C)


def relative_position_index(wh: int, ww: int, table_window: int) -> torch.Tensor:
    """(wh*ww, wh*ww) indices into a ((2w-1)^2, heads) bias table built for a w x w window.

    A smaller window (wh, ww <= w) uses the sub-table of its own offsets.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww),
                                        indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + (table_window - 1)    # (2, N, N), >= 0
    return rel[0] * (2 * table_window - 1) + rel[1]


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Windows are folded into the batch, so `scaled_dot_product_attention` sees 4-D
    (B*nW, heads, N, d) q/k/v, the layout its fused kernels accept. The relative position bias
    plus the shifted-window mask is combined once and cached (`ShapeCache`) while the bias table
    cannot change under autograd (frozen table, or no grad): keyed by (window, mask, batch,
    device, dtype) and stamped with the table's storage and version, so loading new weights
    invalidates it.

    `relative_position_index` is a non-persistent buffer (it moves with `.to(device)`, is never
    copied from the host during forward, and stays out of the state dict, as in timm).

    `attention` chooses how the heads are computed: "sdpa" (the default) with
    `scaled_dot_product_attention`, or "math", the explicit softmax(q k^T / sqrt(d) + bias) v
    that timm's Swin runs (its fused path is experimental): it keeps the (B*nW, heads, N, N)
    probabilities for backward, but adds the bias broadcast over the batch instead of reading a
    (B*nW, heads, N, N) copy of it. Same function; which is faster is a measurement
    (`bench/vs_timm.py`, `bench/train_step.py`).
    """

    ATTENTION = ("sdpa", "math")

    def __init__(self, dim: int, num_heads: int, window_size: int, attention: str = "sdpa"):
        super().__init__()
        if attention not in self.ATTENTION:
            raise ValueError(f"attention={attention!r}: expected one of "
                             f"{', '.join(self.ATTENTION)}")
        self.attention = attention
        self.num_heads = num_heads
        self.window_size = window_size
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.register_buffer("relative_position_index",
                             relative_position_index(window_size, window_size, window_size),
                             persistent=False)
        self._bias = ShapeCache()

    def position_bias(self, window: Grid) -> torch.Tensor:
        """(heads, N, N) bias for a window of (wh, ww) tokens, N = wh * ww.

        A smaller window's offsets are the top-left (wh, ww) corner of the full window's index.
        """
        (wh, ww), w, n = window, self.window_size, window[0] * window[1]
        idx = self.relative_position_index.view(w, w, w, w)[:wh, :ww, :wh, :ww].reshape(n * n)
        return self.relative_position_bias_table[idx].view(n, n, -1).permute(2, 0, 1)

    def attention_bias(self, window: Grid, mask: Optional[torch.Tensor], batch: Optional[int],
                       dtype: torch.dtype) -> torch.Tensor:
        """Additive attention mask, the position bias plus the shift mask: (1, heads, N, N)
        without a shift mask, else (B*nW, heads, N, N) for `scaled_dot_product_attention`, or,
        with batch=None, (nW, heads, N, N) to broadcast over the batch.

        mask: (nW, N, N) shifted-window mask or None.
        """
        def make() -> torch.Tensor:
            bias = self.position_bias(window).to(dtype)[None]              # (1, h, N, N)
            if mask is not None:
                bias = bias + mask.to(dtype)[:, None]                      # (nW, h, N, N)
                if batch is not None:                                      # (B*nW, h, N, N)
                    bias = bias.expand(batch, *bias.shape).flatten(0, 1)
            return bias

        table = self.relative_position_bias_table
        if table.requires_grad and torch.is_grad_enabled():
            return make()
        key = (window, None if mask is None else (mask.data_ptr(), mask.shape), batch,
               table.device, dtype)
        return self._bias.get(key, lambda: make().contiguous(),
                              stamp=(table.data_ptr(), table._version))

    def forward(self, x: torch.Tensor, window: Grid, mask: Optional[torch.Tensor],
                extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, nW, N, C) windows; mask: (nW, N, N) or None -> (B, nW, N, C): `heads`, then
        the output projection."""
        return self.proj(self.heads(x, window, mask, extra_kv))

    def heads(self, x: torch.Tensor, window: Grid, mask: Optional[torch.Tensor],
              extra_kv: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The attention heads' outputs concatenated, before the output projection `proj`:
        x: (B, nW, N, C) windows; mask: (nW, N, N) or None -> (B, nW, N, C).

        extra_kv: optional (B, P, C) extra tokens, already normed (VPT-deep prompts): their keys
        and values, projected with this attention's own qkv weights, join every window, with zero
        relative-position bias and no shift mask on their columns; their outputs are not returned.
        """
        B, nW, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(B * nW, N, 3, h, C // h)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                  # each (B*nW, h, N, d)
        explicit = self.attention == "math"
        bias = self.attention_bias(window, mask, None if explicit else B, q.dtype)
        if extra_kv is not None:
            P = extra_kv.shape[1]
            kv = self.qkv(extra_kv).view(B, 1, P, 3, h, C // h)[:, :, :, 1:]
            kv = kv.expand(B, nW, P, 2, h, C // h).reshape(B * nW, P, 2, h, C // h)
            k_e, v_e = kv.permute(2, 0, 3, 1, 4).unbind(0)              # each (B*nW, h, P, d)
            k, v = torch.cat([k, k_e], dim=2), torch.cat([v, v_e], dim=2)
            bias = F.pad(bias, (0, P))                                   # (.., N, N + P)
        if explicit:                                 # softmax(q k^T / sqrt(d) + bias) v
            logits = (q * self.scale) @ k.transpose(-2, -1)              # (B*nW, h, N, N + P)
            logits = logits.view(B, -1, *logits.shape[1:]) + bias        # bias: (1 or nW, ...)
            out = logits.softmax(-1).flatten(0, 1) @ v
        else:                                        # bias: (1 or B*nW, h, N, N + P)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return out.transpose(1, 2).reshape(B, nW, N, C)


def window_and_shift(hw: Grid, window: int, shifted: bool) -> Tuple[Grid, Grid]:
    """Per dimension: a grid no larger than the window is one window, unshifted."""
    win = tuple(min(s, window) for s in hw)
    shift = tuple(window // 2 if shifted and s > window else 0 for s in hw)
    return win, shift


def shifted_window_mask(padded: Grid, window: Grid, shift: Grid, device) -> torch.Tensor:
    """(nW, N, N) mask: -100 between tokens that the cyclic shift brought from different regions."""
    Hp, Wp = padded
    region = torch.zeros(Hp, Wp, device=device)
    label = 0
    for hs in (slice(0, -window[0]), slice(-window[0], -shift[0] or None),
               slice(-shift[0] or Hp, None)):
        for ws in (slice(0, -window[1]), slice(-window[1], -shift[1] or None),
                   slice(-shift[1] or Wp, None)):
            region[hs, ws] = label
            label += 1
    r = partition(region[None, :, :, None], window).squeeze(-1)[0]      # (nW, N)
    return (r[:, None, :] != r[:, :, None]).float() * -100.0


def partition(x: torch.Tensor, window: Grid) -> torch.Tensor:
    """(B, Hp, Wp, C) -> (B, nW, wh*ww, C), windows in row-major order."""
    B, H, W, C = x.shape
    wh, ww = window
    x = x.view(B, H // wh, wh, W // ww, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, (H // wh) * (W // ww), wh * ww, C)


def unpartition(x: torch.Tensor, window: Grid, padded: Grid) -> torch.Tensor:
    """Inverse of `partition`: (B, nW, wh*ww, C) -> (B, Hp, Wp, C)."""
    B, _, _, C = x.shape
    (wh, ww), (H, W) = window, padded
    x = x.view(B, H // wh, W // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, H, W, C)


class SwinBlock(nn.Module):
    """(S)W-MSA and MLP, each pre-norm with a residual; IV-tuning's adapters after each."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool,
                 mlp_ratio: float, drop_path: float, attention: str = "sdpa"):
        super().__init__()
        self.window_size, self.shifted = window_size, shifted
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.act = nn.GELU()
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)
        self.drop_path = DropPath(drop_path)
        self.adapters: Optional[BlockAdapters] = None
        self.prompts: Optional[nn.Parameter] = None                      # VPT-deep's (P, C)
        self._masks = ShapeCache()

    def window_attention(self, z: torch.Tensor, hw: Grid, extra_kv: Optional[torch.Tensor] = None,
                         project: bool = True) -> torch.Tensor:
        """z: (B, N, C) normed tokens -> (B, N, C) attention output on (shifted) windows.

        extra_kv: optional (B, P, C) normed prompt tokens every window also attends to
        (see `WindowAttention.forward`). With project=False, the heads' outputs before the output
        projection (`WindowAttention.heads`), which acts on each token alone, so that
        `attn.proj(window_attention(z, hw, project=False))` is the same attention output."""
        B, N, C = z.shape
        (H, W), (win, shift) = hw, window_and_shift(hw, self.window_size, self.shifted)
        x = F.pad(z.view(B, H, W, C), (0, 0, 0, (-W) % win[1], 0, (-H) % win[0]))  # (B, Hp, Wp, C)
        padded = (x.shape[1], x.shape[2])
        if any(shift):                                                   # pad, then cyclic shift
            x = torch.roll(x, (-shift[0], -shift[1]), dims=(1, 2))
        mask = None
        if any(shift):
            mask = self._masks.get((padded, win, shift, x.device),
                                   lambda: shifted_window_mask(padded, win, shift, x.device))
        attention = self.attn if project else self.attn.heads
        x = attention(partition(x, win), win, mask, extra_kv)
        x = unpartition(x, win, padded)
        if any(shift):
            x = torch.roll(x, shift, dims=(1, 2))
        return x[:, :H, :W].reshape(B, N, C)

    def forward(self, z: torch.Tensor, hw: Grid, prompt: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        extra = (None if self.prompts is None                            # VPT-deep prompts
                 else self.norm1(self.prompts).expand(z.shape[0], -1, -1))
        z_in, z = z, z + self.drop_path(self.window_attention(self.norm1(z), hw, extra))
        if self.adapters is not None:                                    # HA1, IPA1 (Eq. 5-6)
            z, prompt = self.adapters(0, z_in, z, prompt, hw)
        z_in, z = z, z + self.drop_path(self.mlp(self.norm2(z)))
        if self.adapters is not None:                                    # HA2, IPA2
            z, prompt = self.adapters(1, z_in, z, prompt, hw)
        return z, prompt


class PatchMerging(nn.Module):
    """2x2 neighbourhood concat (x0, x1, x2, x3 order of the release), LayerNorm,
    Linear 4C -> 2C."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, z: torch.Tensor, hw: Grid) -> Tuple[torch.Tensor, Grid]:
        B, N, C = z.shape
        H, W = hw
        x = F.pad(z.view(B, H, W, C), (0, 0, 0, W % 2, 0, H % 2))
        H2, W2 = x.shape[1] // 2, x.shape[2] // 2
        # (B, H2, 2[h], W2, 2[w], C) -> (B, H2, W2, 2[w], 2[h], C): order (0,0) (1,0) (0,1) (1,1)
        x = x.view(B, H2, 2, W2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H2 * W2, 4 * C)
        return self.reduction(self.norm(x)), (H2, W2)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 drop_path: List[float], downsample: bool, attention: str = "sdpa"):
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else None
        self.blocks = nn.ModuleList(
            SwinBlock(dim, num_heads, window_size, i % 2 == 1, mlp_ratio, drop_path[i], attention)
            for i in range(depth))

    def forward(self, z: torch.Tensor, hw: Grid, prompt: Optional[torch.Tensor]
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The stage's blocks (patch merging is the backbone's: it also changes the prompt)."""
        for block in self.blocks:
            z, prompt = block(z, hw, prompt)
        return z, prompt


class SwinBackbone(IVTBackbone):
    """Swin-T/S/B/L returning the four stage outputs as NCHW maps at strides 4, 8, 16, 32.

    With tuning='ivt' (Sec. 3.1): Zv = PE_vis(vis), Zi = PE_ir(ir), P_E = EMPG(Zv, Zi),
    Z0 = Zv + P_E (Eq. 2); stage 1's blocks take P_E as their external prompt, stage s > 1's
    blocks take the stage's input after patch merging.

    `taps` chooses the four maps, the same channels and strides either way: 'stages' (the
    default) the four stage outputs before patch merging (the standard Swin taps);
    'release' those of the authors' SOD release (SOD-IV-tuning/models/SwinTransformers_ivt.py,
    `forward_features`): Z0 (the patch embedding plus, with IV-tuning, the external prompt
    P_E; stride 4) and stages 1-3's outputs after patch merging, i.e. the inputs of stages 2-4
    (strides 8, 16, 32). Stage 4's blocks then feed no output: they are not run, and nothing in
    them trains (requires_grad False; in the release they ran, but their adapters got no
    gradient, which Adam skips, so training is the same). `ivt.fast` supports both.

    `out_norms=True` adds mmseg's and mmdet's per-output LayerNorm (`norm0..3` there), applied to
    each stage output before it becomes a map: the Swin of the runs behind the paper's
    segmentation and detection numbers. They are part of the visible model (frozen unless
    tuning='full'), loaded from an mmdet or detector checkpoint that has them, else (1, 0).
    """

    def __init__(self, name: str, cfg: SwinConfig, tuning: str = "ivt",
                 ivt_cfg: Optional[IVTConfig] = None, taps: str = "stages",
                 out_norms: bool = False):
        super().__init__()
        if taps not in TAPS:
            raise ValueError(f"taps={taps!r}: expected one of {', '.join(TAPS)}")
        if out_norms and taps == "release":
            raise ValueError("out_norms=True normalises the stage outputs; taps='release' "
                             "reads other maps")
        self.taps = taps
        self.name, self.cfg, self.tuning, self.ivt_cfg = name, cfg, tuning, ivt_cfg
        dims = [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))]
        self.out_channels = dims
        self.out_strides = [cfg.patch_size * 2 ** i for i in range(len(dims))]
        self.patch_embed = PatchEmbed(dims[0], cfg.patch_size)
        n = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]       # linear in depth
        starts = [sum(cfg.depths[:i]) for i in range(len(dims))]
        self.layers = nn.ModuleList(
            SwinStage(dims[i], cfg.depths[i], cfg.num_heads[i], cfg.window_size, cfg.mlp_ratio,
                      dpr[starts[i]:starts[i] + cfg.depths[i]], downsample=i > 0,
                      attention=cfg.attention)
            for i in range(len(dims)))
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims) if out_norms else None
        self.apply(_init_visible)
        if tuning == "ivt":
            self._add_ivt_modules(dims)
        self.apply_tuning()

    def _add_ivt_modules(self, dims: List[int]) -> None:
        c = self.ivt_cfg
        self.ir_patch_embed = PatchEmbed(dims[0], self.cfg.patch_size)     # fresh, trainable
        self.empg = EMPG(dims[0], c.d1, c.use_simam, c.empg_visible, c.lam)
        blocks = [(dims[i], b) for i, stage in enumerate(self.layers) for b in stage.blocks]
        if c.layers is not None and (c.layers and max(c.layers) >= len(blocks)):
            raise ValueError(f"layers={c.layers}: {self.name} has blocks 0..{len(blocks) - 1}")
        for index, (dim, block) in enumerate(blocks):
            if c.block_has_adapters(index) and (c.has_ha or c.has_ipa):
                block.adapters = BlockAdapters(dim, c)

    def block_stages(self) -> List[List[nn.Module]]:
        return [list(stage.blocks) for stage in self.layers]

    def apply_tuning(self) -> None:
        """`IVTBackbone.apply_tuning`; with taps='release' nothing in stage 4's blocks trains
        (its adapters or PETL modules, Rein's stage-4 tokens, its weights under 'full'): they
        feed no output."""
        super().apply_tuning()
        if self.taps == "release":
            unused = [self.layers[-1].blocks]
            if getattr(self, "rein", None) is not None:
                unused.append(self.rein[-1])
            for module in unused:
                for p in module.parameters():
                    p.requires_grad = False

    def ivt_module_names(self) -> List[str]:
        return ["ir_patch_embed", "empg"] + [
            f"layers.{i}.blocks.{j}.adapters" for i, s in enumerate(self.layers)
            for j, b in enumerate(s.blocks) if b.adapters is not None]

    def checkpoint_filter_fn(self, state_dict: StateDict) -> StateDict:
        return checkpoint_filter_fn(state_dict, self.cfg.window_size, self.out_norms is not None)

    def optional_visible_keys(self) -> List[str]:
        """The output norms: classification checkpoints lack them (they then stay (1, 0))."""
        return [k for k in self.state_dict() if k.startswith("out_norms.")]

    def forward(self, vis: torch.Tensor, ir: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """vis: (B, 3, H, W), ir: (B, 3 or 1, H, W) -> [(B, C_s, H/4/2^s, W/4/2^s)] for s = 0..3
        (the maps `taps` names)."""
        vis, ir = self.check_inputs(vis, ir)
        z, hw = self.patch_embed(vis)                                    # (B, N, C0)
        prompt = None
        if self.tuning == "ivt":
            zi, _ = self.ir_patch_embed(ir)
            prompt = self.empg(z, zi, hw)                                # P_E, Eq. 7
            z = z + prompt                                               # Eq. 2
        elif ir is not None:                          # PETL / ir_embed: Zv + PE_ir(ir), Sec. 4.5
            z = z + self.ir_patch_embed(ir)[0]
        outs = []
        release = self.taps == "release"
        if release:
            outs.append(tokens_to_map(z, hw).contiguous())               # Z0
        for i, stage in enumerate(self.layers):
            if stage.downsample is not None:
                z, hw = stage.downsample(z, hw)
                prompt = z if self.tuning == "ivt" else None             # stage input as prompt
                if release:
                    outs.append(tokens_to_map(z, hw).contiguous())       # the stage's input
                    if len(outs) == len(self.layers):
                        break                                # stage 4's blocks feed no output
            z, prompt = stage(z, hw, prompt)
            if not release:
                out = z if self.out_norms is None else self.out_norms[i](z)
                outs.append(tokens_to_map(out, hw).contiguous())         # (B, C, H, W)
        return outs


def _init_visible(m: nn.Module) -> None:
    """timm's init for the visible model (overwritten by any pretrained checkpoint)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, WindowAttention):
        nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)


def resize_relative_position_table(table: torch.Tensor, window: int) -> torch.Tensor:
    """((2w'-1)^2, heads) -> ((2w-1)^2, heads) by bicubic interpolation (Swin's own recipe)."""
    L, heads = table.shape
    src, dst = int(math.isqrt(L)), 2 * window - 1
    if src * src != L:
        raise ValueError(f"relative position table with {L} rows is not square")
    if src == dst:
        return table
    t = table.T.reshape(1, heads, src, src).float()
    t = F.interpolate(t, size=(dst, dst), mode="bicubic", align_corners=False)
    return t.reshape(heads, dst * dst).T.to(table.dtype)


def checkpoint_filter_fn(state_dict: StateDict, window_size: int,
                         out_norms: bool = False) -> StateDict:
    """Map a Swin checkpoint (original release, timm, mmdet, or a whole mmdet / detrex detector
    such as DINO) onto this module's names. Pure, but for warnings naming what is not loaded.

    Dropped on purpose: the classifier (`head.*`) and the final `norm.*` that only feeds it
    (the backbone returns stage outputs), and the stored buffers `relative_position_index` and
    `attn_mask` (recomputed here for every input size); a detector's own parts
    (`swin_mmdet.to_release_layout`). mmdet's per-output norms `norm0..3` become `out_norms.0..3`
    for a model that has them (out_norms=True), else they are dropped with a warning. The
    original release keeps patch merging at the end of stage i (`layers.i.downsample`); here it
    opens stage i+1. Relative position tables are resized when the checkpoint's window differs
    from the model's.
    """
    state_dict = to_release_layout(state_dict)
    original = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out, unused_norms = {}, []
    for k, v in state_dict.items():
        if (k.startswith(("head.", "norm."))
                or k.endswith(("relative_position_index", "attn_mask"))):
            continue
        norm = OUTPUT_NORM.fullmatch(k)
        if norm and not out_norms:
            unused_norms.append(k)
            continue
        if norm:
            k = f"out_norms.{norm.group(1)}.{norm.group(2)}"
        if original:
            m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
            if m:
                k = f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"
        if k.endswith("relative_position_bias_table"):
            v = resize_relative_position_table(v, window_size)
        out[k] = v
    if unused_norms:
        warnings.warn(f"the checkpoint's per-output norms are not loaded, this Swin has none "
                      f"(out_norms=False): {', '.join(sorted(unused_norms))}", stacklevel=2)
    return out


def build_swin(name: str, tuning: str, ivt_cfg: Optional[IVTConfig],
               window_size: Optional[int] = None, drop_path_rate: Optional[float] = None,
               attention: str = "sdpa",
               taps: str = "stages", out_norms: bool = False) -> SwinBackbone:
    overrides = {"window_size": window_size, "drop_path_rate": drop_path_rate,
                 "attention": attention}
    cfg = SwinConfig(**{**SWIN_CONFIGS[name].__dict__,
                        **{k: v for k, v in overrides.items() if v is not None}})
    return SwinBackbone(name, cfg, tuning, ivt_cfg, taps, out_norms)


def mmlab_options(backbone: str, options: dict) -> dict:
    """`build_backbone` options for the Swin of mmseg and mmdet, which made the paper's
    segmentation and detection numbers: `out_norms=True` unless given. Other backbones' options
    are returned as they are."""
    return {"out_norms": True, **options} if backbone in SWIN_CONFIGS else options

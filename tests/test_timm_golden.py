"""Equality with timm on golden fixtures (tests/golden/, made once by timm: see its README.md).

A tiny Swin (window 3, shift 1, a non-square input whose stage grids need no padding: where a
block pads, timm's order differs from ivt's, see tests/test_swin.py) and a tiny EVA02 (non-square
grids larger and smaller than its stored position embedding) are loaded from timm's state dicts
through `load_pretrained`, and their outputs compared with the ones timm computed.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ivt.models.eva02 import EVA02Backbone, EVA02Config
from ivt.models.swin import SwinBackbone, SwinConfig

GOLDEN = Path(__file__).resolve().parent / "golden"
ATOL = 1e-5


def timm_config(file: str) -> dict:
    with safe_open(str(GOLDEN / file), framework="pt") as f:
        return json.loads(f.metadata()["config"])


def tiny_swin() -> SwinBackbone:
    c = timm_config("swin_tiny.safetensors")
    cfg = SwinConfig(c["embed_dim"], tuple(c["depths"]), tuple(c["num_heads"]), c["window_size"],
                     mlp_ratio=c["mlp_ratio"], patch_size=c["patch_size"], drop_path_rate=0.0)
    model = SwinBackbone("swin_golden", cfg, tuning="freeze")
    model.load_pretrained(str(GOLDEN / "swin_tiny.safetensors"))
    return model.eval()


def tiny_eva02() -> EVA02Backbone:
    c = timm_config("eva02_tiny.safetensors")
    cfg = EVA02Config(c["embed_dim"], c["depth"], c["num_heads"],
                      int(c["embed_dim"] * c["mlp_ratio"]), patch_size=c["patch_size"],
                      img_size=(c["img_size"], c["img_size"]), rope_ref_grid=c["ref_feat_shape"][0],
                      drop_path_rate=0.0, antialias=True)           # timm's position resize
    model = EVA02Backbone("eva02_golden", cfg, tuning="freeze")
    model.load_pretrained(str(GOLDEN / "eva02_tiny.safetensors"))
    return model.eval()


def test_swin_stage_outputs_equal_timm():
    io = load_file(str(GOLDEN / "swin_tiny_io.safetensors"))
    with torch.no_grad():
        outs = tiny_swin()(io["input"])
    assert len(outs) == 3
    for i, out in enumerate(outs):
        want = io[f"out.{i}"]
        assert out.shape == want.shape, i
        err = (out - want).abs().max().item()
        assert err < ATOL, f"stage {i}: max |ivt - timm| = {err:.3g}"


@pytest.mark.parametrize("size", ["80x112", "48x32"])
def test_eva02_block_outputs_equal_timm(size):
    io = load_file(str(GOLDEN / f"eva02_tiny_{size}_io.safetensors"))
    model = tiny_eva02()
    with torch.no_grad():
        maps = model.forward_blocks(io["input"])
    got = dict(zip(model.feature_blocks, maps))
    expected = sorted(int(k.split(".")[1]) for k in io if k.startswith("out."))
    assert sorted(got) == expected
    for i in expected:
        want = io[f"out.{i}"]
        assert got[i].shape == want.shape, i
        err = (got[i] - want).abs().max().item()
        assert err < ATOL, f"block {i} at {size}: max |ivt - timm| = {err:.3g}"

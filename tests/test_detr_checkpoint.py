"""Loading a COCO-trained DINO's Swin backbone (mmdet and detrex layouts) into our Swin: the
mmdet file is made with mmdet's own converter logic (written out below) from known weights, and
the patch-merging order is checked functionally against mmdet's `nn.Unfold` formulation."""
import re
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from ivt.models import CheckpointError, build_backbone
from ivt.models.detr.coco_backbone import load_detector_backbone


def release_layout(own: dict) -> dict:
    """Our names (patch merging opens stage i+1) -> the Swin release's (it closes stage i)."""
    out = {}
    for k, v in own.items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        out[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    return out


def mmdet_swin_converter(ckpt: dict) -> dict:
    """mmdet's `swin_converter` (mmdet/models/utils/ckpt_convert.py): release -> mmdet names."""
    def reduction_order(x):
        o, i = x.shape
        return x.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)

    def norm_order(x):
        i = x.shape[0]
        return x.reshape(4, i // 4)[[0, 2, 1, 3], :].transpose(0, 1).reshape(i)

    new = {}
    for k, v in ckpt.items():
        if k.startswith("layers"):
            if "attn." in k:
                k = k.replace("attn.", "attn.w_msa.")
            elif "mlp.fc1." in k:
                k = k.replace("mlp.fc1.", "ffn.layers.0.0.")
            elif "mlp.fc2." in k:
                k = k.replace("mlp.fc2.", "ffn.layers.1.")
            elif "downsample" in k:
                v = reduction_order(v) if "reduction." in k else norm_order(v)
            k = k.replace("layers", "stages", 1)
        elif k.startswith("patch_embed") and "proj" in k:
            k = k.replace("proj", "projection")
        new["backbone." + k] = v
    return new


def detector_extras(dims):
    """What a whole DINO checkpoint holds beside the backbone's visible weights: its backbone's
    per-output norms (trained values, not LayerNorm's (1, 0)), a neck and a head."""
    g = torch.Generator().manual_seed(1)
    extras = {f"backbone.norm{i}.{p}": torch.randn(d, generator=g)
              for i, d in enumerate(dims) for p in ("weight", "bias")}
    extras.update({"neck.convs.0.conv.weight": torch.zeros(4, 4, 1, 1),
                   "bbox_head.cls.weight": torch.zeros(80, 4)})
    return extras


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    src = build_backbone("swin_nano", tuning="full")
    return src, {k: v.clone() for k, v in src.state_dict().items()}


def check_loaded(model, own):
    for k, v in own.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_load_mmdet_dino_backbone(source, tmp_path):
    src, own = source
    sd = mmdet_swin_converter(release_layout(own))
    index_key = "backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"   # a buffer
    sd[index_key] = torch.zeros(49, 49, dtype=torch.int64)
    sd.update(detector_extras(src.out_channels))
    path = tmp_path / "dino_mmdet.pth"
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": sd}, path)
    model = build_backbone("swin_nano", tuning="ivt")
    with pytest.warns(UserWarning, match=r"per-output norms are not loaded.*norm0\.bias"):
        ignored = load_detector_backbone(model, str(path))
    check_loaded(model, own)
    assert ignored == ["bbox_head.cls.weight", "neck.convs.0.conv.weight"]
    # mmdet's Swin: the output norms load, frozen with the rest of the visible model
    model = build_backbone("swin_nano", tuning="ivt", out_norms=True)
    load_detector_backbone(model, str(path))
    check_loaded(model, own)
    for i in range(4):
        for p in ("weight", "bias"):
            assert torch.equal(model.state_dict()[f"out_norms.{i}.{p}"],
                               sd[f"backbone.norm{i}.{p}"])
    assert not any(p.requires_grad for p in model.out_norms.parameters())

    # patch merging as mmdet computes it (nn.Unfold), with mmdet's weights, equals ours
    merge = model.layers[1].downsample
    z = torch.randn(2, 6 * 4, 32)
    unfold = (nn.Unfold(kernel_size=2, stride=2)(z.view(2, 6, 4, 32).permute(0, 3, 1, 2))
              .transpose(1, 2))
    ref = F.linear(F.layer_norm(unfold, (128,), sd["backbone.stages.0.downsample.norm.weight"],
                                sd["backbone.stages.0.downsample.norm.bias"]),
                   sd["backbone.stages.0.downsample.reduction.weight"])
    assert torch.allclose(merge(z, (6, 4))[0], ref, atol=1e-5)


def test_output_norms_the_file_lacks_are_named(source, tmp_path):
    """detrex's DINO Swin (out_indices 1-3) has norm1..3 and no norm0: loaded into a Swin with
    four output norms, the missing one keeps LayerNorm's (1, 0), which the load says by name; a
    file with all four (or, as a classification checkpoint, none) says nothing."""
    src, own = source
    sd = {"backbone." + k: v for k, v in release_layout(own).items()}
    sd.update({k: v for k, v in detector_extras(src.out_channels).items()
               if not k.startswith("backbone.norm0.")})
    torch.save({"model": sd}, tmp_path / "three.pth")
    model = build_backbone("swin_nano", tuning="ivt", out_norms=True)
    with pytest.warns(UserWarning, match=r"these 2 keep their initial values: "
                                         r"out_norms\.0\.bias, out_norms\.0\.weight$"):
        load_detector_backbone(model, str(tmp_path / "three.pth"))
    check_loaded(model, own)
    assert torch.equal(model.out_norms[0].weight, torch.ones_like(model.out_norms[0].weight))
    assert torch.equal(model.out_norms[1].weight, sd["backbone.norm1.weight"])
    sd.update(detector_extras(src.out_channels))
    torch.save({"model": sd}, tmp_path / "four.pth")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*keep their initial values")
        load_detector_backbone(model, str(tmp_path / "four.pth"))


def test_load_detrex_dino_backbone(source, tmp_path):
    src, own = source
    sd = {"backbone." + k: v for k, v in release_layout(own).items()}
    sd.update(detector_extras(src.out_channels))
    path = tmp_path / "dino_detrex.pth"
    torch.save({"model": sd, "iteration": 90000}, path)
    model = build_backbone("swin_nano", tuning="full")
    with pytest.warns(UserWarning, match="per-output norms are not loaded"):
        load_detector_backbone(model, str(path))
    check_loaded(model, own)


def test_detector_checkpoint_errors_name_keys(source, tmp_path):
    src, own = source
    sd = mmdet_swin_converter(release_layout(own))
    del sd["backbone.stages.2.blocks.1.ffn.layers.1.weight"]
    sd["backbone.stages.0.blocks.0.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "bad.pth")
    expected = (r"(?s)missing keys \(1\): layers\.2\.blocks\.1\.mlp\.fc2\.weight"
                r".*unexpected keys \(1\): layers\.0\.blocks\.0\.extra\.weight")
    with pytest.raises(CheckpointError, match=expected):
        load_detector_backbone(build_backbone("swin_nano", tuning="ivt"), str(tmp_path / "bad.pth"))
    torch.save({"state_dict": {"neck.w": torch.zeros(1)}}, tmp_path / "nobackbone.pth")
    with pytest.raises(CheckpointError, match="no 'backbone"):
        load_detector_backbone(build_backbone("swin_nano", tuning="ivt"),
                               str(tmp_path / "nobackbone.pth"))
    sd = mmdet_swin_converter(release_layout(own))
    sd["backbone.stages.1.blocks.0.norm1.weight"] = torch.ones(65)
    torch.save({"state_dict": sd}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): "
                                              r"layers\.1\.blocks\.0\.norm1\.weight: "
                                              r"checkpoint \(65,\) vs model \(64,\)"):
        load_detector_backbone(build_backbone("swin_nano", tuning="ivt"),
                               str(tmp_path / "wide.pth"))
    sd = mmdet_swin_converter(release_layout(own))                # as many numbers, transposed
    key = "backbone.stages.2.blocks.1.ffn.layers.1.weight"
    sd[key] = sd[key].t().contiguous()
    torch.save({"state_dict": sd}, tmp_path / "transposed.pth")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): "
                                              r"layers\.2\.blocks\.1\.mlp\.fc2\.weight"):
        load_detector_backbone(build_backbone("swin_nano", tuning="ivt"),
                               str(tmp_path / "transposed.pth"))


def test_mmdet_backbone_file_without_a_detector_loads(source, tmp_path):
    """mmdet's converted Swin backbones (mmdet names, no `backbone.` prefix: what mmdet's
    `swin_converter` gives before a detector wraps it) load as a pretrained file: renamed to the
    release's names, patch merging reordered back from `nn.Unfold`'s order, and the per-output
    norms norm0..3 into `out_norms.0..3`. Every weight is made distinct (a LayerNorm's (1, 0)
    would hide a wrongly ordered patch-merging norm)."""
    src, _ = source
    g = torch.Generator().manual_seed(2)
    params = dict(src.named_parameters())
    own = {k: v + torch.randn(v.shape, generator=g) if k in params else v
           for k, v in src.state_dict().items()}
    sd = {k[len("backbone."):]: v for k, v in mmdet_swin_converter(release_layout(own)).items()}
    assert any(k.startswith("stages.") for k in sd) and "patch_embed.projection.weight" in sd
    norms = {k[len("backbone."):]: v for k, v in detector_extras(src.out_channels).items()
             if k.startswith("backbone.norm")}
    torch.save({"state_dict": {**sd, **norms}}, tmp_path / "mmdet_swin.pth")
    model = build_backbone("swin_nano", tuning="ivt", out_norms=True,
                           pretrained=str(tmp_path / "mmdet_swin.pth"))
    check_loaded(model, own)
    for i in range(4):
        assert torch.equal(model.out_norms[i].weight, norms[f"norm{i}.weight"]), i
        assert torch.equal(model.out_norms[i].bias, norms[f"norm{i}.bias"]), i

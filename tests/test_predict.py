"""predict.py end to end on the CPU with tiny checkpoints (swin_nano trained for 1-2 iterations on
synthetic data by the real training scripts): outputs at the input's size for every task,
1-channel, 3-channel and 16-bit thermal inputs, bad pairs named and skipped while the rest
complete, --pairs, --rgbt, batching, and no overwriting without --overwrite.

Reference predictions come from the model itself (`load_trained` + `model.predict`) on inputs the
tests prepare with the documented rules, never from predict.py's own helpers."""
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))                    # the scripts live at the root
import predict  # noqa: E402
from ivt.checkpoint import load_checkpoint  # noqa: E402
from ivt.data.synthetic import render_scene, write_m3fd, write_mfnet, write_vt  # noqa: E402
from ivt.data.transforms import thermal_to_tensor, visible_to_tensor  # noqa: E402
from ivt.models import normalization_for  # noqa: E402
from ivt.tasks import config_normalization, load_trained  # noqa: E402
from ivt.visualize import overlay_saliency  # noqa: E402
from test_high_bit_depth import stretch_reference  # noqa: E402  (the 16-bit rule, float64)

TINY = ["--backbone", "swin_nano", "--d2", "8", "--batch-size", "2", "--eval-every", "1",
        "--log-every", "1", "--workers", "0", "--device", "cpu", "--kernels", "torch"]


# -- references, written from the documented rules ------------------------------------------------
def model_inputs(vis, ir8, norm, size=None):
    if size is not None:
        vis = np.asarray(Image.fromarray(vis).resize((size, size), Image.BILINEAR))
        ir8 = np.asarray(Image.fromarray(ir8).resize((size, size), Image.BILINEAR))
    return visible_to_tensor(vis, norm)[None], thermal_to_tensor(ir8, norm)[None]


def scene(seed, size, night=False):
    s = render_scene(np.random.default_rng(seed), size, night)
    return s["vis"], s["ir"]


def truncated_png(path: Path, like: np.ndarray) -> None:
    Image.fromarray(like).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def run(capsys, *argv):
    """predict.main -> (exit status, stdout + stderr)."""
    status = predict.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory):
    import train_seg
    root = tmp_path_factory.mktemp("seg")
    write_mfnet(root / "mfnet", n_train=4, n_val=2, n_test=2, size=(32, 48))
    train_seg.main([str(a) for a in ["--data", root / "mfnet", "--out", root / "run",
                                     "--head-dim", "16", "--crop", "32", "--iters", "2", *TINY]])
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """vis/ and ir/ folders: four good pairs (8-bit grey, 3-channel, 16-bit PNG, 16-bit TIFF
    thermal; three sizes), a pair whose sizes differ, a corrupt thermal file, a visible image
    without a partner and a text file. Returns (root, {name: (vis, expected 8-bit thermal)})."""
    root = tmp_path_factory.mktemp("pairs")
    (root / "vis").mkdir()
    (root / "ir").mkdir()
    good = {}
    vis, ir = scene(1, (32, 48))
    Image.fromarray(vis).save(root / "vis" / "grey8.png")
    Image.fromarray(ir).save(root / "ir" / "grey8.png")
    good["grey8"] = (vis, ir)

    vis, ir = scene(2, (37, 53), night=True)
    Image.fromarray(vis).save(root / "vis" / "three.jpg", quality=100)
    Image.fromarray(np.repeat(ir[..., None], 3, axis=2)).save(root / "ir" / "three.png")
    good["three"] = (np.asarray(Image.open(root / "vis" / "three.jpg").convert("RGB")), ir)

    vis, ir = scene(3, (32, 48))
    ir16 = (ir.astype(np.uint16) * 40 + 3000)
    ir16[0, :5] = 65535                                # hot pixels: the percentiles ignore them
    ir16[-1, :5] = 0
    Image.fromarray(ir16).save(root / "ir" / "deep16.png")
    assert Image.open(root / "ir" / "deep16.png").mode.startswith("I")
    Image.fromarray(vis).save(root / "vis" / "deep16.png")
    good["deep16"] = (vis, stretch_reference(ir16))

    vis, ir = scene(4, (30, 40), night=True)
    ir16 = (ir.astype(np.uint16) * 200 + 500)
    Image.fromarray(ir16).save(root / "ir" / "tiff16.tif")
    Image.fromarray(vis).save(root / "vis" / "tiff16.png")
    good["tiff16"] = (vis, stretch_reference(ir16))

    vis, ir = scene(5, (32, 48))
    Image.fromarray(vis).save(root / "vis" / "mismatch.png")
    Image.fromarray(ir[:24]).save(root / "ir" / "mismatch.png")
    Image.fromarray(vis).save(root / "vis" / "corrupt.png")
    truncated_png(root / "ir" / "corrupt.png", ir)
    Image.fromarray(vis).save(root / "vis" / "lonely.png")
    (root / "vis" / "notes.txt").write_text("not an image\n")
    return root, good


BAD = {"mismatch": "sizes differ", "corrupt": "corrupt.png", "lonely": "no thermal image"}


# -- segmentation --------------------------------------------------------------------------------
def test_help_explains_every_flag(capsys):
    parser = predict.get_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    with pytest.raises(SystemExit) as e:
        predict.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--pretrained", "--vis", "--ir", "--pairs", "--rgbt", "--out",
                 "--overwrite", "--device", "--batch", "--amp", "--score-threshold"):
        assert flag in text, flag
    assert "percentile" in text and "Exit status" in text


def test_seg_folder(seg_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", root / "vis",
                       "--ir", root / "ir", "--out", tmp_path, "--device", "cpu")
    assert status == len(BAD)
    for name, words in BAD.items():
        assert any(name in line and words in line for line in text.splitlines()), name
    assert "notes" not in text
    _, model, ckpt = load_trained(str(seg_checkpoint))
    norm = config_normalization(ckpt["config"])
    for name, (vis, ir8) in good.items():
        classes = np.asarray(Image.open(tmp_path / f"{name}_classes.png"))
        assert classes.shape == ir8.shape, name
        expected = model.predict(*model_inputs(vis, ir8, norm))[0].numpy()
        np.testing.assert_array_equal(classes, expected, err_msg=name)
        overlay = np.asarray(Image.open(tmp_path / f"{name}_overlay.png").convert("RGB"))
        h, w = ir8.shape
        assert overlay.shape[0] >= h and overlay.shape[1] > w        # legend on the right
        background = classes == 0
        np.testing.assert_array_equal(overlay[:h, :w][background], vis[background])
        if (~background).any():
            assert (overlay[:h, :w][~background] != vis[~background]).any()
    for name in BAD:
        assert not list(tmp_path.glob(f"{name}_*")), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{n}{s}" for n in good for s in ("_classes.png", "_overlay.png")]
        + ["predict_run.json"])


def test_no_overwrite_and_batching(seg_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    args = ["--checkpoint", seg_checkpoint, "--vis", root / "vis", "--ir", root / "ir",
            "--out", tmp_path, "--device", "cpu"]
    run(capsys, *args)
    single = {n: np.asarray(Image.open(tmp_path / f"{n}_classes.png")) for n in good}
    (tmp_path / "grey8_classes.png").write_bytes(b"kept")
    (tmp_path / "three_overlay.png").unlink()
    status, text = run(capsys, *args, "--batch", "4")
    assert status == len(BAD)
    assert (tmp_path / "grey8_classes.png").read_bytes() == b"kept"
    assert (tmp_path / "three_overlay.png").is_file()             # a missing file is written
    assert "3 already written" in text
    status, _ = run(capsys, *args, "--batch", "4", "--overwrite")
    assert status == len(BAD)
    for name, expected in single.items():       # batched pairs of equal size: same classes
        batched = np.asarray(Image.open(tmp_path / f"{name}_classes.png"))
        assert (batched == expected).mean() > 0.995, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_pairs_list(seg_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    spaced = tmp_path / "with space"
    spaced.mkdir()
    shutil.copy(root / "ir" / "grey8.png", spaced / "grey8 ir.png")
    listing = tmp_path / "list.txt"
    listing.write_text("# visible thermal\n"
                       f"{root / 'vis' / 'grey8.png'} 'with space/grey8 ir.png'\n"
                       "\n"
                       f"{root / 'vis' / 'tiff16.png'} {root / 'ir' / 'tiff16.tif'}  # 16 bit\n"
                       "only_one_field.png\n"
                       f"{root / 'vis' / 'three.jpg'} missing.png\n")
    out = tmp_path / "out"
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--pairs", listing,
                       "--out", out, "--device", "cpu")
    assert status == 2
    assert "list.txt:5" in text and "missing.png" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "grey8_classes.png", "grey8_overlay.png", "predict_run.json", "tiff16_classes.png",
        "tiff16_overlay.png"]
    a = np.asarray(Image.open(out / "tiff16_classes.png"))
    assert a.shape == good["tiff16"][1].shape


def test_rgbt_folder(seg_checkpoint, tmp_path, capsys):
    images = seg_checkpoint.parents[1] / "mfnet" / "images"
    status, _ = run(capsys, "--checkpoint", seg_checkpoint, "--rgbt", images, "--out", tmp_path,
                    "--device", "cpu")
    assert status == 0
    _, model, ckpt = load_trained(str(seg_checkpoint))
    norm = config_normalization(ckpt["config"])
    for path in sorted(images.glob("*.png"))[:3]:
        rgbt = np.asarray(Image.open(path))
        expected = model.predict(*model_inputs(rgbt[..., :3], rgbt[..., 3], norm))[0].numpy()
        got = np.asarray(Image.open(tmp_path / f"{path.stem}_classes.png"))
        np.testing.assert_array_equal(got, expected, err_msg=path.name)


def test_one_pair_of_files_with_amp(seg_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", root / "vis" / "three.jpg",
                       "--ir", root / "ir" / "three.png", "--out", tmp_path, "--amp",
                       "--device", "cpu")
    assert status == 0 and "1 pairs written" in text
    classes = np.asarray(Image.open(tmp_path / "three_classes.png"))
    assert classes.shape == good["three"][1].shape and classes.max() < 9


def test_a_missing_file_of_one_pair_is_named(seg_checkpoint, pairs, tmp_path, capsys):
    """`--vis a --ir b` with b missing: a failed pair naming b (as --pairs and folders report
    it), not the usage error 'must both be files or both be folders'."""
    root, _ = pairs
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", root / "vis" / "three.jpg",
                       "--ir", tmp_path / "nope.png", "--out", tmp_path / "out", "--device", "cpu")
    assert status == 1 and "nope.png" in text and "1 failed" in text, text
    assert "both be files" not in text


def test_exit_status_is_capped(seg_checkpoint, tmp_path, capsys):
    (tmp_path / "vis").mkdir()
    (tmp_path / "ir").mkdir()
    for k in range(predict.MAX_EXIT_STATUS + 5):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "vis" / f"{k}.png")
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", tmp_path / "vis",
                       "--ir", tmp_path / "ir", "--out", tmp_path / "out", "--device", "cpu")
    assert status == predict.MAX_EXIT_STATUS
    assert f"{predict.MAX_EXIT_STATUS + 5} failed" in text


def test_hidden_files_in_input_folders_are_not_pairs(seg_checkpoint, pairs, tmp_path, capsys):
    """Hidden files (macOS `._name.png` resource forks, editors' `.name.png` backups) are not
    inputs: a folder holding them beside its pairs predicts every pair and reports no failure
    (they would otherwise be unpaired stems or unreadable images)."""
    root, _ = pairs
    for sub in ("vis", "ir"):
        (tmp_path / sub).mkdir()
        shutil.copyfile(root / sub / "grey8.png", tmp_path / sub / "grey8.png")
    (tmp_path / "vis" / "._grey8.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    shutil.copyfile(root / "vis" / "grey8.png", tmp_path / "vis" / ".backup.png")
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", tmp_path / "vis",
                       "--ir", tmp_path / "ir", "--out", tmp_path / "out", "--device", "cpu")
    assert status == 0 and "1 pairs written" in text and "0 failed" in text, text
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "grey8_classes.png", "grey8_overlay.png", "predict_run.json"]


def test_usage_errors(seg_checkpoint, tmp_path, capsys):
    for argv in (["--vis", tmp_path],                                 # --ir missing
                 ["--vis", tmp_path, "--ir", tmp_path, "--rgbt", tmp_path],
                 ["--vis", tmp_path / "nothing", "--ir", tmp_path]):
        with pytest.raises(SystemExit) as e:
            predict.main(["--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "o"),
                          *map(str, argv)])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        predict.main(["--checkpoint", str(tmp_path / "none.pt"), "--rgbt", str(tmp_path),
                      "--out", str(tmp_path / "o")])
    assert "none.pt" in capsys.readouterr().err
    webp = tmp_path / "webp"                      # nothing predict reads: an error, not success
    for sub in ("vis", "ir"):
        (webp / sub).mkdir(parents=True)
        (webp / sub / "a.webp").write_bytes(b"")
    (tmp_path / "file").write_text("")
    for argv, expected in [(["--vis", webp / "vis", "--ir", webp / "ir"], "no images to predict"),
                           (["--rgbt", webp / "vis"], "no images to predict"),
                           (["--rgbt", tmp_path, "--out", tmp_path / "file"], "is a file"),
                           (["--rgbt", tmp_path, "--out", tmp_path / "file" / "o"],
                            "nothing can be written under it"),
                           (["--rgbt", tmp_path, "--max-dets", "-1"], "--max-dets must be"),
                           (["--rgbt", tmp_path, "--out", tmp_path], "is the --rgbt folder"),
                           (["--vis", webp / "vis", "--ir", webp / "ir", "--out", webp / "ir"],
                            "is the --ir folder")]:
        with pytest.raises(SystemExit) as e:
            predict.main(["--checkpoint", str(seg_checkpoint), "--out", str(tmp_path / "o"),
                          *map(str, argv)])
        assert e.value.code == 2 and expected in capsys.readouterr().err, argv


def test_seg_pads_to_the_patch_size():
    """EVA02 needs sides that are multiples of its patch: inputs are padded, outputs cropped."""
    class Stub(torch.nn.Module):
        def predict(self, vis, ir):
            assert vis.shape[-2] % 16 == 0 and vis.shape[-1] % 16 == 0 and ir.shape == vis.shape
            b, _, h, w = vis.shape
            yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            return ((yy + 2 * xx) % 9).expand(b, h, w)

    config = {"backbone": "swin_nano", "normalization": normalization_for("swin_nano").as_dict()}
    p = predict.SegPredictor(Stub(), config, None)
    p.multiple = 16
    vis, ir = scene(0, (37, 53))
    v, i = p.prepare(vis, ir)
    assert v.shape == i.shape == (3, 48, 64)
    [classes] = p.run(v[None], i[None], [(37, 53)])
    yy, xx = np.mgrid[0:37, 0:53]
    np.testing.assert_array_equal(classes, (yy + 2 * xx) % 9)


def test_seg_overlay_tints_each_class_with_the_mfnet_palette():
    """_overlay.png colours the classes with docs/data.md's MFNet palette (car (64, 0, 128),
    person (64, 64, 0), ...), written out here from the spec, not read from ivt: on a black
    visible image each class's pixel is one common fraction `a` of its palette colour, and the
    unlabeled class is left untinted."""
    mfnet = [(0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0),
             (64, 64, 128), (192, 128, 128), (192, 64, 0)]
    config = {"backbone": "swin_nano", "normalization": normalization_for("swin_nano").as_dict()}
    p = predict.SegPredictor(torch.nn.Linear(1, 1), config, None)
    classes = np.arange(9, dtype=np.uint8).reshape(3, 3)
    vis = np.zeros((3, 3, 3), np.uint8)
    overlay = np.asarray(p.render(vis, vis[..., 0], classes, None)["_overlay.png"].convert("RGB"))
    tint = overlay[:3, :3].reshape(9, 3).astype(float)
    a = tint[4, 2] / 192                                 # curve (0, 0, 192): the blend factor
    assert 0.2 < a < 1
    np.testing.assert_allclose(tint, a * np.array(mfnet, float), atol=1.0)


def test_drawing_helpers():
    from ivt.visualize import colourise, draw_boxes
    label = np.array([[0, 1, 8], [255, 2, 0]])
    np.testing.assert_array_equal(colourise(label), [[(0, 0, 0), (64, 0, 128), (192, 64, 0)],
                                                     [(255, 255, 255), (64, 64, 0), (0, 0, 0)]])
    # ids outside 0..255 have no colour either: white, not clipped onto class 0 or 255's
    np.testing.assert_array_equal(colourise(np.array([[-1, 256, 3]])),
                                  [[(255, 255, 255), (255, 255, 255), (0, 128, 192)]])
    vis = np.full((4, 1, 3), 100, np.uint8)
    sal = np.array([[0], [255], [128], [51]], np.uint8)
    out = np.asarray(overlay_saliency(vis, sal, alpha=0.5, colour=(200, 0, 100))).astype(float)
    w = 0.5 * sal.astype(float) / 255
    np.testing.assert_allclose(out[:, 0], (1 - w) * 100 + w * np.array([200, 0, 100]), atol=0.5)
    canvas = np.asarray(draw_boxes(np.zeros((100, 200), np.uint8), np.array([[40, 50, 120, 90]]),
                                   ["Car"], [0.87], [(0, 255, 0)]))
    assert canvas.shape == (100, 200, 3)
    assert (canvas[50:91, 40] == (0, 255, 0)).all() and (canvas[90, 40:121] == (0, 255, 0)).all()
    assert (canvas[60:85, 45:115] == 0).all()                        # the inside is untouched
    assert (canvas[:50, 40:] == (0, 255, 0)).all(axis=-1).any()      # the tag sits above
    # the legend's shares: a present class never reads 0.0% (103 of 307,200 pixels did)
    from ivt.visualize import share
    assert [share(103, 640 * 480), share(0, 100), share(1, 1000), share(37, 200)] == \
        ["<0.1%", "0.0%", "0.1%", "18.5%"]


def test_segmentation_overlay_blend_and_legend(monkeypatch):
    """overlay_segmentation on a grey visible image: each labelled pixel is (1 - alpha) * visible
    + alpha * its class colour (rounded), background pixels stay the visible image, and the
    legend to the right lists every other class with its share of the pixels (written out by
    hand), all inside the canvas even when the image is shorter than the legend."""
    from PIL import ImageDraw

    from ivt.visualize import overlay_segmentation
    texts = []
    real_text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(ImageDraw.ImageDraw, "text",
                        lambda self, xy, text, *a, **k: texts.append((xy, text))
                        or real_text(self, xy, text, *a, **k))
    names, palette = ("bg", "car", "person", "bike"), [(0, 0, 0), (200, 0, 0), (0, 200, 100),
                                                       (10, 20, 30)]
    label = np.array([[0, 1, 1, 2], [2, 2, 2, 0]])
    vis = np.full((2, 4, 3), 101, np.uint8)
    canvas = overlay_segmentation(vis, label, names, palette, alpha=0.3)
    image = np.asarray(canvas)[:2, :4].astype(float)
    colours = np.array(palette, float)[label]
    want = np.where((label == 0)[..., None], 101.0, np.floor(0.7 * 101 + 0.3 * colours + 0.5))
    np.testing.assert_array_equal(image, want)
    assert [t for _, t in texts] == ["car 25.0%", "person 50.0%", "bike 0.0%"]
    assert all(x >= 4 and 0 <= y < canvas.height for (x, y), _ in texts)


def test_boxes_tags_stay_inside_with_readable_text():
    """draw_boxes' tag: inside the box when there is no room above it, shifted left to stay
    inside the image, black text on a bright colour and white on a dark one (luma); a box given
    with its corners swapped is drawn as the same box."""
    from ivt.visualize import draw_boxes
    image = np.full((100, 200), 128, np.uint8)
    for colour, text in (((0, 255, 0), 0), ((0, 0, 128), 255)):
        canvas = np.asarray(draw_boxes(image, np.array([[160, 0, 198, 60]]), ["Motorcycle"],
                                       [0.5], [colour])).astype(int)
        tag = (canvas == colour).all(axis=-1)
        rows, cols = np.nonzero(tag[:, :159])             # the tag reaches left of the box
        assert len(cols) > 0 and rows.min() >= 1           # and starts inside it, below y0
        region = canvas[rows.min():rows.max() + 1, cols.min():200]
        assert (np.abs(region - text).sum(axis=-1) < 60).any(), colour
        assert not (np.abs(region - (255 - text)).sum(axis=-1) < 60).any(), colour
    forward = np.asarray(draw_boxes(image, np.array([[40, 50, 120, 90]]), ["Car"], [0.87]))
    swapped = np.asarray(draw_boxes(image, np.array([[120, 90, 40, 50]]), ["Car"], [0.87]))
    np.testing.assert_array_equal(swapped, forward)


def test_saliency_overlay_end_points():
    """overlay_saliency moves each pixel towards the colour by alpha * saliency / 255: saliency 0
    leaves the visible pixel, saliency 255 with alpha 1 gives the colour itself."""
    vis = np.array([[[10, 200, 30], [10, 200, 30]]], np.uint8)
    out = np.asarray(overlay_saliency(vis, np.array([[0, 255]], np.uint8), alpha=1.0,
                                      colour=(255, 32, 0)))
    np.testing.assert_array_equal(out, [[[10, 200, 30], [255, 32, 0]]])


def test_tag_font_size_follows_the_image_height():
    """font(h): about h / 30 pixels, at least 10 (Pillow's scalable default font where FreeType
    is available)."""
    from ivt.visualize import font
    big, small = font(600), font(90)
    if not hasattr(big, "size"):
        pytest.skip("Pillow without FreeType: one bitmap font size")
    assert (big.size, small.size, font(12).size) == (20, 10, 10)


def test_palettes_extend_mfnet_with_distinct_colours():
    """palette_for(n): MFNet's first n colours (docs/data.md) for n <= 9, then colours that are
    all different from each other and from MFNet's."""
    from ivt.visualize import distinct_colours, palette_for
    mfnet = [(0, 0, 0), (64, 0, 128), (64, 64, 0), (0, 128, 192), (0, 0, 192), (128, 128, 0),
             (64, 64, 128), (192, 128, 128), (192, 64, 0)]
    assert [tuple(c) for c in palette_for(5)] == mfnet[:5]
    big = [tuple(c) for c in palette_for(30)]
    assert big[:9] == mfnet and len(set(big)) == 30
    assert len(set(distinct_colours(40))) == 40


# -- salient object detection and detection ------------------------------------------------------
@pytest.fixture(scope="module")
def sod_checkpoint(tmp_path_factory):
    pytest.importorskip("ivt.tasks.sod")
    import train_sod
    root = tmp_path_factory.mktemp("sod")
    write_vt(root / "vt", n_train=4, n_test=0, n_vt1000=0, n_vt821=0, size=(32, 48))
    train_sod.main([str(a) for a in ["--data", root / "vt" / "VT5000" / "Train",
                                     "--out", root / "run", "--size", "32", "--val-count", "2",
                                     "--iters", "1", *TINY]])
    return root / "run" / "best.pt"


@pytest.fixture(scope="module")
def det_checkpoint(tmp_path_factory):
    pytest.importorskip("ivt.tasks.det")
    import train_det
    root = tmp_path_factory.mktemp("det")
    write_m3fd(root / "m3fd", n=6, size=(32, 48))
    train_det.main([str(a) for a in ["--data", root / "m3fd", "--split-dir", root / "m3fd",
                                     "--out", root / "run", "--size", "64", "--hidden-dim", "16",
                                     "--num-queries", "10", "--dec-layers", "1", "--iters", "1",
                                     *TINY]])
    return root / "run" / "best.pt"


def test_sod_folder(sod_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    status, text = run(capsys, "--checkpoint", sod_checkpoint, "--vis", root / "vis",
                       "--ir", root / "ir", "--out", tmp_path, "--device", "cpu")
    assert status == len(BAD)
    assert all(name in text for name in BAD)
    _, model, ckpt = load_trained(str(sod_checkpoint))
    norm, size = config_normalization(ckpt["config"]), ckpt["config"]["size"]
    for name, (vis, ir8) in good.items():
        saliency = np.asarray(Image.open(tmp_path / f"{name}_saliency.png"))
        assert saliency.shape == ir8.shape and saliency.dtype == np.uint8, name
        prob = model.predict(*model_inputs(vis, ir8, norm, size)).float()
        prob = F.interpolate(prob, size=ir8.shape, mode="bilinear", align_corners=False)[0, 0]
        prob = prob.clamp(0, 1).double().numpy()
        lo, hi = prob.min(), prob.max()      # min-max stretched per image (docs/data.md)
        assert hi > lo, name
        assert np.abs(saliency - np.round((prob - lo) / (hi - lo) * 255)).max() <= 1, name
        overlay = np.asarray(Image.open(tmp_path / f"{name}_overlay.png"), dtype=float)
        assert overlay.shape == (*ir8.shape, 3)
        want = np.asarray(overlay_saliency(vis, np.round(prob * 255).astype(np.uint8)), float)
        assert np.abs(overlay - want).max() <= 1, name      # the probability, not stretched


def test_sod_map_is_resized_bilinearly_with_half_pixel_centres():
    """The SOD probability (the module docstring): the square output resized to each pair's
    own size bilinearly with align_corners=False, the evaluation's resize
    (`ivt.tasks.sod.evaluate_sod`, the SOD release's F.upsample(..., align_corners=False)). A stub
    returns random probabilities (a tiny trained model's are too flat to tell resizes apart);
    the reference is the half-pixel bilinear formula in float64, up and down in size."""
    prob = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    class Stub(torch.nn.Module):
        def predict(self, vis, ir):
            return prob

    def axis(n_in, n_out):   # output j samples (j + 0.5) * n_in / n_out - 0.5, clamped at 0
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        return i0, np.minimum(i0 + 1, n_in - 1), src - i0

    config = {"backbone": "swin_nano", "normalization": normalization_for("swin_nano").as_dict(),
              "size": 8}
    p = predict.SodPredictor(Stub(), config, None)
    sizes = [(13, 21), (5, 6)]
    maps = p.run(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), sizes)
    for i, (h, w) in enumerate(sizes):
        (y0, y1, wy), (x0, x1, wx) = axis(8, h), axis(8, w)
        x = prob[i, 0].double().numpy()
        top = x[y0][:, x0] * (1 - wx) + x[y0][:, x1] * wx
        bottom = x[y1][:, x0] * (1 - wx) + x[y1][:, x1] * wx
        want = top * (1 - wy)[:, None] + bottom * wy[:, None]
        assert maps[i].shape == (h, w), i
        np.testing.assert_allclose(maps[i], want, rtol=0, atol=1e-6)  # float32 rounding


def test_det_folder(det_checkpoint, pairs, tmp_path, capsys):
    root, good = pairs
    status, text = run(capsys, "--checkpoint", det_checkpoint, "--vis", root / "vis",
                       "--ir", root / "ir", "--out", tmp_path, "--device", "cpu",
                       "--score-threshold", "0")
    assert status == len(BAD)
    assert all(name in text for name in BAD)
    _, model, ckpt = load_trained(str(det_checkpoint))
    norm, size = config_normalization(ckpt["config"]), ckpt["config"]["size"]
    from ivt.data.m3fd import M3FD_CLASSES
    for name, (vis, ir8) in good.items():
        record = json.loads((tmp_path / f"{name}_boxes.json").read_text())
        assert (record["height"], record["width"]) == ir8.shape
        expected = model.predict(*model_inputs(vis, ir8, norm, size), orig_sizes=[ir8.shape],
                                 score_threshold=0.0, max_dets=100)[0]
        assert len(record["boxes"]) == len(expected["scores"]) > 0, name
        for got, box, score, label in zip(record["boxes"], expected["boxes"],
                                          expected["scores"], expected["labels"]):
            np.testing.assert_allclose(got["box"], box.numpy(), atol=0.01)
            assert got["score"] == pytest.approx(float(score), abs=1e-4)
            assert got["class"] == M3FD_CLASSES[int(label)] and got["label"] == int(label)
        for suffix in ("_vis_boxes.png", "_ir_boxes.png"):
            drawn = Image.open(tmp_path / f"{name}{suffix}")
            assert drawn.size == (ir8.shape[1], ir8.shape[0]) and drawn.mode == "RGB"


def test_det_score_threshold_and_max_dets_reach_the_detector(det_checkpoint, pairs, tmp_path,
                                                             capsys):
    """--score-threshold keeps exactly the boxes scoring at least it, --max-dets keeps the best
    N (the detector's boxes come in descending score order), both taken from the same run with
    neither limit; the JSON records the threshold used. A threshold no box reaches draws no box:
    _vis_boxes.png and _ir_boxes.png are then the visible and the thermal image unchanged (each
    image's own file, not the visible one twice)."""
    root, good = pairs
    vis, ir8 = good["grey8"]
    one = ["--vis", root / "vis" / "grey8.png", "--ir", root / "ir" / "grey8.png",
           "--device", "cpu"]

    def record(out, *flags):
        assert run(capsys, "--checkpoint", det_checkpoint, *one, "--out", out, *flags)[0] == 0
        return json.loads((out / "grey8_boxes.json").read_text())

    everything = record(tmp_path / "all", "--score-threshold", "0")["boxes"]
    with pytest.raises(SystemExit) as e:          # kept files of another threshold would mix
        run(capsys, "--checkpoint", det_checkpoint, *one, "--out", tmp_path / "all")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "score_threshold 0.0 (now 0.3)" in err, err
    scores = [b["score"] for b in everything]
    assert len(everything) >= 4 and scores == sorted(scores, reverse=True)
    # a threshold halfway between two distinct (4-decimal) scores: no rounding ambiguity
    i = next(i for i in range(len(scores) // 2, len(scores) - 1)
             if scores[i] - scores[i + 1] > 2e-4)
    threshold = (scores[i] + scores[i + 1]) / 2
    kept = record(tmp_path / "thr", "--score-threshold", str(threshold))
    assert kept["score_threshold"] == threshold
    assert kept["boxes"] == everything[:i + 1]
    assert record(tmp_path / "max", "--score-threshold", "0", "--max-dets", "3")["boxes"] == \
        everything[:3]
    out = tmp_path / "none"
    assert record(out, "--score-threshold", "1.5")["boxes"] == []
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grey8_vis_boxes.png")), vis)
    np.testing.assert_array_equal(np.asarray(Image.open(out / "grey8_ir_boxes.png")),
                                  np.repeat(ir8[..., None], 3, axis=2))


def test_out_records_its_checkpoint_and_refuses_another_ones(seg_checkpoint, sod_checkpoint,
                                                              pairs, tmp_path, capsys):
    """--out/predict_run.json names the checkpoint by content: the same file moved continues the
    folder; another checkpoint, other settings, unrecorded outputs or an unfinished replacement
    would mix two models' outputs and are refused (exit 2, nothing written), also with
    --overwrite while outputs there would not be rewritten."""
    root, good = pairs
    out = tmp_path / "out"
    inputs = ["--vis", root / "vis", "--ir", root / "ir", "--out", out, "--device", "cpu"]

    def refused(*argv, says):
        before = {p.name: p.read_bytes() for p in out.iterdir()}
        with pytest.raises(SystemExit) as e:
            run(capsys, *argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before     # nothing written
        return err

    def recorded():
        return json.loads((out / "predict_run.json").read_text())

    def sha(path):
        return hashlib.sha256(path.read_bytes()).hexdigest()

    assert run(capsys, "--checkpoint", seg_checkpoint, *inputs)[0] == len(BAD)
    assert recorded()["checkpoint_sha256"] == sha(seg_checkpoint)
    assert (recorded()["task"], recorded()["amp"], recorded()["complete"]) == ("seg", False, True)
    moved = tmp_path / "moved.pt"
    shutil.copyfile(seg_checkpoint, moved)
    status, text = run(capsys, "--checkpoint", moved, *inputs)
    assert status == len(BAD) and f"{len(good)} already written" in text
    err = refused("--checkpoint", sod_checkpoint, *inputs, says="another checkpoint")
    assert str(moved) in err and "--overwrite" in err
    refused("--checkpoint", moved, "--amp", *inputs, says="amp False (now True)")
    # --overwrite, but the segmentation outputs would stay beside the saliency maps
    refused("--checkpoint", sod_checkpoint, *inputs, "--overwrite", says="not this run's")
    one = ["--vis", root / "vis" / "grey8.png", "--ir", root / "ir" / "grey8.png"]
    refused("--checkpoint", moved, "--amp", "--overwrite", *one, *inputs[4:],
            says="not this run's")
    assert run(capsys, "--checkpoint", moved, "--amp", "--overwrite", *inputs)[0] == len(BAD)
    assert (recorded()["amp"], recorded()["complete"]) == (True, True)
    # outputs without a record (an older predict.py), an unfinished replacement, a bad record
    (out / "predict_run.json").unlink()
    refused("--checkpoint", moved, "--amp", *inputs, says="no record of their checkpoint")
    assert run(capsys, "--checkpoint", moved, "--amp", "--overwrite", *inputs)[0] == len(BAD)
    assert recorded()["complete"] is True
    (out / "predict_run.json").write_text(json.dumps({**recorded(), "complete": False}))
    refused("--checkpoint", moved, "--amp", *inputs, says="(it was interrupted)")
    (out / "predict_run.json").write_text("[]")
    refused("--checkpoint", moved, "--amp", *inputs, says="not a record of predict.py")


def test_sod_folder_of_unstretched_maps_is_refused(sod_checkpoint, pairs, tmp_path, capsys):
    """Saliency maps written before they were min-max stretched (a record without
    `saliency_png`) would mix two kinds of map in one folder: refused, naming the setting."""
    root, _ = pairs
    out = tmp_path / "out"
    inputs = ["--checkpoint", sod_checkpoint, "--vis", root / "vis", "--ir", root / "ir",
              "--out", out, "--device", "cpu"]
    assert run(capsys, *inputs)[0] == len(BAD)
    record = json.loads((out / "predict_run.json").read_text())
    assert record["saliency_png"] == "min-max stretched"
    del record["saliency_png"]
    (out / "predict_run.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit) as e:
        run(capsys, *inputs)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "saliency_png None (now 'min-max stretched')" in err, err


def test_overwrite_names_the_outputs_a_failed_pair_left(seg_checkpoint, sod_checkpoint, pairs,
                                                        tmp_path, capsys):
    """--overwrite with another setting where one pair cannot be read: that pair's earlier
    outputs stay, the run says so and the record lists them; a later run is refused naming them
    until they are gone. A folder whose run wrote nothing is not bound to its checkpoint."""
    root, good = pairs
    mix = tmp_path / "mix"
    for sub in ("vis", "ir"):
        (mix / sub).mkdir(parents=True)
        for name, source in (("a", "grey8"), ("b", "deep16")):
            shutil.copyfile(root / sub / f"{source}.png", mix / sub / f"{name}.png")
    out = tmp_path / "out"
    inputs = ["--vis", mix / "vis", "--ir", mix / "ir", "--out", out, "--device", "cpu"]
    assert run(capsys, "--checkpoint", seg_checkpoint, *inputs)[0] == 0
    (mix / "ir" / "b.png").write_bytes(b"not a png")
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--amp", "--overwrite", *inputs)
    assert status == 1 and "2 outputs of the earlier model remain" in text
    record = json.loads((out / "predict_run.json").read_text())
    assert record["complete"] is False
    assert record["not_replaced"] == ["b_classes.png", "b_overlay.png"]
    with pytest.raises(SystemExit) as e:
        run(capsys, "--checkpoint", seg_checkpoint, "--amp", *inputs)
    assert e.value.code == 2 and "b_classes.png" in capsys.readouterr().err
    for name in record["not_replaced"]:
        (out / name).unlink()
    assert run(capsys, "--checkpoint", seg_checkpoint, "--amp", *inputs)[0] == 1   # b fails
    # every pair fails: nothing written, so the folder takes another checkpoint's outputs
    empty = tmp_path / "empty"
    assert run(capsys, "--checkpoint", seg_checkpoint, "--vis", mix / "vis" / "b.png", "--ir",
               mix / "ir" / "b.png", "--out", empty, "--device", "cpu")[0] == 1
    assert run(capsys, "--checkpoint", sod_checkpoint, "--vis", mix / "vis" / "a.png", "--ir",
               mix / "ir" / "a.png", "--out", empty, "--device", "cpu")[0] == 0


def test_ctrl_c_stops_with_a_message_and_the_same_command_writes_the_rest(
        seg_checkpoint, pairs, tmp_path, monkeypatch, capsys):
    root, good = pairs
    real_run, calls = predict.SegPredictor.run, []

    def interrupted_second(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_run(self, *args)

    monkeypatch.setattr(predict.SegPredictor, "run", interrupted_second)
    argv = ["--checkpoint", seg_checkpoint, "--vis", root / "vis", "--ir", root / "ir",
            "--out", tmp_path / "out", "--device", "cpu"]
    with pytest.raises(SystemExit) as e:
        run(capsys, *argv)
    err = capsys.readouterr().err
    assert e.value.code == 130 and "Traceback" not in err
    assert "interrupted: 1 pairs written" in err and "the same command writes the rest" in err
    status, text = run(capsys, *argv)
    assert status == len(BAD) and "1 already written" in text
    assert f"{len(good) - 1} pairs written" in text


def test_kernels_flag_selects_the_backend(seg_checkpoint, pairs, tmp_path, capsys, script_env):
    """--kernels, as evaluate.py's: `torch` runs the PyTorch references."""
    root, _ = pairs
    one = ["--vis", root / "vis" / "grey8.png", "--ir", root / "ir" / "grey8.png"]
    assert run(capsys, "--checkpoint", seg_checkpoint, *one, "--out", tmp_path,
               "--device", "cpu", "--kernels", "torch")[0] == 0
    assert os.environ["IVT_KERNELS"] == "torch"
    assert (tmp_path / "grey8_classes.png").is_file()


def test_pretrained_for_a_checkpoint_of_the_whole_backbone_is_said_unused(seg_checkpoint):
    """A checkpoint trained from no pretrained file holds its whole backbone: --pretrained is
    not used (evaluate.py and predict.py said nothing, even for a missing file)."""
    assert not load_checkpoint(str(seg_checkpoint))["delta"]
    with pytest.warns(UserWarning, match=r"--pretrained /does/not/exist.pth is not used: "
                                         r"checkpoint .* holds the whole trained backbone"):
        load_trained(str(seg_checkpoint), "/does/not/exist.pth")


def test_a_trained_checkpoint_given_as_pretrained_weights_is_named(seg_checkpoint):
    """A run's best.pt given to --pretrained: said for what it is, not as 487 unexpected keys."""
    from ivt.models import CheckpointError, build_backbone
    with pytest.raises(CheckpointError, match=r"is a checkpoint of a training run here, not a "
                                              r"visible model's pretrained weights"):
        build_backbone("swin_nano", pretrained=str(seg_checkpoint))


def test_detection_flags_for_another_task_are_said_ignored(seg_checkpoint, pairs, tmp_path,
                                                             capsys):
    root, _ = pairs
    status, text = run(capsys, "--checkpoint", seg_checkpoint, "--vis", root / "vis" / "grey8.png",
                       "--ir", root / "ir" / "grey8.png", "--out", tmp_path, "--device", "cpu",
                       "--max-dets", "3")
    assert status == 0
    assert "warning: --max-dets applies to detection checkpoints; ignored for this seg one" in text
    assert "--score-threshold" not in text


def test_missing_inputs_are_named_by_their_flag(seg_checkpoint, pairs, tmp_path, capsys):
    root, _ = pairs
    for argv, says in [(["--vis", tmp_path / "nodir", "--ir", root / "ir"],
                        f"--vis {tmp_path / 'nodir'}: not found"),
                       (["--pairs", tmp_path / "no.txt"],
                        f"--pairs {tmp_path / 'no.txt'}: not found"),
                       (["--pairs", root], f"--pairs {root} is a folder")]:
        with pytest.raises(SystemExit) as e:
            run(capsys, "--checkpoint", seg_checkpoint, *argv, "--out", tmp_path / "out")
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err, err

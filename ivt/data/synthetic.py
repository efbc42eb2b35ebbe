"""Synthetic infrared-visible street scenes, written to disk in the real datasets' layouts.

The real datasets cannot be downloaded here, so tests and the demo train on scenes built to make
the paper's point measurable: the infrared image carries information the visible image lacks.

* Background: sky gradient, grey buildings on the horizon, a textured road with lane dashes;
  each material has a cool thermal signature with a mild gradient and noise.
* Objects (car, person, bike, color_cone for segmentation; plus bus, truck, lamp for detection)
  have distinct shapes and colours and are warm: `thermal_signature_table()` lists the values.
* Day: the visible image shows objects clearly, so day scenes are solvable from visible alone.
* Night: the visible image is scaled by 0.05-0.12, desaturated and buried in noise, so objects
  are nearly invisible; the thermal image still shows them.
* Cold decoys: shapes drawn like an object in the visible image but at background temperature
  and labelled 0 (lit posters, reflections). Night scenes have 1-2, brightly lit; day scenes
  have one with probability 0.2. A visible-only model is fooled; the infrared disambiguates.

Everything is numpy and deterministic given the seed (one generator per image, seeded with
[seed, image index]). Writers: `write_mfnet`, `write_vt` / `write_vt_set` (SOD) and
`write_m3fd` (detection).
"""
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# Mean thermal intensity (uint8) of each material; scene noise std is THERMAL_NOISE.
THERMAL_SIGNATURE = {
    "sky": 35, "building": 85, "road": 70, "lane_marking": 62,
    "person": 228, "car": 178, "bike": 150, "color_cone": 122,
    "bus": 172, "truck": 184, "lamp": 245,
}
THERMAL_NOISE = 4.0
NIGHT_BACKGROUND_SHIFT = -12   # the background cools at night; objects keep their heat

# Visible body colour of each object kind (day light).
VISIBLE_COLOUR = {
    "person": (50, 150, 70), "car": (200, 35, 45), "bike": (40, 70, 210),
    "color_cone": (245, 130, 20), "bus": (230, 190, 30), "truck": (30, 90, 160),
    "lamp": (255, 240, 180),
}
# MFNet class ids of the kinds a segmentation scene uses (docs/data.md; others are background).
SEG_LABEL = {"car": 1, "person": 2, "bike": 3, "color_cone": 7}
# M3FD class names of the kinds a detection scene uses.
M3FD_NAME = {"person": "People", "car": "Car", "bus": "Bus", "bike": "Motorcycle",
             "lamp": "Lamp", "truck": "Truck"}
# Object height at the bottom of the image, as a fraction of the image height.
HEIGHT_AT_BOTTOM = {"person": 0.55, "car": 0.32, "bike": 0.36, "color_cone": 0.22,
                    "bus": 0.45, "truck": 0.42, "lamp": 0.9}
SEG_KINDS = ("car", "person", "bike", "color_cone")
SEG_KIND_PROB = (0.35, 0.35, 0.15, 0.15)
DET_KINDS = ("person", "car", "bus", "bike", "lamp", "truck")

Part = Tuple[np.ndarray, Tuple[int, int, int], float]   # (mask (H, W) bool, RGB, thermal)


def thermal_signature_table() -> List[Dict[str, object]]:
    """Rows {material, mfnet_label, thermal} documenting what each material looks like in IR."""
    return [{"material": m, "mfnet_label": SEG_LABEL.get(m, 0), "thermal": t}
            for m, t in THERMAL_SIGNATURE.items()]


# ---------------------------------------------------------------- shapes on a pixel grid

def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / max(ry, 0.5)) ** 2 + ((xx - cx) / max(rx, 0.5)) ** 2 <= 1.0


def _rect(yy, xx, y0, y1, x0, x1):
    return (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)


def _segment(yy, xx, y0, x0, y1, x1, radius):
    dy, dx = y1 - y0, x1 - x0
    t = np.clip(((yy - y0) * dy + (xx - x0) * dx) / max(dy * dy + dx * dx, 1e-6), 0.0, 1.0)
    return (yy - y0 - t * dy) ** 2 + (xx - x0 - t * dx) ** 2 <= radius * radius


def _ring(yy, xx, cy, cx, radius, width):
    d2 = (yy - cy) ** 2 + (xx - cx) ** 2
    return (d2 <= radius ** 2) & (d2 >= max(radius - width, 0.0) ** 2)


def _object_parts(kind: str, yy, xx, foot: float, cx: float, h: float) -> List[Part]:
    """Shape of one object standing at (foot, cx) with height h; each part has colour and heat."""
    c, t = VISIBLE_COLOUR[kind], THERMAL_SIGNATURE[kind]
    dark, tyre, glass, skin = (30, 30, 35), (25, 25, 25), (60, 80, 105), (225, 185, 150)
    if kind == "person":   # body ellipse and a (hotter) head
        return [(_ellipse(yy, xx, foot - 0.4 * h, cx, 0.4 * h, 0.15 * h), c, t),
                (_ellipse(yy, xx, foot - 0.88 * h, cx, 0.11 * h, 0.09 * h), skin, t + 12)]
    if kind == "car":      # body, cabin with windows, two warm wheels
        w, r = 2.2 * h, 0.18 * h
        cabin = _rect(yy, xx, foot - h, foot - 0.6 * h, cx - 0.3 * w, cx + 0.22 * w)
        return [(_rect(yy, xx, foot - 0.62 * h, foot - 0.15 * h, cx - w / 2, cx + w / 2), c, t),
                (cabin, glass, t - 10),
                (_ellipse(yy, xx, foot - r, cx - 0.3 * w, r, r), tyre, t + 20),
                (_ellipse(yy, xx, foot - r, cx + 0.3 * w, r, r), tyre, t + 20)]
    if kind == "bike":     # two rings and a triangular frame
        r, dx = 0.3 * h, 0.5 * h
        width = max(1.0, 0.1 * h)
        seat = (foot - 0.8 * h, cx - 0.1 * h)
        return [(_ring(yy, xx, foot - r, cx - dx, r, width), c, t),
                (_ring(yy, xx, foot - r, cx + dx, r, width), c, t),
                (_segment(yy, xx, foot - r, cx - dx, *seat, width * 0.7), c, t),
                (_segment(yy, xx, foot - r, cx + dx, *seat, width * 0.7), c, t),
                (_segment(yy, xx, foot - r, cx - dx, foot - r, cx + dx, width * 0.7), c, t)]
    if kind == "color_cone":  # triangle with a white band
        inside = (yy >= foot - h) & (yy < foot) & (np.abs(xx - cx) <= 0.32 * (yy - foot + h))
        band = inside & (yy >= foot - 0.55 * h) & (yy < foot - 0.4 * h)
        return [(inside & ~band, c, t), (band, (240, 240, 240), t)]
    if kind == "bus":      # long box, window row, wheels
        w, r = 2.8 * h, 0.12 * h
        windows = _rect(yy, xx, foot - 0.85 * h, foot - 0.55 * h, cx - 0.45 * w, cx + 0.45 * w)
        return [(_rect(yy, xx, foot - h, foot - r, cx - w / 2, cx + w / 2), c, t),
                (windows, glass, t - 12),
                (_ellipse(yy, xx, foot - r, cx - 0.33 * w, r, r), tyre, t + 20),
                (_ellipse(yy, xx, foot - r, cx + 0.33 * w, r, r), tyre, t + 20)]
    if kind == "truck":    # hot cab in front of a cooler cargo box
        w, r = 2.4 * h, 0.14 * h
        cargo = _rect(yy, xx, foot - h, foot - 0.15 * h, cx - w / 2, cx + 0.2 * w)
        return [(cargo, (200, 200, 200), t - 50),
                (_rect(yy, xx, foot - 0.7 * h, foot - 0.15 * h, cx + 0.2 * w, cx + w / 2), c, t),
                (_ellipse(yy, xx, foot - r, cx - 0.3 * w, r, r), tyre, t + 15),
                (_ellipse(yy, xx, foot - r, cx + 0.35 * w, r, r), tyre, t + 15)]
    if kind == "lamp":     # ambient pole, hot lamp head
        pole = _rect(yy, xx, foot - 0.9 * h, foot, cx - max(0.5, 0.03 * h), cx + max(0.5, 0.03 * h))
        return [(pole, dark, THERMAL_SIGNATURE["building"]),
                (_ellipse(yy, xx, foot - 0.92 * h, cx, 0.06 * h, 0.12 * h), c, t)]
    raise ValueError(f"unknown object kind {kind!r}")


# ---------------------------------------------------------------- scenes

def _smooth_noise(rng: np.random.Generator, size: Tuple[int, int],
                  cells: Tuple[int, int]) -> np.ndarray:
    """Low-frequency noise (H, W), about unit std: a coarse random grid resized bilinearly."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR))


def _background(rng, yy, xx, night: bool):
    """Sky, buildings and road: visible (H, W, 3) float, thermal (H, W) float, horizon row."""
    h, w = yy.shape
    horizon = rng.uniform(0.35, 0.5) * h
    sky = yy < horizon
    up = np.clip(yy / horizon, 0.0, 1.0)[..., None]
    sky_colour = (1 - up) * np.array([100, 150, 220]) + up * np.array([185, 205, 230])
    vis = np.where(sky[..., None], sky_colour, 0.0)
    ir = np.where(sky, THERMAL_SIGNATURE["sky"] + 10 * up[..., 0], 0.0)

    for _ in range(rng.integers(2, 6)):   # buildings standing on the horizon
        x0 = rng.uniform(-0.1, 0.9) * w
        bw, bh = rng.uniform(0.08, 0.25) * w, rng.uniform(0.1, 0.3) * h
        m = _rect(yy, xx, horizon - bh, horizon, x0, x0 + bw)
        vis[m] = rng.uniform(90, 170) + rng.uniform(-10, 10, size=3)
        ir[m] = THERMAL_SIGNATURE["building"] + rng.uniform(-8, 8)

    road = yy >= horizon
    depth = np.clip((yy - horizon) / (h - horizon), 0.0, 1.0)
    grey = (105 + rng.uniform(-10, 10) + 6 * rng.standard_normal((h, w))
            + 8 * _smooth_noise(rng, (h, w), (4, 6)))
    vis[road] = np.repeat(grey[road][:, None], 3, axis=1)
    road_ir = THERMAL_SIGNATURE["road"] - 10 + 20 * depth + 5 * _smooth_noise(rng, (h, w), (3, 4))
    ir[road] = road_ir[road]

    lane_x = w / 2 + rng.uniform(-0.1, 0.1) * w + (yy - horizon) * rng.uniform(-0.3, 0.3)
    dashes = road & (np.abs(xx - lane_x) <= 0.5 + 2 * depth) & ((yy - horizon) % 8 < 4)
    vis[dashes] = 235
    ir[dashes] = THERMAL_SIGNATURE["lane_marking"]
    if night:
        ir += NIGHT_BACKGROUND_SHIFT
    return vis, ir, horizon


def _place_objects(rng: np.random.Generator, h: int, w: int, horizon: float, night: bool,
                   kinds: Sequence[str], kind_prob: Sequence[float], n_objects: Tuple[int, int],
                   depth_range: Tuple[float, float], decoys: bool) -> list:
    """Draw the objects and decoys: (foot row, kind, centre x, height, is_decoy, colour tint)
    each, sorted far (small foot row) first."""
    n_real = int(rng.integers(n_objects[0], n_objects[1] + 1))
    n_decoy = 0
    if decoys:
        n_decoy = int(rng.integers(1, 3)) if night else int(rng.random() < 0.2)
    placed = []
    for k in range(n_real + n_decoy):
        kind = str(rng.choice(kinds, p=kind_prob))
        depth = rng.uniform(*depth_range)
        foot = horizon + depth * (h - horizon) + 1
        height = HEIGHT_AT_BOTTOM[kind] * h * depth
        placed.append((foot, kind, rng.uniform(0.05, 0.95) * w, height, k >= n_real,
                       rng.uniform(-15, 15, size=3)))
    return sorted(placed, key=lambda p: p[0])


def _paint_objects(placed: list, yy: np.ndarray, xx: np.ndarray, vis: np.ndarray,
                   ir: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Paint `placed` (far first) into vis (H, W, 3) and ir (H, W) in place; decoys keep the
    background's heat. Returns label, instances, decoy and the objects (see `render_scene`)."""
    h, w = yy.shape
    ir_background = ir.copy()
    label = np.zeros((h, w), np.uint8)
    instances = np.zeros((h, w), np.int32)
    decoy = np.zeros((h, w), bool)
    objects = []
    for foot, kind, cx, height, is_decoy, tint in placed:
        whole = np.zeros((h, w), bool)
        for mask, colour, heat in _object_parts(kind, yy, xx, foot, cx, height):
            vis[mask] = np.clip(np.array(colour) + tint, 0, 255)
            ir[mask] = ir_background[mask] if is_decoy else heat   # decoys are cold
            whole |= mask
        decoy[whole] = is_decoy
        label[whole] = 0 if is_decoy else SEG_LABEL.get(kind, 0)
        instances[whole] = 0 if is_decoy else len(objects) + 1
        if not is_decoy:
            objects.append({"kind": kind})

    for k, obj in enumerate(objects):    # boxes of the pixels left visible after occlusion
        ys, xs = np.nonzero(instances == k + 1)
        obj["pixels"] = int(ys.size)
        obj["bbox"] = ((int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
                       if ys.size else None)
    return label, instances, decoy, objects


def _camera(rng: np.random.Generator, vis: np.ndarray, ir: np.ndarray, decoy: np.ndarray,
            night: bool) -> Tuple[np.ndarray, np.ndarray]:
    """The two sensors: exposure and noise of the visible image, the thermal image's blur and
    noise. Returns vis (H, W, 3) and ir (H, W) as uint8."""
    h, w = ir.shape
    if night:   # dark, desaturated, noisy; decoys are lit (posters under a street light)
        grey = vis @ np.array([0.299, 0.587, 0.114])
        dim = 0.3 * vis + 0.7 * grey[..., None]
        gain = np.where(decoy, rng.uniform(0.6, 0.9), rng.uniform(0.05, 0.12))[..., None]
        vis = np.where(decoy[..., None], vis, dim) * gain + rng.normal(0, 10, size=vis.shape)
    else:
        vis = vis * rng.uniform(0.85, 1.15) + rng.normal(0, 3, size=vis.shape)
    ir_blur = ir.copy()   # thermal optics are soft: 3x3 box blur
    ir_blur[1:-1, 1:-1] = sum(ir[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
                              for dy in (-1, 0, 1) for dx in (-1, 0, 1)) / 9.0
    ir = ir_blur + rng.normal(0, THERMAL_NOISE, size=ir.shape)
    return (np.clip(vis, 0, 255).round().astype(np.uint8),
            np.clip(ir, 0, 255).round().astype(np.uint8))


def render_scene(rng: np.random.Generator, size: Tuple[int, int] = (96, 128),
                 night: bool = False, kinds: Sequence[str] = SEG_KINDS,
                 kind_prob: Sequence[float] = SEG_KIND_PROB, n_objects: Tuple[int, int] = (2, 6),
                 depth_range: Tuple[float, float] = (0.3, 1.0), decoys: bool = True) -> dict:
    """One scene. Returns

        vis (H, W, 3) uint8, ir (H, W) uint8, label (H, W) uint8 (MFNet ids, decoys 0),
        instances (H, W) int32 (k + 1 where object k is in front, decoys 0), decoy (H, W) bool,
        objects: list of dicts {kind, bbox (x0, y0, x1, y1) 0-based inclusive, pixels}.
    """
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vis, ir, horizon = _background(rng, yy, xx, night)
    placed = _place_objects(rng, h, w, horizon, night, kinds, kind_prob, n_objects, depth_range,
                            decoys)
    label, instances, decoy, objects = _paint_objects(placed, yy, xx, vis, ir)
    vis, ir = _camera(rng, vis, ir, decoy, night)
    return {"vis": vis, "ir": ir, "label": label, "instances": instances, "decoy": decoy,
            "objects": objects}


# ---------------------------------------------------------------- writers

def _night_flags(rng: np.random.Generator, n: int, night_fraction: float) -> np.ndarray:
    flags = np.zeros(n, bool)
    flags[:int(round(n * night_fraction))] = True
    return rng.permutation(flags)


def _write_list(path: Path, names: Sequence[str]) -> None:
    path.write_text("".join(f"{n}\n" for n in names))


def write_mfnet(root: Union[str, Path], n_train: int, n_val: int, n_test: int,
                size: Tuple[int, int] = (96, 128), seed: int = 0,
                night_fraction: float = 0.5) -> Dict[str, List[str]]:
    """MFNet layout: images/<name>.png (RGBA = RGB + thermal), labels/<name>.png, split lists
    train/val/test/test_day/test_night. Names 00001D, 00002N, ... Returns the split lists."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {}
    index = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = []
        for night in _night_flags(rng, n, night_fraction):
            index += 1
            name = f"{index:05d}{'N' if night else 'D'}"
            scene = render_scene(np.random.default_rng([seed, index]), size, bool(night))
            rgbt = np.dstack([scene["vis"], scene["ir"]])   # (H, W, 4): R, G, B, thermal
            Image.fromarray(rgbt).save(root / "images" / f"{name}.png")
            Image.fromarray(scene["label"]).save(root / "labels" / f"{name}.png")
            splits[split].append(name)
    splits["test_day"] = [n for n in splits["test"] if n.endswith("D")]
    splits["test_night"] = [n for n in splits["test"] if n.endswith("N")]
    for split, names in splits.items():
        _write_list(root / f"{split}.txt", names)
    return splits


def _ironbow(ir: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8 colour-mapped thermal; every channel rises with heat, so
    the grey conversion the SOD code applies stays monotonic."""
    x = ir.astype(np.float32) / 255.0
    rgb = np.stack([np.clip(2.0 * x, 0, 1), np.clip(2.0 * x - 0.7, 0, 1),
                    np.clip(0.5 * x + np.clip(3.0 * x - 2.0, 0, 1) * 0.5, 0, 1)], axis=-1)
    return (rgb * 255).round().astype(np.uint8)


def write_vt_set(folder: Union[str, Path], n: int, size: Tuple[int, int] = (96, 128),
                 seed: int = 0, night_fraction: float = 0.3,
                 first_index: int = 1) -> Dict[str, List[str]]:
    """One SOD set in the VT layout: <folder>/{RGB,T,GT}/<stem>, stems `first_index`,
    `first_index` + 1, ... as 5 digits. RGB and T (colour-mapped) as .jpg, GT as .png 0/255 masks
    of the warm objects (the salient ones). `night_fraction` of the scenes are night scenes
    (0: a day-only set, 1: a night-only set), the draw seeded with [seed, first_index]; scene k
    is rendered from [seed, k], so sets with disjoint index ranges hold different scenes.
    Returns {'day': stems, 'night': stems}."""
    folder = Path(folder)
    for sub in ("RGB", "T", "GT"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    stems: Dict[str, List[str]] = {"day": [], "night": []}
    flags = _night_flags(np.random.default_rng([seed, first_index]), n, night_fraction)
    for index, night in enumerate(flags, start=first_index):
        stem = f"{index:05d}"
        scene = render_scene(np.random.default_rng([seed, index]), size, bool(night),
                             kinds=DET_KINDS, kind_prob=[1 / len(DET_KINDS)] * len(DET_KINDS),
                             n_objects=(1, 2), depth_range=(0.7, 1.0))
        Image.fromarray(scene["vis"]).save(folder / "RGB" / f"{stem}.jpg", quality=95)
        Image.fromarray(_ironbow(scene["ir"])).save(folder / "T" / f"{stem}.jpg", quality=95)
        gt = np.where(scene["instances"] > 0, 255, 0).astype(np.uint8)
        Image.fromarray(gt).save(folder / "GT" / f"{stem}.png")
        stems["night" if night else "day"].append(stem)
    return stems


def write_vt(root: Union[str, Path], n_train: int = 16, n_test: int = 8, n_vt1000: int = 4,
             n_vt821: int = 4, size: Tuple[int, int] = (96, 128), seed: int = 0,
             night_fraction: float = 0.3) -> Dict[str, List[str]]:
    """SOD layout: VT5000/{Train,Test}/{RGB,T,GT}, VT1000/{RGB,T,GT}, VT821/{RGB,T,GT}, each
    written by `write_vt_set` (stems numbered on across the sets). Returns {folder: stems}."""
    root = Path(root)
    folders = {}
    index = 1
    for folder, n in (("VT5000/Train", n_train), ("VT5000/Test", n_test), ("VT1000", n_vt1000),
                      ("VT821", n_vt821)):
        stems = write_vt_set(root / folder, n, size, seed, night_fraction, first_index=index)
        folders[folder] = sorted(stems["day"] + stems["night"])
        index += n
    return folders


def _voc_xml(stem: str, size: Tuple[int, int], objects: List[dict]) -> ET.ElementTree:
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = "M3FD_Detection"
    ET.SubElement(ann, "filename").text = f"{stem}.png"
    sz = ET.SubElement(ann, "size")
    ET.SubElement(sz, "width").text = str(size[1])
    ET.SubElement(sz, "height").text = str(size[0])
    ET.SubElement(sz, "depth").text = "3"
    for obj in objects:
        o = ET.SubElement(ann, "object")
        ET.SubElement(o, "name").text = M3FD_NAME[obj["kind"]]
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = "0"
        box = ET.SubElement(o, "bndbox")
        x0, y0, x1, y1 = obj["bbox"]
        # VOC corners are 1-based and inclusive (docs/data.md: xmin = x + 1, xmax = x + w).
        for tag, v in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1 + 1), ("ymax", y1 + 1)):
            ET.SubElement(box, tag).text = str(v)
    tree = ET.ElementTree(ann)
    ET.indent(tree, space="\t")
    return tree


def write_m3fd(root: Union[str, Path], n: int, size: Tuple[int, int] = (96, 128), seed: int = 0,
               night_fraction: float = 0.3, min_pixels: int = 10) -> Dict[str, List[str]]:
    """M3FD layout: Vis/<05d>.png, Ir/<05d>.png (3 equal channels), Annotation/<05d>.xml (VOC),
    train/val/test.txt (60/20/20 %) and test_day/test_night.txt (the test ids by scene type;
    `night_fraction` 0 or 1 writes day-only or night-only data). Objects with fewer than
    `min_pixels` visible pixels after occlusion are not annotated. Returns the split lists."""
    root = Path(root)
    for sub in ("Vis", "Ir", "Annotation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = []
    night_flags = _night_flags(rng, n, night_fraction)
    for index, night in enumerate(night_flags):
        stem = f"{index:05d}"
        scene = render_scene(np.random.default_rng([seed, index]), size, bool(night),
                             kinds=DET_KINDS, kind_prob=[1 / len(DET_KINDS)] * len(DET_KINDS))
        Image.fromarray(scene["vis"]).save(root / "Vis" / f"{stem}.png")
        ir3 = np.repeat(scene["ir"][..., None], 3, axis=2)   # M3FD stores IR as 3 equal channels
        Image.fromarray(ir3).save(root / "Ir" / f"{stem}.png")
        boxes = [o for o in scene["objects"] if o["pixels"] >= min_pixels]
        _voc_xml(stem, size, boxes).write(root / "Annotation" / f"{stem}.xml", encoding="unicode")
        stems.append(stem)
    order = rng.permutation(n)
    n_train, n_val = int(round(0.6 * n)), int(round(0.2 * n))
    splits = {"train": sorted(stems[i] for i in order[:n_train]),
              "val": sorted(stems[i] for i in order[n_train:n_train + n_val]),
              "test": sorted(stems[i] for i in order[n_train + n_val:])}
    is_night = dict(zip(stems, night_flags))
    splits["test_day"] = [t for t in splits["test"] if not is_night[t]]
    splits["test_night"] = [t for t in splits["test"] if is_night[t]]
    for split, names in splits.items():
        _write_list(root / f"{split}.txt", names)
    return splits

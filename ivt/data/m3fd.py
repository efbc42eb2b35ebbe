"""M3FD: infrared-visible object detection (Liu et al., CVPR 2022; docs/data.md, "M3FD").

Released layout (4200 registered pairs, ids 00000..04199):

    <root>/Vis/<id>.png   <root>/Ir/<id>.png (3 equal channels)   <root>/Annotation/<id>.xml (VOC)

plus split lists `<split_dir>/{train,val,test}.txt` of ids. M3FD has no official split; the default
`split_dir` is the repository's copy of a public scene-aware split (`ivt/data/splits/m3fd`, see its
README). The COCO-JSON form some users have (`<root>/annotations/*.json` with
`<root>/{train,test}/{vi,ir}/`) is read by `M3FDDataset.from_coco`.

Box convention. VOC `<bndbox>` holds 1-based, inclusive pixel corners: a box covering pixel columns
xmin..xmax (counted from 1) is, in 0-based continuous coordinates (pixel j covers [j, j + 1)),

    x0 = xmin - 1,  y0 = ymin - 1,  x1 = xmax,  y1 = ymax

so a box touching the right border has x1 = W, and its width is xmax - xmin + 1. COCO's
`[x, y, w, h]` is already continuous: (x, y, x + w, y + h). Boxes everywhere in this package are
these continuous xyxy coordinates, in pixels.

Classes are mapped by name (case-insensitive), never by position: code bases order them differently.
Each image's size is read from the file (274 M3FD images are not 1024 x 768); the annotation's own
size is checked against it. A box that reaches past the image's border is clipped to it and kept,
as DINO's data loading does (DETR's `ConvertCocoPolysToMask`: coordinates clamped to [0, W] and
[0, H]); the clip is reported. Boxes that are degenerate (x1 <= x0 or y1 <= y0), have no area inside
the image, or name an unknown class are invalid. Both are reported with file and object index
(counted from 0 in file order), collected in `dataset.warnings` and printed once; invalid boxes are
then skipped (`bad_boxes='skip'`) or refused (`bad_boxes='error'`: ValueError listing them all).
VOC `difficult` (COCO `iscrowd`) boxes are kept with `ignore=True`: the metric neither rewards nor
penalises them.
"""
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .box_transforms import DetEvalTransform, DetTrainTransform, clip_boxes
from .io import image_size, open_thermal, open_visible, verify_images
from .transforms import IMAGENET, Normalization

M3FD_CLASSES = ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")
CLASS_INDEX = {c.lower(): i for i, c in enumerate(M3FD_CLASSES)}
DEFAULT_SPLIT_DIR = Path(__file__).parent / "splits" / "m3fd"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
BAD_BOXES = ("skip", "error")
PRINTED_WARNINGS = 20
TARGET_KEYS = ("boxes", "labels", "ignore", "image_id", "orig_size", "name")

PathLike = Union[str, Path]


@dataclass
class Record:
    """One image pair and its valid boxes (continuous xyxy in original pixels)."""
    name: str
    image_id: int
    vis: Path
    ir: Path
    size: Tuple[int, int]          # (H, W)
    boxes: np.ndarray              # (n, 4) float32
    labels: np.ndarray             # (n,) int64, index into M3FD_CLASSES
    ignore: np.ndarray             # (n,) bool


@dataclass
class RawObject:
    """An annotated object before validation; `box` is continuous xyxy or None if unreadable."""
    name: str
    box: Optional[Tuple[float, float, float, float]]
    ignore: bool


def voc_to_xyxy(xmin: float, ymin: float, xmax: float, ymax: float
                ) -> Tuple[float, float, float, float]:
    """VOC 1-based inclusive corners -> 0-based continuous xyxy (module docstring)."""
    return xmin - 1.0, ymin - 1.0, xmax, ymax


def box_problems(obj: RawObject, size: Tuple[int, int]) -> List[str]:
    """Why `obj` cannot be used in an image of `size` = (H, W); empty if it is fine."""
    reasons = []
    if obj.name.strip().lower() not in CLASS_INDEX:
        reasons.append(f"unknown class {obj.name!r} (expected one of {', '.join(M3FD_CLASSES)})")
    if obj.box is None:
        return reasons + ["box missing or not numeric"]
    x0, y0, x1, y1 = obj.box
    if not (x1 > x0 and y1 > y0):
        return reasons + ["degenerate box (x1 <= x0 or y1 <= y0)"]
    cx0, cy0, cx1, cy1 = clip_to_image(obj.box, size)
    if not (cx1 > cx0 and cy1 > cy0):
        reasons.append(f"box outside the {size[1]}x{size[0]} image (no area inside it)")
    return reasons


def clip_to_image(box: Tuple[float, float, float, float], size: Tuple[int, int]
                  ) -> Tuple[float, float, float, float]:
    """xyxy `box` clipped to an image of `size` = (H, W) (`clip_boxes`), as a tuple."""
    return tuple(clip_boxes(np.asarray([box], np.float64), size)[0].tolist())


def parse_voc(path: Path) -> Tuple[Optional[Tuple[int, int]], List[RawObject]]:
    """(size (H, W) from `<size>` or None, objects in file order) of a VOC XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: not a readable VOC XML file: {e}") from None
    size = None
    w, h = root.findtext("size/width"), root.findtext("size/height")
    if w is not None and h is not None:
        try:
            size = (int(float(h)), int(float(w)))
        except ValueError:
            raise ValueError(f"{path}: <size> is not numeric ({w!r}, {h!r})") from None
    objects = []
    for obj in root.iter("object"):
        corners = _numbers([obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")])
        box = voc_to_xyxy(*corners) if corners else None
        difficult = (obj.findtext("difficult") or "0").strip() not in ("0", "")
        objects.append(RawObject((obj.findtext("name") or "").strip(), box, difficult))
    return size, objects


def _numbers(values) -> Optional[List[float]]:
    """The values as finite floats, or None if any is missing or not a number."""
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def read_split(split_dir: Path, split: str) -> List[str]:
    """Ids of `split` (a list name, or names joined by '+') from `<split_dir>/<name>.txt`."""
    if not re.fullmatch(r"[\w.-]+(\+[\w.-]+)*", split):
        raise ValueError(f"split {split!r}: expected a list name such as train, val, test, or "
                         f"names joined by '+'")
    ids: List[str] = []
    for part in split.split("+"):
        path = split_dir / f"{part}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"split list {path} not found")
        part_ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not part_ids:
            raise ValueError(f"split list {path} is empty")
        ids += part_ids
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ValueError(f"split {split!r} in {split_dir} lists ids more than once: "
                         f"{', '.join(duplicates[:20])}")
    return ids


def _listing(items: List[str], limit: int = 50) -> str:
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _check_policy(bad_boxes: str) -> None:
    if bad_boxes not in BAD_BOXES:
        raise ValueError(f"bad_boxes={bad_boxes!r}: expected one of {BAD_BOXES}")


def _find_image(folder: Path, stem: str) -> Optional[Path]:
    for suffix in IMAGE_SUFFIXES:
        p = folder / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _image_ids(names: Sequence[str]) -> List[int]:
    """Numeric names are their own ids (M3FD's 00471 -> 471); otherwise the position."""
    if all(n.isdigit() for n in names):
        return [int(n) for n in names]
    return list(range(len(names)))


def _find_coco_file(root: Path, split: str) -> Path:
    """The one `<root>/annotations/*.json` whose name contains `split`."""
    found = sorted(p for p in (root / "annotations").glob("*.json") if split in p.stem)
    if len(found) != 1:
        raise FileNotFoundError(f"{root / 'annotations'}: expected one *.json whose name "
                                f"contains {split!r}, found "
                                f"{[p.name for p in found] or 'none'}; pass ann_file")
    return found[0]


def _read_coco(ann_file: Path) -> Tuple[Dict[int, str], List[dict], Dict[int, List[dict]]]:
    """A COCO detection file: ({category id: name}, images, {image id: its annotations})."""
    try:
        coco = json.loads(ann_file.read_text())
        categories = {c["id"]: c["name"] for c in coco["categories"]}
        images = coco["images"]
        annotations = coco["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{ann_file}: not a COCO detection file ({type(e).__name__}: {e})"
                         ) from None
    for k, im in enumerate(images):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise ValueError(f"{ann_file}: image entry {k} has no 'id' or no 'file_name'")
        try:
            int(im["id"])
        except (TypeError, ValueError):
            raise ValueError(f"{ann_file}: image id {im['id']!r} ({im['file_name']}) is not an "
                             f"integer") from None
    per_image: Dict[int, List[dict]] = {im["id"]: [] for im in images}
    for a in annotations:
        if a["image_id"] not in per_image:
            raise ValueError(f"{ann_file}: annotation {a.get('id')} refers to unknown image "
                             f"id {a['image_id']}")
        per_image[a["image_id"]].append(a)
    return categories, images, per_image


def _coco_objects(annotations: List[dict], categories: Dict[int, str]) -> List[RawObject]:
    """COCO annotations (bbox x, y, w, h) -> RawObject (xyxy, None when malformed; `iscrowd`
    boxes ignored); unknown category ids keep a name that says so."""
    objects = []
    for a in annotations:
        xywh = _numbers(a.get("bbox"))
        box = None
        if xywh and len(xywh) == 4:
            x, y, w, h = xywh
            box = (x, y, x + w, y + h)
        name = categories.get(a.get("category_id"), f"category id {a.get('category_id')}")
        objects.append(RawObject(name, box, bool(a.get("iscrowd", 0))))
    return objects


class M3FDDataset(Dataset):
    """M3FD image pairs with boxes.

    Args:
        root: the folder holding `Vis/`, `Ir/` and `Annotation/`.
        split: a list name in `split_dir` ('train', 'val', 'test', or your own), or names joined
            by '+' ('train+val': the paper's 3360 training images).
        split_dir: folder of the list files; default the repository's scene-aware split.
        train: augmented items (`DetTrainTransform`) instead of the plain S x S resize.
        size: S; the whole image is resized to S x S (the paper: 640).
        seed: base seed; augmentation draws from `np.random.default_rng([seed, epoch, index])`:
            call `set_epoch` every epoch (a resumed run replays the same augmentation).
        norm: the backbone's input normalisation (`ivt.models.normalization_for(name)`).
        bad_boxes: 'skip' (report, then drop) or 'error' (ValueError) for invalid boxes
            (degenerate, no area inside the image, unknown class); a box reaching past the
            border is clipped to the image and kept either way (module docstring).
        validate: read the header of every visible and infrared image: their sizes must agree
            (else ValueError); the XML's `<size>` is checked against them (a mismatch is reported
            and the file's size is used). Without it, sizes come from the XML.
        verify: decode every image at construction (`ivt.data.io.verify_images`).

    Items: {'vis', 'ir': (3, S, S) float, 'boxes': (n, 4) float32 xyxy in S x S pixels,
    'labels': (n,) int64, 'ignore': (n,) bool, 'image_id': int, 'orig_size': (H0, W0),
    'name': str}. Batch them with `M3FDDataset.collate_fn`.
    """

    classes = M3FD_CLASSES
    num_classes = len(M3FD_CLASSES)

    def __init__(self, root: PathLike, split: str = "train", split_dir: Optional[PathLike] = None,
                 train: bool = True, size: int = 640, seed: int = 0,
                 norm: Normalization = IMAGENET, bad_boxes: str = "skip", validate: bool = True,
                 verify: bool = False):
        _check_policy(bad_boxes)
        root = Path(root)
        split_dir = DEFAULT_SPLIT_DIR if split_dir is None else Path(split_dir)
        for sub in ("Vis", "Ir", "Annotation"):
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"M3FD folder {root / sub} not found (expected Vis/, Ir/ "
                                        f"and Annotation/ in {root})")
        names = read_split(split_dir, split)
        missing, items = [], []
        for name in names:
            vis, ir = _find_image(root / "Vis", name), _find_image(root / "Ir", name)
            xml = root / "Annotation" / f"{name}.xml"
            missing += [what for what, absent in ((f"Vis/{name}.*", vis is None),
                                                  (f"Ir/{name}.*", ir is None),
                                                  (f"Annotation/{name}.xml", not xml.is_file()))
                        if absent]
            items.append((name, vis, ir, xml))
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} file(s) of split {split!r} (lists in "
                                    f"{split_dir}) missing: {_listing(missing)}")
        records, size_notes, clip_notes, box_reports = [], [], [], []
        for (name, vis, ir, xml), image_id in zip(items, _image_ids(names)):
            xml_size, objects = parse_voc(xml)
            size_hw = self._image_size(vis, ir, xml_size, validate, f"{xml}: <size>", size_notes)
            records.append(self._record(name, image_id, vis, ir, size_hw, objects, str(xml),
                                        clip_notes, box_reports))
        self._setup(records, size_notes, clip_notes, box_reports, f"{root} ({split})", train,
                    size, seed, norm, bad_boxes, verify)

    @classmethod
    def from_coco(cls, root: PathLike, split: str = "train", ann_file: Optional[PathLike] = None,
                  train: bool = True, size: int = 640, seed: int = 0,
                  norm: Normalization = IMAGENET, bad_boxes: str = "skip", validate: bool = True,
                  verify: bool = False) -> "M3FDDataset":
        """M3FD in COCO-JSON form: images in `<root>/<split>/vi/` and `<root>/<split>/ir/`,
        annotations in `ann_file` (default: the one `<root>/annotations/*.json` whose name
        contains `split`). Categories are mapped by name; `iscrowd` boxes get `ignore=True`.
        Other arguments and the items are those of `M3FDDataset`."""
        _check_policy(bad_boxes)
        root = Path(root)
        ann_file = Path(ann_file) if ann_file is not None else _find_coco_file(root, split)
        categories, images, per_image = _read_coco(ann_file)
        vis_dir, ir_dir = root / split / "vi", root / split / "ir"
        missing = [str(d / Path(im["file_name"]).name) for im in images for d in (vis_dir, ir_dir)
                   if not (d / Path(im["file_name"]).name).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} image file(s) listed in {ann_file} "
                                    f"missing: {_listing(missing)}")
        records, size_notes, clip_notes, box_reports = [], [], [], []
        for im in images:
            file_name = Path(im["file_name"]).name
            vis, ir = vis_dir / file_name, ir_dir / file_name
            json_size = (int(im["height"]), int(im["width"])) if "height" in im else None
            size_hw = cls._image_size(vis, ir, json_size, validate,
                                      f"{ann_file}: image {im['id']} size", size_notes)
            where = f"{ann_file} image {im['id']} ({file_name})"
            records.append(cls._record(Path(file_name).stem, int(im["id"]), vis, ir, size_hw,
                                       _coco_objects(per_image[im["id"]], categories), where,
                                       clip_notes, box_reports))
        self = cls.__new__(cls)
        self._setup(records, size_notes, clip_notes, box_reports, f"{root} ({split}, COCO)",
                    train, size, seed, norm, bad_boxes, verify)
        return self

    # ------------------------------------------------------------ construction helpers

    @staticmethod
    def _image_size(vis: Path, ir: Path, claimed: Optional[Tuple[int, int]], validate: bool,
                    where: str, size_notes: List[str]) -> Tuple[int, int]:
        """(H, W) of a pair: from the image headers (visible and infrared must agree) when
        `validate` or when the annotation states no size, a disagreement with the annotation's
        `claimed` size noted in `size_notes`; otherwise the claimed size."""
        if not validate and claimed is not None:
            return claimed
        hw, hw_ir = image_size(vis), image_size(ir)
        if hw != hw_ir:
            raise ValueError(f"image sizes differ: {vis} (H, W) = {hw}, {ir} (H, W) = {hw_ir}")
        if claimed is not None and claimed != hw:
            size_notes.append(f"{where} says {claimed[1]}x{claimed[0]} but {vis} is "
                              f"{hw[1]}x{hw[0]}; using the file's size")
        return hw

    @staticmethod
    def _record(name: str, image_id: int, vis: Path, ir: Path, size: Tuple[int, int],
                objects: List[RawObject], where: str, clip_notes: List[str],
                box_reports: List[str]) -> Record:
        """Keep the valid objects, clipped to the image; report the clipped ones in
        `clip_notes` and the invalid ones in `box_reports`, as '<where>: object <k> ...'."""
        boxes, labels, ignore = [], [], []
        for k, obj in enumerate(objects):
            reasons = box_problems(obj, size)
            what = f"{where}: object {k} ({obj.name or 'no name'}, box {obj.box})"
            if reasons:
                box_reports.append(f"{what}: {'; '.join(reasons)}")
                continue
            box = clip_to_image(obj.box, size)
            if box != tuple(obj.box):
                clip_notes.append(f"{what}: clipped to the {size[1]}x{size[0]} image: {box}")
            boxes.append(box)
            labels.append(CLASS_INDEX[obj.name.strip().lower()])
            ignore.append(obj.ignore)
        return Record(name, image_id, vis, ir, size,
                      np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                      np.asarray(labels, dtype=np.int64), np.asarray(ignore, dtype=bool))

    def _setup(self, records: List[Record], size_notes: List[str], clip_notes: List[str],
               box_reports: List[str], source: str, train: bool, size: int, seed: int,
               norm: Normalization, bad_boxes: str, verify: bool) -> None:
        """Apply the `bad_boxes` policy, report once, build the transform."""
        if not records:
            raise ValueError(f"{source}: no images")
        if bad_boxes == "error" and box_reports:
            raise ValueError(f"{source}: {len(box_reports)} invalid box(es) (bad_boxes='error'):\n"
                             + "\n".join(box_reports))
        self.records = records
        self.warnings = size_notes + clip_notes + box_reports
        if self.warnings:
            shown = "\n  ".join(self.warnings[:PRINTED_WARNINGS])
            more = (f"\n  ... {len(self.warnings) - PRINTED_WARNINGS} more in dataset.warnings"
                    if len(self.warnings) > PRINTED_WARNINGS else "")
            print(f"M3FD {source}: {len(size_notes)} size mismatch(es), {len(clip_notes)} "
                  f"box(es) clipped to the image, {len(box_reports)} invalid box(es) skipped:"
                  f"\n  {shown}{more}", file=sys.stderr)
        ids = [r.image_id for r in records]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{source}: image ids are not unique")
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.transform = (DetTrainTransform(size, norm=norm) if train
                          else DetEvalTransform(size, norm))
        if verify:
            self.verify()

    def verify(self) -> int:
        """Decode every visible and infrared image (`BadImageError` names the first that
        fails); returns the number of files."""
        return verify_images([p for r in self.records for p in (r.vis, r.ir)],
                             desc="verify M3FD images")

    # ------------------------------------------------------------ access

    @property
    def names(self) -> List[str]:
        return [r.name for r in self.records]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def image_paths(self) -> List[Path]:
        """The visible image of every item, in order."""
        return [r.vis for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _open(self, index: int) -> Tuple[Image.Image, Image.Image]:
        """Visible 'RGB' and thermal 'L' (M3FD's 3 equal channels reduced) of one record."""
        r = self.records[index]
        vis, ir = open_visible(r.vis), open_thermal(r.ir)
        if (vis.height, vis.width) != r.size or (ir.height, ir.width) != r.size:
            raise ValueError(f"{r.vis} is {vis.width}x{vis.height} and {r.ir} "
                             f"{ir.width}x{ir.height}, but {r.size[1]}x{r.size[0]} was expected "
                             f"(construct the dataset with validate=True to read sizes from "
                             f"the files)")
        return vis, ir

    def read_images(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """Original-size uint8 arrays for visualisation: vis (H, W, 3), ir gray (H, W)."""
        vis, ir = self._open(index)
        return np.asarray(vis), np.asarray(ir)

    def gt(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ground truth in original pixels: boxes (n, 4) float32 xyxy, labels (n,) int64,
        ignore (n,) bool."""
        r = self.records[index]
        return r.boxes.copy(), r.labels.copy(), r.ignore.copy()

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        vis, ir = self._open(index)
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        item = self.transform(vis, ir, r.boxes, r.labels, r.ignore, rng)
        item.update(image_id=r.image_id, orig_size=r.size, name=r.name)
        return item

    @staticmethod
    def collate_fn(items: List[dict]) -> dict:
        """{'vis', 'ir': (B, 3, S, S), 'targets': [per-image dict of TARGET_KEYS]}."""
        return {"vis": torch.stack([it["vis"] for it in items]),
                "ir": torch.stack([it["ir"] for it in items]),
                "targets": [{k: it[k] for k in TARGET_KEYS} for it in items]}

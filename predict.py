"""Run a trained IV-tuning checkpoint on your own visible + thermal image pairs.

    python predict.py --checkpoint runs/seg/best.pt --vis my/vis --ir my/ir --out predictions
    python predict.py --checkpoint runs/seg/best.pt --pairs pairs.txt --out predictions
    python predict.py --checkpoint runs/seg/best.pt --rgbt data/mfnet/images --out predictions

The task (segmentation, salient object detection, detection) comes from the checkpoint. Per pair
<name> (the visible file's stem) it writes into --out:

    seg  <name>_classes.png    class ids (8-bit grey, one value per class), at the input's size
         <name>_overlay.png    class colours (MFNet palette) over the visible image, legend right
    sod  <name>_saliency.png   the saliency probability at the input's size, min-max stretched
                               per image onto 0..255 (8-bit grey): the map evaluate.py scores
                               (and --save-vis writes), as the SOD toolboxes read it
         <name>_overlay.png    the probability (not stretched) as a red tint over the visible
                               image
    det  <name>_boxes.json     {"boxes": [{"box": [x0, y0, x1, y1], "class", "label", "score"}]},
                               pixel corners in the input image
         <name>_vis_boxes.png, <name>_ir_boxes.png   the boxes drawn on both images

Inputs. Any size: segmentation runs at the native size (padded to a multiple of the patch size
for the ViTs and cropped back); SOD and detection models run at the square size they were trained at
(`size` in the run's configuration), and their outputs are mapped back to the input's size. The
two images of a pair must have the same size. Thermal images may be 8-bit grey, 3-channel
(colour-mapped or repeated grey, reduced to grey with PIL's 'L' weights, as in training) or
high bit depth (16-bit PNG/TIFF, 32-bit integer or float TIFF). THERMAL NORMALISATION RULE for
high-bit-depth images: per image, the 1st..99th percentile range of the values is mapped linearly
onto 0..255 and clipped (the min..max range when those percentiles are equal; 0 for a constant
image). A high-bit-depth grey visible image gets the same rule. Training and evaluate.py read
images by the same rules (ivt/data/io.py).

Failures. A pair whose images differ in size, an unreadable or missing file, a stem present in
only one of the two folders, or a second pair with the same output name is reported by name
(stderr, then again in the summary) and skipped; the others still run. Nothing already in --out
is overwritten unless --overwrite: a pair whose outputs all exist is skipped, a partly written
one gets only its missing files (each file is written to a temporary name, then renamed, so an
interrupted run leaves no half-written file). --out/predict_run.json records the checkpoint (its
SHA-256) and the settings that shape the outputs; a folder holding another checkpoint's or
setting's outputs (or unrecorded ones) is refused, as kept files would mix the two, unless
--overwrite and this run's pairs rewrite every output there (the record says "complete": false
until they have). Exit status: the number of failed pairs, at most 100 (0: all succeeded); 2
also for a usage error (bad flags, unreadable checkpoint, an --out of another checkpoint),
reported before any pair is read.
"""
import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import kernels
from ivt.checkpoint import sha256_file
from ivt.data import CLASSES
from ivt.data.io import BadImageError, open_image, open_thermal, open_visible
from ivt.data.transforms import pad_to, resize, thermal_to_tensor, visible_to_tensor
from ivt.engine import autocast_context, check_output, select_device
from ivt.models.backbone import IVTBackbone
from ivt.precision import store_frozen_weights
from ivt.tasks import add_kernels_flag, config_normalization, load_trained
from ivt.tasks.sod import saliency_map
from ivt.trainer import given_flags
from ivt.visualize import (distinct_colours, draw_boxes, overlay_saliency, overlay_segmentation,
                           palette_for)
from ivt.weights import renamed_into_place

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MAX_EXIT_STATUS = 100


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="FILE",
                   help="a checkpoint written by a training script (best.pt or last.pt)")
    p.add_argument("--pretrained", default=None, metavar="FILE|NAME|URL",
                   help="the pre-trained backbone weights a delta checkpoint was trained from: a "
                        "file, a released checkpoint's name or a URL (downloaded once into "
                        "$IVT_CACHE) (default: the saved file, or the saved name or URL when "
                        "that file is not on this machine)")
    src = p.add_argument_group("inputs (one of --vis/--ir, --pairs, --rgbt)")
    src.add_argument("--vis", default=None, metavar="PATH",
                     help="a visible image, or a folder of them (paired with --ir by file stem)")
    src.add_argument("--ir", default=None, metavar="PATH",
                     help="a thermal image, or a folder of them (1 or 3 channels, 8 or 16 bits)")
    src.add_argument("--pairs", default=None, metavar="LIST",
                     help="a text file with one 'vis_path ir_path' pair per line (relative paths "
                          "are relative to the file's folder; quote paths with spaces; '#' "
                          "starts a comment)")
    src.add_argument("--rgbt", default=None, metavar="PATH",
                     help="a 4-channel PNG (R, G, B, thermal: MFNet's images/*.png), or a folder "
                          "of them")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that already exist (default: keep them, write only "
                        "missing ones; an --out holding another checkpoint's outputs, as "
                        "--out/predict_run.json records, is refused)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA if available), cpu, cuda or cuda:N (default: %(default)s)")
    add_kernels_flag(p)
    p.add_argument("--batch", type=int, default=1,
                   help="pairs per forward pass; segmentation batches only pairs of the same "
                        "size (default: %(default)s)")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast, as training's --amp (the frozen Linear and conv weights "
                        "are then stored in bf16, which autocast casts them to anyway); --no-amp: "
                        "float32 (default: as the checkpoint was trained)")
    p.add_argument("--score-threshold", type=float, default=0.3,
                   help="detection only: keep boxes scoring at least this (default: %(default)s)")
    p.add_argument("--max-dets", type=int, default=100,
                   help="detection only: at most this many boxes per image (default: "
                        "%(default)s)")
    return p


# -- finding the pairs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Pair:
    """One input: `name` names the outputs; `ir` is None when `vis` is a 4-channel RGB-T file."""
    name: str
    vis: Path
    ir: Optional[Path]


def list_images(folder: Path) -> Tuple[Dict[str, Path], List[str]]:
    """{stem: path} of the image files directly in `folder`, and the problems (a stem twice)."""
    found: Dict[str, Path] = {}
    problems = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in found:
            problems.append(f"{path}: stem {path.stem!r} also used by {found[path.stem].name}")
            continue
        found[path.stem] = path
    return found, problems


def pairs_from_paths(vis: Path, ir: Path) -> Tuple[List[Pair], List[str]]:
    """Two files (one pair) or two folders (pairs by stem; unmatched stems are problems)."""
    if not vis.is_dir() and not ir.is_dir():   # one pair; a missing file is named when read
        return [Pair(vis.stem, vis, ir)], []
    for flag, path in (("--vis", vis), ("--ir", ir)):
        if not path.exists():             # beside a folder: not a pair's missing file
            raise FileNotFoundError(f"{flag} {path}: not found")
    if not (vis.is_dir() and ir.is_dir()):
        raise ValueError(f"--vis {vis} and --ir {ir} must both be files or both be folders")
    vis_images, problems = list_images(vis)
    ir_images, ir_problems = list_images(ir)
    problems += ir_problems
    problems += [f"{vis_images[s]}: no thermal image with stem {s!r} in {ir}"
                 for s in sorted(set(vis_images) - set(ir_images))]
    problems += [f"{ir_images[s]}: no visible image with stem {s!r} in {vis}"
                 for s in sorted(set(ir_images) - set(vis_images))]
    return [Pair(s, vis_images[s], ir_images[s])
            for s in sorted(set(vis_images) & set(ir_images))], problems


def pairs_from_list(list_file: Path) -> Tuple[List[Pair], List[str]]:
    """`vis_path ir_path` per line, relative to the list's folder; bad lines are problems."""
    pairs, problems = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        try:
            fields = shlex.split(line, comments=True)
        except ValueError as e:
            problems.append(f"{list_file}:{number}: {e}")
            continue
        if not fields:
            continue
        if len(fields) != 2:
            problems.append(f"{list_file}:{number}: expected 'vis_path ir_path', got {line!r}")
            continue
        vis, ir = (list_file.parent / f for f in fields)
        pairs.append(Pair(vis.stem, vis, ir))
    return pairs, problems


def pairs_from_rgbt(path: Path) -> Tuple[List[Pair], List[str]]:
    """One 4-channel file, or every image in a folder."""
    if path.is_file():
        return [Pair(path.stem, path, None)], []
    if not path.is_dir():
        raise ValueError(f"--rgbt {path}: no such file or folder")
    images, problems = list_images(path)
    return [Pair(s, p, None) for s, p in images.items()], problems


def find_pairs(args) -> Tuple[List[Pair], List[str]]:
    """The pairs the flags name, and the problems found while pairing (each names its file);
    a second pair with an output name already taken is a problem too."""
    for flag in ("pairs", "rgbt"):
        path = getattr(args, flag)
        if path and not Path(path).exists():
            raise FileNotFoundError(f"--{flag} {path}: not found")
    if args.pairs and Path(args.pairs).is_dir():
        raise ValueError(f"--pairs {args.pairs} is a folder; give a text file of "
                         f"'vis_path ir_path' lines")
    if args.pairs:
        pairs, problems = pairs_from_list(Path(args.pairs))
    elif args.rgbt:
        pairs, problems = pairs_from_rgbt(Path(args.rgbt))
    else:
        pairs, problems = pairs_from_paths(Path(args.vis), Path(args.ir))
    if not pairs and not problems:
        given = " and ".join(f"--{k} {getattr(args, k)}" for k in ("vis", "ir", "pairs", "rgbt")
                             if getattr(args, k))
        raise ValueError(f"{given}: no images to predict (image files end in "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))})")
    unique: Dict[str, Pair] = {}
    for pair in pairs:
        if pair.name in unique:
            problems.append(f"{pair.vis}: output name {pair.name!r} already used by "
                            f"{unique[pair.name].vis}")
        else:
            unique[pair.name] = pair
    return list(unique.values()), problems


# -- reading -------------------------------------------------------------------------------------
class PairError(ValueError):
    """A pair that cannot be used; the message names the file(s)."""


def read_pair(pair: Pair) -> Tuple[np.ndarray, np.ndarray]:
    """(vis (H, W, 3), ir (H, W)) uint8; PairError / BadImageError / FileNotFoundError."""
    if pair.ir is None:
        rgbt = np.asarray(open_image(pair.vis))
        if rgbt.ndim != 3 or rgbt.shape[2] != 4:
            raise PairError(f"{pair.vis}: expected 4 channels (R, G, B, thermal), got shape "
                            f"{rgbt.shape}")
        return rgbt[..., :3], rgbt[..., 3]
    vis, ir = np.asarray(open_visible(pair.vis)), np.asarray(open_thermal(pair.ir))
    if vis.shape[:2] != ir.shape:
        raise PairError(f"{pair.vis} is {vis.shape[1]}x{vis.shape[0]} but {pair.ir} is "
                        f"{ir.shape[1]}x{ir.shape[0]} (width x height): sizes differ")
    return vis, ir


# -- the three tasks -----------------------------------------------------------------------------
class Predictor:
    """What a task adds: input tensors, the forward pass, and the files written per pair."""
    suffixes: Tuple[str, ...] = ()

    def __init__(self, model: torch.nn.Module, config: dict, args):
        self.model, self.config, self.args = model, config, args
        self.norm = config_normalization(config)

    def outputs(self, out: Path, name: str) -> Dict[str, Path]:
        return {s: out / f"{name}{s}" for s in self.suffixes}

    def prepare(self, vis: np.ndarray, ir: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        """(vis (3, h, w), ir (3, h, w)) model inputs; pairs with equal shapes share a batch."""
        raise NotImplementedError

    def run(self, vis: torch.Tensor, ir: torch.Tensor, sizes: List[Tuple[int, int]]) -> list:
        """One forward pass on (B, 3, h, w) inputs -> B results at the original `sizes`."""
        raise NotImplementedError

    def render(self, vis: np.ndarray, ir: np.ndarray, result, pair: Pair) -> dict:
        """{suffix: PIL image or JSON-able dict} for one pair."""
        raise NotImplementedError


class SegPredictor(Predictor):
    suffixes = ("_classes.png", "_overlay.png")

    def __init__(self, model, config, args):
        super().__init__(model, config, args)
        # The ViTs cut the image into patch_size x patch_size patches (Swin pads by itself):
        # padded here, as the model would pad each alone, pairs of nearby sizes share a forward.
        self.multiple = next((m.input_multiple for m in model.modules()
                              if isinstance(m, IVTBackbone)), 1)
        self.class_names = list(config.get("class_names") or CLASSES)
        self.palette = palette_for(len(self.class_names))

    def prepare(self, vis, ir):
        h, w = ir.shape
        m = self.multiple
        size = (-(-h // m) * m, -(-w // m) * m)
        return (visible_to_tensor(pad_to(vis, size, 0), self.norm),
                thermal_to_tensor(pad_to(ir, size, 0), self.norm))

    def run(self, vis, ir, sizes):
        classes = self.model.predict(vis, ir).cpu()                  # (B, h, w) int64
        return [classes[i, :h, :w].numpy().astype(np.uint8) for i, (h, w) in enumerate(sizes)]

    def render(self, vis, ir, classes, pair):
        return {"_classes.png": Image.fromarray(classes),
                "_overlay.png": overlay_segmentation(vis, classes, self.class_names,
                                                     self.palette)}


class SquarePredictor(Predictor):
    """SOD and detection: both images resized (bilinear) to the square training size."""
    default_size = 0

    def __init__(self, model, config, args):
        super().__init__(model, config, args)
        self.size = int(config.get("size", self.default_size))

    def prepare(self, vis, ir):
        s = (self.size, self.size)
        return (visible_to_tensor(resize(vis, s, Image.BILINEAR), self.norm),
                thermal_to_tensor(resize(ir, s, Image.BILINEAR), self.norm))


class SodPredictor(SquarePredictor):
    suffixes = ("_saliency.png", "_overlay.png")
    default_size = 384

    def run(self, vis, ir, sizes):
        """-> per pair the probability (H, W) float32 in [0, 1] at its input size."""
        prob = self.model.predict(vis, ir).float().cpu()             # (B, 1, size, size)
        return [F.interpolate(prob[i:i + 1], size=hw, mode="bilinear", align_corners=False)
                [0, 0].clamp(0, 1).numpy() for i, hw in enumerate(sizes)]

    def render(self, vis, ir, prob, pair):
        return {"_saliency.png": Image.fromarray(saliency_map(prob)),
                "_overlay.png": overlay_saliency(vis, np.round(prob * 255).astype(np.uint8))}


class DetPredictor(SquarePredictor):
    suffixes = ("_boxes.json", "_vis_boxes.png", "_ir_boxes.png")
    default_size = 640

    def __init__(self, model, config, args):
        super().__init__(model, config, args)
        names = config.get("class_names")
        if not names:
            from ivt.data.m3fd import M3FD_CLASSES
            names = M3FD_CLASSES
        self.class_names = list(names)
        self.colours = distinct_colours(len(self.class_names))

    def run(self, vis, ir, sizes):
        dets = self.model.predict(vis, ir, orig_sizes=sizes,
                                  score_threshold=self.args.score_threshold,
                                  max_dets=self.args.max_dets)
        return [{k: v.float().cpu().numpy() if k != "labels" else v.cpu().numpy()
                 for k, v in d.items()} for d in dets]

    def render(self, vis, ir, det, pair):
        labels = det["labels"].astype(int).tolist()
        names = [self.class_names[k] for k in labels]
        boxes = det["boxes"].reshape(-1, 4)
        record = {"vis": str(pair.vis), "ir": str(pair.ir or pair.vis),
                  "width": int(vis.shape[1]), "height": int(vis.shape[0]),
                  "score_threshold": self.args.score_threshold,
                  "boxes": [{"box": [round(float(c), 2) for c in box], "class": name,
                             "label": label, "score": round(float(score), 4)}
                            for box, name, label, score in zip(boxes, names, labels,
                                                               det["scores"])]}
        colours = [self.colours[k] for k in labels]
        return {"_boxes.json": record,
                "_vis_boxes.png": draw_boxes(vis, boxes, names, det["scores"], colours),
                "_ir_boxes.png": draw_boxes(ir, boxes, names, det["scores"], colours)}


PREDICTORS = {"seg": SegPredictor, "sod": SodPredictor, "det": DetPredictor}
OUTPUT_SUFFIXES = tuple(s for predictor in PREDICTORS.values() for s in predictor.suffixes)


# -- writing -------------------------------------------------------------------------------------
def save_atomically(obj, path: Path) -> None:
    """A PIL image as PNG or a dict as JSON, written to a temporary name and renamed."""
    with renamed_into_place(path.with_name(f".{path.name}.tmp"), path) as tmp:
        if isinstance(obj, dict):
            tmp.write_text(json.dumps(obj, indent=1) + "\n")
        else:
            obj.save(tmp, format="PNG")


RECORD = "predict_run.json"


def run_record(args, task: str) -> dict:
    """What shapes the outputs: the checkpoint (by content) and the settings; written to
    --out/predict_run.json."""
    settings = {"amp": args.amp}
    if task == "sod":
        settings.update(saliency_png="min-max stretched")
    if task == "det":
        settings.update(score_threshold=args.score_threshold, max_dets=args.max_dets)
    return {"checkpoint": str(Path(args.checkpoint).resolve()),
            "checkpoint_sha256": sha256_file(args.checkpoint), "task": task, **settings}


def check_record(out: Path, record: dict, overwrite: bool,
                 will_write: Set[Path]) -> Tuple[dict, Set[Path]]:
    """(the record to write before the first output, the outputs it must replace before it is
    complete), or ValueError for an --out whose outputs would mix with this run's. A folder
    holding outputs of another checkpoint (a moved file is the same one) or settings, outputs
    with no record, or an --overwrite run's unfinished replacement is refused, except with
    --overwrite when this run is to rewrite every output there (`will_write`); the record then
    says "complete": false until all of them are rewritten (and lists those that were not when
    the run ends). A folder without outputs is new, whatever its record says."""
    path = out / RECORD
    old = None
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: unreadable ({e}); remove it (and the outputs it "
                             f"describes), or give another --out") from None
        if not isinstance(old, dict):
            raise ValueError(f"{path}: not a record of predict.py (a JSON object); remove it "
                             f"(and the outputs it describes), or give another --out")
    existing = ({p for p in out.iterdir() if p.name.endswith(OUTPUT_SUFFIXES) and p.is_file()}
                if out.is_dir() else set())
    if not existing:                  # a new folder, or one whose runs wrote nothing yet
        return {**record, "complete": True}, set()
    left = old.get("not_replaced") if old is not None else None
    unfinished = old is not None and not old.get("complete", True) and (
        left is None or any((out / name).is_file() for name in left))
    differ = ([k for k in record if k != "checkpoint" and old.get(k) != record[k]]
              if old is not None else [])
    if old is not None and not differ and not unfinished:
        return {**record, "complete": True}, set()         # this checkpoint's, settings alike
    if old is None:
        why = f"{len(existing)} outputs with no record of their checkpoint ({RECORD})"
    elif differ:
        said = ", ".join(f"{k} {old.get(k)!r} (now {record[k]!r})" for k in differ
                         if k != "checkpoint_sha256")
        why = (f"the outputs of another checkpoint, {old.get('checkpoint')}"
               if "checkpoint_sha256" in differ else "outputs of other settings")
        why += f" ({said})" if said else ""
    else:
        why = ("outputs of an earlier model that an --overwrite run did not replace ("
               + (", ".join(left[:3]) + (", ..." if len(left) > 3 else "") if left
                  else "it was interrupted") + ")")
    if not overwrite:
        raise ValueError(f"--out {out} holds {why}; keeping them would mix them with this "
                         f"run's outputs: give another --out, or --overwrite to replace them")
    stale = sorted(existing - will_write)
    if stale:
        raise ValueError(f"--out {out} holds {why}, and {len(stale)} of them are not this run's "
                         f"to replace (e.g. {stale[0].name}): they would stay beside this run's "
                         f"outputs; remove them, or give another --out")
    return {**record, "complete": False}, existing


# -- the run -------------------------------------------------------------------------------------
@dataclass
class Job:
    """A pair read and prepared: images (H, W, 3) and (H, W) uint8, model inputs (3, h, w), and
    the output files still to write ({suffix: path})."""
    pair: Pair
    vis: np.ndarray
    ir: np.ndarray
    vis_input: torch.Tensor
    ir_input: torch.Tensor
    files: Dict[str, Path]


def chunks(items: Sequence, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


DET_FLAGS = frozenset({"score_threshold", "max_dets"})    # the flags only detection reads


def main(argv=None) -> int:
    """Returns the exit status: the number of failed pairs, at most MAX_EXIT_STATUS."""
    parser = get_parser()
    args = parser.parse_args(argv)
    sources = [bool(args.vis or args.ir), bool(args.pairs), bool(args.rgbt)]
    if sum(sources) != 1 or (sources[0] and not (args.vis and args.ir)):
        parser.error("give exactly one input: --vis and --ir, --pairs, or --rgbt")
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if args.max_dets < 1:
        parser.error(f"--max-dets must be at least 1, got {args.max_dets}")
    kernels.set_backend(args.kernels)
    try:
        check_output(args.out, "--out", folder=True)
    except ValueError as e:
        parser.error(str(e))
    for flag, folder in (("--vis", args.vis), ("--ir", args.ir), ("--rgbt", args.rgbt)):
        if folder and Path(folder).is_dir() and Path(folder).resolve() == Path(args.out).resolve():
            parser.error(f"--out {args.out} is the {flag} folder: a later run would read the "
                         f"outputs written there as inputs; give another --out")
    try:
        device = select_device(args.device)
        kernels.check_backend(device)
        task, model, ckpt = load_trained(args.checkpoint, args.pretrained)
        pairs, failures = find_pairs(args)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        parser.error(str(e))
    if task != "det":
        for flag in sorted(DET_FLAGS & given_flags(parser, argv)):
            print(f"warning: --{flag.replace('_', '-')} applies to detection checkpoints; "
                  f"ignored for this {task} one", file=sys.stderr)
    if args.amp is None:
        args.amp = bool(ckpt["config"].get("amp"))
    out = Path(args.out)
    predictor = PREDICTORS[task](model, ckpt["config"], args)
    will_write = {path for pair in pairs for path in predictor.outputs(out, pair.name).values()}
    try:
        record, to_replace = check_record(out, run_record(args, task), args.overwrite,
                                          will_write)
    except ValueError as e:
        parser.error(str(e))
    model.to(device)
    if args.amp:
        store_frozen_weights(model, torch.bfloat16)
    autocast = autocast_context(device, args.amp)
    out.mkdir(parents=True, exist_ok=True)
    save_atomically(record, out / RECORD)
    for problem in failures:
        tqdm.write(f"skipped: {problem}", file=sys.stderr)

    written = kept = 0
    bar = tqdm(total=len(pairs), desc=f"predict ({task})", unit="pair", dynamic_ncols=True)
    try:
        for chunk in chunks(pairs, args.batch):
            jobs: List[Job] = []
            for pair in chunk:
                files = predictor.outputs(out, pair.name)
                if not args.overwrite:
                    files = {s: p for s, p in files.items() if not p.exists()}
                if not files:
                    kept += 1
                    bar.update(1)
                    continue
                try:
                    vis, ir = read_pair(pair)
                except FileNotFoundError as e:
                    failures.append(f"{e.filename}: no such file")
                except (BadImageError, PairError) as e:
                    failures.append(str(e))
                else:
                    jobs.append(Job(pair, vis, ir, *predictor.prepare(vis, ir), files))
                    continue
                tqdm.write(f"skipped: {failures[-1]}", file=sys.stderr)
                bar.update(1)
            groups: Dict[tuple, List[Job]] = {}          # one forward pass per input shape
            for job in jobs:
                groups.setdefault(tuple(job.vis_input.shape), []).append(job)
            for group in groups.values():
                vis_b = torch.stack([j.vis_input for j in group]).to(device)    # (B, 3, h, w)
                ir_b = torch.stack([j.ir_input for j in group]).to(device)
                with torch.no_grad(), autocast():
                    results = predictor.run(vis_b, ir_b, [j.ir.shape for j in group])
                for job, result in zip(group, results):
                    rendered = predictor.render(job.vis, job.ir, result, job.pair)
                    for suffix, path in job.files.items():
                        save_atomically(rendered[suffix], path)
                        to_replace.discard(path)
                    written += 1
                    bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {written} pairs written (each file whole); the same command "
              f"writes the rest", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    if not record["complete"]:        # --overwrite of another model's outputs: all replaced?
        left = sorted(p.name for p in to_replace if p.is_file())
        extra = {"not_replaced": left} if left else {}
        save_atomically({**record, "complete": not left, **extra}, out / RECORD)
        if left:
            print(f"warning: {len(left)} outputs of the earlier model remain beside this run's, "
                  f"for the pairs that failed (e.g. {left[0]}); {RECORD} lists them until a run "
                  f"replaces them", file=sys.stderr)

    print(f"{written} pairs written, {kept} already written (kept; --overwrite replaces them), "
          f"{len(failures)} failed -> {out}")
    for f in failures:
        print(f"  failed: {f}")
    return min(len(failures), MAX_EXIT_STATUS)


if __name__ == "__main__":
    sys.exit(main())

"""The detection demo's denoising queries: never many more than its matching queries.

The demo trains with 20 matching queries; DINO's 100 denoising queries per polarity would bury
them under 200 denoising ones. Checked on the demo's own synthetic scenes (their object counts as
the generator writes them) through train_det.py's parser and the denoising module.
"""
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_det  # noqa: E402
from ivt.data.synthetic import write_m3fd  # noqa: E402
from ivt.demo import PRESETS  # noqa: E402
from ivt.demo.det import DET_PRESETS, train_args  # noqa: E402
from ivt.models.detr.denoising import Denoising  # noqa: E402


@pytest.fixture(scope="module")
def object_counts(tmp_path_factory):
    """Objects per scene in the --fast demo's data (seed 0), written as `make_data` writes it."""
    t, s = DET_PRESETS["fast"], PRESETS["fast"]
    root = tmp_path_factory.mktemp("m3fd")
    write_m3fd(root, t.n_images, size=s.size, seed=0, night_fraction=0.5)
    return [len(ET.parse(f).getroot().findall("object"))
            for f in sorted((root / "Annotation").glob("*.xml"))]


@pytest.mark.parametrize("preset", list(DET_PRESETS))
def test_demo_denoising_queries_at_most_matching_queries(preset, object_counts):
    t, s = DET_PRESETS[preset], PRESETS[preset]
    args = train_det.get_parser().parse_args(
        [str(a) for a in train_args(t, s, Path("data"), Path("out"), 0, "ivt", Path("pre.pth"))])
    assert args.dn_number == t.dn_number > 0
    assert max(object_counts) >= 5            # the scenes do get crowded
    dn = Denoising(num_classes=6, dim=8, dn_number=args.dn_number)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    for n in range(1, max(object_counts) + 1):
        # a batch whose most crowded image holds n objects (training crops only remove boxes)
        targets = [{"labels": torch.zeros(n, dtype=torch.int64), "boxes": box.repeat(n, 1)},
                   {"labels": torch.zeros(1, dtype=torch.int64), "boxes": box}]
        pad = dn(targets, args.num_queries).meta["pad_size"]     # denoising queries per image
        assert pad <= args.num_queries, (n, pad, args.num_queries)

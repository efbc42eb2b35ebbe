"""Flags the three training scripts share: one name for the input size, and a number of data
workers that fits the machine."""
import os

import pytest

import train_det
import train_seg
import train_sod
from ivt import trainer

SCRIPTS = {"seg": (train_seg, 512), "sod": (train_sod, 384), "det": (train_det, 640)}


@pytest.mark.parametrize("task", sorted(SCRIPTS))
def test_size_is_one_flag_in_all_three_scripts(task):
    module, default = SCRIPTS[task]
    parser = module.get_parser()
    assert parser.parse_args(["--data", "x"]).size == default
    assert parser.parse_args(["--data", "x", "--size", "96"]).size == 96
    assert not hasattr(parser.parse_args(["--data", "x"]), "crop")


def test_crop_is_train_segs_name_for_size():
    parser = train_seg.get_parser()
    assert parser.parse_args(["--data", "x", "--crop", "64"]).size == 64


@pytest.mark.parametrize("cores, expected", [(1, 1), (2, 2), (3, 3), (16, 4)])
def test_workers_default_never_exceeds_the_cores(monkeypatch, cores, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert trainer.default_workers() == expected
    for module, _ in SCRIPTS.values():
        assert module.get_parser().parse_args(["--data", "x"]).workers == expected

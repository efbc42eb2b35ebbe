"""Train a segmentation model (IV-tuning backbone + Segformer head) on MFNet or MSRS.

    python train_seg.py --data data/MFNet --backbone swin_l

`python train_seg.py --help` lists every flag with the paper's defaults; the run itself is the
shared trainer (`ivt/trainer.py`) driving the segmentation task (`ivt/tasks/seg.py`).
"""
from ivt import trainer
from ivt.tasks.seg import SegTask


def get_parser():
    return trainer.get_parser(SegTask())


def main(argv=None) -> dict:
    return trainer.main(SegTask(), argv)


if __name__ == "__main__":
    main()

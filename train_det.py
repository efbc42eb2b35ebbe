"""Train a detector (IV-tuning backbone + DETR-style detector) on M3FD.

    python train_det.py --data data/M3FD --backbone swin_l

`python train_det.py --help` lists every flag with the paper's defaults; the run itself is the
shared trainer (`ivt/trainer.py`) driving the detection task (`ivt/tasks/det.py`).
"""
from ivt import trainer
from ivt.tasks.det import DetTask


def get_parser():
    return trainer.get_parser(DetTask())


def main(argv=None) -> dict:
    return trainer.main(DetTask(), argv)


if __name__ == "__main__":
    main()

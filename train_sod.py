"""Train a salient object detection model (IV-tuning backbone + CPNet decoder) on VT5000.

    python train_sod.py --data VT5000/Train --backbone swin_l

`python train_sod.py --help` lists every flag with the paper's defaults; the run itself is the
shared trainer (`ivt/trainer.py`) driving the SOD task (`ivt/tasks/sod.py`).
"""
from ivt import trainer
from ivt.tasks.sod import SODTask


def get_parser():
    return trainer.get_parser(SODTask())


def main(argv=None) -> dict:
    return trainer.main(SODTask(), argv)


if __name__ == "__main__":
    main()

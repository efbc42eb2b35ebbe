"""Datasets in their real on-disk layouts (docs/data.md), paired transforms, a synthetic
generator."""
from .m3fd import M3FD_CLASSES, M3FDDataset
from .mfnet import CLASSES, NUM_CLASSES, PALETTE, MFNetDataset, RGBTSegmentationDataset
from .msrs import MSRSDataset
from .transforms import CLIP, IMAGENET, EvalTransform, Normalization, TrainTransform
from .vt import VTDataset, list_vt_stems, split_train_val

SEG_DATASETS = {"mfnet": MFNetDataset, "msrs": MSRSDataset}


def build_seg_dataset(name: str, root, split: str, train: bool, crop=(512, 512), seed: int = 0,
                      validate: bool = True, norm: Normalization = IMAGENET
                      ) -> RGBTSegmentationDataset:
    """`name` in SEG_DATASETS ('mfnet', 'msrs'); other arguments as `MFNetDataset`."""
    if name not in SEG_DATASETS:
        raise ValueError(f"unknown segmentation dataset {name!r}; "
                         f"expected one of {sorted(SEG_DATASETS)}")
    return SEG_DATASETS[name](root, split=split, train=train, crop=crop, seed=seed,
                              validate=validate, norm=norm)


__all__ = ["CLASSES", "NUM_CLASSES", "PALETTE", "MFNetDataset", "MSRSDataset",
           "RGBTSegmentationDataset", "TrainTransform", "EvalTransform", "Normalization",
           "IMAGENET", "CLIP", "SEG_DATASETS",
           "build_seg_dataset", "VTDataset", "list_vt_stems", "split_train_val",
           "M3FD_CLASSES", "M3FDDataset"]

"""Segmentation (MFNet, MSRS): what the task adds to the shared engine."""
from typing import Callable, Dict, Optional

import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..engine import DistInfo, all_reduce_sum_, unwrap
from ..metrics import SegMetric


@torch.no_grad()
def evaluate_seg(model: nn.Module, dataset: Dataset, dist: DistInfo, autocast: Callable,
                 workers: int = 0, on_prediction: Optional[Callable] = None
                 ) -> Dict[str, SegMetric]:
    """Segmentation metrics at native resolution: {'all', 'day', 'night'} -> SegMetric.

    Each process predicts every world_size-th image (batch 1, so sizes may differ); the confusion
    matrices are then summed over processes, so every rank returns the whole set's metrics. Under
    DDP, rank 0's buffers (BatchNorm running statistics, which each process updates from its own
    batches) are broadcast first, so every process evaluates the weights rank 0 checkpoints.
    `model` (or the module inside DDP) must provide `logits_at_input_size(vis, ir)` (B, K, H, W).
    `on_prediction(index, pred (H, W), label (H, W))` is called per image on its process.
    """
    net = unwrap(model)
    if torch_dist.is_initialized():
        for buffer in net.buffers():
            torch_dist.broadcast(buffer, src=0)
    was_training = net.training
    net.eval()
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=workers,
                        generator=torch.Generator())
    metrics = {k: SegMetric(dataset.num_classes) for k in ("all", "day", "night")}
    for index, item in zip(indices, loader):
        vis = item["vis"].to(dist.device, non_blocking=True)
        ir = item["ir"].to(dist.device, non_blocking=True)
        with autocast():
            logits = net.logits_at_input_size(vis, ir)           # (1, K, H, W)
        pred = logits.float().argmax(dim=1).cpu()                 # (1, H, W)
        label = item["label"]                                     # (1, H, W)
        metrics["all"].update(pred, label)
        metrics["night" if bool(item["is_night"][0]) else "day"].update(pred, label)
        if on_prediction is not None:
            on_prediction(index, pred[0], label[0])
    for m in metrics.values():
        m.confusion[:] = all_reduce_sum_(torch.from_numpy(m.confusion.copy())).numpy()
    net.train(was_training)
    return metrics

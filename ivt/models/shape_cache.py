"""`ShapeCache`: tensors a module computes from an input's shape alone (Swin's attention bias and
shifted-window masks, the ViTs' rotary tables), kept for the next forward at that shape.

Training runs a few fixed shapes, and a captured CUDA graph (`ivt.graph_step`) reads these
tensors by address on every replay: an entry used while autograd records is kept for the
module's life. Inference may meet a new size with every image (`predict.py` runs segmentation
at each image's own size, and one entry of Swin-L's attention bias at 1024x768 is hundreds of
MB): entries used only without grad are bounded to the most recently used few.
"""
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, Tuple

import torch


class ShapeCache:
    """`get(key, make, stamp)`: the value cached under `key` if it was made with the same
    `stamp` (for a value computed from weights: their storage and version, so that loading new
    weights invalidates it), else `make()`, cached."""

    def __init__(self, inference_entries: int = 2):
        self.inference_entries = inference_entries
        self.kept: Dict[Hashable, Tuple[Hashable, Any]] = {}
        self.recent: "OrderedDict[Hashable, Tuple[Hashable, Any]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self.kept) + len(self.recent)

    def get(self, key: Hashable, make: Callable[[], Any], stamp: Hashable = None) -> Any:
        entry = self.kept.get(key)
        if entry is not None and entry[0] == stamp:                 # training's every step
            return entry[1]
        keep = entry is not None or torch.is_grad_enabled()
        if entry is None:
            entry = self.recent.pop(key, None)
        if entry is None or entry[0] != stamp:
            entry = (stamp, make())
        if keep:
            self.kept[key] = entry
        else:                                                   # the most recent last
            self.recent[key] = entry
            while len(self.recent) > self.inference_entries:
                self.recent.popitem(last=False)
        return entry[1]

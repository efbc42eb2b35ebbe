"""One training step captured in a CUDA graph and replayed: `GraphedTrainStep`.

The eager step (`ivt.engine.EagerStep`) launches every kernel of the forward, the backward and
the optimizer from Python, one by one; for IV-tuning's many small adapter kernels the host, not
the GPU, sets the pace. A CUDA graph records the launches of one whole step once and replays
them with a single call, so the step costs its GPU time plus one launch.

What capture needs, and how this class provides it:
* fixed input shapes: the batch's tensors are copied into static device buffers; a batch whose
  tensors differ in shape or dtype from the captured ones raises ValueError naming the tensor
  (the caller falls back to eager steps);
* no host work inside the step: the learning rate lives in a device tensor per parameter group,
  refilled before each replay (so a poly or step schedule works under replay); the optimizer is
  switched to its capture-safe form in place (Adam/AdamW `capturable=True`, SGD `fused=True`:
  the same update rule, with its step counters and lr on the device); autocast's weight-cast
  cache is off inside the captured region (cached casts would be stale after a replay);
* dropout and drop-path stay valid: PyTorch registers the default CUDA generator with the graph
  and advances its offset on every replay, so each replay draws new masks;
* gradients are assigned, not accumulated: grads are set to None before capture, so the
  captured backward allocates them from the graph's pool and every replay overwrites them.

The first call runs one ordinary eager step (which also creates the optimizer's state and warms
up cuDNN/cuBLAS on a side stream), the second captures and replays, later calls only copy the
batch in and replay. Every call is exactly one optimisation step on its batch, as in eager mode.
"""
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from .engine import clip_gradients


class GraphedTrainStep:
    """`step(batch, lr) -> loss`: `loss_fn(model, batch)` under `autocast`, backward, optional
    gradient clipping (values to +-`clip_value`, the norm to `clip_grad`; 0: off),
    `optimizer.step()`, with every parameter
    group's lr set to `lr * group.get('lr_mult', 1.0)`; the loss is returned detached, float32,
    on the device, not synchronised. Same contract as `ivt.engine.EagerStep`.

    batch: a dict; its tensors are the step's inputs (copied into static buffers), its other
    values are passed to `loss_fn` as they were at capture.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 autocast: Callable, clip_grad: float = 0.0, clip_value: float = 0.0):
        device = next(model.parameters()).device
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("GraphedTrainStep does not capture DistributedDataParallel's "
                             "gradient all-reduce; use one process, or run without --cuda-graph")
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"GraphedTrainStep captures a CUDA graph and needs the model on a "
                             f"CUDA device; the model is on {device} (run without --cuda-graph)")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.autocast, self.device = autocast, device
        self.clip_grad, self.clip_value = clip_grad, clip_value
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.lrs = _make_capture_safe(optimizer, device)
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: Dict[str, object] = {}
        self.static_loss: Optional[torch.Tensor] = None

    def __call__(self, batch: dict, lr: float) -> torch.Tensor:
        for group, lr_tensor in zip(self.optimizer.param_groups, self.lrs):
            lr_tensor.fill_(lr * group.get("lr_mult", 1.0))
        self.calls += 1
        if self.calls == 1:
            return self._warm_up(batch)
        if self.graph is None:
            self._capture(batch)
        else:
            self._load(batch)
        self.graph.replay()
        return self.static_loss.detach().float().clone()

    # -- the step's body, shared by the eager warm-up and the capture --------------------------
    def _body(self, batch: dict, cache_casts: bool) -> torch.Tensor:
        with self.autocast():
            previous = torch.is_autocast_cache_enabled()
            torch.set_autocast_cache_enabled(cache_casts and previous)
            try:
                loss = self.loss_fn(self.model, batch)
            finally:
                torch.set_autocast_cache_enabled(previous)
        loss.backward()
        clip_gradients(self.params, self.clip_grad, self.clip_value, foreach=True)
        self.optimizer.step()
        return loss

    def _warm_up(self, batch: dict) -> torch.Tensor:
        """Step 1, eager, on a side stream (as CUDA-graph capture recommends)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self._body(_to_device(batch, self.device), cache_casts=True)
            loss = loss.detach().float()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture(self, batch: dict) -> None:
        self.static = {k: (v.to(self.device, copy=True) if torch.is_tensor(v) else v)
                       for k, v in batch.items()}
        self.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: only this thread's CUDA calls are checked during the capture; under the
        # default ("global") the DataLoader's pin-memory thread, which allocates and copies
        # host memory meanwhile, could invalidate it
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_loss = self._body(self.static, cache_casts=False)

    def _load(self, batch: dict) -> None:
        """Copy the batch's tensors into the static buffers; shapes and dtypes must match."""
        for k, v in self.static.items():
            if not torch.is_tensor(v):
                continue
            new = batch.get(k)
            if not torch.is_tensor(new):
                raise ValueError(f"batch[{k!r}] is missing or not a tensor; the CUDA graph was "
                                 f"captured with a {tuple(v.shape)} tensor")
            if new.shape != v.shape or new.dtype != v.dtype:
                raise ValueError(f"batch[{k!r}] has shape {tuple(new.shape)} and dtype "
                                 f"{new.dtype}, but the CUDA graph was captured with "
                                 f"{tuple(v.shape)} {v.dtype}; CUDA graphs need fixed shapes")
            v.copy_(new, non_blocking=True)
        extra = [k for k, v in batch.items() if torch.is_tensor(v) and k not in self.static]
        if extra:
            raise ValueError(f"batch has tensors {extra} that the CUDA graph was not captured with")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def _make_capture_safe(optimizer: torch.optim.Optimizer, device: torch.device):
    """Switch `optimizer` to its capture-safe form in place and give every parameter group a
    device tensor as its lr; returns those tensors (one per group)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        for group in optimizer.param_groups:              # the fused form needs it too
            group["capturable"] = True
        for state in optimizer.state.values():        # resumed state: counters to the device
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].to(device=device, dtype=torch.float32)
    elif isinstance(optimizer, torch.optim.SGD):
        for group in optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
    else:
        raise ValueError(f"GraphedTrainStep supports SGD, Adam and AdamW, not "
                         f"{type(optimizer).__name__}")
    lrs = []
    for group in optimizer.param_groups:
        lr = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        group["lr"] = lr
        lrs.append(lr)
    return lrs

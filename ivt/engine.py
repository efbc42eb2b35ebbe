"""The training loop the task scripts share: devices and DDP, seeding, optimizer, poly schedule,
bf16 autocast, an infinite epoch-aware batch stream, JSONL logging, evaluation, a NaN guard.

A script builds its datasets and model, then hands `train_loop` a loss function, an `evaluate`
callback and a `save` callback; everything task-specific stays in the script.

Distributed runs are detected from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK):
gloo on CPU, nccl on CUDA. All ranks use the same seed, so their RNG streams (dropout, drop-path)
stay in step and the state saved by rank 0 is every rank's state; the data differ by rank through
the DistributedSampler.
"""
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

# -- devices and processes ----------------------------------------------------------------------
@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or torch_dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """One process (`device` 'auto' = CUDA when available, else CPU; or 'cpu', 'cuda', 'cuda:1'),
    or one of several under torchrun (RANK set): cuda:LOCAL_RANK with nccl, or CPU with gloo."""
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if int(os.environ.get("RANK", -1)) == -1:
        if device == "auto":
            device = "cuda" if use_cuda else "cpu"
        return DistInfo(0, 1, 0, torch.device(device))
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over processes (a no-op in a single process)."""
    if torch_dist.is_initialized():
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast_context(device: torch.device, amp: bool) -> Callable:
    """Chosen once per run: `with autocast():` is bf16 autocast when `amp`, else a no-op."""
    if not amp:
        return nullcontext
    return partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


# -- optimisation --------------------------------------------------------------------------------
def build_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float
              ) -> torch.optim.SGD:
    """SGD over the parameters with requires_grad only (frozen weights get no state)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 1.0) -> float:
    """Learning rate for (0-based) `iteration` of `total`: base_lr * (1 - it/total)^power."""
    return base_lr * (1.0 - iteration / total) ** power


# -- data ----------------------------------------------------------------------------------------
class InfiniteBatches:
    """Training batches forever, epoch after epoch, starting after `start_iter` iterations.

    Each epoch shuffles with `DistributedSampler(seed=seed)` + `set_epoch(epoch)` (the order is a
    function of seed and epoch only; each rank takes its share) and calls `dataset.set_epoch`
    (augmentation draws from (seed, epoch, index)). Incomplete batches are dropped. Resuming at
    iteration k skips straight to the k-th batch without loading the skipped samples. The
    DataLoader gets its own generator, so building one never consumes the global torch RNG.
    """

    def __init__(self, dataset: Dataset, batch_size: int, dist: DistInfo, seed: int,
                 workers: int = 0, start_iter: int = 0):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.workers = workers
        self.start_iter = start_iter
        self.pin = dist.device.type == "cuda"
        self.sampler = DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank,
                                          shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(dataset)} training images cannot fill one batch of "
                             f"{batch_size} on each of {dist.world_size} process(es)")

    def __iter__(self) -> Iterator[dict]:
        epoch, skip = divmod(self.start_iter, self.per_epoch)
        while True:
            self.sampler.set_epoch(epoch)
            self.dataset.set_epoch(epoch)
            indices = list(self.sampler)
            bs = self.batch_size
            batches = [indices[i * bs:(i + 1) * bs] for i in range(skip, self.per_epoch)]
            loader = DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                pin_memory=self.pin,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, skip = epoch + 1, 0


# -- logging -------------------------------------------------------------------------------------
def jsonable(x):
    """NaN/inf become null (JSON has no NaN); tuples become lists; tensors become numbers."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


class JSONLLogger:
    """One JSON object per line in `path` (appended: a resumed run continues the same file);
    only the main process writes. Each record gets an `event` name and a wall-clock `timestamp`."""

    def __init__(self, path: str, enabled: bool):
        self.path = path
        self.file = open(path, "a") if enabled else None

    def log(self, event: str, **record) -> None:
        if self.file is None:
            return
        record = {"event": event, **record, "timestamp": time.time()}
        self.file.write(json.dumps(jsonable(record)) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# -- the loop ------------------------------------------------------------------------------------
class TrainingDiverged(RuntimeError):
    """The loss (or, at a checkpoint, a trained weight) stopped being finite."""


def params_finite(model: nn.Module) -> bool:
    """Whether every trainable parameter is finite on every process."""
    bad = sum(int(not torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    return all_reduce_sum_(torch.tensor(float(bad))).item() == 0


def train_loop(model: nn.Module, batches: Iterator[dict], loss_fn: Callable,
               optimizer: torch.optim.Optimizer, *, dist: DistInfo, autocast: Callable,
               start_iter: int, iters: int, base_lr: float, lr_power: float, log_every: int,
               eval_every: int, evaluate: Callable, save: Callable,
               logger: JSONLLogger) -> Optional[dict]:
    """Iterations start_iter+1 .. iters; returns the last `evaluate` result (None if none ran).

    Per iteration: poly learning rate, `loss = loss_fn(model, batch)` under `autocast`, the loss
    averaged over processes (the logged value; a non-finite one raises TrainingDiverged before
    any update), backward, step. Every `log_every` iterations a `train` record
    (iter, loss, lr, time per iteration, elapsed). Every `eval_every` iterations (0: only at the
    end) and at the end: `result = evaluate(it)`, then, if the trained weights are finite,
    `save(it, result)` (otherwise TrainingDiverged, leaving the previous checkpoint in place).
    """
    model.train()
    result = None
    bar = tqdm(total=iters, initial=start_iter, disable=not dist.is_main, dynamic_ncols=True,
               desc="train")
    start = window_start = time.perf_counter()
    window = 0
    try:
        for it in range(start_iter, iters):
            lr = poly_lr(base_lr, it, iters, lr_power)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = next(batches)
            with autocast():
                loss = loss_fn(model, batch)
            reduced = all_reduce_sum_(loss.detach().float().clone()) / dist.world_size
            loss_value = reduced.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at iteration {it + 1} "
                                       f"(lr {lr:.3g}); training stopped")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

            done, window = it + 1, window + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if done % log_every == 0 or done == iters:
                now = time.perf_counter()
                logger.log("train", iter=done, loss=loss_value, lr=lr,
                           time=(now - window_start) / window, elapsed=now - start)
                window_start, window = now, 0
            if (eval_every > 0 and done % eval_every == 0) or done == iters:
                result = evaluate(done)
                if not params_finite(model):
                    raise TrainingDiverged(f"trained weights are not finite after iteration "
                                           f"{done}; training stopped")
                save(done, result)
                window_start, window = time.perf_counter(), 0   # keep evaluation out of `time`
    finally:
        bar.close()
    return result

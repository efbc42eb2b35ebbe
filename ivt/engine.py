"""The task-agnostic machinery of training: devices and DDP, seeding, the poly schedule, bf16
autocast, an infinite epoch-aware batch stream, JSONL logging, the optimisation step and the loop
with its NaN guard. Nothing here knows about a task: `ivt.trainer` drives it with a task's
loss, evaluation and checkpointing callbacks.

Distributed runs are detected from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK):
gloo on CPU, nccl on CUDA. All ranks start from the same seed (dropout and drop-path draw in step);
the data differ by rank through the DistributedSampler, and a checkpoint keeps every rank's RNG
state (`ivt.checkpoint.every_rank_rng_state`), since a task may draw differently on each.
"""
import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterator, Optional, Tuple

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from tqdm import tqdm

from .models.backbone import count_parameters


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


def select_device(name: str) -> torch.device:
    """`--device`: 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'; anything
    else, or CUDA on a machine without it, is a ValueError naming the flag. 'cuda:N' also
    becomes the current device: the Triton kernels, CUDA graphs and events run on that one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                         f"device(s)")
    if device.index is not None:
        torch.cuda.set_device(device)
    return device


def setup_distributed(device: str = "auto") -> DistInfo:
    """One process (`device` as `select_device` reads it), or one of several under torchrun
    (RANK set): cuda:LOCAL_RANK with nccl (and gloo for CPU tensors), or CPU with gloo."""
    chosen = select_device(device)
    use_cuda = chosen.type == "cuda"
    if int(os.environ.get("RANK", -1)) == -1:
        return DistInfo(0, 1, 0, chosen)
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    # with CUDA, nccl for CUDA tensors and gloo for CPU ones: the evaluation's confusion matrices
    # and the finiteness check before a save are reduced on the CPU (nccl alone has no CPU backend)
    torch_dist.init_process_group(backend="cpu:gloo,cuda:nccl" if use_cuda else "gloo")
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
def poly_lr(base_lr: float, iteration: int, total: int, power: float = 1.0,
            min_lr: float = 0.0) -> float:
    """Learning rate for (0-based) `iteration` of `total`, mmseg's poly schedule:
    (base_lr - min_lr) * (1 - it/total)^power + min_lr."""
    return (base_lr - min_lr) * (1.0 - iteration / total) ** power + min_lr


def clip_gradients(params: list, max_norm: float = 0.0, max_value: float = 0.0,
                   foreach: Optional[bool] = None) -> None:
    """Clamp every gradient value to +-`max_value`, then scale the gradients to a total norm of
    at most `max_norm` (each 0: off)."""
    if max_value > 0:
        torch.nn.utils.clip_grad_value_(params, max_value, foreach=foreach)
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=foreach)


# -- data ----------------------------------------------------------------------------------------
def own_process_group(worker_id: int = 0) -> None:
    """DataLoader `worker_init_fn`: the workers leave a stop to the main process (`StopRequest`),
    which finishes its iteration, writes the checkpoint and shuts them down.

    A Ctrl-C (or `kill -- -PGID`) reaches every process of the run's process group: the workers
    get a group of their own. A SIGTERM sent to every process of the run (systemd's and a batch
    scheduler's cgroup-wide stop) would still kill a worker, and the main process with it, in
    the middle of an iteration: a worker waits for SIGTERM in a thread of its own and exits only
    on its parent's, the one the DataLoader sends a worker that does not exit."""
    os.setpgrp()
    if not hasattr(signal, "sigwaitinfo"):                         # macOS
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})     # this thread and the next

    def wait_for_parent() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)                   # as torch's own worker handler does on its parent's SIGTERM

    threading.Thread(target=wait_for_parent, daemon=True).start()


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
                                collate_fn=getattr(self.dataset, "collate_fn", None),
                                worker_init_fn=own_process_group,
                                generator=torch.Generator().manual_seed(self.seed + epoch))
            yield from loader
            epoch, skip = epoch + 1, 0


# -- evaluation ----------------------------------------------------------------------------------
@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """`with evaluation_mode(model) as net:` the module inside any DDP wrapper, in eval mode
    (the previous mode is restored after). Under DDP, rank 0's buffers (BatchNorm running
    statistics, which each process updates from its own batches) are broadcast first, so every
    process evaluates the weights rank 0 checkpoints."""
    net = unwrap(model)
    if torch_dist.is_initialized():
        for buffer in net.buffers():
            torch_dist.broadcast(buffer, src=0)
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


def shard(dataset: Dataset, dist: DistInfo, workers: int = 0,
          collate_fn: Optional[Callable] = None) -> Iterator[Tuple[int, dict]]:
    """(index, batch of one) for every world_size-th item of `dataset`, this process's share.
    Batches of one, so that evaluation images may differ in size. The main process shows a
    progress bar of its share (removed when done, so a training run's bar stays as it was)."""
    indices = list(range(dist.rank, len(dataset), dist.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=1, num_workers=workers,
                        collate_fn=collate_fn, worker_init_fn=own_process_group,
                        generator=torch.Generator())
    bar = tqdm(loader, desc="evaluate", unit="image", leave=False, dynamic_ncols=True,
               disable=not dist.is_main)
    return ((indices[i], batch) for i, batch in enumerate(bar))      # the bar closes at the end


def gather_metric(metric, empty: Callable):
    """A metric holding every process's records: each process's `metric` (per-image records with
    a `merge` method) gathered and merged into `empty()`; the metric itself in one process."""
    if not torch_dist.is_initialized():
        return metric
    parts = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, metric)
    merged = empty()
    for part in parts:
        merged.merge(part)
    return merged


# -- logging -------------------------------------------------------------------------------------
def check_output(path, flag: str, folder: bool) -> None:
    """Raise ValueError naming `flag` unless `path` can be written as a folder (`folder`) or a
    file: not the other kind already, and its first existing parent a writable folder. Called
    before the work, so that a bad path does not fail after it."""
    p = Path(path)
    kind = "folder" if folder else "file name"
    if p.exists():                                   # a folder to write into, a file to replace
        if p.is_dir() != folder:
            raise ValueError(f"{flag} {path} is a {'file' if folder else 'folder'}; give a "
                             f"{kind}")
        if not os.access(p, os.W_OK | (os.X_OK if folder else 0)):
            raise ValueError(f"{flag} {path} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, so nothing can be written under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {parent} is not writable")


def jsonable(x):
    """NaN/inf become null (JSON has no NaN); tuples become lists; tensors and numpy arrays
    become numbers or (nested) lists of them."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = x.tolist()                      # a Python number for one element of 0 dimensions
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
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
    """The loss (or, at a checkpoint, a trained weight; in evaluation, an output) stopped being
    finite."""


def check_finite_output(output: torch.Tensor, dataset, index: int, what: str) -> None:
    """Raise TrainingDiverged naming the image (`dataset.image_paths[index]`) unless every value
    of the model's `output` for it (`what` it is) is finite: an evaluation would otherwise score
    NaN as some class, map or box."""
    if not torch.isfinite(output).all():
        raise TrainingDiverged(f"{dataset.image_paths[index]}: NaN or inf in the model's {what}")


class RunInterrupted(Exception):
    """The run stopped on a signal after iteration `iteration`, its checkpoint written."""

    def __init__(self, iteration: int, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} after iteration {iteration}")
        self.iteration, self.signum = iteration, signum


class StopRequest:
    """While active (`with StopRequest(enabled) as stop:`), the first SIGINT (Ctrl-C) or SIGTERM
    sets `stop.signum` instead of killing the process, so that the loop stops between two
    iterations with a checkpoint; a second signal acts at once, as usual. Disabled (under
    torchrun, where the processes would have to agree on the iteration), it never fires."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled, self.signum, self.previous = enabled, None, {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        for s, handler in self.previous.items():      # the next one is not intercepted
            signal.signal(s, handler)
        print(f"\n{signal.Signals(signum).name}: stopping after this iteration and writing the "
              f"checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def params_finite(model: nn.Module) -> bool:
    """Whether every trainable parameter is finite on every process."""
    bad = sum(int(not torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)
    return all_reduce_sum_(torch.tensor(float(bad))).item() == 0


def describe_parameters(model: nn.Module) -> str:
    """One line: trainable / total parameters of the model and of its backbone."""
    net = unwrap(model)
    total_t, total = count_parameters(net, trainable_only=True), count_parameters(net)
    line = f"parameters: {total_t:,} / {total:,} trainable ({100.0 * total_t / total:.2f}%)"
    backbone = getattr(net, "backbone", None)
    if backbone is not None:
        line += (f"; backbone {count_parameters(backbone, trainable_only=True):,} / "
                 f"{count_parameters(backbone):,} trainable")
    return line


class EagerStep:
    """One optimisation step in eager mode: `step(batch, lr) -> loss` (detached, on the device;
    reading it is left to the caller, so nothing here waits for the GPU).

    Sets every parameter group's lr to `lr * group['lr_mult']`, computes `loss_fn(model, batch)`
    under `autocast`, backpropagates, clamps gradient values to +-`clip_value` and the gradient
    norm to `clip_grad` (each 0: off), steps.
    `ivt.graph_step.GraphedTrainStep` is the same step captured in a CUDA graph.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer,
                 autocast: Callable, clip_grad: float = 0.0, clip_value: float = 0.0):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.autocast, self.clip_grad, self.clip_value = autocast, clip_grad, clip_value
        self.params = [p for g in optimizer.param_groups for p in g["params"]]

    def __call__(self, batch: dict, lr: float) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.params, self.clip_grad, self.clip_value)
        self.optimizer.step()
        return loss.detach().float()


def train_loop(model: nn.Module, batches: Iterator[dict], step: Callable, *, dist: DistInfo,
               start_iter: int, iters: int, lr_at: Callable[[int], float], log_every: int,
               eval_every: int, evaluate: Callable, save: Callable, logger: JSONLLogger,
               save_every: int = 0, stop: Optional[StopRequest] = None) -> Optional[dict]:
    """Iterations start_iter+1 .. iters; returns the last `evaluate` result (None if none ran).

    Per iteration: `loss = step(batch, lr_at(it))` (a device tensor), added to a device-side sum;
    nothing is read back from the device. Every `log_every` iterations, before every evaluation
    and at the end, the mean loss since the last record is averaged over processes and read
    once: a `train` record (iter, loss, lr, time per iteration, elapsed), and a non-finite loss
    raises TrainingDiverged. Every `eval_every` iterations (0: only at the end) and at the end:
    `result = evaluate(it)`, then, if the trained weights are finite, `save(it, result)`; so
    the last checkpoint written is always the last finite one. Every `save_every` iterations
    (0: never) and when `stop` has caught a signal: `save(it, None)` without evaluating; after
    the latter, RunInterrupted, also for a signal caught during an evaluation or save (after
    it, with no further iteration; after the last iteration's, the run is complete).
    """
    model.train()
    result = None
    bar = tqdm(total=iters, initial=start_iter, disable=not dist.is_main, dynamic_ncols=True,
               desc="train")
    start = window_start = time.perf_counter()
    window, loss_sum = 0, None
    try:
        for it in range(start_iter, iters):
            lr = lr_at(it)
            loss = step(next(batches), lr)
            loss_sum = loss if loss_sum is None else loss_sum + loss
            done, window = it + 1, window + 1
            bar.update(1)
            evaluate_now = (eval_every > 0 and done % eval_every == 0) or done == iters
            stopping = stop is not None and stop.signum is not None
            save_now = evaluate_now or stopping or (save_every > 0 and done % save_every == 0)
            if done % log_every == 0 or evaluate_now or stopping:
                mean = (all_reduce_sum_(loss_sum.clone()) / (window * dist.world_size)).item()
                if not math.isfinite(mean):
                    where = (f"at iteration {done}" if window == 1 else
                             f"in iterations {done - window + 1}..{done}")
                    raise TrainingDiverged(f"loss is {mean} {where} (lr {lr:.3g}); "
                                           f"training stopped")
                now = time.perf_counter()
                logger.log("train", iter=done, loss=mean, lr=lr,
                           time=(now - window_start) / window, elapsed=now - start)
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                window_start, window, loss_sum = now, 0, None
            if save_now:
                if evaluate_now:
                    result = evaluate(done)
                if not params_finite(model):
                    raise TrainingDiverged(f"trained weights are not finite after iteration "
                                           f"{done}; training stopped")
                save(done, result if evaluate_now else None)
                window_start = time.perf_counter()   # keep evaluation out of `time`
            # also a signal caught during this evaluation or save; after the last iteration's,
            # the run is complete and saved, and the caller (a demo chaining runs, a shell loop)
            # still hears of the signal
            if stop is not None and stop.signum is not None and (stopping or save_now):
                raise RunInterrupted(done, stop.signum)
    finally:
        bar.close()
    return result

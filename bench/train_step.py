"""Benchmark one training step: full fine-tuning, frozen backbone, IV-tuning reference and fast.

    python bench/train_step.py                        # on a GPU: Swin-L 384 batch 8 and
                                                      # EVA02-L 512 batch 2; writes its section
                                                      # of docs/benchmarks.md and --json if given
    TRITON_INTERPRET=1 python bench/train_step.py --device cpu --out docs/benchmarks.md
                                                      # CPU proxies of the documented small
                                                      # cases (ivt:fused under the interpreter)

Every model is this repository's `build_segmentor(backbone, 9, tuning, ...)` with random weights
(the numbers do not depend on the values), a 9-class Segformer head, cross-entropy on random
labels, AdamW (fused), bf16 autocast on the GPU with the frozen Linear and conv weights stored in
bf16, as the train scripts' --amp does (`ivt.precision`: the same results). Modes, named
`<tuning>[:<impl>[:<memory>]]` after `ivt.fast.make_fast(model, impl, memory)`, applied to the
built model (the train scripts' --impl and --memory):

    full           all parameters train (the paper's baseline)
    full:fast      that with the backbone's fast forward (EVA02, DINOv2, MAE only: EVA02's q and
                   k rotated together as complex numbers; Swin has none without adapters)
    freeze         the backbone is frozen, only the head trains (the floor of any PETL method)
    freeze:fast    that with the backbone's fast forward (as full:fast)
    ivt            IV-tuning, the readable reference forward (impl "reference")
    ivt:fast       IV-tuning, the fast forward: same parameters, same results
    ivt:fast:checkpoint  that with every block checkpointed
    ivt:fast:recompute   that with the frozen sub-layers keeping only their inputs, recomputed up
                   to their last Linear in backward
    ivt:fused      (GPU) the fast forward with every Hybrid Adapter, its residual and internal
                   prompt as Triton kernels (`kernels/hybrid_adapter.py`)
    ivt:fused:checkpoint    (GPU) that with every block checkpointed
    ivt:fused:checkpoint:4  that with the first 4 blocks checkpointed (on Swin, stages 1 and 2,
                   where most of the activations are)
    ivt:fused:recompute     ivt:fused with the frozen sub-layers recomputed
    ivt:fused:checkpoint:2+recompute  the first 2 blocks checkpointed (on Swin, stage 1), the
                   others' frozen sub-layers recomputed: the CPU proxies' memory-target mode
    full+math, ivt:fused+math (GPU, Swin only) full and ivt:fused with the window attention
                   computed explicitly, as timm's Swin does (`attention="math"`)
and, for the CPU proxies only, full fine-tuning as a GPU would count it and where the fast
step's operators go:
    full+gpu_attention  (Swin) full, its window attention counted as one fused kernel forward
                   and one backward (on the CPU its trained position bias, a mask the CPU's
                   fused attention cannot differentiate, sends it to SDPA's math path)
    empg_only:fast the fast forward of the `empg_only` variant: the IR stem and EMPG, no HA/IPA
                   (so the frozen blocks' forward and input-gradient backward, plus the head)
    empg_ha:fast   the `empg_ha` variant: that plus every Hybrid Adapter (ivt:fast adds the IPAs)

GPU, per mode: eager step (the trainer's `EagerStep`) and the whole step in one CUDA graph
(`ivt.graph_step.GraphedTrainStep`): median wall ms over `--steps` steps after `--warmup`
warm-up steps (CUDA events); GPU busy ms (sum of CUDA kernel durations in one profiled eager
step); CUDA kernels per step; peak memory; then inference latency (no grad, bf16, eager and
graphed) of the frozen visible model against the IV-tuned models, with the GPU busy ms and
kernels of one profiled eager forward. Each profiled call also keeps its costliest kernels
(grouped by name: total us and launches; TOP_KERNELS of them in the JSON, 8 in the markdown),
which say where a mode's extra GPU time goes.

CPU proxies (`--device cpu`), per mode, for anyone without a GPU:
* operators per training step: aten operators dispatched in one step (forward, backward,
  optimizer), counted with a TorchDispatchMode, views, detach and allocations of no elements
  excluded (they launch no kernel; torch 2.11's activation checkpointing allocates one such
  tensor a call, 2.13's none), plus one per Triton launch for the fused modes, whose kernels
  run under Triton's CPU interpreter (TRITON_INTERPRET=1; the interpreter's own tensor copies
  are not counted);
* bytes held for backward: after the forward and the loss, the storages of every tensor the
  step produced that is still alive (so held by the autograd graph or a checkpoint), without
  parameters, buffers and inputs; each storage counted once.
Targets: in one IV-tuning mode, bytes held <= 0.5x full fine-tuning's and operators <= 1.5x
its, like for like: full+gpu_attention on Swin, full:fast on the ViTs, and with --amp as the GPU
step runs.
"""
import argparse
import datetime
import gc
import math
import json
import statistics
import sys
import textwrap
import traceback
import weakref
from contextlib import nullcontext
from functools import partial
from pathlib import Path

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)             # the repository's packages, not this folder's scripts

import kernels  # noqa: E402
from bench.kernels import tile_sizes  # noqa: E402
from bench.profiling import kernel_time, profile_once_before_timing  # noqa: E402
from bench.sections import write_atomic, write_section  # noqa: E402
from bench.compile_check import interpreter_launches  # noqa: E402
from ivt.fast import make_fast  # noqa: E402
from ivt.models.segmentor import build_segmentor  # noqa: E402
from ivt.precision import store_frozen_weights  # noqa: E402

# mode -> (tuning, options): `impl` and `memory` go to `make_fast`, the others to the builder
MODES = {"full": ("full", {}), "freeze": ("freeze", {}), "ivt": ("ivt", {}),
         "ivt:fast": ("ivt", {"impl": "fast"}),
         "ivt:fast:checkpoint": ("ivt", {"impl": "fast", "memory": "checkpoint"}),
         "ivt:fast:recompute": ("ivt", {"impl": "fast", "memory": "recompute"})}
DECOMPOSITION = {"empg_only:fast": ("ivt", {"impl": "fast", "variant": "empg_only"}),
                 "empg_ha:fast": ("ivt", {"impl": "fast", "variant": "empg_ha"})}
# GPU only (on the CPU without the interpreter it is ivt:fast): the Hybrid Adapters as Triton
# kernels
FUSED = {"ivt:fused": ("ivt", {"impl": "fused"}),
         "ivt:fused:checkpoint": ("ivt", {"impl": "fused", "memory": "checkpoint"}),
         "ivt:fused:checkpoint:4": ("ivt", {"impl": "fused", "memory": "checkpoint:4"}),
         "ivt:fused:recompute": ("ivt", {"impl": "fused", "memory": "recompute"}),
         "ivt:fused:checkpoint:2+recompute": ("ivt", {"impl": "fused",
                                                      "memory": "checkpoint:2+recompute"})}
# Swin only: its window attention computed explicitly, as timm's Swin does (`attention="math"`)
# instead of with scaled_dot_product_attention
SWIN_ONLY = {"full+math": ("full", {"attention": "math"}),
             "ivt:fused+math": ("ivt", {"impl": "fused", "attention": "math"})}
# the CPU proxies only, Swin only: full fine-tuning with its window attention counted as a GPU
# runs it. Swin's position bias trains, and the CPU's fused attention has no gradient for its
# mask, so there `full`'s attention falls back to SDPA's math path (about 20 operators a block,
# the attention probabilities held for backward); a GPU's memory-efficient attention kernel
# computes that gradient: one kernel forward, one backward (`gpu_attention`)
CPU_ONLY = {"full+gpu_attention": ("full", {})}
# the ViTs only (on Swin the same as full and freeze): full fine-tuning and the frozen model with
# the backbone's fast forward, which IV-tuning's fast modes are to be compared with too
VIT_ONLY = {"full:fast": ("full", {"impl": "fast"}), "freeze:fast": ("freeze", {"impl": "fast"})}
GPU_CASES = [("swin_l", 384, 8), ("eva02_l", 512, 2)]
# most wanted first, so that a run cut short has the comparisons that matter
GPU_ORDER = ["full", "ivt:fused", "ivt:fused:recompute", "full:fast", "full+math", "ivt:fused+math",
             "ivt:fused:checkpoint:2+recompute", "ivt", "freeze", "ivt:fast",
             "ivt:fused:checkpoint:4", "ivt:fast:recompute", "ivt:fused:checkpoint",
             "ivt:fast:checkpoint"]
INFERENCE_MODES = ["freeze", "freeze:fast", "ivt:fused", "ivt:fast", "ivt"]
# the CPU proxies of the fused modes (their kernels under Triton's interpreter)
CPU_FUSED = ["ivt:fused", "ivt:fused:checkpoint:4", "ivt:fused:recompute",
             "ivt:fused:checkpoint:2+recompute"]
# (backbone, (H, W), batch, head width, amp, what the case shows); amp: bf16 autocast with the
# frozen weights stored in bf16, as the GPU step runs (the train scripts' --amp)
AMP_NOTE = "as the GPU step runs"
CPU_CASES = [("swin_t", (128, 96), 2, 256, False, "the default case"),
             ("swin_t", (224, 224), 2, 256, False, "the size the CPU-proxy targets are set at"),
             ("swin_nano", (64, 96), 2, 64, False, "what `tests/test_bench_proxies.py` measures"),
             ("swin_l", (64, 64), 1, 256, False, "the real model's operator count; the tiny input "
              "makes its byte ratios unrepresentative"),
             ("eva02_b", (64, 64), 1, 256, False, "EVA02's prompt changes every block, so only a "
              "block's two IPAs are batched"),
             ("swin_t", (128, 96), 2, 256, True, AMP_NOTE),
             ("eva02_b", (64, 64), 1, 256, True, AMP_NOTE)]
NUM_CLASSES = 9
TOP_KERNELS = 25     # the costliest kernels of each profiled call kept in the JSON
# the markdown sections this script (re)writes: (begin marker, end marker)
GPU_SECTION = ("<!-- bench/train_step.py: begin -->", "<!-- bench/train_step.py: end -->")
CPU_SECTION = ("<!-- bench/train_step.py --device cpu: begin -->",
               "<!-- bench/train_step.py --device cpu: end -->")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cuda: time the real models; cpu: the CPU proxies (aten ops per step, "
                        "bytes held for backward) on a small backbone (default: cuda)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write the numbers here (GPU runs: after every measured mode)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="markdown file whose section this run (re)writes: the GPU section, "
                        "after every measured mode so an interrupted run keeps what it measured, "
                        "or with --device cpu the CPU-proxy section (default: "
                        "docs/benchmarks.md on a GPU; with --device cpu, print only)")
    p.add_argument("--modes", nargs="+", default=None,
                   choices=(list(MODES) + list(DECOMPOSITION) + list(FUSED) + list(SWIN_ONLY)
                            + list(VIT_ONLY) + list(CPU_ONLY)),
                   help="what to measure: full fine-tuning, frozen backbone, IV-tuning "
                        "reference, ivt:fast with --memory keep, checkpoint or recompute; "
                        "ivt:fused (the Hybrid Adapters as Triton kernels; on the CPU under "
                        "TRITON_INTERPRET=1) with keep, checkpoint, checkpoint:4, recompute or "
                        "checkpoint:2+recompute; "
                        "full+math and ivt:fused+math (Swin's explicit window attention); "
                        "full:fast and freeze:fast (the ViTs' fast forward); with "
                        "--device cpu also the decomposition empg_only:fast, empg_ha:fast "
                        "and full+gpu_attention (Swin's full fine-tuning with its attention "
                        "counted as a GPU's fused kernel) (default: all that apply to the "
                        "device)")
    p.add_argument("--inference-modes", nargs="*", default=INFERENCE_MODES, metavar="MODE",
                   choices=INFERENCE_MODES,
                   help="GPU inference latency of these models (default: "
                        f"{' '.join(INFERENCE_MODES)}; none: no inference)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="GPU: merge these earlier runs' --json files (same card) under this "
                        "run's rows, or with --render alone, write their table without measuring")
    p.add_argument("--render", action="store_true",
                   help="measure nothing: write the GPU section of --out from the --merge files")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median; default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps (default 3)")
    p.add_argument("--cases", nargs="+", default=None, metavar="NAME:SIZE:BATCH",
                   help="GPU cases (default: swin_l:384:8 eva02_l:512:2)")
    p.add_argument("--backbone", default=None,
                   help="CPU proxies of this one backbone (with --size, --batch, --head-dim) "
                        "instead of the documented cases: " + ", ".join(
                            f"{n} {h}x{w} batch {b} head {d}" + (" amp" if amp else "")
                            for n, (h, w), b, d, amp, _ in CPU_CASES))
    p.add_argument("--size", type=int, nargs=2, default=(128, 96), metavar=("H", "W"),
                   help="CPU proxy input size with --backbone (default 128 96)")
    p.add_argument("--batch", type=int, default=2, help="CPU proxy batch with --backbone "
                                                        "(default 2)")
    p.add_argument("--amp", action="store_true",
                   help="CPU proxies of --backbone under bf16 autocast with the frozen weights "
                        "stored in bf16, as the GPU step runs (the train scripts' --amp)")
    p.add_argument("--head-dim", type=int, default=256,
                   help="Segformer head width (GPU cases, and --backbone; default 256)")
    p.add_argument("--adapter-tiles", type=tile_sizes, default=None, metavar="TOKENS:CHANNELS",
                   help="CPU proxies: run the fused Hybrid Adapter's kernels on these tiles, "
                        "e.g. 256:64: the same operators, a few fewer bytes held (the per-tile "
                        "BatchNorm partials), about 3x less interpreter time (default: the "
                        "tiles a GPU would use)")
    return p.parse_args(argv)


# -- one case ------------------------------------------------------------------------------------
def build(backbone: str, mode: str, size, device, head_dim: int, amp: bool = False):
    """(model, optimizer) on `device`, random weights, seed 0; on a GPU, or with amp, the frozen
    weights stored in bf16 for bf16 autocast, as the scripts' --amp does."""
    tuning, options = {**MODES, **DECOMPOSITION, **FUSED, **SWIN_ONLY, **VIT_ONLY,
                       **CPU_ONLY}[mode]
    options = dict(options)
    impl, memory = options.pop("impl", "reference"), options.pop("memory", "keep")
    torch.manual_seed(0)
    with torch.device(device):
        model = build_segmentor(backbone, NUM_CLASSES, tuning, img_size=tuple(size),
                                head_dim=head_dim, **options)
    make_fast(model, impl, memory)
    if amp or torch.device(device).type == "cuda":
        store_frozen_weights(model, torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=True)


def make_batch(size, batch: int, device, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    H, W = size
    return {"vis": torch.randn(batch, 3, H, W, generator=g).to(device),
            "ir": torch.randn(batch, 3, H, W, generator=g).to(device),
            "label": torch.randint(0, NUM_CLASSES, (batch, H // 4, W // 4), generator=g).to(device)}


def loss_fn(model, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["vis"], batch["ir"]).float(), batch["label"])


def eager_step(model, optimizer, autocast):
    def step(batch, lr, before_backward=lambda: None):
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast():
            loss = loss_fn(model, batch)
        before_backward()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


# -- CPU proxies ---------------------------------------------------------------------------------
class Launches:
    """Counts the GPU kernels the CPU runs stand-ins for, and tells whether one is running
    (`inside`): the operators a stand-in dispatches are not counted."""

    def __init__(self):
        self.count, self.inside = 0, 0

    def run(self, work):
        """work() as one kernel launch."""
        self.count += 1
        self.inside += 1
        try:
            return work()
        finally:
            self.inside -= 1


class TritonLaunches(Launches):
    """Triton kernel launches run by Triton's CPU interpreter (TRITON_INTERPRET=1), each one
    launch: the interpreter's own tensor copies are operators of no GPU kernel."""

    def _launch(self, run, fn, args, kwargs):
        return self.run(run)

    def __enter__(self):
        self._hook = interpreter_launches(self._launch)
        self._hook.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hook.__exit__(*exc)


class _AttentionKernel(torch.autograd.Function):
    """`F.scaled_dot_product_attention` as a GPU's memory-efficient attention kernel runs it:
    one launch forward, one backward (`Launches.run`), holding q, k, v, the mask, the output and
    the float32 log-sum-exp of every row (what that kernel keeps for its backward). The values
    are SDPA's own on the CPU: forward without autograd, backward by differentiating it again.

    forward(launches, sdpa, q, k, v, mask, scale), q, k, v (B, h, N, d), mask None or
    broadcastable to (B, h, N, N) -> (B, h, N, d)."""

    @staticmethod
    def forward(ctx, launches, sdpa, q, k, v, mask, scale):
        out, lse = launches.run(lambda: (sdpa(q, k, v, attn_mask=mask, scale=scale),
                                         q.new_empty(q.shape[:-1], dtype=torch.float32)))
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.launches, ctx.sdpa, ctx.scale = launches, sdpa, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, mask, _, _ = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:6]

        def gradients():
            with torch.enable_grad():
                inputs = [None if t is None else t.detach().requires_grad_(need)
                          for t, need in zip((q, k, v, mask), needs)]
                out = ctx.sdpa(*inputs[:3], attn_mask=inputs[3], scale=ctx.scale)
                wanted = [t for t in inputs if t is not None and t.requires_grad]
                got = iter(torch.autograd.grad(out, wanted, grad))
            return [next(got) if t is not None and t.requires_grad else None for t in inputs]
        return (None, None, *ctx.launches.run(gradients), None)


class gpu_attention:
    """Within it, `F.scaled_dot_product_attention` (without dropout or a causal mask) runs as
    `_AttentionKernel`, its launches counted by `launches`."""

    def __init__(self, launches: Launches):
        self.launches, self.sdpa = launches, F.scaled_dot_product_attention

    def __call__(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 **kwargs):
        if dropout_p or is_causal or kwargs:
            raise ValueError("gpu_attention counts SDPA without dropout, causal mask or options")
        return _AttentionKernel.apply(self.launches, self.sdpa, q, k, v, attn_mask, scale)

    def __enter__(self):
        F.scaled_dot_product_attention = self
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self.sdpa


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten operators outside kernel launches (`Launches`), excluding views,
    detach and allocations of no elements."""

    def __init__(self, launches: Optional[Launches] = None):
        super().__init__()
        self.count, self.launches = 0, launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inside = self.launches is not None and self.launches.inside
        nothing = func is torch.ops.aten.empty.memory_format and math.prod(args[0]) == 0
        if not (inside or nothing or func.is_view or func is torch.ops.aten.detach.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


class TensorTracker(TorchDispatchMode):
    """Weak references to every tensor an operator produces."""

    def __init__(self):
        super().__init__()
        self.refs = []

    def alive_bytes(self, excluded) -> int:
        """Bytes of the storages produced so far that are still alive, each counted once, those
        whose data pointer is in `excluded` left out."""
        gc.collect()
        storages = {}
        for ref in self.refs:
            t = ref()
            if t is not None and t.untyped_storage().data_ptr() not in excluded:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.refs.append(weakref.ref(t))
        return out


def cpu_proxies(backbone: str, size, batch: int, modes, head_dim: int = 256,
                adapter_tiles=None, amp: bool = False) -> dict:
    """{mode: {operators, aten_ops, triton_launches, bytes_for_backward, trainable}} plus ratios
    to full fine-tuning. Modes run the PyTorch reference kernels, except the fused modes, whose
    Triton kernels run under the interpreter (each launch counts as one operator), with the
    Hybrid Adapter's tiles a GPU would use, or `adapter_tiles` = (tokens, channels).
    The interpreter runs each program's operations one by one in Python, so its time grows with
    the number of programs: on swin_nano 64 x 96, a fused step took 76 s at a GPU's 32-token
    tiles and 22 s at 256 (2026-12-02). The tiles change no launch (operators are equal); the
    bytes held change only by the BatchNorm's per-tile partial sums, which share h's allocation
    (2D floats a tile: 9.52 against 9.46 MB on swin_nano). With amp, the step runs under
    bf16 autocast with the frozen weights stored in bf16, as the GPU step does."""
    result = {"backbone": backbone, "size": list(size), "batch": batch, "head_dim": head_dim,
              "amp": amp, "torch": torch.__version__, "modes": {}}
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16) if amp else nullcontext
    if adapter_tiles:
        result["adapter_tiles"] = list(adapter_tiles)
    data = make_batch(size, batch, "cpu")
    previous = kernels.backend()
    try:
        for mode in modes:
            if mode in FUSED and not kernels.interpreter_ready():
                raise SystemExit(f"mode {mode} on the CPU runs its Triton kernels under the "
                                 f"interpreter, which needs {kernels.INTERPRETER_NEEDS}")
            kernels.set_backend("torch")
            model, optimizer = build(backbone, mode, size, "cpu", head_dim, amp)
            step = eager_step(model, optimizer, autocast)
            # optimizer state and caches; a fused mode's kernels take their PyTorch references
            # here (the same parameters, state and caches; the interpreter's time is the measured
            # step's only)
            step(data, 1e-4)
            kernels.set_backend("triton" if mode in FUSED else "torch")
            if mode in FUSED and adapter_tiles:
                step = fixed_tiles(step, adapter_tiles)
            # bytes held for backward: what the forward + loss produced that is still alive
            # before backward (kept by the autograd graph or a checkpoint)
            own = list(model.parameters()) + list(model.buffers()) + list(data.values())
            excluded = {t.untyped_storage().data_ptr() for t in own}
            launches = (TritonLaunches() if mode in FUSED else
                        Launches() if mode in CPU_ONLY else None)
            held = []
            with (launches if mode in FUSED else nullcontext()), \
                    (gpu_attention(launches) if mode in CPU_ONLY else nullcontext()):
                counter, tracker = OpCounter(launches), TensorTracker()
                with counter, tracker:
                    step(data, 1e-4, lambda: held.append(tracker.alive_bytes(excluded)))
            n_launches = 0 if launches is None else launches.count
            held = held[0]
            result["modes"][mode] = {
                "operators": counter.count + n_launches, "aten_ops": counter.count,
                "triton_launches" if mode in FUSED else "attention_kernels": n_launches,
                "bytes_for_backward": held,
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    finally:
        kernels.set_backend(previous)
    if "full" in result["modes"]:
        full = result["modes"]["full"]
        for row in result["modes"].values():
            row["ops_vs_full"] = row["operators"] / full["operators"]
            row["bytes_vs_full"] = row["bytes_for_backward"] / full["bytes_for_backward"]
    return result


def fixed_tiles(step, tiles):
    """`step` run with the fused Hybrid Adapter's tiles fixed to tiles = (tokens, channels)."""
    from kernels.hybrid_adapter import fixed_tile_sizes

    def tiled(*args):
        with fixed_tile_sizes(*tiles):
            return step(*args)
    return tiled


def proxy_table(result: dict, note: str = "") -> str:
    tiles = result.get("adapter_tiles")
    caption = (f"`{result['backbone']}`, {result['size'][0]}x{result['size'][1]}, batch "
               f"{result['batch']}, head width {result['head_dim']}"
               + (f", fused adapter tiles {tiles[0]}x{tiles[1]}" if tiles else "")
               + (", bf16 autocast, frozen weights in bf16" if result.get("amp") else "")
               + (f" ({note})" if note else "") + ":")
    lines = [textwrap.fill(caption, 100), "",
             "| mode | operators / step | vs full | MB held for backward | vs full | trainable |",
             "|---|---|---|---|---|---|"]
    for mode, r in result["modes"].items():
        ops, held = (f"{r[key]:.2f}x" if key in r else "-"        # "-": `full` not measured
                     for key in ("ops_vs_full", "bytes_vs_full"))
        lines.append(f"| {mode} | {r['operators']:,} | {ops} | "
                     f"{r['bytes_for_backward'] / 1e6:,.2f} | {held} | {r['trainable']:,} |")
    return "\n".join(lines)


def cpu_tables(results, notes) -> str:
    """The CPU-proxy section: how the numbers are counted, then one table per case."""
    text = ("Measured by `TRITON_INTERPRET=1 python bench/train_step.py --device cpu` on "
            f"{datetime.date.today().isoformat()}, torch {torch.__version__}, no GPU. Operators: "
            "the aten operators of one training step (forward, backward, fused AdamW), views, "
            "detach and allocations of no elements excluded, plus one per Triton launch of the "
            "`ivt:fused` modes, run under "
            "Triton's CPU interpreter (whose own tensor copies are not counted); the other modes "
            "run the PyTorch reference kernels. MB held for backward: the storages the forward "
            "made that are still alive before backward, parameters and inputs excluded. "
            "Memory: `checkpoint[:N]` recomputes every block (the first N) in backward, "
            "`recompute` the frozen sub-layers up to their last Linear. `empg_only:fast` is "
            "`ivt:fast` without Hybrid Adapters and IPAs, `empg_ha:fast` without IPAs. "
            "`full:fast` and `freeze:fast` (the ViTs only) are full fine-tuning and the frozen "
            "model with the backbone's fast forward. "
            "`full+gpu_attention` (Swin): full fine-tuning with its window attention counted "
            "as a GPU runs it, one fused kernel forward and one backward holding what that "
            "kernel holds (on the CPU, `full`'s trained position bias sends it to SDPA's math "
            "path). The cases in bf16 autocast run the step as the GPU does (the train "
            "scripts' --amp): autocast's casts are operators, the frozen weights are stored in "
            "bf16, full fine-tuning's trained ones are cast every step.")
    lines = ["## Training step: CPU proxies", "", textwrap.fill(text, 100), ""]
    for result, note in zip(results, notes):
        lines += [proxy_table(result, note), ""]
    return "\n".join(lines)


# -- GPU -----------------------------------------------------------------------------------------
def median_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def gpu_train_case(backbone: str, size: int, batch: int, mode: str, args) -> dict:
    from ivt.graph_step import GraphedTrainStep
    device = torch.device("cuda")
    autocast = partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    data = make_batch((size, size), batch, device)
    row = {}
    for kind in ("eager", "graph"):
        try:
            model, optimizer = build(backbone, mode, (size, size), device, args.head_dim)
            step = (eager_step(model, optimizer, autocast) if kind == "eager"
                    else GraphedTrainStep(model, loss_fn, optimizer, autocast))
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()     # before warm-up: the graph's capture counts
            for _ in range(max(args.warmup, 2)):
                step(data, 1e-4)
            torch.cuda.synchronize()
            row[f"{kind}_ms"] = median_ms(lambda: step(data, 1e-4), args.steps)
            row[f"{kind}_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            if kind == "eager":
                row["gpu_busy_ms"], row["kernels"], row["top_kernels"] = kernel_time(
                    lambda: step(data, 1e-4), TOP_KERNELS)
                row["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        except Exception as exc:     # a failed capture keeps the eager figures (OOM included)
            if kind == "eager":
                raise
            traceback.print_exc()
            row["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        model = optimizer = step = None          # free this kind's model before the next
        gc.collect()
        torch.cuda.empty_cache()
    return row


def gpu_inference_case(backbone: str, size: int, batch: int, mode: str, args) -> dict:
    device = torch.device("cuda")
    model, _ = build(backbone, mode, (size, size), device, args.head_dim)
    model.eval()
    data = make_batch((size, size), batch, device)
    autocast = partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)

    def forward():
        with torch.no_grad(), autocast():
            return model(data["vis"], data["ir"])

    for _ in range(args.warmup):
        forward()
    row = {"eager_ms": median_ms(forward, args.steps)}
    row["gpu_busy_ms"], row["kernels"], row["top_kernels"] = kernel_time(forward, TOP_KERNELS)
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward()
    torch.cuda.current_stream().wait_stream(side)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        with torch.cuda.graph(graph):
            model(data["vis"], data["ir"])
    row["graph_ms"] = median_ms(graph.replay, args.steps)
    model = graph = None
    gc.collect()
    torch.cuda.empty_cache()
    return row


def gpu_jobs(cases: list, modes: list, inference: list = INFERENCE_MODES) -> list:
    """(case index, "train" or "inference", mode) in the order they are measured: the first three
    training modes of every case, then every case's inference, then the other training modes,
    each for every case, so that a run cut short by a time limit still holds the comparisons
    that matter for both cases."""
    first, rest = modes[:3], modes[3:]
    indices = range(len(cases))
    jobs = ([(i, "train", m) for i in indices for m in first]
            + [(i, "inference", m) for i in indices for m in inference]
            + [(i, "train", m) for m in rest for i in indices])
    return [(i, kind, m) for i, kind, m in jobs if applies(m, cases[i][0])]


def applies(mode: str, backbone: str) -> bool:
    """Whether `mode` is measured on `backbone`: SWIN_ONLY and CPU_ONLY modes on Swin, VIT_ONLY
    on the rest."""
    swin = backbone.startswith("swin")
    return not ((mode in {**SWIN_ONLY, **CPU_ONLY} and not swin) or (mode in VIT_ONLY and swin))


def gpu_benchmark(args, on_progress=lambda result: None) -> dict:
    import triton
    cases = ([(n, int(s), int(b)) for n, s, b in (c.split(":") for c in args.cases)]
             if args.cases else GPU_CASES)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "date": datetime.date.today().isoformat(),
              "frozen_weights": "bfloat16",
              "cases": [{"backbone": n, "size": s, "batch": b, "train": {}, "inference": {}}
                        for n, s, b in cases]}
    measure = {"train": gpu_train_case, "inference": gpu_inference_case}
    profile_once_before_timing()
    for i, kind, mode in gpu_jobs(cases, args.modes or GPU_ORDER, args.inference_modes):
        backbone, size, batch = cases[i]
        row = row_or_error(measure[kind], backbone, size, batch, mode, args)
        result["cases"][i][kind][mode] = row
        print(backbone, kind, mode, row, flush=True)
        on_progress(result)
    return result


def row_or_error(case_fn, *args) -> dict:
    """case_fn(*args), or {"error": ...} when the card runs out of memory or the mode fails: the
    other modes and cases are still measured and the table says which one did not run (a
    failure's traceback goes to stderr)."""
    try:
        return case_fn(*args)
    except torch.cuda.OutOfMemoryError:
        error = (f"out of memory ({torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} "
                 "GB card)")
    except Exception as exc:                 # one broken mode must not cost the whole run
        traceback.print_exc()
        error = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    gc.collect()
    torch.cuda.empty_cache()
    return {"error": error}


def best_ms(row: dict) -> float:
    """A measured training mode's best step time: eager, or graphed where the capture worked."""
    return min(row["eager_ms"], row.get("graph_ms", row["eager_ms"]))


def merge_results(results: list) -> dict:
    """Several GPU runs' JSON as one: per case and mode the later run's row wins; the header
    (card, versions, date) is the last run's. Runs on different cards are refused."""
    devices = {r["device"] for r in results}
    if len(devices) > 1:
        raise SystemExit(f"--merge: runs on different cards ({', '.join(sorted(devices))}) "
                         "cannot share a table")
    merged = {**results[-1], "cases": [], "runs": sum(r.get("runs", 1) for r in results)}
    for result in results:
        for case in result["cases"]:
            key = (case["backbone"], case["size"], case["batch"])
            into = next((c for c in merged["cases"]
                         if (c["backbone"], c["size"], c["batch"]) == key), None)
            if into is None:
                into = {**case, "train": {}, "inference": {}}
                merged["cases"].append(into)
            for kind in ("train", "inference"):
                into[kind].update(case[kind])
    return merged


def gpu_tables(result: dict) -> str:
    lines = ["## Training step", "",
             f"Train step, measured by `python bench/train_step.py` on {result['device']}, "
             f"{result['date']}; torch {result['torch']}, triton {result['triton']}. Random "
             "weights, 9-class Segformer head, bf16 autocast"
             + (" with the frozen Linear and conv weights stored in bf16 (`ivt.precision`, as "
                "`--amp` does)" if result.get("frozen_weights") == "bfloat16" else "")
             + ", fused AdamW; median of the timed steps after warm-up (CUDA events); GPU busy = "
             "CUDA kernel time summed over one profiled eager step; graph = the whole step in "
             "one CUDA graph (`ivt.graph_step.GraphedTrainStep`); peak = "
             "`torch.cuda.max_memory_allocated` over the warm-up and timed steps (the graph's "
             "capture included)."
             + (f" Merged from {result['runs']} runs of the script on this card model "
                "(`--merge`): a ratio may compare rows of different runs."
                if result.get("runs", 1) > 1 else ""), ""]
    for case in result["cases"]:
        train = case["train"]
        full = train.get("full")
        lines += [f"**{case['backbone']}, {case['size']}x{case['size']}, batch {case['batch']}**",
                  "", "| mode | eager ms | graph ms | best vs full's best | GPU busy ms | kernels "
                  "| kernels vs full | peak GB (eager / graph) | eager peak vs full | trainable |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        measured = full is not None and "error" not in full
        best_full = best_ms(full) if measured else None
        for mode, r in train.items():
            if "error" in r:
                lines.append(f"| {mode} | {r['error']} | | | | | | | | |")
                continue
            ratio, kernels, peak = (
                (f"{best_ms(r) / best_full:.2f}x", f"{r['kernels'] / full['kernels']:.2f}x",
                 f"{r['eager_peak_gb'] / full['eager_peak_gb']:.2f}x") if measured
                else ("-", "-", "-"))
            graph_ms = f"{r['graph_ms']:.1f}" if "graph_ms" in r else "capture failed"
            graph_peak = f"{r['graph_peak_gb']:.2f}" if "graph_peak_gb" in r else "-"
            lines.append(f"| {mode} | {r['eager_ms']:.1f} | {graph_ms} | {ratio} | "
                         f"{r['gpu_busy_ms']:.1f} | {r['kernels']:,} | {kernels} | "
                         f"{r['eager_peak_gb']:.2f} / {graph_peak} | {peak} | "
                         f"{r['trainable']:,} |")
        inf = case["inference"]
        frozen = inf.get("freeze", {}).get("graph_ms")
        lines += ["", "| inference (no grad, bf16) | eager ms | graph ms | GPU busy ms | kernels "
                  "| vs frozen (graph) |", "|---|---|---|---|---|---|"]
        for mode, r in inf.items():
            if "error" in r:
                lines.append(f"| {mode} | {r['error']} | | | | |")
                continue
            ratio = f"{r['graph_ms'] / frozen:.2f}x" if frozen else "-"
            busy = f"{r['gpu_busy_ms']:.1f} | {r['kernels']:,}" if "kernels" in r else "- | -"
            lines.append(f"| {mode} | {r['eager_ms']:.1f} | {r['graph_ms']:.1f} | {busy} | "
                         f"{ratio} |")
        lines += [""] + top_kernel_lines(case)
    return "\n".join(lines)


def top_kernel_lines(case: dict, shown: int = 8) -> list:
    """Where each mode's GPU time goes: its `shown` costliest kernels (from the profiled eager
    step or forward; the JSON keeps the top TOP_KERNELS), as markdown lines."""
    lines = []
    for kind in ("train", "inference"):
        for mode, r in case[kind].items():
            if r.get("top_kernels"):
                lines.append(f"* {kind} `{mode}`: " + ", ".join(
                    f"`{name[:48]}` {us / 1e3:.2f} ms ({launches})"
                    for name, us, launches in r["top_kernels"][:shown]))
    if lines:
        lines = ["Costliest kernels (name, total ms in one profiled eager call, launches):", ""] \
            + lines + [""]
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.device == "cpu":
        modes = args.modes or (list(MODES) + list(CPU_ONLY) + list(VIT_ONLY)
                               + (CPU_FUSED if kernels.interpreter_ready() else [])
                               + list(DECOMPOSITION))
        cases = ([(args.backbone, tuple(args.size), args.batch, args.head_dim, args.amp, "")]
                 if args.backbone else CPU_CASES)
        results = []
        for backbone, size, batch, head_dim, amp, note in cases:
            results.append(cpu_proxies(backbone, size, batch,
                                       [m for m in modes if applies(m, backbone)], head_dim,
                                       args.adapter_tiles, amp))
            print(proxy_table(results[-1], note) + "\n", flush=True)
        result = {"cases": results}
        if args.out:
            write_section(Path(args.out), *CPU_SECTION,
                          cpu_tables(results, [case[-1] for case in cases]))
            print(f"wrote {args.out}")
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=1))
            print(f"wrote {args.json}")
        return
    out = Path(args.out or ROOT / "docs" / "benchmarks.md")
    earlier = [json.loads(Path(f).read_text()) for f in args.merge or []]

    def write(runs: list) -> dict:
        """Merge `runs`, write their section of --out (and --json); returns the merged run."""
        result = merge_results(runs)
        write_section(out, *GPU_SECTION, gpu_tables(result))
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=1))
        return result

    if args.render:
        if not earlier:
            raise SystemExit("--render writes the table of the --merge files: name at least one")
        print(gpu_tables(write(earlier)))
        return
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu for the CPU proxies")
    if set(args.modes or ()) & set(CPU_ONLY):
        raise SystemExit(f"{', '.join(CPU_ONLY)}: a CPU proxy (on a GPU it is full)")

    result = write(earlier + [gpu_benchmark(args, on_progress=lambda r: write(earlier + [r]))])
    print(gpu_tables(result))
    print(f"wrote {out}" + (f" and {args.json}" if args.json else ""))


if __name__ == "__main__":
    main()

"""Benchmark the Triton kernels against the eager reference and torch.compile of it.

SimAM and the partial conv (forward, forward + backward), and the fused Hybrid Adapter (inference,
and training forward + backward; its time also split by kernel).

    python bench/kernels.py                      # on a GPU; writes docs/kernels.md
    python bench/kernels.py --dtype bfloat16 --out /tmp/bf16.md
    python bench/kernels.py --tiny --out /tmp/t.md   # CPU under TRITON_INTERPRET=1: checks the
                                                     # script end to end, no timing claims

Inputs are channels-last views of random token tensors, as the model makes them. Times are
device times in microseconds: the CUDA kernel durations of one call, summed from the profiler
and averaged over 20 calls after warm-up (the wall time of a small autograd call measures the
host, not the kernels). The floor is the bytes an ideal kernel must move (forward: read x,
write y; forward + backward adds read x, read grad, write grad_x) at the copy bandwidth measured
in the same run (a large tensor copy, read + write). The script rewrites only its own section
of the output file.
"""
import argparse
import datetime
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # `import kernels` is the package, not this file

from bench.sections import write_section  # noqa: E402

# (B, C, H, W), where it occurs in Swin-L IV-tuning
REAL_SHAPES = [((8, 8, 96, 96), "EMPG (d1=8) and stage-1 IPA (d3=8), 384 input, batch 8"),
               ((8, 64, 96, 96), "stage-1 HA (d2=64), 384 input, batch 8"),
               ((2, 8, 128, 128), "EMPG (d1=8) and stage-1 IPA (d3=8), 512 input, batch 2"),
               ((2, 64, 128, 128), "stage-1 HA (d2=64), 512 input, batch 2")]
LARGE_SHAPES = [((8, 64, 256, 256), "large"), ((32, 64, 256, 256), "large")]
TINY_SHAPES = [((2, 8, 7, 9), "tiny")]
# the inference Hybrid Adapter (d2 = 64) on (B, H*W, C) tokens, given as (B, C, H, W)
ADAPTER_SHAPES = [((8, 192, 96, 96), "Swin-L stage-1 HA, 384 input, batch 8"),
                  ((8, 768, 24, 24), "Swin-L stage-3 HA, 384 input, batch 8"),
                  ((2, 1024, 32, 32), "EVA02-L HA, 512 input, batch 2")]
TINY_ADAPTER_SHAPES = [((2, 24, 7, 9), "tiny")]
PASSES = {"forward": 2, "forward+backward": 5}  # tensor-sized reads + writes of an ideal kernel
OPS = ["hybrid_adapter", "simam", "partial_conv"]
BEGIN, END = "<!-- bench/kernels.py: begin -->", "<!-- bench/kernels.py: end -->"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "kernels.md"),
                        help="markdown file the table is written to")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny shapes on the CPU under TRITON_INTERPRET=1, no torch.compile")
    parser.add_argument("--ops", nargs="+", default=OPS, choices=OPS,
                        help=f"what to measure, in this order (default: {' '.join(OPS)})")
    parser.add_argument("--adapter-tiles", nargs="+", type=tile_sizes, default=[],
                        metavar="M:C",
                        help="also time the fused Hybrid Adapter (Triton column only) with tiles "
                             "of M tokens and channel steps of C, e.g. 32:32 32:128 (default: "
                             "only the sizes the kernels choose per shape, "
                             "kernels.hybrid_adapter.tile_sizes)")
    parser.add_argument("--no-compile", action="store_true",
                        help="skip the torch.compile column (its compilation takes most of a "
                             "run's time)")
    return parser.parse_args()


def timer(tiny: bool):
    """A function (fn, grad_to_none) -> (microseconds per call, {kernel name: us per call}):
    CUDA kernel time from the profiler, or on the CPU the wall time of one call (and no split)."""
    if tiny:
        def time_once(fn, grad_to_none):
            fn()
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e6, {}
        return time_once

    from bench.profiling import kernel_time

    def time_device(fn, grad_to_none, calls=20):
        """CUDA kernel time per call (profiler) over `calls` calls, after 3 warm-up calls."""
        def call():
            for t in grad_to_none or ():
                t.grad = None
            fn()
        for _ in range(3):
            call()

        def calls_in_a_row():
            for _ in range(calls):
                call()
        busy_ms, _, by_kernel = kernel_time(calls_in_a_row)
        return busy_ms * 1e3 / calls, {name: us / calls for name, us, _ in by_kernel}
    return time_device


def copy_bandwidth(device, measure) -> float:
    """Bytes per second of a large device-to-device copy, counting read + write."""
    import torch

    numel = 1 << 14 if device.type == "cpu" else 1 << 28  # 1 GiB of float32 on the GPU
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    us, _ = measure(lambda: dst.copy_(src), None)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def channels_last_map(shape, dtype, device, requires_grad):
    """A random (B, C, H, W) map viewed from a (B, H*W, C) token tensor, as the model does."""
    import torch

    B, C, H, W = shape
    z = torch.randn(B, H * W, C, device=device, dtype=dtype)
    return z.view(B, H, W, C).permute(0, 3, 1, 2).detach().requires_grad_(requires_grad)


def tile_sizes(text: str) -> tuple:
    """'64:32' -> (64, 32), powers of two of at least 16 (Triton's matmul tiles)."""
    try:
        m, c = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not BLOCK_M:BLOCK_C, e.g. 64:32")
    if any(v < 16 or v & (v - 1) for v in (m, c)):
        raise argparse.ArgumentTypeError(f"{text!r}: tile sizes are powers of two >= 16")
    return m, c


def compiled(fn, args):
    """torch.compile(fn), or None (a "-" column) with --tiny or --no-compile."""
    import torch
    return None if args.tiny or args.no_compile else torch.compile(fn)


def benchmark_rows(args, on_row=lambda rows, bandwidth, name: None):
    """Measure every (op, shape, direction), the fused Hybrid Adapter first; calls
    on_row(rows so far, copy bandwidth, device name) after each; returns the same three."""
    import torch

    import kernels
    import kernels.hybrid_adapter

    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = getattr(torch, args.dtype)
    measure = timer(args.tiny)
    bandwidth = copy_bandwidth(device, measure)
    # one graph per shape and direction (the setting is `cache_size_limit` before torch 2.6)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else \
        "cache_size_limit"
    setattr(torch._dynamo.config, limit, 64)
    ops = {"simam": (kernels.simam_reference, kernels.simam_triton),
           "partial_conv": (kernels.partial_conv_residual_reference,
                            kernels.partial_conv_residual_triton)}
    shapes = TINY_SHAPES if args.tiny else REAL_SHAPES + LARGE_SHAPES
    name = "CPU (Triton interpreter)" if args.tiny else torch.cuda.get_device_name(device)
    rows = []

    def add(row):
        rows.append(row)
        print(format_row(row, bandwidth), flush=True)
        on_row(rows, bandwidth, name)

    print(HEADER, flush=True)
    for op_name in args.ops:
        if op_name == "hybrid_adapter":
            adapter_rows(args, device, dtype, measure, bandwidth, add)
            for tiles in args.adapter_tiles:
                try:
                    with kernels.hybrid_adapter.fixed_tile_sizes(*tiles):
                        adapter_rows(args, device, dtype, measure, bandwidth, add, tiles)
                except Exception:      # a tile size the GPU cannot run: say so, measure the rest
                    print(f"tiles {tiles[0]}:{tiles[1]} failed:", flush=True)
                    traceback.print_exc()
            continue
        reference, fused = ops[op_name]
        impls = {"eager": reference, "compile": compiled(reference, args), "triton": fused}
        for shape, where in shapes:
            for direction, passes in PASSES.items():
                backward = direction != "forward"
                x = channels_last_map(shape, dtype, device, backward)
                inputs = [x]
                if op_name == "partial_conv":
                    cp = shape[1] // 4
                    inputs += [torch.randn(cp, 1, 3, 3, device=device, dtype=dtype,
                                           requires_grad=backward),
                               torch.randn(cp, device=device, dtype=dtype,
                                           requires_grad=backward), cp]
                grad = torch.randn_like(x)
                tensors = [t for t in inputs if isinstance(t, torch.Tensor)]

                def run(fn):
                    if backward:
                        fn(*inputs).backward(grad)
                    else:
                        with torch.no_grad():
                            fn(*inputs)

                times = {name: None if fn is None else measure(lambda fn=fn: run(fn), tensors)[0]
                         for name, fn in impls.items()}
                moved = passes * x.numel() * x.element_size()
                add(dict(op=op_name, shape=shape, where=where, direction=direction,
                         times=times, floor_us=moved / bandwidth * 1e6,
                         gbps=moved / (times["triton"] * 1e-6) / 1e9))
    return rows, bandwidth, name


def adapter_rows(args, device, dtype, measure, bandwidth, add, tiles=None):
    """The Hybrid Adapter with its residual and the internal prompt added, residual + HA(x) +
    extra with residual = x as the sequential block calls it: at inference and in a training
    forward + backward (batch-statistics BatchNorm, dropout mask given, gradients of x, extra and
    every parameter), each with extra as tokens and as the rank-8 factors the model passes, and
    at inference also with the next LayerNorm made in bfloat16 (`kernels.NextNorm`, as the
    Swin and EVA02 blocks ask for it). The floor moves x, extra (as tokens) and the output once
    at inference (and the normalised output, half a pass in bfloat16), and also reads the
    output gradient and writes x's in training. Each row goes to `add`. With
    tiles = (BLOCK_M, BLOCK_C), only the Triton column, with the kernels' tile sizes set so."""
    import torch

    import kernels
    import kernels.hybrid_adapter as fused
    from ivt.fast.adapters import kernel_weights
    from ivt.models.ivtuning import HybridAdapter

    inference = {"eager": kernels.hybrid_adapter_eval_reference,
                 "compile": compiled(kernels.hybrid_adapter_eval_reference, args),
                 "triton": kernels.hybrid_adapter_eval_triton}
    training = {"eager": kernels.hybrid_adapter_train_reference,
                "compile": compiled(kernels.hybrid_adapter_train_reference, args),
                "triton": kernels.hybrid_adapter_train}
    if tiles is not None:
        inference, training = ({"eager": None, "compile": None, "triton": impls["triton"]}
                               for impls in (inference, training))
    for shape, where in TINY_ADAPTER_SHAPES if args.tiny else ADAPTER_SHAPES:
        B, C, H, W = shape
        chosen = tiles or fused.tile_sizes(B * H * W, C, device)
        where = f"{where}; tiles of {chosen[0]} tokens x {chosen[1]} channels" + (
            "" if tiles else " (chosen)")
        adapter = HybridAdapter(C, 16 if args.tiny else 64).to(device)
        weights = kernel_weights(adapter)
        x, extra = (torch.randn(B, H * W, C, device=device, dtype=dtype) for _ in range(2))
        keep = torch.rand(B * H * W, adapter.down.out_features, device=device) > 0.1
        grad = torch.randn_like(x)
        # the internal prompt as the model passes it: rank-8 factors, made in the kernel (the
        # floor moves x and the output only), in training with their gradients
        factors = kernels.LowRankExtra(torch.randn(B * H * W, 8, device=device, dtype=dtype),
                                       torch.randn(8, C, device=device) * 8 ** -0.5,
                                       torch.randn(C, device=device))
        # and the next sub-layer's LayerNorm of the output, in bfloat16 (autocast's)
        norm = kernels.NextNorm(torch.ones(C, device=device), torch.zeros(C, device=device),
                                1e-5, torch.bfloat16)
        leaves = [x, extra, *factors] + list(adapter.parameters())

        def train(fn, ext):
            for t in leaves:
                t.requires_grad_(True)
            fn(x, x, ext, (H, W), weights, keep, 0.1, 0.1, False).backward(grad)

        for direction, impls, passes, ext, nxt in (
                ("inference", inference, 3, extra, None),
                ("inference, prompt as factors", inference, 2, factors, None),
                ("inference, factors, next LayerNorm", inference, 2.5, factors, norm),
                ("training", training, 6, extra, None),
                ("training, prompt as factors", training, 5, factors, None)):
            if direction.startswith("inference"):
                with torch.no_grad():
                    timings = {name: None if fn is None else measure(
                        lambda fn=fn, ext=ext, nxt=nxt: fn(x, x, ext, (H, W), weights, nxt),
                        None) for name, fn in impls.items()}
            else:
                timings = {name: None if fn is None else measure(
                    lambda fn=fn, ext=ext: train(fn, ext), leaves) for name, fn in impls.items()}
            times = {name: None if t is None else t[0] for name, t in timings.items()}
            moved = passes * x.numel() * x.element_size()
            add(dict(op="hybrid_adapter", shape=shape, where=where, direction=direction,
                     times=times, floor_us=moved / bandwidth * 1e6,
                     gbps=moved / (times["triton"] * 1e-6) / 1e9,
                     per_kernel=timings["triton"][1]))


HEADER = ("| op | shape (B, C, H, W) | where | direction | eager us | compile us | triton us "
          "| floor us | triton GB/s | % of copy BW |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def format_row(row, bandwidth) -> str:
    t = row["times"]
    cells = [row["op"], "x".join(map(str, row["shape"])), row["where"], row["direction"]]
    cells += ["-" if t[k] is None else f"{t[k]:,.1f}" for k in ("eager", "compile", "triton")]
    cells += [f"{row['floor_us']:,.1f}", f"{row['gbps']:,.0f}",
              f"{100 * row['gbps'] * 1e9 / bandwidth:.0f}%"]
    return "| " + " | ".join(cells) + " |"


def render(rows, bandwidth, device_name, args) -> str:
    import torch
    import triton

    lines = ["## Kernels", "",
             f"Measured by `python bench/kernels.py{' --tiny' if args.tiny else ''}` on "
             f"{device_name}, {datetime.date.today().isoformat()}; torch {torch.__version__}, "
             f"triton {triton.__version__}; {args.dtype}, channels-last inputs; times are "
             "device time per call (CUDA kernel durations from the profiler, mean of 20 calls).",
             "",
             "Copy bandwidth measured in the same run (read + write): "
             f"{bandwidth / 1e9:,.0f} GB/s. The floor is the bytes an ideal kernel moves at that "
             "bandwidth (forward: x read, y written; forward + backward also reads x and grad and "
             "writes grad_x); launch latency is not included.", ""]
    if args.tiny:
        lines += ["Tiny shapes on the CPU under the Triton interpreter: this run only checks that "
                  "the script works. The times mean nothing.", ""]
    lines += [HEADER] + [format_row(row, bandwidth) for row in rows]
    split = [row for row in rows if row.get("per_kernel")]
    if split:
        lines += ["", "Where the fused Hybrid Adapter's time goes (Triton column; us per call, "
                  "by kernel, largest first):", "",
                  "| shape | direction | kernels |", "|---|---|---|"]
        for row in split:
            ranked = sorted(row["per_kernel"].items(), key=lambda kv: -kv[1])
            lines.append(f"| {'x'.join(map(str, row['shape']))} | {row['direction']} | "
                         + ", ".join(f"`{name[:40]}` {us:,.1f}" for name, us in ranked) + " |")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if args.tiny:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels' modules are imported

    def save(rows, bandwidth, device_name):     # after every row: a run cut short keeps them
        write_section(Path(args.out), BEGIN, END, render(rows, bandwidth, device_name, args))

    benchmark_rows(args, save)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

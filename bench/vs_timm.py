"""This repository's visible backbones against timm's, on the same architecture and input.

    python bench/vs_timm.py [--json FILE]        # on a GPU with timm installed: Swin-L 384
                                                 # batch 8 and EVA02-L (patch 16) 512 batch 2;
                                                 # rewrites its section of docs/benchmarks.md
    python bench/vs_timm.py --tiny --device cpu  # small models: checks the script, times nothing
    python bench/vs_timm.py --proxies --out docs/benchmarks.md
                                                 # CPU proxies (anyone can check): Swin-T 224
                                                 # and EVA02-B 224, batch 2; rewrites its section

Issue 10 asks for this repository's Swin and EVA02 to be at least as fast as timm's. Both sides
are built with the same configuration and random weights (timm's parameter names are ours, and
`tests/test_timm_golden.py` checks that the outputs are equal on the same weights); drop-path is
0 on both, so both do identical work. Per model: a full fine-tuning forward + backward of the
backbone alone (loss = the sum of the four feature maps' means: ours are the backbone's four
NCHW maps, timm's are `forward_intermediates` at the same stages or blocks, so the backward runs
through every block) and an inference forward (no grad), both under bf16 autocast on the GPU:
median wall ms over `--steps` calls after `--warmup` (CUDA events); on the GPU also one
profiled training call per side, its kernels grouped by name, and the table of the kernels whose
time differs most between the two sides (where our backbone loses time to timm's). Swin is also
measured with `attention="math"`, the window attention computed as timm's Swin computes it,
EVA02 also with the fast forward (`--impl fast`, which full fine-tuning takes too).
EVA02's maps differ in one respect: ours are resized to strides 4-32 (four bilinear
interpolations), timm's are not.

`--proxies` counts instead of timing, on the CPU, what `bench/train_step.py --device cpu` counts
for a whole step, here for the same training call: the aten operators dispatched (views, detach
and empty allocations excluded) and the MB of the storages the forward made that are still alive
before backward (parameters and input excluded), under bf16 autocast; each
`scaled_dot_product_attention` call, on either side, counts as the one fused kernel a GPU runs
forward and one backward, holding what that kernel holds (`train_step.gpu_attention`). timm's
Swin computes its window attention explicitly (its fused path is off by default), operator by
operator as on a GPU.

timm is not a dependency of the project; this script is for machines that have it.
"""
import argparse
import datetime
import json
import statistics
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)             # the repository's packages, not this folder's scripts

from bench.profiling import kernel_time, profile_once_before_timing  # noqa: E402
from bench.sections import write_atomic, write_section  # noqa: E402
from bench.train_step import Launches, OpCounter, TensorTracker, gpu_attention  # noqa: E402
from ivt.fast import make_fast  # noqa: E402
from ivt.models import build_backbone  # noqa: E402
from ivt.models.eva02 import EVA02_CONFIGS, feature_blocks  # noqa: E402
from ivt.models.swin import SWIN_CONFIGS  # noqa: E402

BEGIN, END = "<!-- bench/vs_timm.py: begin -->", "<!-- bench/vs_timm.py: end -->"
PROXY_BEGIN = "<!-- bench/vs_timm.py --proxies: begin -->"
PROXY_END = "<!-- bench/vs_timm.py --proxies: end -->"
# our sides of a case and their label in the table: the default build, (Swin) the window
# attention computed explicitly, as timm's Swin does, and (EVA02) the fast forward that
# `make_fast` gives full fine-tuning too (q and k rotated together as complex numbers)
SIDES = [("ours", ""), ("ours_math", ", explicit attention"), ("ours_fast", ", --impl fast")]
# (our backbone name, input size, batch): the GPU cases, and the --tiny ones
CASES = [("swin_l", 384, 8), ("eva02_l", 512, 2)]
TINY_CASES = [("swin_nano", 128, 1), ("eva02_b", 64, 1)]
PROXY_CASES = [("swin_t", 224, 2), ("eva02_b", 224, 2)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="where to time (default cuda; cpu only makes sense with --tiny)")
    p.add_argument("--proxies", action="store_true",
                   help="count on the CPU instead of timing: operators and MB held for "
                        "backward of one training call (swin_t and eva02_b, 224, batch 2)")
    p.add_argument("--tiny", action="store_true",
                   help="small models (swin_nano 128, eva02_b 64, batch 1): checks the script")
    p.add_argument("--steps", type=int, default=10, help="timed calls (median; default 10)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up calls (default 3)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="markdown file whose vs-timm section is (re)written: the GPU section "
                        "(default docs/benchmarks.md on a GPU), or with --proxies the CPU one "
                        "(default: print only)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers here")
    return p.parse_args(argv)


def timm_twin(name: str, size: int) -> tuple:
    """(timm model, its forward to the four feature maps) with our backbone's configuration."""
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    if name in SWIN_CONFIGS:
        c = SWIN_CONFIGS[name]
        model = SwinTransformer(img_size=size, patch_size=4, embed_dim=c.embed_dim,
                                depths=c.depths, num_heads=c.num_heads,
                                window_size=c.window_size, drop_path_rate=0.0, num_classes=0)
        return model, partial(model.forward_intermediates, intermediates_only=True)
    c = EVA02_CONFIGS[name]
    model = Eva(img_size=size, patch_size=c.patch_size, embed_dim=c.embed_dim, depth=c.depth,
                num_heads=c.num_heads, qkv_fused=False, mlp_ratio=c.mlp_hidden / c.embed_dim,
                swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True,
                ref_feat_shape=(c.rope_ref_grid, c.rope_ref_grid), drop_path_rate=0.0,
                num_classes=0)
    return model, partial(model.forward_intermediates, indices=feature_blocks(c.depth),
                          intermediates_only=True)


def ours(name: str, size: int, **options) -> tuple:
    """(our backbone, its forward to the four feature maps), full fine-tuning, drop-path 0."""
    model = build_backbone(name, tuning="full", img_size=size, drop_path_rate=0.0, **options)
    return model, model


def ours_math(name: str, size: int) -> tuple:
    """`ours` with Swin's window attention computed explicitly, as timm's Swin computes it
    (`attention="math"`; timm's fused path is experimental and off by default)."""
    return ours(name, size, attention="math")


def ours_fast(name: str, size: int) -> tuple:
    """`ours` with the fast forward (`ivt.fast.make_fast(model, "fast")`, the train scripts'
    --impl fast): for EVA02, q and k rotated together as complex numbers."""
    model, _ = ours(name, size)
    make_fast(model, "fast")
    return model, model


def timer(device: torch.device):
    """A function returning the wall ms of one call of fn (CUDA events on a GPU)."""
    if device.type == "cuda":
        def ms(fn):
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def ms(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return ms


def measure(build, name: str, size: int, batch: int, args, device: torch.device) -> dict:
    """Median ms of a forward + backward and of an inference forward; parameters; peak GB."""
    torch.manual_seed(0)
    with device:
        model, features = build(name, size)
    model.train()
    x = torch.randn(batch, 3, size, size, device=device)
    autocast = (partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
                if device.type == "cuda" else nullcontext)

    def train_step():
        with autocast():
            loss = sum(f.float().mean() for f in features(x))
        loss.backward()
        model.zero_grad(set_to_none=True)

    def inference():
        with torch.no_grad(), autocast():
            features(x)

    # timm's final norm (`norm`, or `fc_norm` of EVA's pooled head) is built but not applied by
    # forward_intermediates: not counted
    ms, row = timer(device), {"parameters": sum(p.numel() for n, p in model.named_parameters()
                                                if not n.startswith(("norm.", "fc_norm.")))}
    for key, fn in (("train_ms", train_step), ("inference_ms", inference)):
        for _ in range(args.warmup):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row[key] = statistics.median(ms(fn) for _ in range(args.steps))
        if device.type == "cuda" and key == "train_ms":
            row["train_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
            row["train_busy_ms"], row["train_kernels"], row["train_by_kernel"] = kernel_time(
                train_step)
    return row


def proxies(build, name: str, size: int, batch: int) -> dict:
    """Operators and MB held for backward of one training call (forward + backward, as
    `measure`'s) on the CPU under bf16 autocast, SDPA counted as a GPU's fused kernel."""
    torch.manual_seed(0)
    model, features = build(name, size)
    model.train()
    x = torch.randn(batch, 3, size, size)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sum(f.float().mean() for f in features(x))

    forward().backward()                       # caches built on the first call are not counted
    model.zero_grad(set_to_none=True)
    own = list(model.parameters()) + list(model.buffers()) + [x]
    excluded = {t.untyped_storage().data_ptr() for t in own}
    launches = Launches()
    with gpu_attention(launches):
        counter, tracker = OpCounter(launches), TensorTracker()
        with counter, tracker:
            loss = forward()
            held = tracker.alive_bytes(excluded)
            loss.backward()
    return {"operators": counter.count + launches.count, "aten_ops": counter.count,
            "attention_kernels": launches.count, "bytes_for_backward": held,
            "parameters": sum(p.numel() for n, p in model.named_parameters()
                              if not n.startswith(("norm.", "fc_norm.")))}


def kernel_differences(ours: list, theirs: list, shown: int = 10) -> list:
    """The kernels whose GPU time differs most between the two sides' training calls, as
    (name, ours [us, launches], theirs [us, launches]), largest |difference| first."""
    a = {name: (us, n) for name, us, n in ours}
    b = {name: (us, n) for name, us, n in theirs}
    names = sorted(a.keys() | b.keys(),
                   key=lambda k: -abs(a.get(k, (0.0, 0))[0] - b.get(k, (0.0, 0))[0]))
    return [(k, a.get(k, (0.0, 0)), b.get(k, (0.0, 0))) for k in names[:shown]]


def compared(result: dict):
    """(case, its label, our side's row, timm's row) for every side measured beside timm's, in
    the tables' order."""
    for case in (c for c in result["cases"] if "timm" in c):
        for side, label in SIDES:
            if side in case:
                yield case, label, case[side], case["timm"]


def table(result: dict) -> str:
    lines = ["## This repository's backbones against timm's", "",
             f"Measured by `python bench/vs_timm.py{' --tiny' if result['tiny'] else ''}` on "
             f"{result['device']}, {result['date']}; torch {result['torch']}, timm "
             f"{result['timm']}. Random weights, same configuration on both sides, drop-path 0"
             + (", bf16 autocast" if result["device"] != "cpu" else "") + "; median of the "
             "timed calls after warm-up. Train = forward + backward of the backbone alone "
             "(full fine-tuning, no optimizer).", "",
             "| backbone | input, batch | ours train ms | timm train ms | ours / timm | ours "
             "inference ms | timm inference ms | ours / timm |",
             "|---|---|---|---|---|---|---|---|"]
    measured = [case for case in result["cases"] if "timm" in case]
    for case, label, o, t in compared(result):
        lines.append(f"| {case['backbone']}{label} | {case['size']}, {case['batch']} | "
                     f"{o['train_ms']:.1f} | {t['train_ms']:.1f} | "
                     f"{o['train_ms'] / t['train_ms']:.2f}x | {o['inference_ms']:.1f} | "
                     f"{t['inference_ms']:.1f} | "
                     f"{o['inference_ms'] / t['inference_ms']:.2f}x |")
    for case, (side, label) in ((c, s) for c in measured for s in SIDES):
        o, t = case.get(side, {}), case["timm"]
        if "train_by_kernel" not in o or "train_by_kernel" not in t:
            continue
        lines += ["", f"Where {case['backbone']}{label}'s training call differs from timm's (one "
                  f"profiled call each: GPU busy {o['train_busy_ms']:.1f} ms in "
                  f"{o['train_kernels']:,} kernels here, {t['train_busy_ms']:.1f} ms in "
                  f"{t['train_kernels']:,} in timm's; the kernels with the largest differences):",
                  "",
                  "| kernel | ours ms (launches) | timm ms (launches) | ours - timm ms |",
                  "|---|---|---|---|"]
        for name, (us_o, n_o), (us_t, n_t) in kernel_differences(o["train_by_kernel"],
                                                                 t["train_by_kernel"]):
            lines.append(f"| `{name[:70]}` | {us_o / 1e3:.2f} ({n_o}) | {us_t / 1e3:.2f} ({n_t}) "
                         f"| {(us_o - us_t) / 1e3:+.2f} |")
    if result["tiny"]:
        lines += ["", "Tiny models: this run only checks that the script works."]
    return "\n".join(lines) + "\n"


def proxy_table(result: dict) -> str:
    lines = ["## This repository's backbones against timm's: CPU proxies", "",
             f"Measured by `python bench/vs_timm.py --proxies{' --tiny' if result['tiny'] else ''}`"
             f" on {result['date']}; torch {result['torch']}, timm {result['timm']}, no GPU. "
             "One training call of the backbone alone (as the GPU table's), random weights, "
             "drop-path 0, bf16 autocast. Operators: aten operators dispatched, each "
             "`scaled_dot_product_attention` counted as one kernel forward and one backward "
             "(in brackets: those kernels); MB held for backward: what the forward made that is "
             "alive before backward, parameters and input excluded.", "",
             "| backbone | input, batch | ours operators | timm operators | ours / timm | ours MB "
             "held | timm MB held | ours / timm |",
             "|---|---|---|---|---|---|---|---|"]
    for case, label, o, t in compared(result):
        lines.append(f"| {case['backbone']}{label} | {case['size']}, {case['batch']} | "
                     f"{o['operators']:,} ({o['attention_kernels']}) | "
                     f"{t['operators']:,} ({t['attention_kernels']}) | "
                     f"{o['operators'] / t['operators']:.2f}x | "
                     f"{o['bytes_for_backward'] / 1e6:.2f} | "
                     f"{t['bytes_for_backward'] / 1e6:.2f} | "
                     f"{o['bytes_for_backward'] / t['bytes_for_backward']:.2f}x |")
    if result["tiny"]:
        lines += ["", "Tiny models: this run only checks that the script works."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        import timm
    except ImportError:
        raise SystemExit("timm is not installed: this benchmark compares against it "
                         "(pip install timm; it is not a dependency of the project)")
    device = torch.device("cpu" if args.proxies else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny to check the script, or "
                         "--proxies for the CPU proxies")
    out = args.out or (str(ROOT / "docs" / "benchmarks.md") if device.type == "cuda" else None)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "timm": timm.__version__, "tiny": args.tiny, "proxies": args.proxies, "cases": []}
    render = proxy_table if args.proxies else table
    begin, end = (PROXY_BEGIN, PROXY_END) if args.proxies else (BEGIN, END)

    def write():
        """The section of --out and --json: after every side, so that a run cut short by a
        time limit keeps what it measured."""
        if out:
            write_section(Path(out), begin, end, render(result))
        if args.json:
            write_atomic(args.json, json.dumps(result, indent=1))

    cases = TINY_CASES if args.tiny else PROXY_CASES if args.proxies else CASES
    if device.type == "cuda":
        profile_once_before_timing()
    for name, size, batch in cases:
        case = {"backbone": name, "size": size, "batch": batch}
        result["cases"].append(case)
        sides = [("ours", ours), ("timm", timm_twin)]
        sides.append(("ours_math", ours_math) if name in SWIN_CONFIGS else ("ours_fast", ours_fast))
        for side, build in sides:
            case[side] = (proxies(build, name, size, batch) if args.proxies else
                          measure(build, name, size, batch, args, device))
            print(name, side, case[side], flush=True)
            if side == "timm" and case["ours"]["parameters"] != case["timm"]["parameters"]:
                raise SystemExit(f"{name}: {case['ours']['parameters']:,} parameters here, "
                                 f"{case['timm']['parameters']:,} in timm's: not the same model")
            write()
    print(render(result))
    written = ([out] if out else []) + ([args.json] if args.json else [])
    if written:
        print("wrote " + " and ".join(written))


if __name__ == "__main__":
    main()

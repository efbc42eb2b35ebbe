"""Compile every Triton kernel as the IV-tuning models launch it, for GPUs this machine lacks.

    python -m bench.compile_check                          # Swin-L 384 b8, EVA02-L 512 b2; sm_90
    python -m bench.compile_check --arch 80 90 --backbone swin_l

The kernel tests run the kernels under Triton's CPU interpreter, which runs programs a GPU cannot:
one that needs more shared memory than a block may have (the fused adapter's pw1 backward needed
260 KB on sm_90 until this check found it), or that the GPU compiler rejects. This check closes
that gap on a machine without a GPU, in two steps:

1. record, in a child process with TRITON_INTERPRET=1 (so the wrappers take their Triton path on
   CPU tensors): build the backbone, `ivt.fast.make_fast(model, "fused")`, as fake tensors
   (`FakeTensorMode`: shapes and dtypes, no storage, no arithmetic) and run a training forward and
   backward and an inference forward, in float32 and under bfloat16 autocast, with the
   interpreter's launch entry point replaced by a recorder: it keeps each distinct launch (kernel,
   argument types, constexpr values, launch options) and executes nothing;
2. compile, in a child process without the interpreter: `triton.compile` of every recorded launch
   for `GPUTarget("cuda", arch, 32)`, through PTX to a cubin with the ptxas that Triton bundles,
   and check the shared memory it needs against the architecture's per-block limit (a failure);
   report the registers per thread and the register spills `ptxas -v` finds (a slow kernel, not
   a failure: the fused adapter's backward kernels spilled up to 3 KB a thread at 4 warps), and
   for a kernel that spills, how many of the spill loads in its machine code (`cuobjdump -sass`)
   lie inside a loop, where they run every iteration rather than once;
3. from those registers and that shared memory, how many of a kernel's programs one streaming
   multiprocessor holds at once (`programs_per_sm`, the occupancy calculator's rules), and so in
   how many waves each recorded launch runs: 288 programs of which a multiprocessor holds one
   at a time run in 3 waves on 132 multiprocessors, the last 18% full. The waves model the
   launch; they are not a timing, which only a GPU measures (`bench/kernels.py`).

CPU autocast casts the matmuls, convolutions and attention to bfloat16 as CUDA autocast does, so
the recorded dtypes are the GPU run's. Integer arguments are compiled unspecialised (on a GPU the
JIT also specialises values of 1 and multiples of 16: same program, different constants).
"""
import argparse
import concurrent.futures
import importlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Dict, List, Optional, Tuple

# The compiler interface used here (`get_ptxas(arch)`, `triton.knobs`, `ASTSource(constexprs=)`)
# is that of Triton 3.6 and later.
MIN_TRITON = (3, 6)
# Per-block shared memory limit (bytes, opt-in maximum) by compute capability.
SHARED_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448}
# Per-multiprocessor limits by compute capability (the CUDA C++ Programming Guide's technical
# specifications): resident warps, resident blocks, shared memory (bytes). Every one of these
# has 65,536 registers a multiprocessor, allocated to each warp in units of 256, and reserves
# 1 KB of shared memory for each resident block, whose own is allocated in units of 128 bytes.
SM_LIMITS = {80: (64, 32, 167_936), 86: (48, 16, 102_400), 89: (48, 24, 102_400),
             90: (64, 32, 233_472)}
REGISTERS_PER_SM, REGISTER_UNIT = 65_536, 256
SHARED_RESERVED, SHARED_UNIT = 1024, 128
# backbone: (image size, batch); Swin-L and EVA02-L as `bench/train_step.py` measures them, two
# small Swins for a quick check.
CONFIGS = {"swin_l": (384, 8), "eva02_l": (512, 2), "swin_t": (224, 2), "swin_nano": (64, 2)}
TRITON_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "bool": "i1",
                 "int64": "i64", "int32": "i32", "uint8": "u8", "int8": "i8"}


def _launch_record(fn, args: tuple, kwargs: dict) -> dict:
    """One launch as {module, kernel, signature, constexprs, options} (JSON-ready)."""
    import torch
    import triton.language as tl

    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "num_ctas") if k in kwargs}
    signature_of_fn = inspect.signature(fn)
    params = signature_of_fn.parameters
    bound = signature_of_fn.bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs = {}, {}
    for name, value in bound.arguments.items():
        annotation = params[name].annotation
        if annotation is tl.constexpr or annotation == "tl.constexpr" or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPES[str(value.dtype).replace("torch.", "")]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {name} of type {type(value).__name__}")
    return {"module": fn.__module__, "kernel": fn.__name__, "signature": signature,
            "constexprs": constexprs, "options": options}


@contextmanager
def interpreter_launches(handler: Callable[[Callable[[], Any], Any, tuple, dict], Any]):
    """Within it, every kernel launch `kernel[grid](*args, **kwargs)` that Triton's CPU
    interpreter (TRITON_INTERPRET=1) receives goes to handler(run, fn, args, kwargs): fn the
    kernel's Python function, args and kwargs its launch arguments (launch options included)
    with the grid as kwargs["grid"], run() the launch as usual. The one place that hooks the
    interpreter, at `InterpretedFunction.__getitem__`, which every Triton from 3.0 launches
    through: `record` keeps launches without running them, `bench/train_step.py` counts them."""
    from triton.runtime.interpreter import InterpretedFunction

    own = "__getitem__" in vars(InterpretedFunction)      # else inherited (KernelInterface)
    original = InterpretedFunction.__getitem__

    def launcher(self, grid):
        launch = original(self, grid)
        return lambda *args, **kwargs: handler(lambda: launch(*args, **kwargs), self.fn, args,
                                               {**kwargs, "grid": grid})

    InterpretedFunction.__getitem__ = launcher
    try:
        yield
    finally:
        if own:
            InterpretedFunction.__getitem__ = original
        else:
            del InterpretedFunction.__getitem__


def record(backbone: str, size: int, batch: int, multiprocessors: int) -> List[dict]:
    """The distinct Triton launches of a fused IV-tuning training step and inference forward of
    `backbone` (float32 and bfloat16 autocast) on a GPU with that many streaming multiprocessors
    (the fused adapter's tile size depends on it), each with its grids' program counts,
    launch["programs"][backbone]; needs TRITON_INTERPRET=1 (see the module docstring). Nothing
    runs: the tensors are fake and the launches only recorded."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    import kernels
    import kernels.hybrid_adapter as fused
    from ivt.fast import make_fast
    from ivt.models import build_backbone

    if not kernels.triton_interpreter_on():
        raise RuntimeError("recording needs TRITON_INTERPRET=1 (set before `kernels` is imported)")
    launches: Dict[str, dict] = {}

    def recorder(run, fn, args, kwargs):                    # records, never calls run()
        named = {k: v for k, v in kwargs.items() if k != "grid"}
        launch = _launch_record(fn, args, named)
        launch = launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        programs = math.prod(kwargs["grid"])
        launch.setdefault("programs", {}).setdefault(backbone, [])
        if programs not in launch["programs"][backbone]:
            launch["programs"][backbone].append(programs)

    previous = kernels.backend()
    kernels.set_backend("triton")
    try:
        with torch.device("meta"):                 # then storage-less CPU tensors
            model = make_fast(build_backbone(backbone, tuning="ivt", img_size=size), "fused")
        with FakeTensorMode(allow_non_fake_inputs=True), warnings.catch_warnings(), \
                interpreter_launches(recorder), fused.assume_multiprocessors(multiprocessors):
            # the attention-bias cache stamps tables by data pointer, which fake tensors warn about
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            model.to_empty(device="cpu")
            vis, ir = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
            for autocast in (nullcontext, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
                model.train()
                with autocast():
                    loss = sum(m.float().mean() for m in model(vis, ir))
                loss.backward()
                model.eval()
                with autocast(), torch.no_grad():
                    model(vis, ir)
    finally:
        kernels.set_backend(previous)
    return list(launches.values())


def ptxas_usage(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers per thread, bytes of register spill stores + loads per thread) that `ptxas -v`
    reports for the PTX, with the ptxas Triton itself uses for sm_<arch>."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        source, binary = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(source, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"      # as Triton names it
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={gpu}", source, "-o",
                              binary], capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def programs_per_sm(arch: int, warps: int, registers: int, shared: int) -> Tuple[int, str]:
    """(programs of a kernel one multiprocessor of sm_<arch> holds at once, the limit that sets
    it: "registers", "shared", "warps" or "blocks") for programs of `warps` warps, `registers`
    registers a thread and `shared` bytes of shared memory."""
    max_warps, max_blocks, shared_per_sm = SM_LIMITS[arch]
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    per_block = -(-shared // SHARED_UNIT) * SHARED_UNIT + SHARED_RESERVED
    limits = {"registers": REGISTERS_PER_SM // per_warp // warps,
              "shared": shared_per_sm // per_block, "warps": max_warps // warps,
              "blocks": max_blocks}
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def waves(programs: int, resident: int, multiprocessors: int) -> float:
    """Programs over the programs a GPU holds at once: 2.18 runs as 3 waves, the last 18% full."""
    return programs / (resident * multiprocessors)


def spill_loads_in_loops(sass: str) -> Tuple[int, int]:
    """(local-memory loads, LDL, in a kernel's SASS as `cuobjdump -sass` prints it, how many of
    them lie in a loop: between a branch back and its target, both included)."""
    line = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*)$")
    code = [(int(m.group(1), 16), m.group(2)) for m in map(line.match, sass.splitlines()) if m]
    loops = [(int(target, 16), at) for at, text in code
             for target in re.findall(r"\bBRA\s+0x([0-9a-f]+)", text) if int(target, 16) < at]
    loads = [at for at, text in code if re.search(r"\bLDL\b", text)]
    return len(loads), sum(any(start <= at <= end for start, end in loops) for at in loads)


def sass(cubin: bytes) -> str:
    """The machine code of a cubin, disassembled by the cuobjdump that Triton bundles."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], capture_output=True,
                              text=True, check=True).stdout


def compile_launch(launch: dict, arch: int) -> dict:
    """`triton.compile` one recorded launch for sm_<arch>; returns its shared memory, registers
    and register spills (ptxas -v), for a kernel that spills its spill loads and how many of
    them are in loops, its warps and the time it took. Raises what the compiler raises, or
    ValueError when the shared memory is over the limit."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    source = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"])
    t0 = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    shared = compiled.metadata.shared
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and shared > limit:
        raise ValueError(f"{launch['kernel']}: {shared} bytes of shared memory, sm_{arch} allows "
                         f"{limit} per block")
    registers, spills = ptxas_usage(compiled.asm["ptx"], arch)
    loads, in_loops = spill_loads_in_loops(sass(compiled.asm["cubin"])) if spills else (0, 0)
    return {"shared": shared, "registers": registers, "spill_bytes": spills,
            "spill_loads": loads, "spill_loads_in_loops": in_loops,
            "warps": compiled.metadata.num_warps, "seconds": time.perf_counter() - t0}


def describe(launch: dict) -> str:
    """kernel[CONST=value, ...] with the pointer dtypes, for the report."""
    consts = ", ".join(f"{k}={v}" for k, v in launch["constexprs"].items() if v is not None)
    dtypes = sorted({t[1:] for t in launch["signature"].values() if t.startswith("*")})
    opts = "".join(f", {k}={v}" for k, v in launch["options"].items())
    return f"{launch['kernel']}[{consts}{opts}] ({'/'.join(dtypes)})"


def print_waves(compiled: List[tuple], multiprocessors: int) -> None:
    """For each compiled (launch, arch, result) with recorded grids: programs a multiprocessor
    holds (and what limits it), and each grid's waves on `multiprocessors` of them."""
    print(f"programs a multiprocessor holds at once, and waves on {multiprocessors} "
          "multiprocessors (programs / held at once; 2.18 runs as 3 waves, the last 18% full):")
    for launch, arch, result in compiled:
        if "programs" not in launch or arch not in SM_LIMITS:
            continue
        resident, limit = programs_per_sm(arch, result["warps"], result["registers"],
                                          result["shared"])
        grids = "; ".join(
            f"{backbone} " + ", ".join(f"{n} = {waves(n, resident, multiprocessors):.2f}"
                                       for n in sorted(counts))
            for backbone, counts in launch["programs"].items())
        print(f"  sm_{arch} {describe(launch)}: {resident} a multiprocessor ({limit}); {grids}")


def _compile_one(item):
    launch, arch = item
    try:
        return launch, arch, compile_launch(launch, arch), None
    except Exception as error:                                        # reported, then exit 1
        return launch, arch, None, f"{type(error).__name__}: {error}"


def compile_all(launches: List[dict], archs: List[int], workers: int) -> List[tuple]:
    """(launch, arch, result or None, error or None) for every launch and architecture."""
    items = [(launch, arch) for arch in archs for launch in launches]
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(_compile_one, items))


def _child(args: List[str], interpret: bool) -> None:
    """This module with `args` in a child process, Triton's interpreter on or off; exits with
    the child's status if it fails (its output says why)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    status = subprocess.run([sys.executable, "-m", "bench.compile_check", *args],
                            env=env).returncode
    if status:
        raise SystemExit(status)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.compile_check",
        description="Compile every Triton kernel launch of a fused IV-tuning training step and "
                    "inference forward for NVIDIA GPUs, without a GPU (see the module docstring).")
    p.add_argument("--backbone", nargs="+", default=["swin_l", "eva02_l"], choices=sorted(CONFIGS),
                   help="backbones to record: swin_l (384, batch 8) and eva02_l (512, batch 2) "
                        "as bench/train_step.py measures them, swin_t (224, batch 2) and "
                        "swin_nano (64, batch 2) for a quick check (default: swin_l eva02_l)")
    p.add_argument("--arch", nargs="+", type=int, default=[90],
                   help="compute capabilities to compile for: 90 = H100/H200, 80 = A100 "
                        "(default: 90)")
    p.add_argument("--multiprocessors", type=int, default=132,
                   help="streaming multiprocessors of the GPU the launches are recorded for: the "
                        "fused adapter takes smaller tiles where a kernel would have too few "
                        "programs for them (default: 132, an H100 SXM or H200; an A100 has 108)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="parallel compiler processes (default: the CPU count)")
    p.add_argument("--record-to", metavar="FILE", help=argparse.SUPPRESS)     # child: step 1
    p.add_argument("--compile-from", metavar="FILE", help=argparse.SUPPRESS)  # child: step 2
    return p


def main(argv: Optional[List[str]] = None) -> None:
    import kernels

    args = get_parser().parse_args(argv)
    version = kernels.triton_version()
    if version is None or version < MIN_TRITON:
        raise SystemExit("bench.compile_check needs Triton >= {}.{} (its compiler interface); "
                         "here ".format(*MIN_TRITON)
                         + ("Triton {}.{}".format(*version) if version else "no Triton"))
    if args.record_to:
        launches: Dict[str, dict] = {}
        for name in args.backbone:
            for launch in record(name, *CONFIGS[name], args.multiprocessors):
                programs = launch.pop("programs")
                launch = launches.setdefault(json.dumps(launch, sort_keys=True), launch)
                launch.setdefault("programs", {}).update(programs)
        with open(args.record_to, "w") as f:
            json.dump(list(launches.values()), f)
        return
    if args.compile_from:
        with open(args.compile_from) as f:
            launches = json.load(f)
        print(f"compiling {len(launches)} distinct launches for sm_"
              + ", sm_".join(map(str, args.arch)), flush=True)
        failures = spilling = 0
        compiled = []
        for launch, arch, result, error in compile_all(launches, args.arch, args.workers):
            if error is None:
                spilling += result["spill_bytes"] > 0
                spills = (f", SPILLS {result['spill_bytes']} B/thread ("
                          f"{result['spill_loads_in_loops']} of {result['spill_loads']} spill "
                          "loads in a loop)" if result["spill_bytes"] else "")
                print(f"  ok   sm_{arch} {describe(launch)}: {result['shared']} B shared, "
                      f"{result['registers']} registers{spills}, {result['seconds']:.1f} s")
                compiled.append((launch, arch, result))
            else:
                failures += 1
                print(f"  FAIL sm_{arch} {describe(launch)}: {error}")
        print(f"{failures} of {len(launches) * len(args.arch)} compilations failed; "
              f"{spilling} spill registers")
        print_waves(compiled, args.multiprocessors)
        if failures:
            raise SystemExit(1)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launches.json")
        common = ["--backbone", *args.backbone, "--arch", *map(str, args.arch),
                  "--multiprocessors", str(args.multiprocessors)]
        _child([*common, "--record-to", path], interpret=True)
        _child([*common, "--compile-from", path, "--workers", str(args.workers)],
               interpret=False)


if __name__ == "__main__":
    main()

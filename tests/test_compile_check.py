"""`python -m bench.compile_check`: every Triton kernel, as the fused models launch it, compiles
to a cubin for the H100/H200 (sm_90) and the A100 (sm_80) within their shared-memory limits, on
this GPU-less machine; and the check fails a launch that needs more shared memory than a block
may have, which Triton's CPU interpreter runs without complaint."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

import kernels  # noqa: E402
from script_runs import load_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
compile_check = load_bench("compile_check")
pytestmark = pytest.mark.skipif(kernels.triton_version() < compile_check.MIN_TRITON,
                                reason="bench.compile_check needs Triton >= {}.{}".format(
                                    *compile_check.MIN_TRITON))


def run(args, interpret: bool, extra_path: str = "", timeout: int = 600):
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), extra_path) if p)}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def launched_kernels(source: str) -> set:
    """The `*_kernel` functions a kernels module defines with @triton.jit."""
    return set(re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", source))


def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    launches = tmp_path / "launches.json"
    record = run(["-m", "bench.compile_check", "--backbone", "swin_l", "eva02_l",
                  "--record-to", str(launches)], interpret=True)
    assert record.returncode == 0, record.stderr[-3000:]
    recorded = json.loads(launches.read_text())
    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        defined |= launched_kernels(path.read_text())
    # every kernel the package defines is launched by a fused Swin-L or EVA02-L step
    assert {launch["kernel"] for launch in recorded} == defined
    dtypes = {t for launch in recorded for t in launch["signature"].values()}
    assert {"*fp32", "*bf16"} <= dtypes                    # float32 and autocast launches
    # every launch knows its grids' sizes, by backbone
    assert all(set(launch["programs"]) <= {"swin_l", "eva02_l"} and launch["programs"]
               and all(n >= 1 for counts in launch["programs"].values() for n in counts)
               for launch in recorded)
    result = run(["-m", "bench.compile_check", "--arch", "90", "80",
                  "--compile-from", str(launches)], interpret=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"0 of {2 * len(recorded)} compilations failed" in result.stdout
    # and the waves of every compiled launch are reported
    assert len(re.findall(r"^  sm_(?:90|80) .* a multiprocessor \(", result.stdout,
                          re.MULTILINE)) == 2 * len(recorded)


# (arch, warps, registers a thread, shared bytes) -> programs a multiprocessor holds, and the
# limit, worked by hand from the CUDA Programming Guide's per-multiprocessor limits (65,536
# registers in units of 256 a warp; 1 KB of shared memory reserved a block, units of 128 bytes)
@pytest.mark.parametrize("arch, warps, registers, shared, held, limit", [
    # 255 -> 256 registers: 8,192 a warp, 8 warps fit, 2 programs of 4 (shared: 4)
    (90, 4, 255, 50_176, 2, "registers"),
    # 178 -> 184 registers: 5,888 a warp, 11 warps fit, 1 program of 8
    (90, 8, 178, 40_960, 1, "registers"),
    # 100,000 -> 100,096 + 1,024 bytes: 233,472 // 101,120 = 2 (registers: 16)
    (90, 4, 32, 100_000, 2, "shared"),
    # 16 registers, 1 warp: 128 by registers, 228 by shared, 64 by warps, 32 by blocks
    (90, 1, 16, 0, 32, "blocks"),
    # sm_86 holds 48 warps: 3 programs of 16 (registers: 4)
    (86, 16, 32, 0, 3, "warps"),
    # sm_80: 167,936 // (81,920 + 1,024) = 2 (registers: 8)
    (80, 4, 64, 81_920, 2, "shared"),
])
def test_programs_per_multiprocessor(arch, warps, registers, shared, held, limit):
    from bench.compile_check import programs_per_sm
    assert programs_per_sm(arch, warps, registers, shared) == (held, limit)


def test_waves():
    from bench.compile_check import waves
    assert waves(288, 1, 132) == pytest.approx(288 / 132)      # 3 waves, the last 18% full
    assert waves(264, 2, 132) == pytest.approx(1.0)


TOY = '''
import triton
import triton.language as tl


@triton.jit
def toy_dot_kernel(a_ptr, out_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i[:, None] * BLOCK + i[None, :])
    tl.store(out_ptr + i[:, None] * BLOCK + i[None, :], tl.dot(a, a))
'''


@pytest.mark.parametrize("block, ok", [(32, True), (256, False)])
def test_shared_memory_over_the_limit_fails(tmp_path, block, ok):
    """A launch that needs more shared memory than sm_80 allows a block is reported, not passed:
    the interpreter runs it happily (the fused adapter's pw1 backward did, at 260 KB, until this
    check found it). The toy's 256x256 float32 dot stages its operands in shared memory."""
    (tmp_path / "toy_kernels.py").write_text(TOY)
    launch = {"module": "toy_kernels", "kernel": "toy_dot_kernel",
              "signature": {"a_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
              "constexprs": {"BLOCK": block}, "options": {}}
    script = textwrap.dedent(f"""
        from bench.compile_check import compile_launch
        print(compile_launch({launch!r}, 80))
    """)
    result = run(["-c", script], interpret=False, extra_path=str(tmp_path))
    assert (result.returncode == 0) == ok, result.stderr[-2000:]
    if not ok:
        assert "bytes of shared memory, sm_80 allows 166912 per block" in result.stderr


def test_spill_loads_in_loops():
    """The SASS reader counts local-memory loads (LDL) and those between a branch back and its
    target (a loop runs them every iteration); a forward branch makes no loop."""
    from bench.compile_check import spill_loads_in_loops
    sass = """
        Function : toy
        .headerflags    @"EF_CUDA_SM90"
        /*0000*/                   MOV R1, c[0x0][0x28] ;          /* 0x00000a0000017a02 */
        /*0010*/                   LDL R2, [R1] ;                  /* 0x0000000001027983 */
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;        /* 0x0000000103037810 */
        /*0030*/                   LDL R4, [R1+0x4] ;              /* 0x0000040001047983 */
        /*0040*/              @P0 BRA 0x20 ;                      /* 0xfffffffc00f40947 */
        /*0050*/                   BRA 0x70 ;                      /* 0x0000000000047947 */
        /*0060*/                   LDL.64 R6, [R1+0x8] ;           /* 0x0000080001067983 */
        /*0070*/                   STL [R1+0xc], R6 ;              /* 0x00000c0601007387 */
        /*0080*/                   EXIT ;                          /* 0x000000000000794d */
    """
    assert spill_loads_in_loops(sass) == (3, 1)
    assert spill_loads_in_loops(sass.replace("BRA 0x20", "BRA 0x10")) == (3, 2)


def test_refuses_a_triton_too_old_for_its_compiler_interface(monkeypatch):
    monkeypatch.setattr(kernels, "triton_version", lambda: (3, 0))
    with pytest.raises(SystemExit, match=r"needs Triton >= 3\.6 .*here Triton 3\.0"):
        compile_check.main(["--backbone", "swin_nano"])

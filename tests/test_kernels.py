"""The Triton kernels against their PyTorch references, the dispatch rules, and the benchmark.

On a CPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`, as `make test` sets);
with a GPU the same comparisons also run on it in float32 and bfloat16. Inputs are fresh random
numbers on every run; a failure prints the seed, and KERNELS_TEST_SEED=<seed> replays it.
"""
import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.reference import partial_conv_residual_reference, simam_reference

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))

# (device, dtype, relative tolerance vs the float64 reference)
TARGETS = []
if kernels.interpreter_ready():
    TARGETS += [("cpu", torch.float64, 1e-10), ("cpu", torch.float32, 1e-5)]
if kernels.TRITON_INSTALLED and torch.cuda.is_available():
    TARGETS += [("cuda", torch.float32, 1e-5), ("cuda", torch.bfloat16, 2e-2)]
needs_triton = pytest.mark.skipif(not TARGETS, reason=f"needs a GPU or {kernels.INTERPRETER_NEEDS}")
target_ids = [f"{device}-{str(dtype)[6:]}" for device, dtype, _ in TARGETS]


def random_map(shape, layout, gen):
    """A float64 (B, C, H, W) map in a given memory layout; never constant, never zeros.

    channels_last is how the model makes its maps: a (B, H*W, C) token tensor viewed as a map.
    hw_transposed has H and W swapped in memory, a layout the kernels must copy to read.
    """
    B, C, H, W = shape
    if layout == "channels_last":
        z = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
        x = z.view(B, H, W, C).permute(0, 3, 1, 2)
    elif layout == "hw_transposed":
        x = torch.randn(B, C, W, H, generator=gen, dtype=torch.float64).transpose(2, 3)
    else:
        x = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64)
    return x * 2.0 + 0.5


def max_rel_err(actual, expected, scale=None):
    """max |actual - expected| / max |scale| (scale: expected where not given; 0 for empty
    tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = (expected if scale is None else scale).abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


def run_both(op, ref, inputs, gen, device, dtype, extra=(), magnitudes=False):
    """Output and input gradients of the kernel (on device, dtype) and of the float64 reference.

    The map is cast to dtype, parameters (inputs after the first) too except that bfloat16 maps
    keep float32 parameters, as under autocast. The reference sees the same rounded values in
    float64, so only the arithmetic differs. `.to` keeps each input's memory layout.
    With `magnitudes`, also the reference's gradients for the inputs' and the output gradient's
    absolute values: for an op linear in each input (the partial conv), each one's sum of the
    absolute values of the terms its gradient sums, what a sum's rounding error scales with.
    """
    param_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    dtypes = [dtype] + [param_dtype] * (len(inputs) - 1)
    rounded = [t.to(d).double() for t, d in zip(inputs, dtypes)]
    ref_in = [t.clone().requires_grad_() for t in rounded]
    ker_in = [t.to(device, d).requires_grad_() for t, d in zip(rounded, dtypes)]
    ref_out = ref(*ref_in, *extra)
    out = op(*ker_in, *extra)
    grad = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(dtype).double()
    ref_out.backward(grad)
    out.backward(grad.to(device, dtype))
    ref_grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in ref_in]
    pairs = [(t.grad.cpu(), g) for t, g in zip(ker_in, ref_grads)]
    if not magnitudes:
        return (out, ref_out), pairs
    abs_in = [t.detach().abs().requires_grad_() for t in rounded]
    ref(*abs_in, *extra).backward(grad.abs())
    return (out, ref_out), pairs, [t.grad for t in abs_in]


def cases(shapes, extra):
    """Every shape contiguous and channels-last, plus the extra (shape, layout) pairs."""
    return [(s, layout) for s in shapes for layout in ("contiguous", "channels_last")] + extra


def case_id(value):
    return "x".join(map(str, value)) if isinstance(value, tuple) else str(value)


# H*W == 1, odd H and W, the real shapes scaled down, and H and W stored transposed (copied).
# (1, 16, 65, 65) runs in one pass; tests/test_simam_paths.py covers the chunked path.
SIMAM_CASES = cases([(1, 4, 1, 9), (1, 3, 1, 1), (2, 5, 7, 9), (2, 8, 24, 24), (2, 64, 12, 12)],
                    [((2, 5, 7, 9), "hw_transposed"), ((2, 8, 24, 24), "hw_transposed"),
                     ((1, 16, 65, 65), "channels_last"), ((2, 5, 7, 1), "hw_transposed")])


@needs_triton
@pytest.mark.parametrize("shape,layout", SIMAM_CASES, ids=case_id)
@pytest.mark.parametrize("device,dtype,tol", TARGETS, ids=target_ids)
def test_simam_matches_reference(shape, layout, device, dtype, tol):
    gen = torch.Generator().manual_seed(SEED)
    x = random_map(shape, layout, gen)
    (out, ref_out), grads = run_both(kernels.simam_triton, simam_reference, [x], gen, device,
                                     dtype)
    msg = f"KERNELS_TEST_SEED={SEED}, shape {shape}, {layout}, {device} {dtype}"
    assert out.shape == ref_out.shape and out.dtype == dtype, msg
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), msg
    assert max_rel_err(out.cpu(), ref_out) < tol, f"forward: {msg}"
    (grad_x, ref_grad_x), = grads
    assert max_rel_err(grad_x, ref_grad_x) < tol, f"grad x: {msg}"


# cp = 0 (2x), C not divisible by 4, cp not a multiple of the channel block, the real shapes
# (cp = C // 4) scaled down.
PARTIAL_CONV_CASES = cases([((1, 4, 1, 9), 1), ((1, 3, 1, 1), 0), ((2, 6, 5, 3), 0),
                            ((2, 10, 7, 9), 2), ((1, 20, 9, 7), 17), ((2, 8, 24, 24), 2),
                            ((2, 64, 12, 12), 16)],
                           [(((2, 10, 7, 9), 2), "hw_transposed"),
                            (((1, 20, 9, 7), 17), "hw_transposed"),
                            (((2, 5, 7, 1), 2), "hw_transposed")])


@needs_triton
@pytest.mark.parametrize("case,layout", PARTIAL_CONV_CASES,
                         ids=lambda v: v if isinstance(v, str) else f"{case_id(v[0])}-cp{v[1]}")
@pytest.mark.parametrize("device,dtype,tol", TARGETS, ids=target_ids)
def test_partial_conv_residual_matches_reference(case, layout, device, dtype, tol):
    shape, cp = case
    gen = torch.Generator().manual_seed(SEED)
    x = random_map(shape, layout, gen)
    weight = torch.randn(cp, 1, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(cp, generator=gen, dtype=torch.float64)
    (out, ref_out), grads, magnitudes = run_both(
        kernels.partial_conv_residual_triton, partial_conv_residual_reference, [x, weight, bias],
        gen, device, dtype, extra=(cp,), magnitudes=True)
    msg = f"KERNELS_TEST_SEED={SEED}, shape {shape}, cp {cp}, {layout}, {device} {dtype}"
    assert out.shape == ref_out.shape and out.dtype == dtype, msg
    if layout == "channels_last" and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last), msg
    assert max_rel_err(out.cpu(), ref_out) < tol, f"forward: {msg}"
    # the weight and bias gradients are sums over every position: relative to the sum of
    # their terms' magnitudes (a bias gradient of one channel can cancel to near zero)
    for name, (grad, ref_grad), scale in zip(("x", "weight", "bias"), grads, magnitudes):
        assert grad.shape == ref_grad.shape, f"grad {name} shape: {msg}"
        assert max_rel_err(grad, ref_grad, scale) < tol, f"grad {name}: {msg}"


@needs_triton
def test_backward_accepts_broadcast_gradients():
    """`y.sum().backward()` hands back a gradient with all strides 0; no copy, same result."""
    device, dtype, tol = TARGETS[0]
    gen = torch.Generator().manual_seed(SEED)
    x = random_map((2, 6, 5, 7), "channels_last", gen).to(device=device, dtype=dtype)
    weight = torch.randn(1, 1, 3, 3, generator=gen, dtype=torch.float64).to(device, dtype)
    bias = torch.randn(1, generator=gen, dtype=torch.float64).to(device, dtype)
    for op, args in ((kernels.simam_triton, ()),
                     (kernels.partial_conv_residual_triton, (weight, bias, 1))):
        x_ker = x.clone().requires_grad_()
        op(x_ker, *args).sum().backward()
        x_full = x.clone().requires_grad_()
        op(x_full, *args).backward(torch.ones_like(x))
        msg = f"KERNELS_TEST_SEED={SEED}, {op.__name__}"
        assert max_rel_err(x_ker.grad, x_full.grad.double()) < tol, msg


@pytest.fixture
def spy_triton(monkeypatch):
    """Replace both Triton entry points by recorders; returns the list of calls."""
    calls = []
    monkeypatch.setattr(kernels, "TRITON_INSTALLED", True)
    monkeypatch.setattr(kernels, "triton_version", lambda: kernels.INTERPRETER_MIN_TRITON)
    monkeypatch.setattr(kernels, "simam_triton", lambda x, lam: calls.append("simam") or x,
                        raising=False)
    monkeypatch.setattr(kernels, "partial_conv_residual_triton",
                        lambda x, w, b, cp: calls.append("partial_conv") or x, raising=False)
    monkeypatch.delenv("IVT_KERNELS", raising=False)
    return calls


def call_both():
    x = torch.randn(1, 4, 3, 3)
    kernels.simam(x)
    kernels.partial_conv_residual(x, torch.randn(1, 1, 3, 3), torch.randn(1), 1)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_torch_backend_never_calls_triton(spy_triton, monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    kernels.set_backend("torch")
    call_both()
    assert spy_triton == []


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_backend_uses_reference_on_cpu(spy_triton, monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert kernels.backend() == "auto"
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(kernels.simam(x), simam_reference(x), rtol=0, atol=0)
    call_both()
    assert spy_triton == []


def test_triton_backend_on_cpu(spy_triton, monkeypatch):
    monkeypatch.setenv("IVT_KERNELS", "triton")
    monkeypatch.setattr(kernels, "KERNELS_INTERPRETED", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        kernels.simam(torch.randn(1, 4, 3, 3))
    monkeypatch.setattr(kernels, "KERNELS_INTERPRETED", True)
    call_both()
    assert spy_triton == ["simam", "partial_conv"]


def test_triton_backend_on_cpu_refuses_an_interpreter_too_old(spy_triton, monkeypatch):
    """Triton 3.0's interpreter returns CPU tensors unwritten: an error, not garbage."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    monkeypatch.setattr(kernels, "KERNELS_INTERPRETED", True)
    monkeypatch.setattr(kernels, "triton_version", lambda: (3, 0))
    with pytest.raises(RuntimeError, match=r"Triton >= 3\.5 \(here Triton 3\.0\)"):
        kernels.simam(torch.randn(1, 4, 3, 3))
    assert spy_triton == []


def test_simam_is_the_function_not_the_submodule():
    """`kernels/simam.py` shares its name with `kernels.simam`; the dispatcher must win."""
    importlib.import_module("kernels.simam")
    assert callable(kernels.simam) and callable(kernels.partial_conv_residual)


def test_bad_backend_raises(monkeypatch):
    monkeypatch.setenv("IVT_KERNELS", "cuda")
    with pytest.raises(ValueError, match="IVT_KERNELS"):
        kernels.simam(torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError):
        kernels.set_backend("fast")


def test_imports_and_runs_without_triton():
    """With Triton missing, `import kernels` works and the auto backend runs the reference."""
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, kernels\n"
            "x = torch.randn(1, 4, 3, 3)\n"
            "assert torch.equal(kernels.simam(x), kernels.simam_reference(x))\n"
            "kernels.partial_conv_residual(x, torch.randn(1, 1, 3, 3), torch.randn(1), 1)\n")
    env = {k: v for k, v in os.environ.items() if k != "IVT_KERNELS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not kernels.TRITON_INSTALLED
                    or kernels.triton_version() < kernels.INTERPRETER_MIN_TRITON,
                    reason=f"needs {kernels.INTERPRETER_NEEDS}")
def test_benchmark_script_runs_tiny(tmp_path):
    """bench/kernels.py --tiny runs every row on the CPU interpreter and writes its table."""
    out = tmp_path / "benchmarks.md"
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "bench/kernels.py", "--tiny", "--out", str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "| op |" in text and "simam" in text and "partial_conv" in text
    assert "interpreter" in text


def random_kernel_case(draw: int):
    """A fresh (B, C, H, W), layout, SimAM lambda and partial-conv cp from the seed: odd and
    1-sized sides included, lambda from the default to one that moves every output."""
    rng = random.Random(SEED * 13 + draw)
    shape = (rng.randint(1, 3), rng.randint(1, 40), rng.choice([1, rng.randint(2, 31)]),
             rng.randint(1, 31))
    layout = rng.choice(["contiguous", "channels_last", "hw_transposed"])
    lam = 0.5 if draw == 0 else rng.choice([1e-4, 0.05, 0.5, 3.0])    # one off the default
    return shape, layout, lam, rng.randint(0, shape[1])


# bfloat16 maps (float32 parameters, as under autocast) run under the interpreter too
RANDOM_TARGETS = TARGETS + ([("cpu", torch.bfloat16, 2e-2)] if kernels.interpreter_ready()
                            else [])


@needs_triton
@pytest.mark.parametrize("draw", range(3))
@pytest.mark.parametrize("device,dtype,tol", RANDOM_TARGETS,
                         ids=[f"{d}-{str(t)[6:]}" for d, t, _ in RANDOM_TARGETS])
def test_kernels_on_fresh_random_shapes(draw, device, dtype, tol):
    """SimAM (at a drawn lambda, passed through the dispatcher) and the partial conv against
    their references, forward and backward, on a shape, layout, lambda and cp drawn afresh from
    the run's seed."""
    shape, layout, lam, cp = random_kernel_case(draw)
    msg = (f"KERNELS_TEST_SEED={SEED}, draw {draw}: shape {shape}, {layout}, lambda {lam}, "
           f"cp {cp}, {device} {dtype}")
    gen = torch.Generator().manual_seed(SEED + draw)
    x = random_map(shape, layout, gen)
    os.environ["IVT_KERNELS"] = "triton"
    try:
        (out, ref_out), grads = run_both(kernels.simam, simam_reference, [x.clone()], gen,
                                         device, dtype, extra=(lam,))
    finally:
        del os.environ["IVT_KERNELS"]
    assert max_rel_err(out.cpu(), ref_out) < tol, f"simam forward: {msg}"
    assert max_rel_err(*grads[0]) < tol, f"simam grad x: {msg}"
    weight = torch.randn(cp, 1, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(cp, generator=gen, dtype=torch.float64)
    (out, ref_out), grads, magnitudes = run_both(
        kernels.partial_conv_residual_triton, partial_conv_residual_reference,
        [x.clone(), weight, bias], gen, device, dtype, extra=(cp,), magnitudes=True)
    assert max_rel_err(out.cpu(), ref_out) < tol, f"partial conv forward: {msg}"
    for name, (grad, ref_grad), scale in zip(("x", "weight", "bias"), grads, magnitudes):
        assert max_rel_err(grad, ref_grad, scale) < tol, f"partial conv grad {name}: {msg}"


def test_backend_name_is_read_case_insensitively(monkeypatch):
    """IVT_KERNELS is matched without regard to case (`backend` lowercases it): "Torch" forces
    the reference as "torch" does, and a wrong name is refused whatever its case."""
    monkeypatch.setenv("IVT_KERNELS", "Torch")
    assert kernels.backend() == "torch"
    monkeypatch.setenv("IVT_KERNELS", "TRITON")
    assert kernels.backend() == "triton"
    monkeypatch.setenv("IVT_KERNELS", "CUDA")
    with pytest.raises(ValueError, match="IVT_KERNELS"):
        kernels.backend()


class CudaLike:
    """Just what `use_triton` reads of a tensor, as a CUDA tensor of `numel` elements has it:
    the dispatch rules for GPU tensors, checked on a machine without one."""
    is_cuda = True
    device = torch.device("cuda")

    def __init__(self, numel):
        self._numel = numel

    def numel(self):
        return self._numel


def test_dispatch_rules_for_cuda_tensors(spy_triton, monkeypatch):
    """The rules of `kernels`' docstring for CUDA tensors: `auto` takes Triton for them, but the
    reference for one of 2**31 elements or more (no error: the 32-bit limit is `triton`'s to
    refuse); forced Triton runs them without the CPU interpreter (which only CPU tensors
    need), and refuses 2**31 elements."""
    monkeypatch.setattr(kernels, "KERNELS_INTERPRETED", False)       # no CPU interpreter
    assert kernels.use_triton(CudaLike(2 ** 31 - 1)) is True          # auto
    assert kernels.use_triton(CudaLike(2 ** 31)) is False
    monkeypatch.setenv("IVT_KERNELS", "triton")
    assert kernels.use_triton(CudaLike(6)) is True
    with pytest.raises(RuntimeError, match="32-bit offsets"):
        kernels.use_triton(CudaLike(2 ** 31))
    monkeypatch.setenv("IVT_KERNELS", "torch")
    assert kernels.use_triton(CudaLike(6)) is False


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("On", True), ("YES", True),
                                       ("y", True), ("0", False), ("false", False), ("off", False),
                                       ("n", False), ("t", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """TRITON_INTERPRET counts as on for the values Triton's own boolean knobs accept (1, true,
    on, yes, y, in any case), so that `kernels` and Triton agree on whether kernels run on the
    CPU; where Triton has its knobs (3.6 and later), also against Triton's own reading."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert kernels.triton_interpreter_on() is on
    knobs = getattr(sys.modules.get("triton"), "knobs", None)
    if knobs is not None:
        assert bool(knobs.runtime.interpret) is on


@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TARGETS else []))
def test_simam_takes_its_lambda(monkeypatch, backend):
    """`kernels.simam(x, lam)` computes with the lam it is given (SimAM's lambda, Eq. 12, a
    constructor argument of the model's SimAM), on either backend: against Eq. 11-12 written
    out in float64, with lam = 0.5, far from the default 1e-4."""
    monkeypatch.setenv("IVT_KERNELS", backend)
    device = TARGETS[0][0] if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(SEED)
    x = random_map((2, 3, 4, 5), "contiguous", gen)
    lam, n = 0.5, 4 * 5 - 1
    d = (x - x.mean(dim=(2, 3), keepdim=True)) ** 2
    expected = x * torch.sigmoid(d / (4 * (d.sum(dim=(2, 3), keepdim=True) / n + lam)) + 0.5)
    got = kernels.simam(x.to(device), lam).cpu()
    assert max_rel_err(got, expected) < 1e-10, f"KERNELS_TEST_SEED={SEED}"


@needs_triton
def test_backward_reads_gradients_in_any_layout():
    """An output gradient whose H and W do not merge into one axis (here stored with H and W
    transposed) gives the same input, weight and bias gradients as its contiguous copy: the
    backward copies it to read it, as the forward does its input."""
    device, dtype, tol = TARGETS[0]
    gen = torch.Generator().manual_seed(SEED)
    x = random_map((2, 6, 5, 7), "contiguous", gen).to(device, dtype)
    weight = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64).to(device, dtype)
    bias = torch.randn(2, generator=gen, dtype=torch.float64).to(device, dtype)
    g = torch.randn(2, 6, 7, 5, generator=gen, dtype=torch.float64).to(device, dtype)
    g = g.transpose(2, 3)                                           # (2, 6, 5, 7), not mergeable
    assert kernels.utils.merged_hw_stride(g) is None
    for op in (kernels.simam_triton,
               lambda t, w, b: kernels.partial_conv_residual_triton(t, w, b, 2)):
        grads = []
        for grad in (g, g.contiguous()):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            out = op(*leaves) if op is not kernels.simam_triton else op(leaves[0])
            out.backward(grad)
            grads.append([t.grad for t in leaves if t.grad is not None])
        for a, b in zip(*grads):
            assert max_rel_err(a, b.double()) < tol, f"KERNELS_TEST_SEED={SEED}"


@needs_triton
def test_partial_conv_reads_strided_weight_and_bias():
    """The conv's weight and bias given as strided views (every other channel of larger
    tensors, as a slice of a parameter would be) give the reference's output and gradients
    (those of contiguous copies): the kernels index them as contiguous (cp, 9) and (cp,), so
    the wrapper copies them."""
    device, dtype, tol = TARGETS[0]
    gen = torch.Generator().manual_seed(SEED)
    x = random_map((2, 10, 7, 9), "contiguous", gen)
    weight = torch.randn(6, 1, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 10, 7, 9, generator=gen, dtype=torch.float64)
    leaves = [t.clone().to(device, dtype).requires_grad_() for t in (x, weight, bias)]
    w_view, b_view = leaves[1][::2], leaves[2][:, 0]                 # (3, 1, 3, 3), stride 2
    assert not w_view.reshape(3, 9).is_contiguous() and b_view.stride(0) == 2
    out = kernels.partial_conv_residual_triton(leaves[0], w_view, b_view, 3)
    out.backward(g.to(device, dtype))
    ref = [x.clone().requires_grad_(), weight[::2].clone().requires_grad_(),
           bias[:, 0].clone().requires_grad_()]
    expected = partial_conv_residual_reference(*ref, 3)
    expected.backward(g)
    msg = f"KERNELS_TEST_SEED={SEED}"
    assert max_rel_err(out.detach().cpu(), expected) < tol, msg
    assert max_rel_err(leaves[0].grad.cpu(), ref[0].grad) < tol, msg
    assert max_rel_err(leaves[1].grad[::2].cpu(), ref[1].grad) < tol, msg
    assert max_rel_err(leaves[2].grad[:, 0].cpu(), ref[2].grad) < tol, msg

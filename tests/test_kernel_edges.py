"""The kernels' entry points at the edges of their contract, where a caller other than the model
may take them: inputs in other memory layouts, empty tensors, a second derivative, buffers
written between forward and backward, a Triton that is installed but does not import, and
TRITON_INTERPRET set after `kernels` was imported. The Triton side runs under the interpreter
(`TRITON_INTERPRET=1`, as `make test` sets); each comparison is against the PyTorch reference or
against the same kernel on contiguous copies, in float64.
"""
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels.reference import (HybridAdapterWeights, LowRankExtra, partial_conv_residual_reference,
                               simam_reference)
from test_hybrid_adapter_kernel import random_weights

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("KERNELS_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
needs_interpreter = pytest.mark.skipif(not kernels.interpreter_ready(),
                                       reason=f"needs {kernels.INTERPRETER_NEEDS}")


def adapter_weights(C: int, d2: int, gen: torch.Generator) -> HybridAdapterWeights:
    """`random_weights` (float64, non-trivial values everywhere), every tensor but the running
    statistics a leaf that takes a gradient."""
    w = random_weights(C, d2, gen)
    return HybridAdapterWeights(*[t.requires_grad_(i not in (10, 11))
                                  for i, t in enumerate(w[:18])], *w[18:])


@needs_interpreter
def test_training_adapter_takes_factors_and_mask_in_any_layout(monkeypatch):
    """The extra's factors and the dropout mask given as transposed and strided views (as
    `up.weight.t()` would be) give the output and gradients of contiguous copies of the same
    values: the kernels index them as row-major, so the entry point makes the copies."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    rng = random.Random(SEED)
    B, H, W, C, d2, r = rng.randint(1, 2), rng.choice([3, 5]), rng.choice([4, 7]), 24, 16, 5
    M = B * H * W
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    h = torch.randn(M, r, generator=gen, dtype=torch.float64)
    w_e = torch.randn(r, C, generator=gen, dtype=torch.float64)
    b_e = torch.randn(C, generator=gen, dtype=torch.float64)
    keep = torch.rand(M, d2, generator=gen) > 0.2
    g = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)

    def run(layout):
        wts = adapter_weights(C, d2, torch.Generator().manual_seed(SEED + 1))
        leaves = [t.clone().requires_grad_() for t in (x, h, w_e, b_e)]
        xl, hl, wl, bl = leaves
        mask = keep
        if layout == "strided":
            hl_in = hl.t().contiguous().t()                   # (M, r), column-major
            wl_in = wl.t().contiguous().t()                   # (r, C), column-major
            bl_in = torch.stack([bl, bl], 1)[:, 0]            # (C,), stride 2
            mask = keep.t().contiguous().t()
            assert hl_in.stride(1) != 1 and not wl_in.is_contiguous() and bl_in.stride(0) == 2
        else:
            hl_in, wl_in, bl_in = hl, wl, bl
        out = kernels.hybrid_adapter_train(xl, xl, LowRankExtra(hl_in, wl_in, bl_in), (H, W), wts,
                                           mask, 0.2, 0.1, False)
        out.backward(g)
        trained = [t.grad for t in wts[:18] if t.requires_grad]
        return [out.detach()] + [t.grad for t in leaves] + trained

    for name, a, b in zip(["out", "dx", "dh", "dw_e", "db_e"] + [f"d{i}" for i in range(16)],
                          run("contiguous"), run("strided")):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=f"{name}, seed {SEED}")


@needs_interpreter
def test_training_adapter_leaves_the_running_statistics_free_between_passes(monkeypatch):
    """The BatchNorm running statistics are updated in place by every training forward: one
    written between this forward and its backward (a second forward, a buffer broadcast) must
    not break the backward, which does not read them, nor change its gradients."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2 = 2, 3, 5, 16, 8
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)

    def run(write_between):
        w = adapter_weights(C, d2, torch.Generator().manual_seed(SEED + 1))
        xl = x.clone().requires_grad_()
        out = kernels.hybrid_adapter_train(xl, xl, None, (H, W), w, None, 0.0, 0.1, True)
        if write_between:
            w.bn_mean.add_(1.0)
            w.bn_var.mul_(2.0)
        out.sum().backward()
        return [xl.grad] + [t.grad for t in w[:18] if t.requires_grad]

    for a, b in zip(run(False), run(True)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def second_derivative(op, leaf):
    """Differentiate the gradient of op(leaf)'s squared sum again: the error, if any."""
    (grad,) = torch.autograd.grad((op(leaf) ** 2).sum(), leaf, create_graph=True)
    (grad ** 2).sum().backward()


@needs_interpreter
def test_second_derivative_is_refused_not_wrong(monkeypatch):
    """The kernels' backward passes run outside autograd: a gradient of a gradient (a gradient
    penalty) through them is refused with an error; without the refusal, the first gradient
    silently has no graph behind it and the second derivative lacks its term. The reference
    differentiates twice."""
    gen = torch.Generator().manual_seed(SEED)
    x = torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    wc, bc = torch.randn(2, 1, 3, 3, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
    w = adapter_weights(8, 8, gen)
    tokens = torch.randn(1, 20, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    ops = [(kernels.simam, x), (lambda t: kernels.partial_conv_residual(t, wc, bc, 2), x),
           (lambda t: kernels.hybrid_adapter_train(t, t, None, (4, 5), w, None, 0.0, 0.1, False),
            tokens)]
    monkeypatch.setenv("IVT_KERNELS", "torch")
    for op, leaf in ops[:2]:
        second_derivative(op, leaf)                                   # the reference can
    monkeypatch.setenv("IVT_KERNELS", "triton")
    for op, leaf in ops:
        with pytest.raises(RuntimeError, match="once_differentiable|twice"):
            second_derivative(op, leaf)


@needs_interpreter
@pytest.mark.parametrize("shape", [(2, 0, 4, 4), (0, 3, 4, 4)])
def test_empty_maps_take_the_reference(monkeypatch, shape):
    """A map with no channel or no image has nothing to launch: forcing Triton, SimAM
    and the partial conv return the reference's empty result and gradient instead of sizing a
    grid from 0."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    cp = min(shape[1], 1)
    wc, bc = torch.randn(cp, 1, 3, 3, dtype=torch.float64), torch.randn(cp, dtype=torch.float64)
    for op, ref in [(kernels.simam, simam_reference),
                    (lambda t: kernels.partial_conv_residual(t, wc, bc, cp),
                     lambda t: partial_conv_residual_reference(t, wc, bc, cp))]:
        y = op(x)
        assert y.shape == ref(x).shape == x.shape
        y.sum().backward()
        assert x.grad.shape == x.shape
        x.grad = None


def test_forcing_triton_refuses_a_tensor_beyond_32_bit_offsets(monkeypatch):
    """2**31 elements (an expanded view: no memory) would overflow the kernels' 32-bit offsets:
    forced Triton says so instead of writing out of bounds; one element fewer passes that check
    (only `use_triton` is asked)."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    huge = torch.zeros(1, 1, 1, 1).expand(2, 2 ** 15, 2 ** 8, 2 ** 7)
    assert huge.numel() == 2 ** 31
    with pytest.raises(RuntimeError, match="32-bit offsets"):   # asked first: a missed limit
        kernels.use_triton(huge)                                # fails here, not in a launch
    with pytest.raises(RuntimeError, match="32-bit offsets"):
        kernels.simam(huge)
    below = torch.zeros(1).expand(2 ** 31 - 1)
    try:
        kernels.use_triton(below)
    except RuntimeError as e:             # no Triton or interpreter here: another reason
        assert "32-bit offsets" not in str(e)


@pytest.mark.parametrize("error", ["ImportError", "RuntimeError", "AttributeError"])
def test_a_triton_that_does_not_import_leaves_the_references(tmp_path, error):
    """A Triton installed but broken (built for another torch or CUDA; its import fails with
    whatever error): `import kernels` warns and the references run; forcing Triton says why it
    cannot."""
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text(f"raise {error}('libcuda.so: cannot open (a test)')\n")
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import kernels, ivt.fast.adapters\n"
        "print('warned:', any('does not import' in str(w.message) for w in caught))\n"
        "print('installed:', kernels.TRITON_INSTALLED)\n"
        "x = torch.randn(1, 4, 3, 3)\n"
        "print('same:', torch.equal(kernels.simam(x), kernels.simam_reference(x)))\n"
        "kernels.set_backend('triton')\n"
        "try:\n"
        "    kernels.simam(x)\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    env.pop("IVT_KERNELS", None)
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[:3] == ["warned: True", "installed: False", "same: True"], run.stdout
    assert lines[3].startswith(f"refused: IVT_KERNELS=triton, but Triton does not import "
                               f"({error}: libcuda.so: cannot open (a test))"), run.stdout


@pytest.mark.skipif(not kernels.TRITON_INSTALLED, reason="needs Triton")
def test_interpreter_turned_on_after_import_is_explained(monkeypatch):
    """Triton decides at `import kernels` whether its kernels are interpreted: TRITON_INTERPRET=1
    set later cannot run them on CPU tensors, and forcing Triton then says so (not Triton's
    '0 active drivers')."""
    monkeypatch.setattr(kernels, "KERNELS_INTERPRETED", False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("IVT_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET set before `kernels` is imported"):
        kernels.simam(torch.randn(1, 4, 3, 3))


@pytest.mark.parametrize("script", ["train_seg.py", "evaluate.py", "predict.py"])
def test_forced_triton_that_cannot_run_is_refused_before_any_work(tmp_path, script):
    """--kernels triton on a CPU without Triton's interpreter: one error line naming the flag,
    exit 2, before data, model or outputs (no --out folder is made)."""
    out = tmp_path / "out"
    argv = {"train_seg.py": ["--data", str(tmp_path), "--out", str(out),   # never read
                             "--backbone", "swin_nano", "--impl", "fused"],
            "evaluate.py": ["--checkpoint", str(tmp_path / "no.pt"), "--data", str(tmp_path)],
            "predict.py": ["--checkpoint", str(tmp_path / "no.pt"), "--vis", str(tmp_path),
                           "--ir", str(tmp_path), "--out", str(out)]}[script]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "IVT_KERNELS")}
    run = subprocess.run([sys.executable, str(ROOT / script), *argv, "--kernels", "triton",
                          "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert "--kernels triton: IVT_KERNELS=triton" in last and "Traceback" not in run.stderr, last
    assert not out.exists()


def training_adapter(monkeypatch, impl: str):
    """The training call of the fused Hybrid Adapter: its PyTorch reference, or the Triton
    kernels forced (skipped where the interpreter cannot run them)."""
    if impl == "triton" and not kernels.interpreter_ready():
        pytest.skip(f"needs {kernels.INTERPRETER_NEEDS}")
    monkeypatch.setenv("IVT_KERNELS", "triton")
    return (kernels.hybrid_adapter_train_reference if impl == "reference"
            else kernels.hybrid_adapter_train)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_training_adapter_without_update_leaves_the_running_statistics(monkeypatch, impl):
    """update=False (BatchNorm in training mode with its running statistics frozen, or a
    checkpoint's recomputation): the batch's statistics normalise, but the running mean and
    variance and the count of batches are left exactly as they were, by the reference and by
    the kernels; with update=True the count goes up by one."""
    train = training_adapter(monkeypatch, impl)
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2 = 2, 3, 4, 16, 8
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    w = adapter_weights(C, d2, gen)
    before = (w.bn_mean.clone(), w.bn_var.clone())
    batches = torch.tensor(5)
    train(x, x, None, (H, W), w, None, 0.0, 0.1, False, batches)
    assert torch.equal(w.bn_mean, before[0]) and torch.equal(w.bn_var, before[1])
    assert batches.item() == 5
    train(x, x, None, (H, W), w, None, 0.0, 0.1, True, batches)
    assert not torch.equal(w.bn_mean, before[0]) and batches.item() == 6


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("x_is_residual", [False, True], ids=["residual", "x-is-residual"])
def test_training_adapter_lead_rows_are_the_residuals(monkeypatch, impl, x_is_residual):
    """With lead > 0 (EVA02's cls token first), the result's first `lead` rows are residual's
    as they are, not x's, and take the output gradient straight through to residual (x's
    gradient there is zero, unless x is the residual); the other rows are the adapter on the
    rows after `lead` (the reference with lead=0 on those rows, gradients included), and a
    tokens extra takes their gradient. x differs from residual here, as it does not in the
    model's blocks."""
    train = training_adapter(monkeypatch, impl)
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2, lead = 2, 3, 4, 16, 8, 2
    x0, r0, g = (torch.randn(B, lead + H * W, C, generator=gen, dtype=torch.float64)
                 for _ in range(3))
    e0 = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    keep = torch.rand(B * H * W, d2, generator=gen) > 0.2
    w = random_weights(C, d2, gen)

    def run(rows, train):
        x, e = x0[:, rows].clone().requires_grad_(), e0.clone().requires_grad_()
        r = x if x_is_residual else r0[:, rows].clone().requires_grad_()
        out = train(x, r, e, (H, W), HybridAdapterWeights(*[t.clone() for t in w[:18]], *w[18:]),
                    keep, 0.2, 0.1, True, **({"lead": lead} if rows.start == 0 else {}))
        out.backward(g[:, rows])
        return out.detach(), x.grad, None if x_is_residual else r.grad, e.grad

    out, dx, dr, de = run(slice(0, None), train)
    tokens, dx_t, dr_t, de_t = run(slice(lead, None), kernels.hybrid_adapter_train_reference)
    residual_lead = x0[:, :lead] if x_is_residual else r0[:, :lead]
    assert torch.equal(out[:, :lead], residual_lead)
    torch.testing.assert_close(out[:, lead:], tokens, rtol=1e-10, atol=1e-10)
    if x_is_residual:
        assert torch.equal(dx[:, :lead], g[:, :lead])
    else:
        assert torch.equal(dx[:, :lead], torch.zeros_like(dx[:, :lead]))
        assert torch.equal(dr[:, :lead], g[:, :lead])
        torch.testing.assert_close(dr[:, lead:], dr_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(dx[:, lead:], dx_t, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(de, de_t, rtol=1e-10, atol=1e-10)


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values in a non-contiguous layout: a 1-d tensor every other element of a buffer,
    others with their last two dimensions stored transposed (as `weight.t()` would be)."""
    if t.dim() == 1:
        return torch.stack([t, t], 1)[:, 0]
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@needs_interpreter
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_adapter_takes_its_weights_in_any_layout(monkeypatch, training):
    """The adapter's weights (every tensor but the running statistics, which the training
    kernels update in place) given as non-contiguous views, as a caller's `weight.t()` or a
    sliced buffer would be: the kernels index them as row-major, so the entry point makes
    contiguous copies, and the output and gradients equal the reference's on the same values."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2 = 2, 3, 4, 24, 16
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    g = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    w = random_weights(C, d2, gen)

    def run(fn, layout):
        leaves = [t.clone().requires_grad_(training and i not in (10, 11))
                  for i, t in enumerate(w[:18])]
        given = [layout(t) if i not in (10, 11) else t for i, t in enumerate(leaves)]
        assert layout is not strided_copy or not given[4].is_contiguous()
        wts = HybridAdapterWeights(*given, *w[18:])
        xl = x.clone().requires_grad_(training)
        if not training:
            return [fn(xl, xl, None, (H, W), wts)]
        out = fn(xl, xl, None, (H, W), wts, None, 0.0, 0.1, True)
        out.backward(g)
        return [out.detach(), xl.grad] + [t.grad for t in leaves if t.requires_grad]

    fns = ((kernels.hybrid_adapter_eval_reference, kernels.hybrid_adapter_eval) if not training
           else (kernels.hybrid_adapter_train_reference, kernels.hybrid_adapter_train))
    for i, (a, b) in enumerate(zip(run(fns[0], lambda t: t), run(fns[1], strided_copy))):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=f"tensor {i}, seed {SEED}")


@needs_interpreter
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_float64_tokens_with_float32_weights_are_computed_in_float64(monkeypatch, training):
    """The kernels compute in the tokens' accumulator dtype (`accumulator_dtype`: float64 for
    float64 tokens) whatever the weights' dtype: float64 tokens through float32 weights give
    the float64 reference on those weights' values to float64 rounding (the output, and in
    training the tokens' gradient), not float32 arithmetic's 1e-7."""
    monkeypatch.setenv("IVT_KERNELS", "triton")
    gen = torch.Generator().manual_seed(SEED)
    B, H, W, C, d2 = 2, 3, 4, 24, 16
    x = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    g = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64)
    w32 = [t.float() for t in random_weights(C, d2, gen)[:18]]
    extras = random_weights(C, d2, gen)[18:]

    def run(fn, dtype):
        wts = HybridAdapterWeights(*[t.to(dtype) for t in w32], *extras)
        xl = x.clone().requires_grad_(training)
        if not training:
            return [fn(xl, xl, None, (H, W), wts)]
        out = fn(xl, xl, None, (H, W), wts, None, 0.0, 0.1, True)
        out.backward(g)
        return [out.detach(), xl.grad]

    fns = ((kernels.hybrid_adapter_eval_reference, kernels.hybrid_adapter_eval) if not training
           else (kernels.hybrid_adapter_train_reference, kernels.hybrid_adapter_train))
    for name, a, b in zip(["out", "dx"], run(fns[0], torch.float64),
                          run(fns[1], torch.float32)):
        assert b.dtype == torch.float64, name
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=f"{name}, seed {SEED}")

"""Both SimAM kernel strategies against the float64 reference: whole rows in one program (one
read per direction) and the chunked two-launch path for long rows, each forced through
`kernels.simam.ROW_TILE`; and the choice between them. CPU under TRITON_INTERPRET=1, or a GPU."""
import importlib

import pytest
import torch

import kernels
from kernels.reference import simam_reference

DEVICES = []
if kernels.interpreter_ready():
    DEVICES.append("cpu")
if kernels.TRITON_INSTALLED and torch.cuda.is_available():
    DEVICES.append("cuda")
pytestmark = pytest.mark.skipif(not DEVICES, reason=f"needs a GPU or {kernels.INTERPRETER_NEEDS}")


def simam_module():
    """The kernel module (`kernels.simam` as an attribute is the function)."""
    return importlib.import_module("kernels.simam")


def assert_kernel_matches_reference(x: torch.Tensor, grad: torch.Tensor, device: str) -> None:
    """The Triton kernels' output and input gradient (upstream `grad`) against the float64
    reference's."""
    ref_in = x.clone().requires_grad_()
    ref = simam_reference(ref_in)
    ref.backward(grad)
    ker_in = x.to(device).requires_grad_()
    out = kernels.simam_triton(ker_in)
    out.backward(grad.to(device))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ker_in.grad.cpu(), ref_in.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_tile", [0, 8192], ids=["chunked", "one-pass"])
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (2, 20, 12, 16), (1, 33, 5, 3)])
def test_simam_paths_match_reference(monkeypatch, device, row_tile, shape):
    simam = simam_module()
    monkeypatch.setattr(simam, "ROW_TILE", row_tile)
    assert (simam.one_pass_blocks(torch.empty(shape)) is None) == (row_tile == 0)
    gen = torch.Generator().manual_seed(11)
    B, C, H, W = shape
    tokens = torch.randn(B, H * W, C, generator=gen, dtype=torch.float64) * 3 + 5
    x = tokens.view(B, H, W, C).permute(0, 3, 1, 2)              # channels-last, as the model
    assert_kernel_matches_reference(x, torch.randn(shape, generator=gen, dtype=torch.float64),
                                    device)


def test_one_pass_only_where_rows_fit():
    simam = simam_module()
    assert simam.one_pass_blocks(torch.empty(8, 8, 48, 48)) is not None        # 2,304 per row
    assert simam.one_pass_blocks(torch.empty(8, 8, 96, 96)) is None            # 9,216 per row
    block_c, block_hw, _ = simam.one_pass_blocks(torch.empty(2, 64, 24, 24))
    assert block_hw == 1024 and block_c * block_hw <= simam.ROW_TILE


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,max_chunks", [((1, 8, 96, 96), None), ((2, 5, 40, 41), 3)],
                         ids=["empg-swin-l-384", "uneven-last-chunk"])
def test_chunks_of_several_tiles_match_reference(monkeypatch, device, shape, max_chunks):
    """Each program of the chunked kernels loops over CHUNK_TILES > 1 tiles: the EMPG's SimAM at
    Swin-L 384 (8 channels on the 96 x 96 stage-1 grid: 2 tiles a chunk), and a row of 7 tiles
    in chunks of 3 (the last chunk's only tile partly past the row's end)."""
    simam = simam_module()
    if max_chunks:                                       # forced through the chunked path
        monkeypatch.setattr(simam, "ROW_TILE", 0)
        monkeypatch.setattr(simam, "MAX_CHUNKS", max_chunks)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5
    assert simam.one_pass_blocks(x) is None and simam.row_grid(x)[2] > 1
    assert_kernel_matches_reference(x, torch.randn(shape, generator=gen, dtype=torch.float64),
                                    device)


def test_rows_of_exactly_one_row_tile_take_one_pass():
    """"Rows of at most ROW_TILE elements take one launch a direction" (`kernels.simam`): a
    row of exactly ROW_TILE elements is still one pass, one more element is not."""
    simam = simam_module()
    assert simam.one_pass_blocks(torch.empty(1, 1, 1, simam.ROW_TILE)) is not None
    assert simam.one_pass_blocks(torch.empty(1, 1, 1, simam.ROW_TILE + 1)) is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("row_tile", [0, 16384], ids=["chunked", "one-pass"])
def test_bfloat16_maps_accumulate_in_float32(monkeypatch, device, row_tile):
    """A bfloat16 map (as under autocast) keeps its statistics and the partial sums of both
    directions in float32: output and input gradient within bfloat16's rounding (2e-2 of the
    largest value) of the float64 reference on the same bfloat16 values."""
    simam = simam_module()
    monkeypatch.setattr(simam, "ROW_TILE", row_tile)
    gen = torch.Generator().manual_seed(13)
    shape = (2, 3, 130, 71)                              # 9,230 a row
    x = (torch.randn(shape, generator=gen) * 3 + 1).bfloat16()
    assert (simam.one_pass_blocks(x) is None) == (row_tile == 0)
    grad = torch.randn(shape, generator=gen).bfloat16()
    ref_in = x.double().requires_grad_()
    ref = simam_reference(ref_in)
    ref.backward(grad.double())
    ker_in = x.to(device).requires_grad_()
    out = kernels.simam_triton(ker_in)
    out.backward(grad.to(device))
    assert out.dtype == ker_in.grad.dtype == torch.bfloat16
    for actual, expected in ((out, ref), (ker_in.grad, ref_in.grad)):
        err = (actual.cpu().double() - expected).abs().max() / expected.abs().max()
        assert err < 2e-2

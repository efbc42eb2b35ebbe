"""`GraphedTrainStep`: on CUDA, steps replayed from a CUDA graph equal eager steps (same
parameters after every step, same losses), with a changing learning rate, SGD and AdamW; a batch
of another shape is refused by name; the fast path, the fused adapters with recomputed frozen
sub-layers and with a checkpointed block are all capturable (the fused adapters' TF32 matmuls
compared at TF32's tolerance, see `assert_same_run`). Without CUDA only the refusal on the CPU
is testable."""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from ivt.fast import make_fast
from ivt.graph_step import GraphedTrainStep
from ivt.models.segmentor import build_segmentor


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["vis"], batch["ir"]), batch["label"], ignore_index=255)


# `make_fast`'s impl and memory: the fast path; the fused Hybrid Adapters with the frozen
# sub-layers recomputed in backward; the fused adapters with the first block checkpointed
OPTIONS = {"fast": {"impl": "fast"},
           "fused:recompute": {"impl": "fused", "memory": "recompute"},
           "fused:checkpoint:1": {"impl": "fused", "memory": "checkpoint:1"}}


def model(device, options=OPTIONS["fast"]):
    torch.manual_seed(0)
    # no dropout / drop-path: eager and graphed steps draw different random numbers
    built = build_segmentor("swin_nano", 5, "ivt", head_dim=32, head_dropout=0.0, dropout=0.0,
                            drop_path_rate=0.0)
    return make_fast(built, options["impl"], options.get("memory", "keep")).to(device)


def batches(device, n, size=(64, 96)):
    g = torch.Generator().manual_seed(1)
    for _ in range(n):
        yield {"vis": torch.randn(2, 3, *size, generator=g).to(device),
               "ir": torch.randn(2, 1, *size, generator=g).to(device),
               "label": torch.randint(0, 5, (2, size[0] // 4, size[1] // 4),
                                      generator=g).to(device),
               "name": ["a", "b"]}


def test_refuses_cpu_model():
    m = model("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainStep(m, loss_fn, torch.optim.SGD(m.parameters(), lr=0.1), lambda: None)


def test_capture_checks_only_its_own_thread(monkeypatch):
    """The trainer's DataLoader pins host memory on another thread while the step is captured;
    under CUDA's default ("global") capture mode, that thread's calls could invalidate the
    capture (a crash at step 2 of a --cuda-graph run). The capture is made in "thread_local"
    mode: checked here on stand-ins for CUDA's graph objects (the capture itself: the CUDA tests
    below)."""
    seen = []

    @contextlib.contextmanager
    def graph(cuda_graph, **options):
        seen.append(options)
        yield

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "a graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    step = GraphedTrainStep.__new__(GraphedTrainStep)
    step.device = torch.device("cpu")
    step.optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    step._body = lambda batch, cache_casts: torch.zeros(())
    step._capture({"vis": torch.ones(2), "name": ["a"]})
    assert seen == [{"capture_error_mode": "thread_local"}]


def assert_same_run(graph_model, eager_model, start: dict, tf32: bool) -> None:
    """Every parameter and buffer of the graphed run equals the eager run's. Element by element
    where the step's float32 matmuls are exact; where the Triton kernels' matmuls use TF32 (the
    fused adapters), each tensor's change over the run in norm, to 2%: TF32 rounds its inputs to
    10 mantissa bits, so the last-bit noise of the step's atomics-based kernels (the head's
    bilinear upsampling backward) flips roundings and moves single elements by ~1e-4 (measured on
    an H200, bench/results/2026-11-27-h200/), while a stale learning rate, a missed gradient or a
    replay of stale inputs moves whole tensors by tens of percent."""
    eager = dict(eager_model.state_dict())
    for name, got in graph_model.state_dict().items():
        expected = eager[name]
        if not (tf32 and expected.is_floating_point()):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
            continue
        moved = (expected - start[name]).double().norm().item()
        error = (got - expected).double().norm().item()
        assert error <= 2e-2 * moved + 1e-6 * expected.numel() ** 0.5, \
            f"{name}: graphed run off the eager one by {error:.3g}, the tensor moved {moved:.3g}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("optim", ["sgd", "adamw"])
@pytest.mark.parametrize("options", list(OPTIONS))
def test_graphed_steps_equal_eager_steps(optim, options):
    from ivt.engine import EagerStep
    from contextlib import nullcontext
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    eager_model = model(device, OPTIONS[options])
    graph_model = copy.deepcopy(eager_model)
    start = {k: v.clone() for k, v in eager_model.state_dict().items()}

    def make(m):
        # two groups, the backbone's at lr x0.1: each step sets every group's lr (`lr_mult`)
        params = [{"params": [p for n, p in m.named_parameters()
                              if p.requires_grad and not n.startswith("backbone.")]},
                  {"params": [p for n, p in m.named_parameters()
                              if p.requires_grad and n.startswith("backbone.")], "lr_mult": 0.1}]
        assert all(group["params"] for group in params)
        if optim == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-2)
        # Adam divides by sqrt(v) + eps, so at the default eps=1e-8 a gradient at rounding-noise
        # level (~1e-9, a bias feeding a normalisation) moves its parameter by a whole lr either
        # way: two identical eager runs then differ by 3e-4 (H200). eps=1e-4 leaves real
        # gradients' updates as they are and noise-level ones near zero.
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, eps=1e-4)

    eager = EagerStep(eager_model, loss_fn, make(eager_model), nullcontext, clip_grad=1.0)
    graphed = GraphedTrainStep(graph_model, loss_fn, make(graph_model), nullcontext, clip_grad=1.0)
    for i, batch in enumerate(batches(device, 5)):
        lr_scale = 1.0 - i / 5                                       # poly schedule
        le = eager(batch, (0.01 if optim == "sgd" else 1e-3) * lr_scale)
        lg = graphed(batch, (0.01 if optim == "sgd" else 1e-3) * lr_scale)
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-5)
    assert_same_run(graph_model, eager_model, start,
                    tf32=OPTIONS[options]["impl"] == "fused")
    other = next(batches(device, 1, size=(32, 96)))
    with pytest.raises(ValueError, match="vis"):
        graphed(other, 1e-3)


def test_a_batch_unlike_the_captured_one_is_refused_by_name():
    """After the capture, a batch is copied into the static buffers only when each tensor has
    the captured shape and dtype and there is no other tensor; otherwise a ValueError naming
    the tensor, on which the trainer continues with eager steps. Non-tensor values are not
    inputs. On the CPU, without a capture (`_load` alone)."""
    step = GraphedTrainStep.__new__(GraphedTrainStep)
    step.static = {"vis": torch.zeros(2, 3), "name": ["a", "b"]}
    step._load({"vis": torch.ones(2, 3), "name": ["c", "d"]})
    assert torch.equal(step.static["vis"], torch.ones(2, 3))
    for batch, says in [({"vis": torch.ones(2, 4)}, r"batch\['vis'\] has shape \(2, 4\)"),
                        ({"vis": torch.ones(2, 3, dtype=torch.float64)}, r"torch\.float64"),
                        ({"name": ["c", "d"]}, r"batch\['vis'\] is missing or not a tensor"),
                        ({"vis": torch.ones(2, 3), "ir": torch.ones(2)}, r"\['ir'\] that the")]:
        with pytest.raises(ValueError, match=says):
            step._load(batch)

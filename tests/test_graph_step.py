"""`GraphedTrainStep`: on CUDA, steps replayed from a CUDA graph equal eager steps (same
parameters after every step, same losses), with a changing learning rate, SGD and AdamW; a batch
of another shape is refused by name; the fast path, the fused adapters with recomputed frozen
sub-layers and with a checkpointed block are all capturable. Without CUDA only the refusal on the CPU is testable."""
import copy

import pytest
import torch
import torch.nn.functional as F

from ivt.graph_step import GraphedTrainStep
from ivt.models.segmentor import build_segmentor


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["vis"], batch["ir"]), batch["label"], ignore_index=255)


# the fast path; the fused Hybrid Adapters with the frozen sub-layers recomputed in backward;
# the fused adapters with the first block checkpointed
OPTIONS = {"fast": {"fast": True},
           "fused_lean": {"fast": True, "fused_adapters": True, "recompute_frozen": True},
           "fused_ckpt1": {"fast": True, "fused_adapters": True, "checkpoint_blocks": 1}}


def model(device, options=OPTIONS["fast"]):
    torch.manual_seed(0)
    # no dropout / drop-path: eager and graphed steps draw different random numbers
    return build_segmentor("swin_nano", 5, "ivt", head_dim=32, head_dropout=0.0, dropout=0.0,
                           drop_path_rate=0.0, **options).to(device)


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

    def make(m):
        params = [p for p in m.parameters() if p.requires_grad]
        if optim == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-2)
        return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)

    eager = EagerStep(eager_model, loss_fn, make(eager_model), nullcontext, clip_grad=1.0)
    graphed = GraphedTrainStep(graph_model, loss_fn, make(graph_model), nullcontext, clip_grad=1.0)
    for i, batch in enumerate(batches(device, 5)):
        lr_scale = 1.0 - i / 5                                       # poly schedule
        le = eager(batch, (0.01 if optim == "sgd" else 1e-3) * lr_scale)
        lg = graphed(batch, (0.01 if optim == "sgd" else 1e-3) * lr_scale)
        torch.testing.assert_close(lg, le, rtol=1e-4, atol=1e-5)
    for (name, pe), pg in zip(eager_model.named_parameters(), graph_model.parameters()):
        torch.testing.assert_close(pg, pe, rtol=1e-4, atol=1e-5, msg=name)
    for (name, be), bg in zip(eager_model.named_buffers(), graph_model.buffers()):
        torch.testing.assert_close(bg, be, rtol=1e-4, atol=1e-5, msg=name)
    other = next(batches(device, 1, size=(32, 96)))
    with pytest.raises(ValueError, match="vis"):
        graphed(other, 1e-3)

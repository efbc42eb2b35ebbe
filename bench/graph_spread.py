"""How far a training run replayed from a CUDA graph lands from an eager run, next to how far two
identical eager runs land from each other (CUDA only).

`tests/test_graph_step.py` compares graphed and eager runs; on a GPU the eager run is not
bit-reproducible (the head's bilinear-upsampling backward accumulates with atomics), so this
script measures that spread first, for each of the test's model options and optimizers: the
losses' last two steps, then the largest parameter difference of eager-vs-eager and
graphed-vs-eager with its parameter and gradient size, and the largest buffer difference.

    python bench/graph_spread.py                   # swin_nano, 5 steps, every option
"""
import argparse
import copy
import sys
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)
sys.path.insert(1, str(ROOT / "tests"))

import test_graph_step as cases  # noqa: E402
from ivt.engine import EagerStep  # noqa: E402
from ivt.graph_step import GraphedTrainStep  # noqa: E402


def optimizer(model, name: str, eps: float):
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-2)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, eps=eps)


def largest_difference(a: torch.nn.Module, b: torch.nn.Module) -> tuple:
    """(max |a - b| over parameters, its parameter's name, that parameter's max |grad| in a)."""
    rows = [((pa - pb).abs().max().item(), name,
             pa.grad.abs().max().item() if pa.grad is not None else float("nan"))
            for (name, pa), pb in zip(a.named_parameters(), b.parameters())]
    return max(rows)


def spread(options: str, optim: str, eps: float, steps: int) -> str:
    device = torch.device("cuda")
    first = cases.model(device, cases.OPTIONS[options])
    models = [first, copy.deepcopy(first), copy.deepcopy(first)]
    runs = [EagerStep(models[0], cases.loss_fn, optimizer(models[0], optim, eps), nullcontext,
                      clip_grad=1.0),
            EagerStep(models[1], cases.loss_fn, optimizer(models[1], optim, eps), nullcontext,
                      clip_grad=1.0),
            GraphedTrainStep(models[2], cases.loss_fn, optimizer(models[2], optim, eps),
                             nullcontext, clip_grad=1.0)]
    losses = []
    for i, batch in enumerate(cases.batches(device, steps)):
        lr = (0.01 if optim == "sgd" else 1e-3) * (1 - i / steps)          # poly schedule
        got = [float(run(batch, lr)) for run in runs]
        losses.append(f"{got[0]:.7f} eager2-eager {got[1] - got[0]:+.1e} "
                      f"graph-eager {got[2] - got[0]:+.1e}")
    buffers = [max(((x.float() - y.float()).abs().max().item()
                    for x, y in zip(models[0].buffers(), other.buffers())), default=0.0)
               for other in models[1:]]
    return (f"[{options}-{optim}-eps{eps:g}] losses: " + " | ".join(losses[-2:]) + "\n"
            f"   param max diff eager2: {largest_difference(models[0], models[1])}  "
            f"graph: {largest_difference(models[0], models[2])}  "
            f"buffers eager2 {buffers[0]:.1e} graph {buffers[1]:.1e}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="training steps per run (default 5)")
    p.add_argument("--options", nargs="+", default=list(cases.OPTIONS),
                   choices=list(cases.OPTIONS), help="model options of the test (default: all)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    for options in args.options:
        for optim, eps in (("sgd", 1e-8), ("adamw", 1e-8), ("adamw", 1e-4)):
            try:
                print(spread(options, optim, eps, args.steps), flush=True)
            except Exception:                  # one failing option must not hide the others
                print(f"[{options}-{optim}-eps{eps:g}] failed")
                traceback.print_exc()


if __name__ == "__main__":
    main()

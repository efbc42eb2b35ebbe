"""`--cuda-graph` on the CPU: a CUDA graph cannot capture an operator that makes the host wait for
the GPU (a tensor's value read into Python, an output shape that depends on the values, a tensor
made from Python data), and the capture then fails with a CUDA error, on a GPU only. Here each
task's training step (forward, loss, backward, gradient clipping: everything the graph captures
but the optimizer, whose capturable form `tests/test_graph_step.py` checks on CUDA) runs as
`train_*.py --impl fused` builds it: once as the eager warm-up before a capture, then again, the
fused kernels under Triton's interpreter, recording every such operator. Segmentation and
SOD (Swin and EVA02) must have none; detection has them (its Hungarian matching), which is why
its `--cuda-graph` runs eager steps (`DetTask.eager_only`)."""
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kernels  # noqa: E402
from ivt import engine, trainer  # noqa: E402
from ivt.data.synthetic import write_m3fd, write_mfnet, write_vt  # noqa: E402
from ivt.models import normalization_for  # noqa: E402
from ivt.tasks import task_module  # noqa: E402
from script_runs import load_bench  # noqa: E402

aten = torch.ops.aten
# operators a capture refuses on a GPU: a value read into Python, an output whose shape depends
# on the values, a tensor made from Python data (copied from the host)
HOST_WAITS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
              aten.is_nonzero.default, aten.equal.default, aten._unique2.default,
              aten.unique_consecutive.default, aten.unique_dim.default,
              aten.repeat_interleave.Tensor, aten.lift_fresh.default}
TASK_CLASSES = {"seg": "SegTask", "sod": "SODTask", "det": "DetTask"}


def _bench_train_step():
    return load_bench("train_step")


class HostWaits(TorchDispatchMode):
    """Records the operators of HOST_WAITS, and indexing by a boolean mask (a nonzero inside),
    outside Triton launches (the interpreter's own copies are no GPU operators)."""

    def __init__(self, launches):
        super().__init__()
        self.found, self.launches = [], launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.launches.inside:
            masks = [a for a in (args[1] if func in (aten.index.Tensor, aten.index_put_.default)
                                 else ()) if isinstance(a, torch.Tensor) and a.dtype == torch.bool]
            if func in HOST_WAITS or masks:
                self.found.append(str(func))
        return func(*args, **(kwargs or {}))


def _write(task: str, root: Path) -> list:
    """Tiny synthetic data for `task` -> the training script's data flags."""
    if task == "seg":
        write_mfnet(root, n_train=2, n_val=1, n_test=1, size=(32, 48))
        return ["--data", str(root), "--head-dim", "16"]
    if task == "sod":
        write_vt(root, n_train=3, n_test=1, n_vt1000=1, n_vt821=1, size=(32, 40))
        return ["--data", str(root / "VT5000" / "Train"), "--val-count", "1"]
    write_m3fd(root, 10, size=(48, 64))
    return ["--data", str(root), "--split-dir", str(root), "--hidden-dim", "16",
            "--num-queries", "8", "--dec-layers", "2"]


def host_waits_of_a_step(task: str, backbone: str, tmp_path: Path, impl: str = "fused") -> list:
    """The HOST_WAITS operators of one training step of `task` on `backbone`, as the training
    script builds it with `--impl impl`, on tiny synthetic data."""
    task_obj = getattr(task_module(task), TASK_CLASSES[task])()
    args = trainer.get_parser(task_obj).parse_args(_write(task, tmp_path / "data") + [
        "--backbone", backbone, "--d2", "8", "--size", "32" if task != "det" else "64",
        "--batch-size", "2", "--pretrained", "none", "--impl", impl, "--device", "cpu",
        "--out", str(tmp_path / "run")])
    config = {"task": task, **vars(args)}
    (tmp_path / "run").mkdir()
    train_set, _ = task_obj.build_datasets(args, normalization_for(backbone), tmp_path / "run",
                                           True)
    dist = engine.DistInfo(0, 1, 0, torch.device("cpu"))
    batch = next(iter(engine.InfiniteBatches(train_set, 2, dist, seed=0)))
    torch.manual_seed(0)
    model = trainer.speed_up(task_obj.build_model(config, None), config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    bench = _bench_train_step()
    previous = kernels.backend()

    def step():
        task_obj.loss(model, batch, dist.device).backward()
        engine.clip_gradients(params, args.clip_grad, args.clip_grad_value, foreach=True)

    try:
        # The eager warm-up step before a capture fills the model's caches. Here the fused
        # kernels take their PyTorch references (the interpreter's time goes to the recorded
        # step): a cache that only the kernels fill is filled in the recorded step instead, where
        # a host wait it makes is found, so the check is stricter than a GPU's warm-up.
        kernels.set_backend("torch")
        step()
        kernels.set_backend("triton" if impl == "fused" else "torch")
        with bench.TritonLaunches() as launches:
            with HostWaits(launches) as waits:
                step()
    finally:
        kernels.set_backend(previous)
    assert launches.count > 0 or impl != "fused", "the fused kernels did not run"
    return waits.found


pytestmark = pytest.mark.skipif(not kernels.interpreter_ready(),
                                reason=f"needs Triton's interpreter ({kernels.INTERPRETER_NEEDS})")


@pytest.mark.parametrize("task, backbone", [("seg", "swin_nano"), ("sod", "swin_nano"),
                                            ("sod", "eva02_b")])
def test_captured_tasks_never_make_the_host_wait(task, backbone, tmp_path):
    assert host_waits_of_a_step(task, backbone, tmp_path) == []


def test_detection_makes_the_host_wait_so_its_steps_stay_eager(tmp_path):
    assert host_waits_of_a_step("det", "swin_nano", tmp_path, impl="reference")
    assert task_module("det").DetTask.eager_only

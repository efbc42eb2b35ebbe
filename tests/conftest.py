"""Test-wide settings: one intra-op thread per process.

The tests run tiny models, where a second OpenMP thread buys little; on a loaded 2-core machine
it costs a lot (threads spin waiting for a busy core: a 50x slowdown was measured here).
Subprocesses started by the tests inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def script_env(monkeypatch):
    """For tests that call a script's `main()`: the script sets IVT_KERNELS from --kernels
    (restored afterwards by monkeypatch) and may change torch's thread count (restored to one,
    as the subprocesses get through OMP_NUM_THREADS: identical arithmetic for resume checks)."""
    monkeypatch.setenv("IVT_KERNELS", "auto")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

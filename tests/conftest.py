"""Test-wide settings: one intra-op thread per process; Triton's interpreter without a GPU.

The tests run tiny models, where a second OpenMP thread buys little; on a loaded 2-core machine
it costs a lot (threads spin waiting for a busy core: a 50x slowdown was measured here).
Subprocesses started by the tests inherit OMP_NUM_THREADS.
"""
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# Without a GPU the Triton kernels are tested under Triton's interpreter, which must be asked for
# before `kernels` is imported (as `make test` does; `pytest tests/test_kernels.py` alone too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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


@pytest.fixture(scope="session", autouse=True)
def children_write_temporary_files_under_pytests_folder(tmp_path_factory):
    """The processes the tests start (torchrun's log folders, multiprocessing's folders, a run
    killed on purpose), and this one (a DataLoader's workers' listener socket), make their
    temporary files under pytest's temporary folder, which pytest prunes, instead of leaving them
    in the system's."""
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp"))
    tempfile.tempdir = None             # tempfile caches the folder it found first

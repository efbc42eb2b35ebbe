"""Test-wide settings: one intra-op thread per process.

The tests run tiny models, where a second OpenMP thread buys little; on a loaded 2-core machine
it costs a lot (threads spin waiting for a busy core: a 50x slowdown was measured here).
Subprocesses started by the tests inherit OMP_NUM_THREADS.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

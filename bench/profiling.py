"""GPU time of one call by kernel, from the profiler (shared by the GPU benchmarks)."""
import collections
from typing import Callable, Optional

import torch


def kernel_time(fn: Callable[[], object], top: Optional[int] = None) -> tuple:
    """(GPU busy ms, CUDA kernels launched, the kernels grouped by name as [name, us, launches],
    costliest first: the first `top` of them, or all) of one call of fn, from the profiler's
    CUDA kernel durations. Wall time of a call measures the host as well; this is the device."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # not the GPU-side ranges of `record_function` scopes (e.g. every optimizer.step()), which
    # the profiler lists on the device timeline too (torch's own summary skips them as well)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
               and not getattr(e, "is_user_annotation", False)]
    by_name = collections.defaultdict(lambda: [0.0, 0])
    for e in kernels:
        by_name[e.name][0] += e.time_range.elapsed_us()
        by_name[e.name][1] += 1
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return (sum(e.time_range.elapsed_us() for e in kernels) / 1e3, len(kernels),
            [[name[:120], round(us, 1), launches] for name, (us, launches) in ranked])


def profile_once_before_timing() -> None:
    """Profile a trivial call, before any timing: what the profiler leaves set up after its
    first use (CUPTI's callbacks stay registered in some torch versions) then slows every
    measurement of the run alike, not only those made after the first profiled mode."""
    kernel_time(lambda: torch.ones(1, device="cuda") * 2)

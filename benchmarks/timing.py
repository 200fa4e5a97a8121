"""How every benchmark here times a call and measures its memory (imported by the scripts beside it).

    median_ms(fn, device, reps, setup=None)   median ms of fn() over `reps` runs after one warm-up
    with PeakMemory(device) as peak: fn()      peak.extra_gib: peak device memory above the start

On CUDA the time is taken with CUDA events on the current stream, which also covers work a call
issues on side streams as long as the current stream waits for it before the call returns (the swap
engine's rule), and the host time of a call whose device work is shorter (the end event is enqueued
only when fn returns). On the CPU it is the host clock.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

GIB = 2**30


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, reps: int,
              setup: Callable[[], object] | None = None) -> float:
    """Median wall time of `fn()` in milliseconds over `reps` timed runs after one untimed warm-up.

    `setup` (if given) runs untimed before every call, e.g. to restore an input that fn overwrites.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    times = []
    for rep in range(reps + 1):
        if setup is not None:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            began = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - began) * 1e3
        if rep > 0:  # the first run compiles, autotunes, allocates
            times.append(elapsed)
    return statistics.median(times)


class PeakMemory:
    """Peak device memory allocated inside the block above what was allocated when it began.

    `extra_bytes` / `extra_gib` are None on the CPU (torch keeps no allocator statistics there).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.extra_bytes: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra_bytes = torch.cuda.max_memory_allocated(self.device) - self._base

    @property
    def extra_gib(self) -> float | None:
        return None if self.extra_bytes is None else self.extra_bytes / GIB

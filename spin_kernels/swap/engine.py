"""Copy engine behind `spin_kernels.swap`: host arenas, batched copies and their stream ordering.

Two implementations with one interface: the C++ extension `spin_kernels._swap_ext` (exact-size
pinned arenas from cudaHostAlloc, a whole list of copies per call with the GIL released) and plain
torch (pinned memory from the caching host allocator, which rounds every request up to a power of
two, and one `copy_` per tensor). Ordering rules, the same for both:

* a batch runs on a side stream that first waits for the caller's current stream (the tensors it
  reads were written there), and the current stream waits for the batch before going on (so its
  next kernels see the new values and may reuse freed memory);
* every batch that touches host memory leaves an event; the CPU must wait for it before it reads or
  writes that host memory itself (a DMA may still be reading or writing it).
"""
from __future__ import annotations

from typing import Sequence

import torch

try:
    from spin_kernels import _swap_ext
except ImportError:  # built with SPIN_KERNELS_NO_EXT=1, or not built: the torch engine serves
    _swap_ext = None

# Offsets of tensors inside an arena are multiples of this: any vectorised kernel, cuBLAS and the
# DMA engines are happy with it, and it costs at most 255 bytes per tensor (0.002 % of 3 GB in
# 200 tensors).
ARENA_ALIGNMENT = 256

BACKEND_NAMES = ("cuda-ext", "cpu-ext", "torch")


def live_backend() -> str:
    """The implementation this installation uses by default: "cuda-ext", "cpu-ext" or "torch"."""
    if _swap_ext is None:
        return "torch"
    return "cuda-ext" if _swap_ext.with_cuda else "cpu-ext"


def align_up(nbytes: int, alignment: int = ARENA_ALIGNMENT) -> int:
    return (nbytes + alignment - 1) // alignment * alignment


class CopyEngine:
    """Allocation and batched copies for one backend ("ext" uses the extension, "torch" does not)."""

    def __init__(self, use_extension: bool):
        if use_extension and _swap_ext is None:
            raise ValueError("backend: the C++ extension spin_kernels._swap_ext is not built; "
                             "use backend='torch' or rebuild the package")
        self.use_extension = use_extension
        self._side_streams: dict[tuple[int, int], torch.cuda.Stream] = {}

    @property
    def name(self) -> str:
        return live_backend() if self.use_extension else "torch"

    # -- host memory ------------------------------------------------------------------------------

    def alloc_host(self, nbytes: int, pinned: bool) -> torch.Tensor:
        """An uninitialised host uint8 tensor of `nbytes`, pinned if asked (views keep it alive)."""
        if self.use_extension and (_swap_ext.with_cuda or not pinned):
            return _swap_ext.alloc_host(nbytes, pinned)
        # A CPU-only extension cannot pin; torch's allocator can, at the price of rounding.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)

    def host_footprint(self, nbytes: int, pinned: bool) -> int:
        """Host bytes that `alloc_host(nbytes, pinned)` really reserves."""
        if pinned and not (self.use_extension and _swap_ext.with_cuda):
            return 1 << max(nbytes - 1, 0).bit_length()  # CachingHostAllocator: next power of two
        return nbytes

    def device_view(self, host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """A CUDA tensor that reads pinned `host` memory in place (kernels fetch only the bytes they
        touch over the bus), or None where this engine cannot make one."""
        if not (self.use_extension and _swap_ext.with_cuda and device.type == "cuda"):
            return None
        try:
            return _swap_ext.device_view(host, _index(device))
        except RuntimeError:  # not in memory from cudaHostAlloc, or mapped for another device
            return None

    # -- streams ----------------------------------------------------------------------------------

    def side_stream(self, device: torch.device, lane: int = 0) -> torch.cuda.Stream:
        """This engine's stream number `lane` on `device` (lane 1 carries device-to-host stashes)."""
        key = (_index(device), lane)
        if key not in self._side_streams:
            self._side_streams[key] = torch.cuda.Stream(device=key[0])
        return self._side_streams[key]

    # -- copies -----------------------------------------------------------------------------------

    def copy_batch(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor],
                   device: torch.device | None) -> torch.cuda.Event | None:
        """dsts[i] <- srcs[i]. With a CUDA `device` the batch runs on its side stream, ordered
        against the current stream; returns the event to wait on before host access, else None."""
        assert len(dsts) == len(srcs)
        if device is None or device.type != "cuda":
            self._issue(dsts, srcs, stream=None, device_index=-1)
            return None
        side = self.side_stream(device)
        current = torch.cuda.current_stream(device)
        side.wait_stream(current)
        self._issue(dsts, srcs, stream=side, device_index=_index(device))
        return _finish_on(side, current)

    def stash_and_load(self, live: Sequence[torch.Tensor], stash: Sequence[torch.Tensor],
                       bank: Sequence[torch.Tensor], device: torch.device | None) -> torch.cuda.Event | None:
        """stash[i] <- live[i], then live[i] <- bank[i]; on CUDA the device-to-host stash and the
        host-to-device load run on two streams, so both PCIe directions work at once."""
        assert len(live) == len(stash) == len(bank)
        if device is None or device.type != "cuda":
            self._issue(stash, live, stream=None, device_index=-1)
            self._issue(live, bank, stream=None, device_index=-1)
            return None
        current = torch.cuda.current_stream(device)
        load_stream = self.side_stream(device)
        stash_stream = self.side_stream(device, lane=1)
        stash_stream.wait_stream(current)
        load_stream.wait_stream(current)
        fast = [i for i in range(len(live)) if self._fast_pair(live[i], bank[i]) and self._fast_pair(stash[i], live[i])]
        fast_set = set(fast)
        if self.use_extension and fast:
            _swap_ext.stash_and_load([live[i] for i in fast], [stash[i] for i in fast], [bank[i] for i in fast],
                                     stash_stream.cuda_stream, load_stream.cuda_stream, _index(device))
        for i in range(len(live)):
            if self.use_extension and i in fast_set:
                continue
            with torch.cuda.stream(stash_stream):
                stash[i].copy_(live[i], non_blocking=True)
            load_stream.wait_stream(stash_stream)
            with torch.cuda.stream(load_stream):
                live[i].copy_(bank[i], non_blocking=True)
        load_stream.wait_stream(stash_stream)
        return _finish_on(load_stream, current)

    def _fast_pair(self, dst: torch.Tensor, src: torch.Tensor) -> bool:
        """Whether the extension can do this copy (else torch's copy_ does it, on the same stream)."""
        return (self.use_extension and dst.is_contiguous() and src.is_contiguous()
                and (_swap_ext.with_cuda or (dst.device.type == "cpu" and src.device.type == "cpu")))

    def issue(self, dsts: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], stream: torch.cuda.Stream | None,
              device_index: int = -1) -> None:
        """dsts[i] <- srcs[i] on `stream` (None: synchronously), without any ordering of its own."""
        self._issue(dsts, srcs, stream, device_index)

    def _issue(self, dsts, srcs, stream: torch.cuda.Stream | None, device_index: int) -> None:
        fast = [i for i in range(len(dsts)) if self._fast_pair(dsts[i], srcs[i])]
        if fast:
            _swap_ext.copy_batch([dsts[i] for i in fast], [srcs[i] for i in fast],
                                 stream.cuda_stream if stream is not None else 0, device_index)
        fast_set = set(fast)
        slow = [i for i in range(len(dsts)) if i not in fast_set]
        if not slow:
            return
        if stream is None:
            for i in slow:
                dsts[i].copy_(srcs[i])
            return
        with torch.cuda.stream(stream):
            for i in slow:
                dsts[i].copy_(srcs[i], non_blocking=True)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _finish_on(side: torch.cuda.Stream, current: torch.cuda.Stream) -> torch.cuda.Event:
    done = torch.cuda.Event()
    done.record(side)
    current.wait_stream(side)
    return done


def resolve_engine(backend: str | None) -> CopyEngine:
    """`backend`: None or "auto" (the live one), "ext" / "cuda-ext" / "cpu-ext", or "torch"."""
    if backend is None or backend == "auto":
        return CopyEngine(use_extension=_swap_ext is not None)
    if backend == "torch":
        return CopyEngine(use_extension=False)
    if backend in ("ext", "cuda-ext", "cpu-ext"):
        if backend != "ext" and backend != live_backend():
            raise ValueError(f"backend={backend!r} requested but the built extension is {live_backend()!r}")
        return CopyEngine(use_extension=True)
    raise ValueError(f"backend must be None, 'auto', 'ext', 'torch' or one of {BACKEND_NAMES}, got {backend!r}")


def wait_host(event: torch.cuda.Event | None) -> None:
    """Block the CPU until the DMA that `event` marks is done (no-op for synchronous copies)."""
    if event is not None:
        event.synchronize()


def bump_versions(tensors: Sequence[torch.Tensor]) -> None:
    """Tell autograd that these tensors were written behind its back (the extension writes raw
    memory), so a graph that saved the old values fails loudly instead of using the new ones."""
    for tensor in tensors:
        if not tensor.is_inference():
            torch.autograd.graph.increment_version(tensor)

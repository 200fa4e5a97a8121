"""The bytes a run allocates, measured on the CPU as a GPU run would allocate them (no tests here)."""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from spin_kernels.dtensor import local_tensor


class LiveTensorBytes(TorchDispatchMode):
    """The peak bytes of the storages that ATen operators return, and of the storages FSDP2 resizes
    (its unsharded parameters are storages it grows and shrinks in place, no operator's output),
    live at once: what a GPU run allocates too. Kernels' private scratch is not seen (on the CPU, a
    bf16 matmul's fp32 result buffer, which cuBLAS does not need); storages that existed before
    (the weights) are not counted. A storage's Python object lives exactly as long as the storage
    (also when only autograd's saved tensors hold it), so its finalizer marks the free.
    `resized` is the bytes of the resized storages alone, and of all_gather()'s outputs (FSDP's
    gathered weights). With `snapshots`, `at_peak` is what was live at the peak: (bytes, the
    operator that made it), largest first (to find which tensors make a peak; costs a copy at every
    new peak)."""

    def __init__(self, existing, snapshots=False):
        super().__init__()
        self.snapshots, self.made_by, self.peak_live = snapshots, {}, {}
        self.existing = {local_tensor(t).untyped_storage()._cdata for t in existing}
        self.live = {}        # the storage's C object -> bytes
        self.resized_keys = set()
        self.current = self.peak = self.resized = self.resized_peak = 0
        self.windows = {}   # name -> the peak since open_window(name), while that window is open
        self.paused = False

    def _set(self, key, nbytes):
        change = nbytes - self.live.get(key, 0)
        self.live[key] = nbytes
        self.current += change
        if self.current > self.peak and self.snapshots:
            self.peak_live = {k: (n, self.made_by.get(k, "resized by FSDP")) for k, n in self.live.items()}
        self.peak = max(self.peak, self.current)
        for name, peak in self.windows.items():
            self.windows[name] = max(peak, self.current)
        if key in self.resized_keys:
            self.resized += change
            self.resized_peak = max(self.resized_peak, self.resized)

    def _release(self, key):
        self._set(key, 0)
        del self.live[key]
        self.resized_keys.discard(key)
        self.made_by.pop(key, None)

    def open_window(self, name):
        """Starts a peak of its own (a phase of the step: close_window(name) returns it); windows of
        different names may overlap."""
        self.windows[name] = self.current

    def close_window(self, name):
        return self.windows.pop(name)

    @property
    def at_peak(self):
        return sorted(self.peak_live.values(), reverse=True)

    def _track(self, storage, nbytes, resized=False, made_by=None):
        key = storage._cdata
        if key in self.existing:
            return
        if made_by and key not in self.live:
            self.made_by[key] = made_by
        if resized:
            self.resized_keys.add(key)
        if key not in self.live:
            if nbytes == 0:
                return
            weakref.finalize(storage, self._release, key)
        self._set(key, nbytes)

    def one_kernel(self, function):
        """`function` as the one GPU kernel it stands for: only its outputs are counted, not the
        tensors its CPU twin works in (spin_kernels' torch backend of the Triton log-prob kernels:
        chunks of the logits in fp32)."""
        def counted_outputs(*args, **kwargs):
            self.paused = True
            try:
                out = function(*args, **kwargs)
            finally:
                self.paused = False
            self._track_outputs(out)
            return out

        return counted_outputs

    def all_gather(self, collective):
        """`collective` (an all-gather into its first argument) as one kernel whose output counts with
        the resized storages: FSDP's all-gather output holds a unit's gathered weights until their
        copy-out (a prefetched unit's during the backward of the one before)."""
        run = self.one_kernel(collective)

        def gathered(output, *args, **kwargs):
            key = local_tensor(output).untyped_storage()._cdata
            if key in self.live and key not in self.resized_keys:
                self.resized_keys.add(key)
                self.resized += self.live[key]
                self.resized_peak = max(self.resized_peak, self.resized)
            return run(output, *args, **kwargs)

        return gathered

    def _track_outputs(self, out, func=None):
        for tensor in tree_flatten(out)[0]:
            tensor = local_tensor(tensor)   # a DTensor op (the mode sees it before DTensor does): its shard
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage()._cdata not in self.live:
                made_by = f"{func} {tuple(tensor.shape)} {tensor.dtype}" if self.snapshots else None
                self._track(tensor.untyped_storage(), tensor.untyped_storage().nbytes(), made_by=made_by)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            self._track_outputs(out, func)
        return out

    def __enter__(self):
        resize, live = torch.UntypedStorage.resize_, self

        def tracked_resize(storage, size):
            result = resize(storage, size)
            live._track(storage, size, resized=True)
            return result

        self._resize = resize
        torch.UntypedStorage.resize_ = tracked_resize
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)


def allocated_peak(model, fn):
    with LiveTensorBytes(list(model.parameters()) + list(model.buffers())) as live:
        fn()
    return live.peak

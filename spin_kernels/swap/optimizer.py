"""Optimizer-state offload: Adam-style state tensors to one host arena (pinned on CUDA) and back.

While the model generates, the optimizer's state (two fp32 moments per parameter for Adam: 8 bytes
per parameter, 10 GB for a 1.2 B model) only takes device memory. `offload_optimizer` copies every
state tensor into a `WeightBank` arena in one batch and puts the host views into `optimizer.state`,
which frees the device tensors; `onload_optimizer` copies them back into fresh device tensors, bit
for bit. The arena is kept for the next offload unless asked otherwise, because pinning gigabytes
costs far more than copying them.
"""
from __future__ import annotations

import dataclasses
import weakref

import torch

from spin_kernels.swap.bank import WeightBank, local_tensor


@dataclasses.dataclass
class _StateEntry:
    """One state tensor: where it lives in the optimizer and where it came from."""
    state: dict            # optimizer.state[param]
    key: str
    device: torch.device
    dtensor_spec: tuple | None  # (device_mesh, placements, shape, stride) of a DTensor, else None


@dataclasses.dataclass
class OptimizerOffload:
    """The host copy of one optimizer's state (returned by `offload_optimizer`)."""
    bank: WeightBank
    entries: dict[str, _StateEntry]
    on_host: bool

    def synchronize(self) -> None:
        """Wait until the host copy is complete (needed before reading it on the CPU)."""
        self.bank.synchronize()


# One record per live optimizer, dropped with it: onload needs to know where each tensor came from.
_RECORDS: "weakref.WeakKeyDictionary[object, OptimizerOffload]" = weakref.WeakKeyDictionary()


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "state") and hasattr(optimizer, "param_groups")):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")


def _state_tensors(optimizer) -> dict[str, tuple[dict, str, torch.Tensor]]:
    """{"group.param.key": (state dict, key, tensor)} for every tensor in the optimizer's state."""
    found = {}
    for group_index, group in enumerate(optimizer.param_groups):
        for param_index, param in enumerate(group["params"]):
            state = optimizer.state.get(param)
            if not state:
                continue
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    found[f"{group_index}.{param_index}.{key}"] = (state, key, value)
    return found


def _dtensor_spec(tensor: torch.Tensor) -> tuple | None:
    if local_tensor(tensor) is tensor:
        return None
    return (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())


def offload_optimizer(optimizer, *, blocking: bool = True, backend: str | None = None,
                      pin_memory: bool | None = None) -> OptimizerOffload:
    """Move every state tensor of `optimizer` to host memory and free its device memory.

    The state then holds host views into one arena until `onload_optimizer`. With blocking=False the
    copies may still be running when this returns: call `.synchronize()` on the result before reading
    the host state on the CPU (the device side is ordered correctly either way)."""
    _check_optimizer(optimizer)
    record = _RECORDS.get(optimizer)
    if record is not None and record.on_host:
        raise ValueError("offload_optimizer: this optimizer's state is already offloaded")
    found = _state_tensors(optimizer)
    sources = {name: local_tensor(tensor) for name, (_, _, tensor) in found.items()}
    layout = {name: (tuple(t.shape), t.dtype) for name, t in sources.items()}
    reusable = record is not None and {n: (s.shape, s.dtype) for n, s in record.bank.slots.items()} == layout
    if reusable:
        bank = record.bank
        bank.update_from(sources)
    else:
        bank = WeightBank.from_tensors(sources, backend=backend, pin_memory=pin_memory)
    entries = {}
    host = bank.views()
    for name, (state, key, tensor) in found.items():
        entries[name] = _StateEntry(state, key, tensor.device, _dtensor_spec(tensor))
        state[key] = host[name]
    record = OptimizerOffload(bank, entries, on_host=True)
    _RECORDS[optimizer] = record
    if blocking:
        bank.synchronize()
    return record


def onload_optimizer(optimizer, *, keep_host_buffer: bool = True) -> None:
    """Copy the offloaded state back to the devices it came from (new tensors, bit for bit).

    keep_host_buffer=False frees the host arena (after waiting for the copies); by default it is kept
    for the next `offload_optimizer`."""
    _check_optimizer(optimizer)
    record = _RECORDS.get(optimizer)
    if record is None or not record.on_host:
        raise ValueError("onload_optimizer: this optimizer's state is not offloaded "
                         "(call offload_optimizer first)")
    bank = record.bank
    names = list(record.entries)
    targets = {}
    for name in names:
        entry = record.entries[name]
        slot = bank.slots[name]
        targets[name] = torch.empty(slot.shape, dtype=slot.dtype, device=entry.device)
    bank.load_into(targets)
    for name in names:
        entry = record.entries[name]
        value = targets[name]
        if entry.dtensor_spec is not None:
            from torch.distributed.tensor import DTensor

            mesh, placements, shape, stride = entry.dtensor_spec
            value = DTensor.from_local(value, mesh, placements, run_check=False, shape=shape, stride=stride)
        entry.state[entry.key] = value
    record.on_host = False
    if not keep_host_buffer:
        bank.synchronize()
        del _RECORDS[optimizer]

"""Optimizer-state offload: Adam-style state tensors to one host arena (pinned on CUDA) and back.

While the model generates, the optimizer's state (two fp32 moments per parameter for Adam: 8 bytes
per parameter, 10 GB for a 1.2 B model) only takes device memory. `offload_optimizer` copies every
state tensor into a `WeightBank` arena in one batch and puts the host views into `optimizer.state`,
which frees the device tensors; `onload_optimizer` copies them back into fresh device tensors, bit
for bit. The arena is kept for the next offload unless asked otherwise, because pinning gigabytes
costs far more than copying them: the caller holds the returned `OptimizerOffload` and passes it
back (`offload_optimizer(opt, reuse=record)`); there is no registry of optimizers here.
"""
from __future__ import annotations

import dataclasses

import torch

from spin_kernels.dtensor import is_dtensor, local_tensor
from spin_kernels.swap.bank import WeightBank


@dataclasses.dataclass
class _StateEntry:
    """One state tensor: where it lives in the optimizer and where it came from."""
    state: dict            # optimizer.state[param]
    key: str
    device: torch.device
    dtensor_spec: tuple | None  # (device_mesh, placements, shape, stride) of a DTensor, else None


@dataclasses.dataclass
class OptimizerOffload:
    """The host copy of one optimizer's state. `offload_optimizer` returns it; the caller holds it,
    hands it to `onload_optimizer`, and may hand it to the next `offload_optimizer(..., reuse=)` so
    that the host arena is reused."""
    optimizer: object
    bank: WeightBank | None  # None once onloaded with keep_host_buffer=False
    entries: dict[str, _StateEntry]
    on_host: bool

    def synchronize(self) -> None:
        """Wait until the host copy is complete (needed before reading it on the CPU)."""
        if self.bank is not None:
            self.bank.synchronize()


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
    if not is_dtensor(tensor):
        return None
    return (tensor.device_mesh, tensor.placements, tensor.shape, tensor.stride())


def offload_optimizer(optimizer, *, blocking: bool = True, backend: str | None = None,
                      pin_memory: bool | None = None, reuse: OptimizerOffload | None = None) -> OptimizerOffload:
    """Move every state tensor of `optimizer` to host memory and free its device memory; returns
    the record that `onload_optimizer` takes.

    The state then holds host views into one arena until `onload_optimizer`. `reuse`: the record of
    an earlier round for this optimizer (onloaded since): its arena is refilled when the layout still
    fits, because pinning gigabytes costs far more than copying them. With blocking=False the copies
    may still be running when this returns: call `.synchronize()` on the result before reading the
    host state on the CPU (the device side is ordered correctly either way)."""
    _check_optimizer(optimizer)
    if reuse is not None:
        if not isinstance(reuse, OptimizerOffload) or reuse.optimizer is not optimizer:
            raise ValueError("offload_optimizer: reuse must be the OptimizerOffload of an earlier "
                             "offload of this same optimizer")
        if reuse.on_host:
            raise ValueError("offload_optimizer: this optimizer's state is already offloaded")
    found = _state_tensors(optimizer)
    sources = {name: local_tensor(tensor) for name, (_, _, tensor) in found.items()}
    layout = {name: (tuple(t.shape), t.dtype) for name, t in sources.items()}
    old_bank = reuse.bank if reuse is not None else None
    if old_bank is not None and {n: (s.shape, s.dtype) for n, s in old_bank.slots.items()} == layout:
        bank = old_bank
        bank.update_from(sources)
    else:
        bank = WeightBank.from_tensors(sources, backend=backend, pin_memory=pin_memory)
    entries = {}
    host = bank.views()
    for name, (state, key, tensor) in found.items():
        entries[name] = _StateEntry(state, key, tensor.device, _dtensor_spec(tensor))
        state[key] = host[name]
    record = reuse if reuse is not None else OptimizerOffload(optimizer, bank, entries, on_host=True)
    record.bank, record.entries, record.on_host = bank, entries, True
    if blocking:
        bank.synchronize()
    return record


def onload_optimizer(record: OptimizerOffload, *, keep_host_buffer: bool = True) -> None:
    """Copy the state that `offload_optimizer` moved (its returned `record`) back to the devices it
    came from (new tensors, bit for bit).

    keep_host_buffer=False frees the host arena (after waiting for the copies); by default the record
    keeps it for the next `offload_optimizer(..., reuse=record)`."""
    if not isinstance(record, OptimizerOffload):
        raise TypeError(f"onload_optimizer takes the OptimizerOffload that offload_optimizer returned, got "
                        f"{type(record).__name__}")
    if not record.on_host:
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
        record.bank = None

"""`WeightBank`: a set of named tensors held in one exact-size host arena (pinned on CUDA).

Every tensor is a view at a 256-byte aligned offset of a single allocation, in the order it was
given (for a module: `named_parameters()` then persistent buffers, i.e. layer by layer, which is what
lets the streamed forward move a whole decoder layer with one copy). Loading into a module copies
in place into the module's existing tensors, so optimizer state, DTensor wrappers and autograd
references stay valid.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Mapping

import torch
from torch import nn

from spin_kernels.dtensor import local_tensor
from spin_kernels.swap.engine import CopyEngine, align_up, bump_versions, resolve_engine, wait_host


@dataclasses.dataclass(frozen=True)
class Slot:
    """Where one tensor lives in an arena."""
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def module_tensors(module: nn.Module, include_non_persistent_buffers: bool = False) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once, under their first name) and buffers of `module`, by name."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    seen = {id(t) for t in tensors.values()}
    for prefix, sub in module.named_modules():
        for leaf, buffer in sub._buffers.items():
            if buffer is None or id(buffer) in seen:
                continue
            if leaf in sub._non_persistent_buffers_set and not include_non_persistent_buffers:
                continue
            seen.add(id(buffer))
            tensors[f"{prefix}.{leaf}" if prefix else leaf] = buffer
    return tensors


def plan_layout(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[dict[str, Slot], int]:
    """Aligned slots in the given order; the arena ends exactly where the last tensor ends."""
    slots: dict[str, Slot] = {}
    end = 0
    for name, (shape, dtype) in specs.items():
        nbytes = _numel(shape) * _itemsize(dtype)
        offset = align_up(end)
        slots[name] = Slot(offset, nbytes, tuple(shape), dtype)
        end = offset + nbytes
    return slots, end


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def view_slot(arena: torch.Tensor, slot: Slot) -> torch.Tensor:
    return arena[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)


def default_pinning() -> bool:
    return torch.cuda.is_available()


class WeightBank:
    """Named tensors snapshotted into one host arena. Build with `from_module` or `from_tensors`;
    the tensors are owned by the bank (later changes to the sources do not reach it)."""

    def __init__(self, arena: torch.Tensor, slots: dict[str, Slot], engine: CopyEngine, pinned: bool):
        assert arena.dtype == torch.uint8 and arena.device.type == "cpu"
        self._arena = arena
        self._pinned = pinned
        self._slots = slots
        self._engine = engine
        self._tensors = {name: view_slot(arena, slot) for name, slot in slots.items()}
        # Events of the asynchronous transfers that read or write the arena and may still run
        # (one per device). The CPU waits for them before it touches the arena itself.
        self._pending: list[torch.cuda.Event] = []
        self._stash: WeightBank | None = None  # a second arena, lent to `swapped` (lend_stash)
        self._stash_lent = False

    # -- construction -----------------------------------------------------------------------------

    @classmethod
    def allocate(cls, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], *, backend: str | None = None,
                 pin_memory: bool | None = None) -> "WeightBank":
        """An uninitialised bank with room for `specs` ({name: (shape, dtype)})."""
        engine = resolve_engine(backend)
        slots, nbytes = plan_layout(specs)
        pinned = default_pinning() if pin_memory is None else bool(pin_memory)
        return cls(engine.alloc_host(nbytes, pinned), slots, engine, pinned)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], *, backend: str | None = None,
                     pin_memory: bool | None = None) -> "WeightBank":
        """Snapshot `tensors` ({name: tensor}, any devices; DTensors give their local shard)."""
        if not isinstance(tensors, Mapping):
            raise TypeError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
        sources: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
                raise TypeError(f"tensors must map str -> torch.Tensor, got {type(name).__name__} -> "
                                f"{type(tensor).__name__}")
            sources[name] = local_tensor(tensor).detach()
        bank = cls.allocate({n: (tuple(t.shape), t.dtype) for n, t in sources.items()}, backend=backend,
                            pin_memory=pin_memory)
        bank._copy_from(sources)
        return bank

    @classmethod
    def from_module(cls, module: nn.Module, *, backend: str | None = None, pin_memory: bool | None = None,
                    include_non_persistent_buffers: bool = False) -> "WeightBank":
        """Snapshot the parameters and buffers of `module` (DTensor parameters: this rank's shard)."""
        return cls.from_tensors(module_tensors(module, include_non_persistent_buffers), backend=backend,
                                pin_memory=pin_memory)

    # -- inspection -------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._slots)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the arena adds at most 255 bytes of alignment per tensor)."""
        return sum(slot.nbytes for slot in self._slots.values())

    @property
    def arena_nbytes(self) -> int:
        """Bytes of host memory reserved for the tensors (torch's pinned allocator rounds a request
        up to a power of two; the extension allocates exactly)."""
        return self._engine.host_footprint(self._arena.numel(), self.is_pinned)

    @property
    def is_pinned(self) -> bool:
        """Whether the arena is page-locked (asked for by default when CUDA is available)."""
        return self._pinned

    @property
    def backend(self) -> str:
        return self._engine.name

    @property
    def arena(self) -> torch.Tensor:
        """The uint8 host tensor every bank tensor is a view of."""
        return self._arena

    @property
    def slots(self) -> dict[str, Slot]:
        return dict(self._slots)

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, name: object) -> bool:
        return name in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The bank's host tensor `name` (a view into the arena; wait before a CPU read)."""
        self.synchronize()
        return self._tensors[name]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The host tensors by name, after waiting for transfers in flight."""
        self.synchronize()
        return dict(self._tensors)

    def views(self) -> dict[str, torch.Tensor]:
        """The host tensors by name without waiting: only for handing on (call `synchronize` before
        the CPU reads or writes them)."""
        return dict(self._tensors)

    def synchronize(self) -> None:
        """Wait until no transfer reads or writes the arena, so the CPU may touch it."""
        for event in self._pending:
            wait_host(event)
        self._pending = []

    # -- transfers --------------------------------------------------------------------------------

    def _copy_from(self, sources: Mapping[str, torch.Tensor]) -> None:
        self._transfer([self._tensors[n] for n in sources], list(sources.values()))

    def _transfer(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> None:
        """One batch per device; the bank's host side is always one end of each copy. Device batches
        need no host wait: they all start after and end before the current stream, which orders them
        against every earlier batch."""
        for device, indices in _group_by_device(dsts, srcs).items():
            if device is None:
                self.synchronize()  # the CPU itself is about to read or write the arena
            event = self._engine.copy_batch([dsts[i] for i in indices], [srcs[i] for i in indices], device)
            if event is not None:
                self._pending.append(event)
        if self._engine.use_extension:
            bump_versions(dsts)

    def update_from(self, module_or_tensors: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Re-snapshot into the existing arena (same names, shapes, dtypes) without reallocating."""
        targets = self.match(module_or_tensors)
        self._transfer([self._tensors[n] for n in targets], list(targets.values()))

    def load_into(self, module_or_tensors: nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Copy the bank in place into the module's tensors (one batch per device); ValueError when
        names, shapes or dtypes differ."""
        targets = self.match(module_or_tensors)
        self._transfer(list(targets.values()), [self._tensors[n] for n in targets])

    def match(self, module_or_tensors: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{name: the target's local tensor} in bank order; ValueError naming every mismatch."""
        if isinstance(module_or_tensors, nn.Module):
            targets = module_tensors(module_or_tensors, include_non_persistent_buffers=True)
            # A non-persistent buffer is matched only when the bank holds it.
            targets = {n: t for n, t in targets.items() if n in self._slots or not _is_non_persistent(
                module_or_tensors, n)}
        elif isinstance(module_or_tensors, Mapping):
            targets = dict(module_or_tensors)
        else:
            raise TypeError("expected a torch.nn.Module or a mapping of name -> tensor, got "
                            f"{type(module_or_tensors).__name__}")
        missing = [n for n in self._slots if n not in targets]
        unexpected = [n for n in targets if n not in self._slots]
        problems = []
        if missing:
            problems.append(f"{len(missing)} bank tensor(s) missing from the target: {_some(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} target tensor(s) not in the bank: {_some(unexpected)}")
        matched: dict[str, torch.Tensor] = {}
        for name, slot in self._slots.items():
            if name not in targets:
                continue
            local = local_tensor(targets[name])
            if tuple(local.shape) != slot.shape or local.dtype != slot.dtype:
                problems.append(f"{name!r}: bank has {list(slot.shape)} {slot.dtype}, target has "
                                f"{list(local.shape)} {local.dtype}")
            matched[name] = local.detach()
        if problems:
            raise ValueError("WeightBank does not match the target: " + "; ".join(problems))
        return matched

    def stash_and_load(self, targets: Mapping[str, torch.Tensor], stash: "WeightBank") -> None:
        """stash[name] <- targets[name], then targets[name] <- self[name], for the targets `match`
        returned; per tensor the load waits only for that tensor's stash, and on CUDA the two
        directions run on two streams, so both directions of the bus work at once."""
        assert stash._slots == self._slots
        names, live = list(targets), list(targets.values())
        for device, indices in _group_by_device(live, live).items():
            if device is None:
                self.synchronize()
                stash.synchronize()
            event = self._engine.stash_and_load([live[i] for i in indices],
                                                [stash._tensors[names[i]] for i in indices],
                                                [self._tensors[names[i]] for i in indices], device)
            if event is not None:
                self._pending.append(event)
                stash._pending.append(event)
        if self._engine.use_extension:
            bump_versions(live)

    @contextlib.contextmanager
    def lend_stash(self) -> Iterator["WeightBank"]:
        """A second arena with this bank's layout, lent to one user at a time (`swapped` keeps the
        model's own tensors in it); kept after the block for the next one (allocating pinned memory
        costs more than the copies), freed by `release_stash`."""
        assert not self._stash_lent, "the stash is lent already"
        if self._stash is None:
            arena = self._engine.alloc_host(self._arena.numel(), self.is_pinned)
            self._stash = WeightBank(arena, self._slots, self._engine, self._pinned)
        self._stash_lent = True
        try:
            yield self._stash
        finally:
            self._stash_lent = False

    @property
    def swap_active(self) -> bool:
        """Whether the stash is lent right now (inside a `swapped` block of this bank)."""
        return self._stash_lent

    def release_stash(self) -> None:
        if self._stash_lent:
            raise ValueError("release_stash: the bank is swapped into a model right now")
        if self._stash is not None:
            self._stash.synchronize()
            self._stash = None

    # -- for callers that order their own copies (the streamed forward) --------------------------

    def side_stream(self, device: torch.device) -> torch.cuda.Stream:
        """A CUDA stream of this bank's copy engine that the bank's own transfers do not use."""
        return self._engine.side_stream(device, lane=2)

    def copy_ranges(self, dsts: list[torch.Tensor], ranges: list[tuple[int, int]],
                    stream: torch.cuda.Stream | None) -> None:
        """dsts[i] (uint8) <- the arena's bytes [offset, offset + nbytes) of ranges[i], issued on
        `stream` (None: synchronously) with no ordering of their own: the caller orders the stream
        against its compute, and hands the bank an event that follows the copies (`hold_until`)
        so that the CPU stays off the arena until they are done."""
        srcs = [self._arena[offset:offset + nbytes] for offset, nbytes in ranges]
        self._engine.issue(dsts, srcs, stream, stream.device.index if stream is not None else -1)

    def hold_until(self, event: torch.cuda.Event | None) -> None:
        """The CPU touches the arena again only after `event` (recorded after device work that reads
        the arena outside the bank's own transfers: `copy_ranges`, kernels on a `device_view`)."""
        if event is not None:
            self._pending.append(event)

    def device_view(self, name: str, device: torch.device) -> torch.Tensor | None:
        """A CUDA tensor that reads the bank's tensor `name` in place from pinned host memory (kernels
        fetch only the bytes they touch over the bus), or None where the engine cannot map it (the
        torch backend, pageable memory, a CPU device)."""
        return self._engine.device_view(self._tensors[name], device)


def _is_non_persistent(module: nn.Module, name: str) -> bool:
    prefix, _, leaf = name.rpartition(".")
    owner = module.get_submodule(prefix) if prefix else module
    return leaf in owner._non_persistent_buffers_set


def _group_by_device(dsts: list[torch.Tensor], srcs: list[torch.Tensor]) -> dict[torch.device | None, list[int]]:
    groups: dict[torch.device | None, list[int]] = {}
    for i, (dst, src) in enumerate(zip(dsts, srcs)):
        device = dst.device if dst.device.type != "cpu" else src.device
        groups.setdefault(device if device.type != "cpu" else None, []).append(i)
    return groups


def _some(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")

"""Layer-streamed reference forward: a decoder's no-grad forward computed with a `WeightBank`'s
weights, each decoder layer copied from host memory into one of two device buffers while the
previous layer computes. The model lends its code (modules, masks, rotary embedding) but its own
parameters are never written: for the duration of one layer, the layer's parameter slots point at
views of the buffer, and they are put back right after.

Costs, for a 1.2 B Llama shape on an H200 (121 MB per layer at ~55 GB/s: 2.2 ms of copy against
~4 ms of compute at 16k tokens): the first layer's copy is not hidden; the LM head (525 MB) is
spread over the bus's idle gaps between the last layers' copies. The input embedding is gathered on
the host (only B·T rows cross the bus, not the [V, H] table).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from spin_kernels.dtensor import is_dtensor
from spin_kernels.swap.bank import Slot, WeightBank, module_tensors
from spin_kernels.swap.engine import ARENA_ALIGNMENT, align_up


@dataclasses.dataclass
class _Stage:
    """The bank tensors of one module, laid out in a device buffer as they lie in the arena, so that
    each run of adjacent arena tensors moves with one copy."""
    bindings: list[tuple[dict, str, int, Slot]]  # (module._parameters or ._buffers, leaf, buffer offset, slot)
    runs: list[tuple[int, int, int]]             # (arena offset, bytes, buffer offset)
    nbytes: int


def _make_stage(bindings: list[tuple[dict, str, Slot]]) -> _Stage:
    placed: dict[int, int] = {}  # arena offset -> buffer offset (a tied tensor is copied once)
    runs: list[list[int]] = []
    cursor = 0
    for store, leaf, slot in sorted(bindings, key=lambda b: b[2].offset):
        if slot.offset in placed:
            continue
        if runs and 0 <= slot.offset - (runs[-1][0] + runs[-1][1]) < ARENA_ALIGNMENT:
            runs[-1][1] = slot.offset + slot.nbytes - runs[-1][0]
        else:
            cursor = align_up(cursor)
            runs.append([slot.offset, slot.nbytes, cursor])
        run_start, run_bytes, run_buffer = runs[-1]
        placed[slot.offset] = run_buffer + slot.offset - run_start
        cursor = run_buffer + run_bytes
    resolved = [(store, leaf, placed[slot.offset], slot) for store, leaf, slot in bindings]
    return _Stage(resolved, [tuple(r) for r in runs], cursor)


def _split_runs(runs: list[tuple[int, int, int]], limit: int) -> list[tuple[int, int, int]]:
    """The same bytes as `runs`, in copies of at most `limit` bytes."""
    return [(arena + offset, min(limit, nbytes - offset), buffer + offset)
            for arena, nbytes, buffer in runs for offset in range(0, nbytes, limit)]


def _bindings(module: nn.Module | None, names_by_id: dict[int, str], slots: dict[str, Slot]):
    """(store, leaf, slot) for every tensor of `module` that the bank holds."""
    if module is None:
        return []
    found = []
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for leaf, tensor in store.items():
                if tensor is not None and id(tensor) in names_by_id:
                    found.append((store, leaf, slots[names_by_id[id(tensor)]]))
    return found


def _views(stage: _Stage, buffer: torch.Tensor) -> list[tuple[dict, str, torch.Tensor]]:
    return [(store, leaf, buffer[offset:offset + slot.nbytes].view(slot.dtype).view(slot.shape))
            for store, leaf, offset, slot in stage.bindings]


def _install(views: list[tuple[dict, str, torch.Tensor]], saved: list) -> None:
    for store, leaf, view in views:
        saved.append((store, leaf, store[leaf]))
        store[leaf] = view


def _restore(saved: list) -> None:
    while saved:
        store, leaf, original = saved.pop()
        store[leaf] = original


def _decoder_parts(model: nn.Module):
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or type(embed) is not nn.Embedding or not hasattr(base, "norm"):
        raise ValueError("model must be a Hugging Face decoder with .base_model.layers (ModuleList), "
                         ".base_model.norm and a plain nn.Embedding input embedding (the Llama family), "
                         f"got {type(model).__name__}")
    if embed.max_norm is not None:
        raise ValueError("model: an input embedding with max_norm rewrites its weight and cannot be streamed")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return base, layers, base.norm, embed, head


class _LayerPipeline:
    """Copies on a side stream, compute on the current one, ordered with events (all no-ops on the
    CPU, where copies are synchronous)."""

    def __init__(self, bank: WeightBank, device: torch.device, layer_stages: list[_Stage], tail: _Stage):
        self.bank = bank
        self.on_cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.on_cuda else None
        self.copier = bank.side_stream(device) if self.on_cuda else None
        self.layer_stages = layer_stages
        self.tail = tail
        ring_bytes = max([stage.nbytes for stage in layer_stages], default=0)
        # Two buffers: layer i+1 is copied into one while layer i computes from the other.
        self.ring = [torch.empty(ring_bytes, dtype=torch.uint8, device=device)
                     for _ in range(min(2, len(layer_stages)))]
        self.tail_buffer = torch.empty(tail.nbytes, dtype=torch.uint8, device=device)
        # The tail (final norm and LM head: as big as 4 layers of a 1 B model) goes over the bus in
        # pieces of half a layer, one after each of the last layers' copies: there the bus idles
        # while a layer computes longer than the next one copies, so the pieces hide in those gaps
        # instead of stalling the head at the end.
        self.tail_pieces = _split_runs(tail.runs, max(ring_bytes // 2, 1 << 20))
        self.tail_issued = 0
        self.ready: list = [None] * len(layer_stages)
        self.freed: list = [None, None]
        self.tail_ready = None
        if self.on_cuda:
            self.copier.wait_stream(self.compute)  # the buffers were just allocated on the compute stream

    def event_on(self, stream) -> torch.cuda.Event | None:
        if not self.on_cuda:
            return None
        done = torch.cuda.Event()
        done.record(stream)
        return done

    def wait(self, done: torch.cuda.Event | None) -> None:
        if done is not None:
            self.compute.wait_event(done)

    def copy_stage(self, stage: _Stage, buffer: torch.Tensor, after: torch.cuda.Event | None = None):
        if after is not None:
            self.copier.wait_event(after)
        self.bank.copy_ranges([buffer[b:b + n] for _, n, b in stage.runs], [(a, n) for a, n, _ in stage.runs],
                              self.copier)
        return self.event_on(self.copier)

    def issue_layer(self, i: int) -> None:
        self.ready[i] = self.copy_stage(self.layer_stages[i], self.ring[i % 2], self.freed[i % 2])
        layers_left = len(self.layer_stages) - 1 - i
        self.issue_tail(len(self.tail_pieces) - layers_left)

    def issue_tail(self, upto: int) -> None:
        """Copy the tail pieces up to `upto` (all of them by the last layer's copy)."""
        pieces = self.tail_pieces[self.tail_issued:max(upto, 0)]
        if pieces:
            self.bank.copy_ranges([self.tail_buffer[b:b + n] for _, n, b in pieces], [(a, n) for a, n, _ in pieces],
                                  self.copier)
            self.tail_issued += len(pieces)
        if self.tail_issued == len(self.tail_pieces) and self.tail_ready is None:
            self.tail_ready = self.event_on(self.copier) if self.on_cuda else True

    def start(self) -> None:
        if self.layer_stages:
            self.issue_layer(0)
        else:
            self.issue_tail(len(self.tail_pieces))

    def layer_views(self, i: int):
        self.wait(self.ready[i])
        return _views(self.layer_stages[i], self.ring[i % 2])

    def layer_done(self, i: int) -> None:
        self.freed[i % 2] = self.event_on(self.compute)
        if i + 2 < len(self.layer_stages):
            self.issue_layer(i + 2)

    def tail_views(self):
        assert self.tail_ready is not None, "the tail is used before all of it was copied"
        if self.on_cuda:
            self.wait(self.tail_ready)
        return _views(self.tail, self.tail_buffer)

    def embed(self, embed_host: torch.Tensor, table: torch.Tensor | None, flat_ids: torch.Tensor,
              shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Rows of the host embedding table for the ids, on the device: only B*T rows cross the bus,
        not the [V, H] table. With `table` (the bank's device view of the pinned host table) the
        gather kernel reads it in place; otherwise the rows are gathered on the host and copied."""
        hidden = embed_host.shape[1]
        out = torch.empty((*shape, hidden), dtype=embed_host.dtype, device=device)
        if not self.on_cuda:
            torch.index_select(embed_host, 0, flat_ids, out=out.view(-1, hidden))
            return out
        if table is not None:
            torch.index_select(table, 0, flat_ids.to(device), out=out.view(-1, hidden))
            return out
        staging = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        torch.index_select(embed_host, 0, flat_ids, out=staging.view(-1, hidden))
        self.copier.wait_stream(self.compute)  # `out` was just allocated on the compute stream
        with torch.cuda.stream(self.copier):
            out.copy_(staging, non_blocking=True)  # torch keeps `staging` alive until this is done
        self.wait(self.event_on(self.copier))
        return out

    def finish(self) -> None:
        if self.on_cuda:
            # Nothing may reuse the buffers while a copy still writes them (e.g. after an exception).
            self.compute.wait_stream(self.copier)
            # Nor may the CPU write the arena while a copy, or a gather from the pinned embedding
            # table, still reads it: both are ordered before this point of the compute stream.
            self.bank.hold_until(self.event_on(self.compute))


@torch.no_grad()
def streamed_reference_forward(model: nn.Module, bank: WeightBank, input_ids: torch.Tensor,
                               attention_mask: torch.Tensor | None = None, *,
                               return_hidden: bool = False) -> torch.Tensor:
    """Logits [B, T, V] of `model`'s architecture with the bank's weights (return_hidden=True: the
    final hidden states [B, T, H] after the last norm; the LM head is then neither moved nor run).

    The model's parameters are neither read for compute nor written; they only fix the device and
    the architecture. A bank from `WeightBank.from_module(reference_model)` of the same architecture
    fits. Tensor-parallel (DTensor) models are not streamed: use `swapped` there."""
    if not isinstance(bank, WeightBank):
        raise TypeError(f"bank must be a WeightBank, got {type(bank).__name__}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T], got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
    base, layers, norm, embed, head = _decoder_parts(model)
    if head is None and not return_hidden:
        raise ValueError("model has no output embedding (LM head): pass return_hidden=True")
    bank.match(model)  # ValueError naming every mismatch
    tensors = module_tensors(model, include_non_persistent_buffers=True)
    if any(is_dtensor(t) for t in tensors.values()):
        raise ValueError("model has DTensor (tensor-parallel) parameters; stream a plain model or use swapped()")
    names_by_id = {id(t): name for name, t in tensors.items() if name in bank}
    slots = bank.slots
    embed_name = names_by_id[id(embed.weight)]
    embed_host = bank[embed_name]
    flat_ids = input_ids.reshape(-1).to("cpu")
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(flat_ids.max()) >= embed_host.shape[0]):
        raise ValueError(f"input_ids must lie in [0, {embed_host.shape[0]}), got values in "
                         f"[{int(flat_ids.min())}, {int(flat_ids.max())}]")

    layer_stages = [_make_stage(_bindings(layer, names_by_id, slots)) for layer in layers]
    norm_bindings = _bindings(norm, names_by_id, slots)
    head_bindings = [] if return_hidden else _bindings(head, names_by_id, slots)
    tail = _make_stage(norm_bindings + head_bindings)
    norm_keys = {(id(store), leaf) for store, leaf, _ in norm_bindings}
    staged = {id(store[leaf]) for module in [*layers, norm, head] for store, leaf, _ in
              _bindings(module, names_by_id, slots)}
    staged.add(id(embed.weight))
    # Whatever else the bank holds for this model (e.g. a persistent rotary buffer) stays resident.
    rest = _make_stage([b for b in _bindings(model, names_by_id, slots) if id(b[0][b[1]]) not in staged])

    rest_buffer = torch.empty(rest.nbytes, dtype=torch.uint8, device=embed.weight.device)
    pipeline = _LayerPipeline(bank, embed.weight.device, layer_stages, tail)
    resident_saved: list = []  # whole forward: tensors outside layers, norm and head
    stage_saved: list = []     # one layer (or the norm, or the head) at a time
    hooks = []
    try:
        rest_ready = pipeline.copy_stage(rest, rest_buffer)
        pipeline.start()
        table = bank.device_view(embed_name, embed.weight.device)
        embeds = pipeline.embed(embed_host, table, flat_ids, tuple(input_ids.shape), embed.weight.device)
        if len(layers) > 1:
            pipeline.issue_layer(1)

        def before_layer(i: int):
            def hook(module, args):
                _install(pipeline.layer_views(i), stage_saved)
            return hook

        def after_layer(i: int):
            def hook(module, args, output):
                _restore(stage_saved)
                pipeline.layer_done(i)
            return hook

        def before_norm(module, args):
            _install([v for v in pipeline.tail_views() if (id(v[0]), v[1]) in norm_keys], stage_saved)

        def after_norm(module, args, output):
            _restore(stage_saved)

        for i, layer in enumerate(layers):
            hooks.append(layer.register_forward_pre_hook(before_layer(i)))
            hooks.append(layer.register_forward_hook(after_layer(i)))
        hooks.append(norm.register_forward_pre_hook(before_norm))
        hooks.append(norm.register_forward_hook(after_norm))
        pipeline.wait(rest_ready)
        _install(_views(rest, rest_buffer), resident_saved)
        mask = attention_mask.to(embeds.device) if attention_mask is not None else None
        hidden = base(inputs_embeds=embeds, attention_mask=mask, use_cache=False)[0]
        assert not stage_saved, "a layer hook did not restore the model's parameters"
        if return_hidden:
            return hidden
        _install([v for v in pipeline.tail_views() if (id(v[0]), v[1]) not in norm_keys], stage_saved)
        return head(hidden)
    finally:
        for handle in hooks:
            handle.remove()
        _restore(stage_saved)
        _restore(resident_saved)
        pipeline.finish()

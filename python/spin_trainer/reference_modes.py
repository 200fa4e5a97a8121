"""The reference θ_t of a SPIN iteration: one small type per `--reference` mode.

At the start of iteration t the policy *is* θ_t. Every mode answers the same four questions:

    begin_iteration()          the policy, as it is now, becomes θ_t
    batch_logps(batch, rows)   [2b] reference log-prob sums of a pair batch (`rows`: the iteration's
                               cached [b, 2] sums, which only the precompute mode reads)
    weights()                  context: a module that computes with θ_t (per-epoch regeneration)
    state() / load_state()     contexts: the module whose state dict is θ_t, to save from / to load
                               into (in place); None where the mode keeps no weights

    precompute  the whole iteration's reference log-probs are computed at its start from the policy
                itself: no second model and no swap. θ_t's weights are kept (in a bank, as in swap
                mode) only when generation runs every epoch, which samples from θ_t.
    swap        θ_t in a WeightBank in host memory (pinned on CUDA), swapped into the live policy
                for each batch (NeMo-Aligner's `cpu_weight_swap`).
    resident    θ_t as a second, frozen copy of the model on the device.

Precision and memory. The bank is copied in place into the live parameters, so it holds θ_t in
the *parameter* dtype, bit for bit: the swapped-in reference then computes exactly as the policy
did at the iteration's start, whatever the compute path (a bf16 bank under fp32 master weights
would need a cast per swap and would differ where the forward reads fp32 weights, e.g. norms
outside FSDP's mixed precision). Its cost in pinned host memory is the parameter bytes of this
rank's local shard (4 per parameter with fp32 master weights), plus as much again for the stash
that `swapped` keeps for the policy while θ_t is in: 8 bytes per local parameter in all in swap
mode. The bank persists across iterations (`update_from` refills the same arena) instead of
pinning a new one per iteration. The resident copy is a copy of the policy module, so it also
holds the parameter dtype, in device memory (no pinned memory).
"""
from contextlib import contextmanager

import torch

from .logprobs import sequence_logps
from .parallelize import copy_local_tensors, frozen_copy, sharded


@contextmanager
def _nothing():
    yield None


class SwappedReference:
    """--reference swap: θ_t in a WeightBank, swapped into the policy for each reference forward."""

    precomputes_logps = False

    def __init__(self, model, ctx):
        self.model, self.ctx = model, ctx
        self.bank = None

    def begin_iteration(self):
        with sharded(self.model):   # the bank holds local shards (FSDP may have left some gathered)
            if self.bank is None:
                from spin_kernels.swap import WeightBank
                self.bank = WeightBank.from_module(self.model)
            else:
                self.bank.update_from(self.model)

    def batch_logps(self, batch, rows):
        with self.weights() as model:
            return sequence_logps(model, batch, self.ctx)

    @contextmanager
    def weights(self):
        from spin_kernels.swap import swapped

        assert self.bank is not None, "begin_iteration (or load_state) first"
        # The swap writes local shards; weights FSDP gathered before it, or while θ_t was in, are dropped.
        with sharded(self.model), swapped(self.model, self.bank):
            yield self.model

    def state(self):
        return self.weights()

    @contextmanager
    def load_state(self):
        """Inside, the policy's tensors take θ_t; after, the bank holds them and the policy its own."""
        from spin_kernels.swap import WeightBank, swapped

        with sharded(self.model):
            if self.bank is None:   # the layout only: every value is replaced below
                self.bank = WeightBank.from_module(self.model)
            with swapped(self.model, self.bank):
                yield self.model
                self.bank.update_from(self.model)


class PrecomputedReference:
    """--reference precompute: the iteration's log-probs come from its cache (computed at its start)."""

    precomputes_logps = True

    def __init__(self, model, ctx, *, keep_weights):
        self.kept = SwappedReference(model, ctx) if keep_weights else None

    def begin_iteration(self):
        if self.kept is not None:
            self.kept.begin_iteration()

    def batch_logps(self, batch, rows):
        return torch.cat([rows[:, 0], rows[:, 1]]).to(batch.input_ids.device)

    def weights(self):
        assert self.kept is not None, "θ_t's weights are kept only when generation runs every epoch"
        return self.kept.weights()

    def state(self):
        return self.kept.state() if self.kept is not None else _nothing()

    def load_state(self):
        return self.kept.load_state() if self.kept is not None else _nothing()


class ResidentReference:
    """--reference resident: θ_t as a frozen copy of the model, refreshed in place every iteration."""

    precomputes_logps = False

    def __init__(self, model, ctx):
        self.model, self.ctx = model, ctx
        self.copy = None

    def _ensure_copy(self):
        if self.copy is None:
            self.copy = frozen_copy(self.model, self.ctx)   # parallelized like the policy
        return self.copy

    def begin_iteration(self):
        if self.copy is None:
            self._ensure_copy()
        else:
            copy_local_tensors(self.copy, self.model)

    def batch_logps(self, batch, rows):
        return sequence_logps(self.copy, batch, self.ctx)

    @contextmanager
    def weights(self):
        assert self.copy is not None, "begin_iteration (or load_state) first"
        yield self.copy

    def state(self):
        return self.weights()

    @contextmanager
    def load_state(self):
        yield self._ensure_copy()


def make_reference(mode, model, ctx, *, generate_every_epoch):
    """The reference of `--reference mode` for `model` (generation every epoch samples from θ_t)."""
    if mode == "precompute":
        return PrecomputedReference(model, ctx, keep_weights=generate_every_epoch)
    if mode == "swap":
        return SwappedReference(model, ctx)
    assert mode == "resident", f"unknown reference mode {mode!r} (SpinConfig validates --reference)"
    return ResidentReference(model, ctx)

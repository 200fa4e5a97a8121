"""The reference policy θ_t of a SPIN iteration: one small type per mode of the `reference` setting.

At the start of iteration t the policy *is* θ_t. Every mode offers:

    begin_iteration()          the policy, as it is now, becomes θ_t
    batch_logps(batch)         [2b] reference log-prob sums of a pair batch (precompute: the
                               trainer reads the iteration's cache instead)
    weights()                  context: a module that computes with θ_t (per-epoch regeneration)
    state() / load_state()     contexts: the module whose state dict is θ_t, to save from / load
                               into; None where the mode keeps no weights

    precompute  the iteration's reference log-probs computed at its start from the policy itself;
                θ_t's weights kept (as in swap) only when generation runs every epoch
    swap        θ_t in a WeightBank in host memory (pinned on CUDA), swapped into the live policy
                per batch (NeMo-Aligner's `cpu_weight_swap`)
    resident    θ_t as a second, frozen copy of the model on the device
    streamed    θ_t in a WeightBank, its layers streamed through two device buffers during the
                reference forward: the policy stays untouched, no second copy on the device (a
                plain, unsharded model only)

The bank holds θ_t in the *parameter* dtype, bit for bit, so the swapped-in reference computes
exactly as the policy did at the iteration's start (a bf16 bank under fp32 master weights would
differ wherever the forward reads fp32 weights). Pinned host memory: the local shard's parameter
bytes, and as much again for the policy's stash while θ_t is in. The bank persists across
iterations (`update_from` refills the same arena).
"""
from contextlib import contextmanager, nullcontext
from types import SimpleNamespace

import torch

from spin_kernels.swap import WeightBank, streamed_reference_forward, swapped

from .errors import UsageError, option
from .parallel.apply import copy_local_tensors, frozen_copy, sharded


class _HeldReference:
    """The modes that hold θ_t's weights: its log-probs are the Scorer's on `weights()`."""

    def __init__(self, model, scorer, *, precomputes_logps=False):
        self.model, self.scorer, self.precomputes_logps = model, scorer, precomputes_logps

    def batch_logps(self, batch):
        with self.weights() as model:
            return self.scorer.sequence_logps(model, batch)

    def state(self):
        return self.weights()


class SwappedReference(_HeldReference):
    """Mode swap: θ_t in a WeightBank, swapped into the policy for each reference forward (and mode
    precompute's θ_t where generation runs every epoch: `precomputes_logps`)."""

    bank = None   # from the first begin_iteration or load_state on

    def begin_iteration(self):
        with sharded(self.model):   # the bank holds local shards (FSDP may have left some gathered)
            if self.bank is None:
                self.bank = WeightBank.from_module(self.model)
            else:
                self.bank.update_from(self.model)

    @contextmanager
    def weights(self):
        assert self.bank is not None, "begin_iteration (or load_state) first"
        # The swap writes local shards; weights FSDP gathered before it, or while θ_t was in, are dropped.
        with sharded(self.model), swapped(self.model, self.bank):
            yield self.model

    @contextmanager
    def load_state(self):
        """Inside, the policy's tensors take θ_t; after, the bank holds them and the policy its own."""
        with sharded(self.model):
            if self.bank is None:   # the layout only: every value is replaced below
                self.bank = WeightBank.from_module(self.model)
            with swapped(self.model, self.bank):
                yield self.model
                self.bank.update_from(self.model)


class PrecomputedReference:
    """Mode precompute, generation once per iteration: the log-probs come from the iteration's cache
    (computed at its start) and no weights are kept."""

    precomputes_logps = True

    def begin_iteration(self):
        pass

    def weights(self):
        raise AssertionError("θ_t's weights are kept only when generation runs every epoch")

    def state(self):
        return nullcontext()

    load_state = state


class ResidentReference(_HeldReference):
    """Mode resident: θ_t as a frozen copy of the model, refreshed in place every iteration."""

    copy = None   # from the first begin_iteration or load_state on

    def begin_iteration(self):
        if self.copy is None:   # parallelized like the policy
            self.copy = frozen_copy(self.model, self.scorer.ctx, self.scorer.precision)
        else:
            copy_local_tensors(self.copy, self.model)

    @contextmanager
    def weights(self):
        assert self.copy is not None, "begin_iteration (or load_state) first"
        yield self.copy

    @contextmanager
    def load_state(self):
        if self.copy is None:   # the layout only: every value is replaced inside
            self.begin_iteration()
        yield self.copy


class StreamedReference(SwappedReference):
    """reference streamed: θ_t in a WeightBank; its layers stream to the device for each reference
    forward, while the policy's own weights stay where they are (no swap, no second copy)."""

    def __init__(self, model, scorer):
        if scorer.ctx.world_size > 1:
            raise UsageError(f"{option('reference')} streamed streams a plain model's layers (one process); "
                             f"under torchrun use {option('reference')} swap")
        super().__init__(model, scorer)

    @torch.no_grad()
    def batch_logps(self, batch):
        return self.scorer.sequence_logps(_StreamedModel(self.model, self.bank), batch)


class _StreamedModel:
    """θ_t as the Scorer calls a model: the hidden states of its layers streamed from the bank, then
    the policy's LM head module (with the Scorer's hooks on it) computing with θ_t's head weights. The
    Scorer's own arithmetic on them makes π − ref exactly 0 at θ_t."""

    def __init__(self, model, bank):
        self.model, self.bank = model, bank

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()

    def __call__(self, input_ids, attention_mask, use_cache):
        hidden = streamed_reference_forward(self.model, self.bank, input_ids, attention_mask,
                                            return_hidden=True)   # [2b, T, H]
        head = self.get_output_embeddings()
        names = {id(p): n for n, p in self.model.named_parameters()}
        weights = {name: self.bank[names[id(p)]].to(hidden.device) for name, p in head.named_parameters()}
        return SimpleNamespace(logits=torch.func.functional_call(head, weights, (hidden,)))


def make_reference(mode, model, scorer, *, generate_every_epoch):
    """The reference policy of mode `mode` for `model` (generation every epoch samples from θ_t)."""
    if mode != "precompute":
        modes = {"swap": SwappedReference, "resident": ResidentReference, "streamed": StreamedReference}
        return modes[mode](model, scorer)
    if generate_every_epoch:   # θ_t's weights kept (as in swap) for the generation of every epoch
        return SwappedReference(model, scorer, precomputes_logps=True)
    return PrecomputedReference()

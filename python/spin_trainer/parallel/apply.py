"""Applies the run's parallelism to a model, in torchtitan's order: the tensor-parallel plan on the
`tp` axis (tp_plan.py), activation recompute (recompute.py), then FSDP2 `fully_shard` (or
`replicate`) of each decoder layer and of the root on the `dp` axis, with the precision's
MixedPrecisionPolicy. It touches no device: `--plan` runs it on the meta device and a fake process group.

FSDP keeps the root's parameters gathered after a forward (the backward needs them at once), and a
decoder layer's only between its forward and backward. Code that reads or writes the local shards
outside FSDP's forward and backward (the reference bank, a resident copy) therefore runs inside
`sharded(model)`; generation runs inside `full_weights(model)`.
"""
import copy
from contextlib import contextmanager

import torch
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import AutoModelForCausalLM

from spin_kernels.dtensor import local_tensor

from ..errors import UsageError
from ..model import disable_dropout
from .recompute import apply_recompute
from .tp_plan import apply_tensor_parallel


def decoder_layers(model):
    """The repeated blocks of a Hugging Face model (its `_no_split_modules` classes), in order."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    # The whole MRO: fully_shard turns a layer's class into a subclass (FSDPLlamaDecoderLayer).
    layers = [m for m in model.modules() if any(cls.__name__ in names for cls in type(m).__mro__)]
    if not layers:
        raise UsageError(f"model: cannot find the decoder layers of {type(model).__name__} "
                         f"(no module of its _no_split_modules {sorted(names)})")
    return layers


def fsdp_modules(model):
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def apply_fsdp(model, ctx, precision, *, root_reshards_after_forward=False):
    """fully_shard each decoder layer, then the root, on ctx.dp_mesh; with ctx.dp_shard False,
    replicate() the same way (a full replica per rank, gradients all-reduced per layer)."""
    wrap = fully_shard if ctx.dp_shard else replicate
    policy = precision.mp_policy()
    for layer in decoder_layers(model):
        wrap(layer, mesh=ctx.dp_mesh, mp_policy=policy)
    root_options = {"reshard_after_forward": root_reshards_after_forward} if ctx.dp_shard else {}
    wrap(model, mesh=ctx.dp_mesh, mp_policy=policy, **root_options)
    # FSDP keeps this setting in private state; full_weights restores it from here.
    model.root_reshards_after_forward = root_reshards_after_forward
    for module in fsdp_modules(model):
        # Every micro-batch loss is already its share of the global batch (trainer.py), so
        # the update is the SUM of the gradients over micro-batches and data-parallel ranks. FSDP2
        # divides by the dp size by default (ReduceOp.AVG); a divide factor of 1 with sum-only
        # collectives makes its reduce-scatter a plain sum (exact, and no PREMUL_SUM, which gloo
        # lacks), the same arithmetic as one process.
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)
    return model


def parallelize_model(model, ctx, precision, *, recompute="none"):
    """Tensor parallelism, activation recompute, then FSDP (or replicas), as ctx says; returns the model."""
    apply_tensor_parallel(model, ctx)
    apply_recompute(decoder_layers(model), recompute)
    if ctx.dp_mesh is not None:
        apply_fsdp(model, ctx, precision)
    return model


def reshard(model):
    """Frees every gathered FSDP parameter: the module holds its local shards again."""
    for module in fsdp_modules(model):
        module.reshard()


@contextmanager
def sharded(model):
    """Inside, the model's parameters are its local shards (and gathered copies made inside are
    dropped on the way out, so a forward after it gathers the shards as they are then)."""
    reshard(model)
    try:
        yield model
    finally:
        reshard(model)


@contextmanager
def full_weights(model):
    """Inside, every FSDP module holds its full (all-gathered) weights across forwards, for the
    decoders of generation; on the way out they are freed and resharding is as apply_fsdp set it."""
    modules = fsdp_modules(model)
    for module in modules:
        module.unshard()
        module.set_reshard_after_forward(False, recurse=False)
    try:
        yield model
    finally:
        for module in modules:
            module.set_reshard_after_forward(module is not model or model.root_reshards_after_forward,
                                             recurse=False)
        reshard(model)


def copy_local_tensors(target, source):
    """Copies `source`'s parameters and buffers into `target`'s, in place, local shard by local shard
    (two models parallelized the same way)."""
    def tensors(module):
        return list(module.named_parameters()) + list(module.named_buffers())

    with torch.no_grad(), sharded(target), sharded(source):
        for (name, dst), (source_name, src) in zip(tensors(target), tensors(source), strict=True):
            assert name == source_name and dst.dtype == src.dtype, (name, source_name, dst.dtype, src.dtype)
            local_tensor(dst).copy_(local_tensor(src))


def frozen_copy(model, ctx, precision):
    """A frozen, eval-mode copy of the policy, parallelized like it (the resident reference).

    FSDP modules cannot be deep-copied: the copy is built on the meta device, parallelized,
    materialised and filled with the policy's local shards; its root reshards after each forward,
    so no gathered copy of its embeddings and LM head stays behind.
    """
    if ctx.dp_mesh is None:
        return copy.deepcopy(model).eval().requires_grad_(False)

    buffer_dtypes = {name: buffer.dtype for name, buffer in model.named_buffers()}
    with torch.device("meta"):
        twin = AutoModelForCausalLM.from_config(model.config, attn_implementation=model.config._attn_implementation)
    # The stored dtype, not the policy's parameters' dtype now: after a forward its root holds FSDP's
    # gathered bf16 copies under mixed precision, which made a bf16 (pure-precision) reference.
    twin.to(precision.param_dtype)
    for name, buffer in twin.named_buffers():   # e.g. RoPE's inv_freq stays fp32 beside bf16 weights
        buffer.data = buffer.data.to(buffer_dtypes[name])
    disable_dropout(twin)
    apply_tensor_parallel(twin, ctx)
    apply_fsdp(twin, ctx, precision, root_reshards_after_forward=True)
    twin.to_empty(device=ctx.device)
    copy_local_tensors(twin, model)
    return twin.eval().requires_grad_(False)

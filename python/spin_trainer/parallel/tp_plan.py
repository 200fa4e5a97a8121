"""Tensor-parallel plan of Llama-family models, written as data for `parallelize_module` (each rank
owns heads/tp attention heads). The LM head is column-parallel over the vocabulary, its output kept
as the local shard [B, T, V/tp] that `spin_loss(process_group=tp_group)` consumes: the full
[B, T, V] logits never exist on any rank. Embeddings and norms stay replicated (their gradients
arrive complete on every rank through the column-parallel inputs).
"""
from contextlib import contextmanager

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from ..errors import UsageError, option

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
LAYER_PLAN = {"self_attn.q_proj": ColwiseParallel, "self_attn.k_proj": ColwiseParallel,
              "self_attn.v_proj": ColwiseParallel, "mlp.gate_proj": ColwiseParallel, "mlp.up_proj": ColwiseParallel,
              "self_attn.o_proj": RowwiseParallel, "mlp.down_proj": RowwiseParallel}


def check_tensor_parallel(config, tp):
    """UsageError naming the tp setting when the model cannot be split `tp` ways by the plan."""
    if tp == 1:
        return
    if config.model_type not in LLAMA_FAMILY:
        raise UsageError(f"{option('tp')} {tp}: model type {config.model_type!r} has no tensor-parallel plan "
                         f"(supported: {', '.join(LLAMA_FAMILY)}); use {option('tp')} 1")
    sizes = {"num_attention_heads": config.num_attention_heads,
             "num_key_value_heads": getattr(config, "num_key_value_heads", config.num_attention_heads),
             "vocab_size": config.vocab_size, "intermediate_size": config.intermediate_size}
    for name, size in sizes.items():
        if size % tp != 0:
            raise UsageError(f"{option('tp')} {tp} does not divide the model's {name} ({size})")
    if getattr(config, "tie_word_embeddings", False):
        raise UsageError(f"{option('tp')} {tp}: the model ties its LM head to the input embeddings "
                         f"(tie_word_embeddings=True), which the vocab-sharded LM head cannot keep; "
                         f"use {option('tp')} 1")


def apply_tensor_parallel(model, ctx):
    """Shards `model` in place over ctx.tp_mesh by the plan of a HF *ForCausalLM of the Llama family
    (no-op when tp == 1); returns the model."""
    if ctx.tp_size == 1:
        return model
    check_tensor_parallel(model.config, ctx.tp_size)
    plan = {f"model.layers.{i}.{name}": style() for i in range(model.config.num_hidden_layers)
            for name, style in LAYER_PLAN.items()}
    plan["lm_head"] = ColwiseParallel(use_local_output=True)
    for name in plan:
        assert isinstance(model.get_submodule(name), torch.nn.Linear), f"plan entry {name} is not a Linear of the model"
    return parallelize_module(model, ctx.tp_mesh, plan)


@contextmanager
def full_vocab_logits(model, ctx):
    """Inside, the LM head returns full-vocabulary logits (all-gathered shards), e.g. for sampling."""
    if ctx.tp_size == 1:
        yield model
        return

    def gather_shards(module, inputs, output):
        return DTensor.from_local(output, ctx.tp_mesh, [Shard(output.dim() - 1)]).full_tensor()

    handle = model.get_output_embeddings().register_forward_hook(gather_shards)
    try:
        yield model
    finally:
        handle.remove()

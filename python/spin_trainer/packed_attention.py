"""A Hugging Face causal LM's forward over a packed pair batch (packing.py), through HF's own
attention entry points, alike for Llama, Mistral and Qwen2 in transformers 5.x:

- "segments" (the default for "sdpa" models, the CPU path): an `AttentionInterface` function runs
  HF's `sdpa_attention_forward` once per segment (pair) with that segment's [L, L] mask, the model
  switched to it for the call only. HF builds no mask for an implementation it has no mask function
  for, so attention costs the sum of the segments' L^2 (as FlexAttention's skipped blocks on a GPU)
  instead of a dense mask's N^2. The segment bounds are host ints: no host sync.
- "block_mask" (for "flex_attention" models, the GPU path): a FlexAttention `BlockMask` of the rule.
- "mask": a 4D `attention_mask` over the whole row, boolean for "sdpa", additive for "eager" (its
  `attn_weights + mask`). HF's `create_causal_mask` and `create_sliding_window_causal_mask` return
  a 4D mask unchanged; Qwen2 also takes a dict of masks per layer type.
- "positions" (`share_prompt=False`): no custom mask; HF derives per-document attention from the
  position ids itself (sdpa, eager, flex), or flash-attn its varlen bounds.

A 4D mask bypasses HF's sliding window, so the rule applies the window itself, on position ids,
as in the padded row (Mistral's `sliding_window`, Qwen2's windowed layers).
"""
from functools import cache, partial

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .packing import block_mask, dense_mask

SEGMENTED_SDPA = "spin_packed_segments"


def segmented_sdpa(module, query, key, value, attention_mask, *, packed_segments=None, sliding_window=None,
                   **kwargs):
    """HF attention function: query/key/value [1, heads, N, D] of a packed row -> ([1, N, heads, D], None).
    `packed_segments`: (the row's segments, segment_mask(window, (start, end)) -> its [1, 1, L, L] mask)."""
    assert packed_segments is not None, f"attention {SEGMENTED_SDPA!r} runs packed pair batches only (packed_forward)"
    segments, segment_mask = packed_segments
    outputs = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                      segment_mask(sliding_window, (start, end)), **kwargs)[0]
               for start, end in segments]
    return torch.cat(outputs, dim=1), None


AttentionInterface.register(SEGMENTED_SDPA, segmented_sdpa)


def _windows(config):
    """{layer type: window or None} of the attention layers of a HF config."""
    window, layer_types = getattr(config, "sliding_window", None), getattr(config, "layer_types", None)
    if layer_types is None:   # Llama, Mistral: one kind of layer, windowed when sliding_window is set
        return {"full_attention": window}
    return {kind: (window if kind == "sliding_attention" else None) for kind in set(layer_types)}


def _full_mask(implementation, packed, window, dtype):
    if implementation == "flex_attention":
        return block_mask(packed, window)
    allowed = dense_mask(packed, window)
    if implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def packed_forward(model, packed, *, attention=None):
    """`model`'s output on `packed` (logits [1, N, V], or fewer rows under lm_head.compacted_input).
    `attention`: "segments", "block_mask", "mask" or "positions" (share_prompt=False); None: the
    model's implementation's default."""
    config, implementation = model.config, model.config._attn_implementation
    inputs = {"input_ids": packed.input_ids, "position_ids": packed.position_ids, "use_cache": False}
    if not packed.share_prompt:
        return model(**inputs)   # attention_mask None: HF's own per-document attention from the position ids
    if attention == "positions":
        raise ValueError("attention 'positions' cannot share the prompt; pack with share_prompt=False")
    attention = attention or {"sdpa": "segments", "flex_attention": "block_mask", "eager": "mask"}.get(
        implementation, "unsupported")
    if attention == "segments":
        config._attn_implementation = SEGMENTED_SDPA   # for this call only
        try:
            # Each segment's mask, per sliding window, built once per forward.
            return model(**inputs, packed_segments=(packed.segments, cache(partial(dense_mask, packed))))
        finally:
            config._attn_implementation = implementation
    if (attention, implementation) not in (("mask", "sdpa"), ("mask", "eager"), ("block_mask", "flex_attention")):
        raise ValueError(f"attention {attention!r} with the model's attention implementation {implementation!r} "
                         f"cannot share the prompt; use 'segments', 'block_mask' with flex_attention, 'mask' with "
                         f"('sdpa', 'eager', 'flex_attention'), or pack with share_prompt=False")
    dtype = model.get_input_embeddings().weight.dtype
    masks = {kind: _full_mask(implementation, packed, window, dtype) for kind, window in _windows(config).items()}
    # One mask for every layer, or one per layer type (Qwen2-style models take the dict).
    inputs["attention_mask"] = masks if len(masks) > 1 else next(iter(masks.values()))
    return model(**inputs)

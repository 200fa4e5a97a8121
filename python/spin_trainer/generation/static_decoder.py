"""A decoder for Llama-family causal LMs over a preallocated KV cache, with the one-token step
captured in a CUDA graph.

Hugging Face's forward with its default cache spends most of a decode step launching ~20 small
kernels per layer from Python and growing the cache by concatenation; at batch 64 on a 1.2 B model
the GPU idles between launches (ANCHORS.md: 4,967 tok/s against a ~88,000 tok/s read floor). Here
the cache is allocated once per (batch, length) shape, every tensor a step touches lives at a fixed
address, and the whole step (embedding, all layers, LM head) is replayed as one CUDA graph.

The forward calls the model's own submodules (projections, norms, MLP, rotary table, LM head), so
it reads the weights in place and their hooks run as usual. Only the attention arithmetic and the
cache are ours, hence the family check (`static_decoder_unsupported_reason`); other models take
decode.py's Hugging Face path. Nothing here touches `transformers.cache_utils` (its `StaticCache`
changed between 5.17 and 5.24), only module names every Llama-family release shares.
"""

import time
import warnings

import torch
import torch.nn.functional as F

from spin_kernels.dtensor import is_dtensor

# Families whose decoder layer is exactly: h += o_proj(attn(rope(q, k), v)); h += mlp(norm(h)),
# with q/k/v/o projections as Linear modules (bias allowed: Qwen2) and no per-head q/k norm.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies depend on the sequence length seen so far; a position table
# computed once for the cache length would differ from what the model computes.
LENGTH_DEPENDENT_ROPE_TYPES = ("dynamic", "longrope")
# Cache lengths are rounded up to this so that batches of similar lengths share one CUDA graph,
# and so the attention mask's last dimension is aligned for the fused SDPA kernels.
CACHE_LENGTH_MULTIPLE = 64
GRAPH_WARMUP_STEPS = 2


def static_decoder_unsupported_reason(model) -> str | None:
    """None when `StaticKVDecoder` can run `model`, else why not (for a warning)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}"
    body = getattr(model, "model", None)
    for owner, name in [(model, "lm_head")] + [(body, n) for n in ("embed_tokens", "layers", "norm", "rotary_emb")]:
        if not hasattr(owner, name):
            return f"the model has no `{name}` module where a Llama-family model has one"
    for layer in body.layers:
        attention = getattr(layer, "self_attn", None)
        if not all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            return "a decoder layer lacks self_attn.{q,k,v,o}_proj"
        if hasattr(attention, "q_norm") or hasattr(attention, "k_norm"):
            return "per-head q/k norms are not supported"
        if not all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "a decoder layer lacks its norms or MLP"
    sliding = getattr(config, "sliding_window", None)
    if sliding is not None and (model_type == "mistral" or getattr(config, "use_sliding_window", False)):
        return "sliding-window attention is not supported"
    # transformers 5 holds the RoPE settings (4's rope_scaling) in rope_parameters, the type as "rope_type"
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type in LENGTH_DEPENDENT_ROPE_TYPES:
        return f"rope type {rope_type!r} depends on the sequence length"
    return None


def _apply_rope(x, cos, sin):
    """x [B, H, S, D]; cos, sin [B, 1, S, D]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def _attend(q, keys, values, mask, scale: float) -> torch.Tensor:
    """q [B, Hq, S, D], keys/values [B, Hkv, L, D], mask [B, 1, S, L] bool (True = attend) -> [B, S, Hq*D]."""
    batch, query_heads, steps, head_dim = q.shape
    kv_heads = keys.shape[1]
    groups = query_heads // kv_heads
    assert groups * kv_heads == query_heads, (query_heads, kv_heads)
    if steps == 1:
        # One new token: the `groups` query heads that share a KV head become that head's query rows,
        # so the cache is read once instead of being repeated `groups` times every step.
        grouped = q.reshape(batch, kv_heads, groups, head_dim)
        out = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=mask, scale=scale)
        return out.reshape(batch, 1, query_heads * head_dim)
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, steps, query_heads * head_dim)


def gather_full_logits(x: torch.Tensor) -> torch.Tensor:
    # A tensor-parallel LM head may return a vocab-sharded DTensor; sampling needs every column.
    return x.full_tensor() if is_dtensor(x) else x


class StaticKVDecoder:
    """Prefill + one-token decode steps over a preallocated cache.

    `start(input_ids, attention_mask, max_steps)` runs the left-padded prompts and returns the
    logits [B, V] of their last position; each `step(tokens)` feeds one token per row and returns
    the next logits [B, V] (a buffer overwritten by the following step). With `use_cuda_graph` the
    step is captured on its first call for each (batch, cache length) shape and replayed after.
    """

    def __init__(self, model, *, use_cuda_graph: bool):
        assert static_decoder_unsupported_reason(model) is None, "decode.choose_backend picks the decoder"
        self.model = model
        self.body = model.model
        self.layers = list(self.body.layers)
        self.use_cuda_graph = use_cuda_graph
        self.capture_seconds = 0.0
        self.captures = 0
        self._shape = None   # of the cache and graph (_prepare)

    def _prepare(self, batch: int, length: int, device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, length, device, dtype, self.compute_dtype)
        if shape == self._shape:
            return
        # Free the previous graph's memory pool and cache before allocating the new ones.
        self._graph = self._graph_logits = None
        self.keys = [None] * len(self.layers)   # allocated by the first prefill, in the compute dtype
        self.values = [None] * len(self.layers)
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)  # slot holds a real token
        self.step_tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step_positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.step_slot = torch.zeros(1, dtype=torch.long, device=device)
        positions = torch.arange(length, device=device)[None]
        probe = torch.zeros(1, dtype=dtype, device=device)
        cos, sin = self.body.rotary_emb(probe, positions)
        self.cos_table, self.sin_table = cos[0].contiguous(), sin[0].contiguous()  # [L, D]
        self._shape = shape

    def _forward(self, input_ids, positions, slots, mask) -> torch.Tensor:
        """input_ids and positions [B, S] into cache `slots` [S]; mask [B, 1, S, kv length] bool -> the
        logits [B, V] of the last position."""
        cos = self.cos_table[positions].unsqueeze(1)  # [B, 1, S, D]
        sin = self.sin_table[positions].unsqueeze(1)
        hidden = self.body.embed_tokens(input_ids)
        for index in range(len(self.layers)):
            hidden = self._layer(index, hidden, cos, sin, slots, mask)
        return gather_full_logits(self.model.lm_head(self.body.norm(hidden[:, -1:])))[:, 0]

    def _layer(self, index: int, hidden, cos, sin, slots, mask):
        layer = self.layers[index]
        # The attention's intermediates die with _attention's frame, before the MLP's are made (the
        # prefill's peak, which the memory plan counts: plan/generation.py).
        attended = self._attention(index, layer.input_layernorm(hidden), cos, sin, slots, mask)
        hidden = hidden + layer.self_attn.o_proj(attended)
        del attended
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attention(self, index: int, x, cos, sin, slots, mask):
        attention = self.layers[index].self_attn
        head_dim = attention.head_dim
        batch, steps, _ = x.shape
        q, k, v = (proj(x).view(batch, steps, -1, head_dim).transpose(1, 2)
                   for proj in (attention.q_proj, attention.k_proj, attention.v_proj))
        del x
        # RoPE's tables may be fp32 (fp32 weights under autocast) and promote q and k: attention and
        # the cache stay in the compute dtype, so the cache's bytes do not depend on the cast rules.
        q = _apply_rope(q, cos, sin).to(self.compute_dtype)
        if self.keys[index] is None:
            cache_shape = (batch, k.shape[1], self.valid.shape[1], head_dim)
            self.keys[index] = torch.zeros(cache_shape, dtype=self.compute_dtype, device=k.device)
            self.values[index] = torch.zeros(cache_shape, dtype=self.compute_dtype, device=v.device)
        self.keys[index].index_copy_(2, slots, _apply_rope(k, cos, sin).to(self.compute_dtype))
        self.values[index].index_copy_(2, slots, v.to(self.compute_dtype))
        del k, v
        kv_length = mask.shape[-1]   # the prompt's length in the prefill, the whole cache in a step
        keys = self.keys[index][:, :, :kv_length]
        values = self.values[index][:, :, :kv_length]
        return _attend(q, keys, values, mask, getattr(attention, "scaling", head_dim**-0.5))

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_steps: int) -> torch.Tensor:
        """Prefill left-padded prompts [B, P]; the cache gets room for `max_steps` more tokens."""
        batch, prompt_length = input_ids.shape
        length = -(-(prompt_length + max_steps) // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
        # The projections compute in autocast's dtype when it is on (fp32 weights, bf16 matmuls), else
        # in the weights' own (FSDP's gathered bf16 weights under its mixed precision, or plain weights).
        autocast = torch.is_autocast_enabled(input_ids.device.type)
        self.compute_dtype = (torch.get_autocast_dtype(input_ids.device.type) if autocast
                              else self.layers[0].self_attn.q_proj.weight.dtype)
        self._prepare(batch, length, input_ids.device, next(self.model.parameters()).dtype)
        present = attention_mask.bool()
        self.valid.zero_()
        self.valid[:, :prompt_length] = present
        positions = (present.long().cumsum(-1) - 1).clamp_min(0)  # [B, P]; pads get 0, never attended
        causal = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=input_ids.device).tril()
        # Every query also sees itself, so a padding row is never fully masked (its softmax would be
        # NaN, and NaN values leak through 0-weighted sums into later layers).
        diagonal = torch.eye(prompt_length, dtype=torch.bool, device=input_ids.device)
        mask = ((causal & present[:, None, None, :]) | diagonal)  # [B, 1, P, P]
        slots = torch.arange(prompt_length, device=input_ids.device)
        logits = self._forward(input_ids, positions, slots, mask)
        self.step_positions.copy_(present.long().sum(-1, keepdim=True))
        self.step_slot.fill_(prompt_length)
        return logits

    def _decode_step(self) -> torch.Tensor:
        """One token per row at `step_slot`; only fixed-address buffers are read (graph-safe)."""
        self.valid.index_fill_(1, self.step_slot, True)
        mask = self.valid.view(self.valid.shape[0], 1, 1, -1)
        return self._forward(self.step_tokens, self.step_positions, self.step_slot, mask)

    def _capture(self) -> None:
        device = self.step_tokens.device
        began = time.perf_counter()
        torch.cuda.synchronize(device)
        # Warm-up runs (lazy cuBLAS/SDPA initialisation must not happen during capture) write the
        # same slot with the same values as the first real step, so they change nothing.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._decode_step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode_step()
        torch.cuda.synchronize(device)
        self._graph, self._graph_logits = graph, logits
        self.capture_seconds += time.perf_counter() - began
        self.captures += 1

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] at the next position; returns the logits [B, V] that follow them."""
        self.step_tokens.copy_(tokens.view(-1, 1))
        if self.use_cuda_graph and self._graph is None:
            try:
                self._capture()
            except Exception as error:  # any capture failure: the eager step computes the same thing
                self.use_cuda_graph = False
                if self.step_tokens.is_cuda:
                    torch.cuda.synchronize(self.step_tokens.device)
                warnings.warn(f"CUDA graph capture of the decode step failed ({error!r}); decoding eagerly",
                              RuntimeWarning)
        if self._graph is not None:
            self._graph.replay()
            logits = self._graph_logits
        else:
            logits = self._decode_step()
        self.step_positions.add_(1)
        self.step_slot.add_(1)
        return logits

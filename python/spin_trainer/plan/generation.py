"""Device memory of generation, by formula (for `--plan`): the KV cache and the prefill's transients
of `rows` prompts generated at once, and the largest such batch that fits.

Which decoder runs: the static-cache decoder (generation/static_decoder.py) on one tensor-parallel
rank, Hugging Face's own forward and dynamic cache under tensor parallelism (generation/decode.py,
choose_backend). Every prompt is taken at --max-length - 1 tokens and every batch as the worst one
the length-sorted batching can form (its longest prompt that long, a short one that leaves
--max-new-tokens steps), so the figures are upper bounds. With h the hidden size, q and w the query
and key/value widths (heads x head dim), I the MLP width, t the tensor-parallel size, b the
compute dtype's bytes and r the residual stream's (= b: mixed precision is FSDP's cast, which
makes the embeddings bf16 too):

    KV cache     rows x length x layers x 2w/t x bytes. Length: the static decoder's slots run to
                 the batch's padded prompt + its steps, rounded up to a multiple of 64; Hugging
                 Face's cache ends one token short of that, unrounded. Bytes: the compute dtype
    prefill      per prompt token, the largest of the phases of one decoder layer (the hidden
                 state is replicated over the tensor-parallel ranks):
                   norms    HF's RMSNorm upcasts its input to fp32: input, fp32 copy, its square
                            or x·rsqrt, output: 12h bytes for fp32 input, (r + 8)h otherwise;
                            the second norm also holds the layer's input: + r·h
                   attention  the layer's input r·h and (Hugging Face) the norm's output r·h;
                            q, k, v b(q + 2w)/t with RoPE's three q-sized temporaries
                            3·max(b, r)·q/t, or, in SDPA, q, the output and (static decoder: k, v
                            written to the cache and freed, the key/value heads repeated for the
                            query heads) 2b·q/t more, with SDPA's additive mask b·P
                   MLP      three hidden states 3r·h (input, after attention, normed) and
                            act(gate), up and their product 3b·I/t, or the product and the
                            down projection's output b·I/t + b·h
                 plus, for the whole prefill, the attention mask [rows, 1, P, P] as booleans (and
                 as SDPA's additive float mask in the attention phase, b bytes per element), the
                 RoPE tables of every position, 2·r·head_dim per token, and per batch the [P, P]
                 patterns it is made of (causal and diagonal in the static decoder, causal in
                 Hugging Face's)
    decode step  Hugging Face's cache grows by concatenation: one layer's keys and values twice
                 (old and new); the static decoder writes in place

tests/test_plan_measured.py measures these against the tensors a CPU run allocates.
"""
from dataclasses import dataclass

from ..generation.static_decoder import CACHE_LENGTH_MULTIPLE


@dataclass(frozen=True)
class GenerationMemory:
    static_decoder: bool
    cache_length: int
    kv_cache_per_row: int
    transient_per_row: int     # the larger of the prefill's and a decode step's transients
    transient_per_batch: int   # the prefill's causal and diagonal [P, P] masks

    def kv_cache(self, rows):
        return rows * self.kv_cache_per_row

    def transient(self, rows):
        return rows * self.transient_per_row + self.transient_per_batch

    def total(self, rows):
        return self.kv_cache(rows) + self.transient(rows)

    def rows_that_fit(self, free_bytes):
        per_row = self.kv_cache_per_row + self.transient_per_row
        return max(0, (free_bytes - self.transient_per_batch) // per_row)


def _norm_peak(h, r):
    return 12 * h if r == 4 else (r + 8) * h


def prefill_bytes_per_token(shape, mode, prompt, static):
    """Bytes the prefill of one prompt of `prompt` tokens keeps at its peak, per token."""
    h, w, t, b, r = shape.hidden, shape.kv_width, mode.tp, mode.compute_bytes, mode.compute_bytes
    q, i = shape.heads * shape.head_dim // t, shape.intermediate // t
    norm = max(_norm_peak(h, r), r * h + _norm_peak(h, r))
    projected = b * (q + 2 * w // t)
    if static:   # the norm's output and k, v die once written to the cache; the heads are repeated
        attention = r * h + max(projected + 3 * max(b, r) * q, 4 * b * q + b * prompt)
    else:        # Hugging Face keeps them to the end of the attention
        attention = 2 * r * h + projected + max(3 * max(b, r) * q, 3 * b * q + b * prompt)
    # act(gate), up and their product; or the product and the down projection's output
    mlp = 3 * r * h + max(3 * b * i, b * i + b * h)
    whole_prefill = prompt + 2 * r * shape.head_dim
    return max(norm, attention, mlp) + whole_prefill


def generation_memory(shape, mode, *, max_length, max_new_tokens, static_decoder=None):
    """GenerationMemory of one rank; the decoder the run would choose unless `static_decoder` says
    (the static one on one tensor-parallel rank, Hugging Face's under tensor parallelism)."""
    static = mode.tp == 1 if static_decoder is None else static_decoder
    prompt = max_length - 1
    slots = prompt + max_new_tokens
    if static:
        length = -(-slots // CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE
        cache_bytes = mode.compute_bytes
    else:
        length = slots - 1
        cache_bytes = mode.compute_bytes
    layer_cache = length * 2 * shape.kv_width // mode.tp * cache_bytes
    prefill = prompt * prefill_bytes_per_token(shape, mode, prompt, static)
    decode = 0 if static else 2 * layer_cache
    return GenerationMemory(static_decoder=static, cache_length=length, kv_cache_per_row=shape.layers * layer_cache,
                            transient_per_row=max(prefill, decode), transient_per_batch=(2 if static else 1) * prompt * prompt)

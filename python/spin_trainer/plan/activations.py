"""Activation memory of one SPIN micro-batch of a Llama-family decoder, by formula (for `--plan`).

The micro-batch is plan/micro_batch.py's largest one: n tokens (padded: 2 rows a pair at
--max-length; packed: the token budget) of which N go through the LM head (padded: every position,
an upper bound; packed: the scored tokens, the last prompt position twice).

What autograd keeps for the backward, in bytes per token, with h the hidden size, q the query
width (heads x head dim), w the key/value width (KV heads x head dim), I the MLP width, a the
attention heads, t the tensor-parallel size, b the compute dtype's bytes (mixed precision is FSDP's
cast of every weight, embeddings included, so the residual stream is in the compute dtype too:
r = b):

    RMSNorm (HF: fp32 upcast, x·rsqrt, weight·x)  4h + r·h + 4, plus its output: b·h read by all
                                                  its consumers
    attention (a fused kernel)                    b·(2h + 2w)/t for q, k, v and the output (o_proj
                                                  reads it in place) + 4a/t for the log-sum-exp
      packed pairs on SDPA (packed_attention.py's  + b·q/t (the segments' outputs concatenated for
      segments: one SDPA call a pair, with its    o_proj), + b·2(q - w)/t with grouped-query
      [L, L] mask)                                attention (HF repeats k and v for SDPA with a
                                                  mask), and per layer b·ΣL² over the segments
                                                  (SDPA keeps the boolean mask as an additive one)
    SwiGLU MLP                                    4·b·I/t: gate, up, act(gate), act(gate)·up

    per decoder layer, --recompute none           norm(3) + attention + norm(2) + MLP
                       --recompute elementwise    the norms keep only their input (r·h) and output
                                                  casts; the MLP drops act(gate): 3·b·I/t
                       --recompute full           the layer's input, r·h (one layer's activations
                                                  are rebuilt in the backward: counted as a transient)

    per micro-batch    n·(L·layer + 8 (input ids) + final norm 4h + r·h + 4) + RoPE tables 2·T·d·r
                       (d the head dim, T the positions of a row: --max-length padded, n packed;
                       none/elementwise) + the segments' masks
    LM head and loss   --head logits: N·(b·h (the head's input) + b·V/t (logits, which the loss's
                       gradient overwrites in place) + 32 (fp32 log-sum-exp and log-prob; int64
                       label, position and row))
                       --head fused (spin_kernels.loss.linear_spin_loss, gradients formed in the
                       forward): N·(2·b·h (the compacted input and its gradient) + 32) + one chunk of
                       logits (at most head_chunks.CHUNK_BYTES) + the fp32 accumulator of d weight,
                       4·V/t·h, + d weight itself in the compute dtype, b·V/t·h, held to the backward
                       (an fp32 weight's gradient is its own accumulator). With its fixed
                       (4 + b)·V/t·h bytes and a chunk, it is the leaner head only once the logits it
                       avoids are larger: for bf16 from about one chunk's rows + 3·h labelled tokens
                       per micro-batch (16.5k at V = 128256, h = 4096)

    a decoder layer's backward, beside what is saved (its peak is in the MLP's; tests/
    test_plan_training.py measures the live tensors there): the residual stream's gradient b·h,
    and at act(gate)·up's backward d act(gate) and d up while d(act(gate)·up) is still there and
    act(gate)·up, down_proj's saved input, is already freed: 2·b·I/t more (elementwise: 3, as
    act(gate) is rebuilt first); at down_proj's backward d(act(gate)·up), b·I/t, with the weight's
    gradient (training.py adds it where it is formed whole). The final norm's activations are freed
    by then. --recompute full rebuilds the layer's activations first (--recompute none's).

The decoder part equals the bytes autograd saves for an unpadded batch with a flash-style
attention kernel (tests/test_train_plan.py measures it with saved-tensor hooks on the CPU for every
--recompute and precision, padded and packed). Not counted: with padding, Hugging Face's
flash-attention-2 path unpads q/k/v into copies and re-pads the output (about one more b·h/t per
token and layer without recompute); an attention mask materialised as [rows, T, T] (eager or SDPA
with padding, a packed row on eager); the cuBLAS/NCCL workspaces and allocator fragmentation. The
training step's phases: plan/training.py.
"""
from dataclasses import dataclass

from spin_kernels.loss.ops.linear_logprobs import CHUNK_BYTES

LABEL_BYTES = 32   # per labelled token: fp32 log-sum-exp + fp32 log-prob + int64 label, position, row


@dataclass(frozen=True)
class DecoderShape:
    hidden: int
    kv_width: int
    intermediate: int
    heads: int
    head_dim: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, config):
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(hidden=config.hidden_size, kv_width=kv_heads * head_dim, intermediate=config.intermediate_size,
                   heads=heads, head_dim=head_dim, layers=config.num_hidden_layers, vocab=config.vocab_size)


@dataclass(frozen=True)
class ComputeMode:
    compute_bytes: int    # b
    tp: int = 1


def _norm_bytes(shape, mode, recompute):
    h, b = shape.hidden, mode.compute_bytes
    kept = 4 * h + b * h + 4 if recompute == "none" else b * h
    return kept + b * h


def segmented_attention_bytes_per_token(shape, mode):
    """What packed pairs on SDPA (one call a segment, with its mask) keep beyond a fused kernel, per
    token and layer: the concatenated output, and k and v repeated for the query heads."""
    q, w, b, t = shape.heads * shape.head_dim, shape.kv_width, mode.compute_bytes, mode.tp
    repeated = 2 * (q - w) if w < q else 0
    return b * (q + repeated) // t


def layer_bytes_per_token(shape, mode, recompute, segmented=False):
    """Bytes one decoder layer keeps for the backward, per token of the micro-batch (`segmented`:
    packed pairs on SDPA, the mask excluded)."""
    h, w, b, t = shape.hidden, shape.kv_width, mode.compute_bytes, mode.tp
    if recompute == "full":
        return b * h
    attention = b * (2 * h + 2 * w) // t + 4 * shape.heads // t
    if segmented:
        attention += segmented_attention_bytes_per_token(shape, mode)
    mlp = (4 if recompute == "none" else 3) * b * shape.intermediate // t
    return 2 * _norm_bytes(shape, mode, recompute) + attention + mlp


def final_norm_bytes_per_token(shape, mode):
    return 4 * shape.hidden + mode.compute_bytes * shape.hidden + 4


def decoder_bytes(shape, mode, recompute, *, tokens, positions, segments_squared=0):
    """Bytes the backbone (embeddings, decoder layers, final norm) keeps for one micro-batch of
    `tokens` tokens in rows of `positions` positions; `segments_squared` > 0: packed pairs on SDPA,
    whose segments' squares sum to it (each layer keeps their masks in the compute dtype)."""
    r = mode.compute_bytes
    segmented = segments_squared > 0
    per_token = (shape.layers * layer_bytes_per_token(shape, mode, recompute, segmented) + 8
                 + final_norm_bytes_per_token(shape, mode))
    if recompute == "full":
        return tokens * per_token
    rope = 2 * positions * shape.head_dim * r
    return tokens * per_token + rope + shape.layers * r * segments_squared


def head_bytes(shape, mode, labelled, head="logits"):
    """Bytes of the LM head and the loss for `labelled` tokens (--head logits or fused)."""
    b, h, v = mode.compute_bytes, shape.hidden, shape.vocab // mode.tp
    if head == "logits":
        return labelled * (b * h + b * v + LABEL_BYTES)

    weight_gradient = 4 * v * h + (b * v * h if b < 4 else 0)
    return labelled * (2 * b * h + LABEL_BYTES) + min(CHUNK_BYTES, labelled * b * v) + weight_gradient


def head_transient_bytes(shape, mode, labelled, head="logits"):
    """The part of head_bytes that ends with the loss's forward: the fused head's chunk of logits and
    (for a bf16 weight) d weight's fp32 accumulator, freed once d weight is cast."""
    if head == "logits":
        return 0
    b, h, v = mode.compute_bytes, shape.hidden, shape.vocab // mode.tp
    return min(CHUNK_BYTES, labelled * b * v) + (4 * v * h if b < 4 else 0)


@dataclass(frozen=True)
class ActivationEstimate:
    tokens: int                 # n
    labelled: int               # N
    layer_per_token: int        # bytes per token per decoder layer
    layer_mask: int             # bytes per decoder layer: the segments' masks (packed pairs on SDPA)
    decoder: int                # bytes: backbone
    head: int                   # bytes: LM head and loss
    head_transient: int         # bytes: the part of `head` freed at the end of the loss's forward
    final_norm: int             # bytes: the final norm's, freed before the decoder layers' backward
    # a decoder layer's backward, beside the saved tensors (the weight's gradient: training.py)
    residual_gradient: int      # the residual stream's gradient
    mlp_gradients: int          # at act(gate)·up's backward
    mlp_product_gradient: int   # at down_proj's backward, beside its weight's gradient
    rebuilt: int                # --recompute full: the layer's activations, rebuilt

    @property
    def total(self):
        return self.decoder + self.head

    @property
    def top_layer(self):
        """Bytes the last decoder layer keeps (freed by its backward, the first of the layers')."""
        return self.tokens * self.layer_per_token + self.layer_mask


def estimate_activations(shape, mode, recompute, batch, *, head="logits", segmented=False):
    """The activations of `batch` (micro_batch.MicroBatch); `segmented`: a packed batch runs
    packed_attention.py's segments (an SDPA model)."""
    n, b, per_layer_intermediate = batch.tokens, mode.compute_bytes, mode.compute_bytes * shape.intermediate // mode.tp
    squared = batch.segments_squared if segmented else 0
    rebuilt = 0
    if recompute == "full":   # the layer's activations are rebuilt before its backward, its mask too
        rebuilt = n * layer_bytes_per_token(shape, mode, "none", squared > 0) + b * squared
    return ActivationEstimate(
        tokens=n, labelled=batch.labelled, layer_per_token=layer_bytes_per_token(shape, mode, recompute, squared > 0),
        layer_mask=0 if recompute == "full" else b * squared,
        decoder=decoder_bytes(shape, mode, recompute, tokens=n, positions=batch.positions, segments_squared=squared),
        head=head_bytes(shape, mode, batch.labelled, head),
        head_transient=head_transient_bytes(shape, mode, batch.labelled, head), final_norm=n * final_norm_bytes_per_token(shape, mode),
        residual_gradient=n * b * shape.hidden,
        mlp_gradients=n * (3 if recompute == "elementwise" else 2) * per_layer_intermediate,
        mlp_product_gradient=n * per_layer_intermediate, rebuilt=rebuilt)

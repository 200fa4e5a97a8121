"""Activation memory of one SPIN micro-batch of a Llama-family decoder, by formula (for `--plan`).

A micro-batch of m pairs is 2m rows (actual and generated) padded to the longest; the plan takes
every row at --max-length, n = 2·m·max_length tokens, and every position as labelled (N = n):
an upper bound (prompts and padding have no label, so the head runs on fewer rows in practice).

What autograd keeps for the backward, in bytes per token, with h the hidden size, w the key/value
width (KV heads x head dim), I the MLP width, a the attention heads, t the tensor-parallel size,
b the compute dtype's bytes (mixed precision is FSDP's cast of every weight, embeddings included,
so the residual stream is in the compute dtype too: r = b):

    RMSNorm (HF: fp32 upcast, x·rsqrt, weight·x)  4h + r·h + 4, plus its output: b·h read by all
                                                  its consumers
    attention (a fused kernel)                    b·(2h + 2w)/t for q, k, v and the output (o_proj
                                                  reads it in place) + 4a/t for the log-sum-exp
    SwiGLU MLP                                    4·b·I/t: gate, up, act(gate), act(gate)·up

    per decoder layer, --recompute none           norm(3) + attention + norm(2) + MLP
                       --recompute elementwise    the norms keep only their input (r·h) and output
                                                  casts; the MLP drops act(gate): 3·b·I/t
                       --recompute full           the layer's input, r·h (one layer's activations
                                                  are rebuilt in the backward: counted as a transient)

    per micro-batch    n·(L·layer + 8 (input ids) + final norm 4h + r·h + 4) + RoPE tables 2·T·d·r
                       (d the head dim; none/elementwise)
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

The decoder part equals the bytes autograd saves for an unpadded batch with a flash-style
attention kernel (tests/test_train_plan.py measures it with saved-tensor hooks on the CPU for every
--recompute and precision). Not counted: with padding, Hugging Face's flash-attention-2 path
unpads q/k/v into copies and re-pads the output (about one more b·h/t per token and layer without
recompute); an attention mask materialised as [rows, T, T] (eager or SDPA with padding); the
cuBLAS/NCCL workspaces and allocator fragmentation. The backward's working set and the training
step's phases: plan/training.py.
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


def layer_bytes_per_token(shape, mode, recompute):
    """Bytes one decoder layer keeps for the backward, per token of the micro-batch."""
    h, w, b, t = shape.hidden, shape.kv_width, mode.compute_bytes, mode.tp
    if recompute == "full":
        return b * h
    attention = b * (2 * h + 2 * w) // t + 4 * shape.heads // t
    mlp = (4 if recompute == "none" else 3) * b * shape.intermediate // t
    return 2 * _norm_bytes(shape, mode, recompute) + attention + mlp


def decoder_bytes(shape, mode, recompute, *, rows, length):
    """Bytes the backbone (embeddings, decoder layers, final norm) keeps for one micro-batch of
    `rows` x `length` tokens."""
    h, r = shape.hidden, mode.compute_bytes
    tokens = rows * length
    per_token = shape.layers * layer_bytes_per_token(shape, mode, recompute) + 8 + 4 * h + r * h + 4
    rope = 0 if recompute == "full" else 2 * length * shape.head_dim * r
    return tokens * per_token + rope


def head_bytes(shape, mode, labelled, head="logits"):
    """Bytes of the LM head and the loss for `labelled` tokens (--head logits or fused)."""
    b, h, v = mode.compute_bytes, shape.hidden, shape.vocab // mode.tp
    if head == "logits":
        return labelled * (b * h + b * v + LABEL_BYTES)

    weight_gradient = 4 * v * h + (b * v * h if b < 4 else 0)
    return labelled * (2 * b * h + LABEL_BYTES) + min(CHUNK_BYTES, labelled * b * v) + weight_gradient


@dataclass(frozen=True)
class ActivationEstimate:
    tokens: int                 # n
    labelled: int               # N
    layer_per_token: int        # bytes per token per decoder layer
    decoder: int                # bytes: backbone
    head: int                   # bytes: LM head and loss
    backward_working_set: int   # bytes: a decoder layer's backward, beside the saved tensors

    @property
    def total(self):
        return self.decoder + self.head

    @property
    def top_layer(self):
        """Bytes the last decoder layer keeps (freed by its backward, the first of the layers')."""
        return self.tokens * self.layer_per_token


def working_set_per_token(shape, mode):
    """A decoder layer's backward, at its largest (in the MLP's): the gradients of the MLP's
    intermediates d(act(gate)·up), d act(gate) and d up."""
    return 3 * mode.compute_bytes * shape.intermediate // mode.tp


def estimate_activations(shape, mode, recompute, *, micro_batch_size, max_length, head="logits"):
    """The micro-batch's activations (2·micro_batch_size rows of max_length tokens, all labelled)."""
    rows = 2 * micro_batch_size
    tokens = rows * max_length
    working_set = tokens * working_set_per_token(shape, mode)
    if recompute == "full":   # the layer's activations are rebuilt before its backward
        working_set += tokens * layer_bytes_per_token(shape, mode, "none")
    return ActivationEstimate(
        tokens=tokens, labelled=tokens, layer_per_token=layer_bytes_per_token(shape, mode, recompute),
        decoder=decoder_bytes(shape, mode, recompute, rows=rows, length=max_length),
        head=head_bytes(shape, mode, tokens, head), backward_working_set=working_set)

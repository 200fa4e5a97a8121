"""Choosing the next token: greedy, or a draw after temperature, top-k and top-p whose randomness
depends only on (seed, example index, step, vocab id).

Why a hash and not a `torch.Generator`: a generator's stream is consumed in batch order, so a
prompt's noise would depend on its batch-mates, the batch size and the number of data-parallel
ranks, and a run resumed on another world size would sample other responses. Here each number is a
counter-based hash of its coordinates (the idea of Philox in cuRAND and of JAX's `fold_in`), made
with integer tensor ops on the logits' device: no state, no host sync, and the keys are device
tensors, so a draw can run inside a captured CUDA graph.

The hash works on 32-bit words held in int64 tensors, every product exact: a multiplier c >= 2^31
is used as c - 2^32 (the same modulo 2^32, and |x·c| < 2^63), so the bits are the same on every
device and nothing relies on overflow. The mixer is lowbias32 (C. Wellons' hash-prospector:
16 7feb352d 15 846ca68b 16). Each (example, step) gets two 32-bit keys, fully mixed on [B] only;
token v of a row gets lowbias32(key1 + v·φ), then key2 mixed in, so two rows share noise only if
both keys collide (2^-64). The top 24 bits give u in (0, 1), E = -ln u ~ Exp(1), and the token is
argmax_v p_v / E_v: the exponential race, which draws v with probability p_v exactly as Gumbel-max
or multinomial do (up to the 2^-24 resolution of u: Exp(1) is cut below 3e-8 and above 17.3).
"""
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
PHI32 = 0x9E3779B9  # 2^32 / golden ratio: consecutive vocab ids land far apart before mixing
# The multipliers, each >= 2^31 one as c - 2^32 (see above).
_LOWBIAS_1, _LOWBIAS_2 = 0x7FEB352D, 0x846CA68B - (1 << 32)
_LANE2 = 0x21F0AAAD
_LANE_SALTS = (0x3C6EF372, 0xA54FF53A)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # Tokens before a response may end (HF's min_new_tokens): EOS and one-token stop sequences are
    # masked out of the first min_new_tokens draws, and a longer stop sequence ending there does
    # not count.
    min_new_tokens: int = 0
    # Token-id sequences that end a response (included in it), e.g. a chat turn's end marker.
    stop_sequences: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens={self.max_new_tokens}], "
                             f"got {self.min_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_int(self.seed):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not isinstance(self.stop_sequences, (list, tuple)):
            raise TypeError("stop_sequences must be a list of token-id lists, "
                            f"got {type(self.stop_sequences).__name__}")
        for index, stop in enumerate(self.stop_sequences):
            if not isinstance(stop, (list, tuple)) or not stop or not all(is_int(t) and t >= 0 for t in stop):
                raise ValueError(f"stop_sequences[{index}] must be a non-empty list of token ids >= 0, got {stop!r}")
        object.__setattr__(self, "stop_sequences", tuple(map(tuple, self.stop_sequences)))


def mix32(x):
    """lowbias32 of 32-bit words: int64 tensors (values in [0, 2^32)) or Python ints, bit-identical;
    `x` itself is left as it was."""
    return _mix32_in_place(x.clone() if isinstance(x, torch.Tensor) else x)


def _mix32_in_place(x):
    # In place on a tensor: on [B, V] a fresh tensor per operation costs 3x the arithmetic (CPU).
    x ^= x >> 16
    x *= _LOWBIAS_1
    x &= MASK32
    x ^= x >> 15
    x *= _LOWBIAS_2
    x &= MASK32
    x ^= x >> 16
    return x


def row_keys(seed: int, examples: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys per row [B] (int64) of (seed, example index [B], step (0-dim))."""
    seed_lo, seed_hi = seed & MASK32, (seed >> 32) & MASK32
    example_lo, example_hi = examples & MASK32, (examples >> 32) & MASK32
    step = step & MASK32
    seed_keys = [mix32(mix32(seed_lo ^ salt) ^ seed_hi) for salt in _LANE_SALTS]  # Python ints: cost nothing
    return tuple(mix32(mix32(mix32(key ^ example_lo) ^ example_hi) ^ step) for key in seed_keys)


def uniform_noise(seed: int, examples: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """u [B, vocab] float32 in (0, 1), a function of (seed, examples[b], step, v) only."""
    key1, key2 = row_keys(seed, examples, step)
    ids = torch.arange(vocab, dtype=torch.int64, device=examples.device)
    x = ((ids * PHI32) & MASK32) + key1[:, None]
    x &= MASK32
    _mix32_in_place(x)
    x ^= key2[:, None]
    x *= _LANE2
    x &= MASK32
    x ^= x >> 16
    x >>= 8
    return (x.float() + 0.5) * 2.0**-24


def sample_next_tokens(logits: torch.Tensor, sampling: SamplingConfig, examples: torch.Tensor,
                       step: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> token ids [B], on the logits' device, without a host sync.

    `examples` [B] int64: each row's example index (its place in the whole dataset, not in the
    batch); `step` 0-dim int64: the index of the token being drawn, both on the logits' device.
    """
    if not sampling.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / sampling.temperature
    vocab = scores.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth_best = torch.topk(scores, sampling.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampling.top_p < 1.0:
        ordered, order = scores.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token goes when the mass before it
        # already does (the best token is always kept).
        drop = (probs.cumsum(dim=-1) - probs) >= sampling.top_p
        scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = scores.softmax(dim=-1)
    race = uniform_noise(sampling.seed, examples, step, vocab).log_().neg_()  # Exp(1), > 0
    return (probs / race).argmax(dim=-1)

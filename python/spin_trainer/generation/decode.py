"""Response generation for SPIN: the policy answers every training prompt once per iteration.

Prompts are sorted by length (less padding) and run in left-padded batches. Tokens are drawn on the
device (sampling.py), with noise keyed by each prompt's example index, so a prompt's response does
not depend on its batch, and every tensor-parallel rank draws the same tokens from the same full
logits. The host reads the tokens only every `EOS_CHECK_INTERVAL` steps, to stop a finished batch.

A response ends at the first EOS id or at the end of a stop sequence (both included), but not
before `sampling.min_new_tokens` tokens; otherwise it is cut at its length cap, min(max_new_tokens,
max_length - prompt length), and reported `truncated`.

Backends (`backend=`):
  "cuda_graph"  our static-KV-cache decoder with the decode step replayed as a CUDA graph (fast path)
  "static"      the same decoder run eagerly (CPU, or where graph capture is unwanted)
  "hf"          the model's own forward with its default cache (any causal LM; tensor parallel)
  "auto"        for Llama-family models cuda_graph on CUDA, static elsewhere; hf for other models
                and for tensor-parallel (DTensor) models
A capture failure falls back to the eager decoder with a warning.
"""

import inspect
import numbers
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from tqdm.auto import tqdm

from spin_kernels.dtensor import is_dtensor

from ..model import evaluating
from .sampling import SamplingConfig, is_int, sample_next_tokens
from .static_decoder import StaticKVDecoder, gather_full_logits, static_decoder_unsupported_reason

BACKENDS = ("auto", "cuda_graph", "static", "hf")
# Stopping a batch early needs the host to read whether every row is done (a device sync); every 16
# steps costs at most 15 wasted steps at the end of a batch and no sync on the other steps.
EOS_CHECK_INTERVAL = 16


@dataclass
class GenerationStats:
    """Filled by `generate_responses(stats=...)`: what ran and what it cost."""

    backend: str = ""
    new_tokens: int = 0
    seconds: float = 0.0
    capture_seconds: float = 0.0
    captures: int = 0
    batches: int = 0
    fallback_reasons: list[str] = field(default_factory=list)


class Responses(list):
    """Response token ids in prompt order (a list of lists); `truncated[i]`: response i was cut at its
    length cap, without an EOS or stop sequence at its end."""

    def __init__(self, responses, truncated):
        super().__init__(responses)
        self.truncated = list(truncated)


class HFDecoder:
    """The model's own forward and default (dynamic) cache: works for any causal LM."""

    def __init__(self, model):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name still works but warns).
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_last_logits = "logits_to_keep" in parameters

    def start(self, input_ids, attention_mask, max_steps):
        self.attention_mask = attention_mask
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 1)
        return self._forward(input_ids, positions, **({"logits_to_keep": 1} if self.keeps_last_logits else {}))

    def step(self, tokens):
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        return self._forward(tokens.view(-1, 1), self.next_positions, **{self.cache_argument: self.cache})

    def _forward(self, input_ids, positions, **extra):
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=positions,
                         use_cache=True, **extra)
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        assert self.cache is not None, "the model returned no cache with use_cache=True"
        self.next_positions = positions[:, -1:] + 1
        return gather_full_logits(out.logits)[:, -1]


def choose_backend(model, backend: str, device: torch.device) -> tuple[str, list[str]]:
    """Resolve `backend` for this model and device; returns it and the reasons for any downgrade."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "hf":
        return "hf", []
    unsupported = static_decoder_unsupported_reason(model)
    if unsupported is not None:
        return "hf", [] if backend == "auto" else [f"static decoder unavailable: {unsupported}"]
    if backend == "auto":
        # Tensor parallelism shards the weights (DTensors); data parallelism alone leaves each rank a
        # whole model, which the static decoder can run.
        tensor_parallel = any(is_dtensor(p) for p in model.parameters())
        return ("hf" if tensor_parallel else "cuda_graph" if device.type == "cuda" else "static"), []
    if backend == "cuda_graph" and device.type != "cuda":
        return "static", [f"CUDA graphs need a CUDA device, the model is on {device}"]
    return backend, []


def _validate_prompts(prompts, max_length, vocab_size):
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"prompts[{index}] must be a list of int token ids")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{index}] is empty; a response needs at least one prompt token")
        if len(prompt) >= max_length:
            raise ValueError(f"prompts[{index}] has {len(prompt)} tokens, which leaves no room for a response "
                             f"within max_length={max_length}")
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            raise ValueError(f"prompts[{index}] has token ids outside [0, {vocab_size}) (the model's vocabulary)")


def _decode_batch(decoder, batch, examples, limits, sampling, eos_ids, pad_token_id, device, vocab_size):
    """(responses, truncated) of one batch; `examples`: the rows' example indices (sampling keys)."""
    ids = [torch.tensor(prompt, dtype=torch.long) for prompt in batch]   # left-padded: each prompt right-aligned
    input_ids = pad_sequence(ids, batch_first=True, padding_value=pad_token_id, padding_side="left")
    attention_mask = pad_sequence([torch.ones_like(i) for i in ids], batch_first=True, padding_side="left")
    max_steps = max(limits)
    logits = decoder.start(input_ids.to(device), attention_mask.to(device), max_steps)
    if vocab_size is not None and logits.shape[-1] < vocab_size:
        raise ValueError(f"model: the LM head returned {logits.shape[-1]} logit columns for a vocabulary of "
                         f"{vocab_size}; under tensor parallelism it must return a DTensor (use_local_output=False) "
                         "or replicated logits")
    example_keys = torch.tensor(examples, dtype=torch.long, device=device)
    step_key = torch.zeros((), dtype=torch.long, device=device)  # a device counter: no host value per step
    # A one-token stop sequence is one more EOS id. Before min_new_tokens none of them can be drawn.
    end_ids = eos_ids + [stop[0] for stop in sampling.stop_sequences if len(stop) == 1]
    eos = torch.tensor(end_ids, dtype=torch.long, device=device)
    early_ban = torch.tensor([t for t in end_ids if 0 <= t < logits.shape[-1]], dtype=torch.long, device=device)
    stops = [torch.tensor(stop, dtype=torch.long, device=device) for stop in sampling.stop_sequences if len(stop) > 1]
    # A row's length is its cap until it ends; it is done at a step >= its length.
    lengths = torch.tensor(limits, device=device)
    stopped = torch.zeros_like(lengths, dtype=torch.bool)  # ended by EOS or a stop sequence
    tokens = torch.full((len(batch), max_steps), pad_token_id, dtype=torch.long, device=device)
    for step in range(max_steps):
        if step > 0:
            logits = decoder.step(next_tokens)
        started = step >= sampling.min_new_tokens
        if not started:
            logits = logits.index_fill(-1, early_ban, float("-inf"))
        done = lengths <= step
        next_tokens = sample_next_tokens(logits, sampling, example_keys, step_key).masked_fill(done, pad_token_id)
        tokens[:, step] = next_tokens
        if started:
            ends = torch.isin(next_tokens, eos)
            for stop in stops:
                if len(stop) <= step + 1:
                    ends |= (tokens[:, step + 1 - len(stop):step + 1] == stop).all(dim=-1)
            ends &= ~done
            stopped |= ends
            lengths = torch.where(ends, step + 1, lengths)
        step_key += 1
        if (step + 1) % EOS_CHECK_INTERVAL == 0 and step + 1 < max_steps and bool((lengths <= step + 1).all()):
            break
    responses = [row[:length] for row, length in zip(tokens[:, :step + 1].tolist(), lengths.tolist())]
    return responses, (~stopped).tolist()


def generate_responses(model, prompts: list[list[int]], sampling: SamplingConfig, *, eos_token_id: int | list[int],
                       pad_token_id: int, max_length: int, batch_size: int = 64, progress: bool = True,
                       backend: str = "auto", stats: GenerationStats | None = None,
                       example_ids: list[int] | None = None) -> Responses:
    """Each prompt's response token ids (prompt excluded; ends with its EOS or stop sequence when
    one was produced), with `.truncated` flags.

    A response has at most min(sampling.max_new_tokens, max_length - len(prompt)) tokens.
    `eos_token_id`: one id or a list (any of them ends a response); ids the model cannot produce
    (e.g. -1) or an empty list disable stopping on EOS. `example_ids[i]`: the index of prompt i in
    the whole dataset (default: i); it keys the sampling noise, so a prompt's response does not
    depend on the other prompts of the call. The model's train/eval mode is restored afterwards.
    """
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    for name, value in (("pad_token_id", pad_token_id), ("max_length", max_length), ("batch_size", batch_size)):
        if not is_int(value):
            raise TypeError(f"{name} must be an int, got {value!r}")
    eos_ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple)) else list(eos_token_id)
    if not all(map(is_int, eos_ids)):
        raise TypeError(f"eos_token_id must be an int or a list of ints, got {eos_token_id!r}")
    if example_ids is None:
        example_ids = list(range(len(prompts)))
    elif len(example_ids) != len(prompts) or not all(is_int(i) and i >= 0 for i in example_ids):
        raise ValueError(f"example_ids must hold one int >= 0 per prompt ({len(prompts)}), got {example_ids!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if vocab_size is not None and not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the model's vocabulary [0, {vocab_size})")
    _validate_prompts(prompts, max_length, vocab_size)
    stats = stats or GenerationStats()
    if len(prompts) == 0:
        return Responses([], [])

    device = next(model.parameters()).device
    chosen, reasons = choose_backend(model, backend, device)
    for reason in reasons:
        warnings.warn(f"generate_responses: backend {backend!r} -> {chosen!r}: {reason}", RuntimeWarning)
    decoder = HFDecoder(model) if chosen == "hf" else StaticKVDecoder(model, use_cuda_graph=chosen == "cuda_graph")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses, truncated = [None] * len(prompts), [None] * len(prompts)
    began = time.perf_counter()
    bar = tqdm(total=len(prompts), unit="prompt", desc="generate", disable=not progress)
    with evaluating(model), torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            indices = order[start:start + batch_size]
            batch = [prompts[i] for i in indices]
            limits = [min(sampling.max_new_tokens, max_length - len(p)) for p in batch]
            outputs, cut = _decode_batch(decoder, batch, [example_ids[i] for i in indices], limits, sampling,
                                         eos_ids, pad_token_id, device, vocab_size)
            for index, output, was_cut in zip(indices, outputs, cut):
                responses[index], truncated[index] = output, was_cut
            stats.new_tokens += sum(len(o) for o in outputs)
            stats.batches += 1
            bar.update(len(indices))
            bar.set_postfix(tok_s=f"{stats.new_tokens / max(time.perf_counter() - began, 1e-9):.0f}")
    if isinstance(decoder, StaticKVDecoder):
        stats.capture_seconds += decoder.capture_seconds
        stats.captures += decoder.captures
        if chosen == "cuda_graph" and not decoder.use_cuda_graph:
            chosen = "static"
            stats.fallback_reasons.append("CUDA graph capture failed")
    stats.backend = chosen
    stats.fallback_reasons.extend(reasons)
    stats.seconds += time.perf_counter() - began
    return Responses(responses, truncated)

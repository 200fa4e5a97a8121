"""Response generation for SPIN: the policy answers every training prompt once per iteration.

Prompts are sorted by length (less padding) and run in left-padded batches. Sampling (greedy,
temperature, top-k, top-p) happens on the device from a `torch.Generator` seeded by the caller, so
the same call gives the same tokens on every run and on every tensor-parallel rank (all ranks see
the same full logits and draw the same numbers); no per-rank global RNG state is touched. The host
looks at the tokens only every `EOS_CHECK_INTERVAL` steps, to stop a batch whose rows all ended.

Backends (`backend=`):
  "cuda_graph"  our static-KV-cache decoder with the decode step replayed as a CUDA graph (fast path)
  "static"      the same decoder run eagerly (CPU, or where graph capture is unwanted)
  "hf"          the model's own forward with its default cache (any causal LM; tensor parallel)
  "auto"        for Llama-family models cuda_graph on CUDA, static elsewhere; hf for other models
                and for tensor-parallel (DTensor) models
A capture failure falls back to the eager decoder with a warning.
"""

from __future__ import annotations

import inspect
import numbers
import time
import warnings
from dataclasses import dataclass, field

import torch
from spin_kernels.dtensor import is_dtensor
from tqdm.auto import tqdm

from spin_trainer.decode_graph import StaticKVDecoder, gather_full_logits, static_decoder_unsupported_reason

BACKENDS = ("auto", "cuda_graph", "static", "hf")
# Stopping a batch early needs the host to read the `finished` flags (a device sync); every 16
# steps costs at most 15 wasted steps at the end of a batch and no sync on the other steps.
EOS_CHECK_INTERVAL = 16


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")


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


def sample_next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B], on the logits' device, without a host sync."""
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
    # Exponential race (argmax p_i / E_i with E_i ~ Exp(1)) draws from `probs` exactly like
    # multinomial; the clamp keeps a zero draw from turning a zero-probability token into 0/0.
    race = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    return (probs / race).argmax(dim=-1)


class HFDecoder:
    """The model's own forward and default (dynamic) cache: works for any causal LM."""

    def __init__(self, model):
        self.model = model
        parameters = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name still works but warns).
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.keeps_last_logits = "logits_to_keep" in parameters

    @torch.no_grad()
    def start(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_steps: int) -> torch.Tensor:
        self.attention_mask = attention_mask
        positions = attention_mask.long().cumsum(-1) - 1
        positions.masked_fill_(attention_mask == 0, 1)
        extra = {"logits_to_keep": 1} if self.keeps_last_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **extra)
        self._keep_cache(out)
        self.next_positions = positions[:, -1:] + 1
        return gather_full_logits(out.logits)[:, -1]

    def _keep_cache(self, out) -> None:
        cache = getattr(out, "cache", None)
        self.cache = cache if cache is not None else getattr(out, "past_key_values", None)
        assert self.cache is not None, "the model returned no cache with use_cache=True"

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones(self.attention_mask.shape[0], 1)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=-1)
        out = self.model(
            input_ids=tokens.view(-1, 1),
            attention_mask=self.attention_mask,
            position_ids=self.next_positions,
            use_cache=True,
            **{self.cache_argument: self.cache},
        )
        self._keep_cache(out)
        self.next_positions = self.next_positions + 1
        return gather_full_logits(out.logits)[:, -1]


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def _is_tensor_parallel(model) -> bool:
    # Data parallelism alone leaves each rank a whole model, which the static decoder can run.
    return any(is_dtensor(p) for p in model.parameters())


def choose_backend(model, backend: str, device: torch.device) -> tuple[str, list[str]]:
    """Resolve `backend` for this model and device; returns it and the reasons for any downgrade."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    reasons = []
    if backend == "hf":
        return "hf", reasons
    unsupported = static_decoder_unsupported_reason(model)
    if unsupported is not None:
        if backend != "auto":
            reasons.append(f"static decoder unavailable: {unsupported}")
        return "hf", reasons
    if backend == "auto":
        if _is_tensor_parallel(model):
            return "hf", reasons
        return ("cuda_graph" if device.type == "cuda" else "static"), reasons
    if backend == "cuda_graph" and device.type != "cuda":
        reasons.append(f"CUDA graphs need a CUDA device, the model is on {device}")
        return "static", reasons
    return backend, reasons


def _validate_prompts(prompts, max_length: int, vocab_size: int | None) -> None:
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            raise TypeError(f"prompts[{index}] must be a list of int token ids")
        if len(prompt) == 0:
            raise ValueError(f"prompts[{index}] is empty; a response needs at least one prompt token")
        if len(prompt) >= max_length:
            raise ValueError(
                f"prompts[{index}] has {len(prompt)} tokens, which leaves no room for a response within "
                f"max_length={max_length}"
            )
        if vocab_size is not None and (min(prompt) < 0 or max(prompt) >= vocab_size):
            raise ValueError(f"prompts[{index}] has token ids outside [0, {vocab_size}) (the model's vocabulary)")


def _left_padded(batch: list, pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, prompt in enumerate(batch):
        input_ids[row, width - len(prompt):] = torch.tensor([int(t) for t in prompt], dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids.to(device), attention_mask.to(device)


def _decode_batch(decoder, batch, limits, sampling, generator, eos_token_id, pad_token_id, device, vocab_size) -> list[list[int]]:
    input_ids, attention_mask = _left_padded(batch, pad_token_id, device)
    max_steps = max(limits)
    logits = decoder.start(input_ids, attention_mask, max_steps)
    if vocab_size is not None and logits.shape[-1] < vocab_size:
        raise ValueError(
            f"model: the LM head returned {logits.shape[-1]} logit columns for a vocabulary of {vocab_size}; "
            "under tensor parallelism it must return a DTensor (use_local_output=False) or replicated logits"
        )
    limit = torch.tensor(limits, device=device)
    finished = torch.zeros(len(batch), dtype=torch.bool, device=device)
    tokens = torch.full((len(batch), max_steps), pad_token_id, dtype=torch.long, device=device)
    steps_run = max_steps
    for step in range(max_steps):
        if step > 0:
            logits = decoder.step(next_tokens)
        next_tokens = sample_next_tokens(logits, sampling, generator)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_token_id), next_tokens)
        tokens[:, step] = next_tokens
        finished |= (next_tokens == eos_token_id) | (limit <= step + 1)
        if (step + 1) % EOS_CHECK_INTERVAL == 0 and step + 1 < max_steps and bool(finished.all()):
            steps_run = step + 1
            break
    rows = tokens[:, :steps_run].tolist()
    responses = []
    for row, row_limit in zip(rows, limits):
        row = row[:row_limit]
        if eos_token_id in row:
            row = row[: row.index(eos_token_id) + 1]
        responses.append(row)
    return responses


def generate_responses(
    model,
    prompts: list[list[int]],
    sampling: SamplingConfig,
    *,
    eos_token_id: int,
    pad_token_id: int,
    max_length: int,
    batch_size: int = 64,
    progress: bool = True,
    backend: str = "auto",
    stats: GenerationStats | None = None,
) -> list[list[int]]:
    """Each prompt's response token ids (prompt excluded; ends with EOS when one was produced).

    A response has at most min(sampling.max_new_tokens, max_length - len(prompt)) tokens. An
    `eos_token_id` the model cannot produce (e.g. -1) disables stopping. The model's train/eval
    mode is restored afterwards.
    """
    if not isinstance(sampling, SamplingConfig):
        raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    for name, value in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id), ("max_length", max_length), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab_size = getattr(embeddings, "num_embeddings", None)
    if vocab_size is not None and not 0 <= pad_token_id < vocab_size:
        raise ValueError(f"pad_token_id={pad_token_id} is outside the model's vocabulary [0, {vocab_size})")
    _validate_prompts(prompts, max_length, vocab_size)
    stats = stats if stats is not None else GenerationStats()
    if len(prompts) == 0:
        return []

    device = _model_device(model)
    chosen, reasons = choose_backend(model, backend, device)
    for reason in reasons:
        warnings.warn(f"generate_responses: backend {backend!r} -> {chosen!r}: {reason}", RuntimeWarning)
    decoder = HFDecoder(model) if chosen == "hf" else StaticKVDecoder(model, use_cuda_graph=chosen == "cuda_graph")
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling.seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[list[int] | None] = [None] * len(prompts)
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), tqdm(total=len(prompts), unit="prompt", desc="generate", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                indices = order[start:start + batch_size]
                batch = [list(prompts[i]) for i in indices]
                limits = [min(sampling.max_new_tokens, max_length - len(p)) for p in batch]
                outputs = _decode_batch(decoder, batch, limits, sampling, generator, eos_token_id, pad_token_id, device, vocab_size)
                for index, output in zip(indices, outputs):
                    responses[index] = output
                stats.new_tokens += sum(len(o) for o in outputs)
                stats.batches += 1
                bar.update(len(indices))
                bar.set_postfix(tok_s=f"{stats.new_tokens / max(time.perf_counter() - began, 1e-9):.0f}")
    finally:
        model.train(was_training)
    if isinstance(decoder, StaticKVDecoder):
        stats.capture_seconds += decoder.capture_seconds
        stats.captures += decoder.captures
        if chosen == "cuda_graph" and not decoder.use_cuda_graph:
            chosen = "static"
            stats.fallback_reasons.append("CUDA graph capture failed")
    stats.backend = chosen
    stats.fallback_reasons.extend(reasons)
    stats.seconds += time.perf_counter() - began
    assert all(r is not None for r in responses)
    return responses

"""The policy model and its tokenizer: the built-in tiny default, or any local HF causal-LM directory.

The default is built locally (no download) and saved in Hugging Face format, so that everything
downstream (loading, tensor parallelism, export) takes the same path as a real model.
"""
import importlib.util
import json
import os
from contextlib import contextmanager

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)

from .errors import UsageError, option
from .parallel.precision import DTYPES

# Dropout rates that models keep as plain attributes instead of nn.Dropout modules (Llama, Mistral,
# Qwen: `attention_dropout`, read in the attention call while training).
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "attn_dropout", "resid_dropout")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Chat template of the tiny tokenizer, so that {"messages"} data works on the default model too.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)


def build_char_tokenizer(alphabet):
    """A character-level PreTrainedTokenizerFast over `alphabet` (plus pad/bos/eos/unk)."""
    symbols = [PAD, BOS, EOS, UNK] + sorted(set(alphabet))
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # BOS first, as Llama tokenizers do: `tokenizer("13+54=")` then prompts the exported model the
    # way training did (the trainer itself encodes with add_special_tokens=False and adds BOS).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS,
                                        eos_token=EOS, unk_token=UNK)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(vocab_size, *, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                     intermediate_size=128, max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
                     eos_token_id=None, seed=0, dtype=torch.float32, device="cpu", **config):
    """A randomly initialised Llama, by default small enough to train in seconds on a CPU: the one
    builder of the default model, the tests and the benchmarks.

    The weights depend only on `seed` (and the device's generator): the global RNG state is left as
    it was. `config` sets any other `LlamaConfig` field (tie_word_embeddings, initializer_range,
    rope_scaling, attention_dropout, ...).
    """
    config = {"tie_word_embeddings": False, "attention_dropout": 0.0, "initializer_range": 0.05, **config}
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
        bos_token_id=bos_token_id, eos_token_id=eos_token_id, **config)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = LlamaForCausalLM(config)
    return model.to(dtype)


def create_default_model(out_dir, *, alphabet="0123456789+=", vocab_multiple=4, seed=0, **model_kwargs):
    """Builds the tiny tokenizer + Llama and saves both to `out_dir` (HF format); returns out_dir.

    The vocabulary is padded to a multiple of `vocab_multiple` so that it shards evenly under
    tensor parallelism (the extra ids are never produced by the tokenizer).
    """
    tokenizer = build_char_tokenizer(alphabet)
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    model = build_tiny_llama(vocab_size, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed, **model_kwargs)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def choose_attention(requested, device, dtype=torch.bfloat16):
    """flash_attention_2 when asked (or "auto") and usable (CUDA, 16-bit weights), else PyTorch SDPA."""
    flash_usable = (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
                    and importlib.util.find_spec("flash_attn") is not None)
    if requested == "auto":
        return "flash_attention_2" if flash_usable else "sdpa"
    if requested == "flash_attention_2" and not flash_usable:
        raise UsageError(f"{option('attn')} flash_attention_2 needs a CUDA device, {option('dtype')} bfloat16 or "
                         f"float16 and the flash_attn package; use {option('attn')} sdpa or auto")
    return requested


def check_model_dir(path):
    """A clear error for a model path that is not a local Hugging Face causal-LM directory."""
    if not os.path.isdir(path):
        raise UsageError(f"{option('model')} {path!r}: no such directory (a local Hugging Face model directory "
                         f"with config.json, weights and tokenizer files is expected)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"{option('model')} {path!r}: config.json not found; is this a Hugging Face model directory?")
    try:
        with open(config_path, encoding="utf-8") as f:
            json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option('model')} {path!r}: config.json is not valid JSON ({exc})") from exc


def check_context_length(max_length, model_config):
    """The context within the positions the model has (every generation is capped by it)."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and max_length > limit:
            raise UsageError(f"{option('max_length')} {max_length} is beyond the model's {name} ({limit}): prompts "
                             f"plus generated responses would not fit; use {option('max_length')} {limit} or less")


def load_tokenizer(path):
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{option('model')} {path!r}: the tokenizer could not be loaded ({exc})") from exc
    if tokenizer.eos_token_id is None:
        raise UsageError(f"{option('model')} {path!r}: the tokenizer has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out everywhere, so any id will do; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def disable_dropout(model):
    """Sets every dropout of `model` to 0, as the SPIN paper's code does for the policy and the
    reference: with dropout, the policy at step 1 (which *is* the reference) scores a pair
    differently from the reference and the loss starts away from ln 2. Returns the model."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name in DROPOUT_ATTRIBUTES:
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


def load_model(path, *, attention="auto", dtype="float32", device=torch.device("cpu"), compute_dtype=None):
    """Loads a causal LM from a local directory with the chosen attention kernel and no dropout.

    `dtype` is what the parameters are stored in; `compute_dtype` (default: the same) what the
    forward computes in, which decides whether flash-attention can run.
    """
    check_model_dir(path)
    attn_implementation = choose_attention(attention, device, DTYPES[compute_dtype or dtype])
    try:
        config = AutoConfig.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{option('model')} {path!r}: could not load a causal LM ({exc})") from exc
    assert model.config.model_type == config.model_type
    return disable_dropout(model).to(device)


@contextmanager
def evaluating(model):
    """Inside, `model` is in eval mode; on the way out (also on an exception) its mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

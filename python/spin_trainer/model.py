"""The policy model and its tokenizer: the built-in tiny default (built locally and saved in Hugging
Face format, so that it takes a real model's path), any local HF causal-LM directory, or a Hub id.

A model directory is checked before anything runs from it: config.json a mapping with positive
sizes, a causal-LM architecture, every weight of that architecture in the weight files and none
besides. The Python code a directory may ship (`auto_map`) runs only with --trust-remote-code.
"""
import importlib.util
import json
import os
import re
from contextlib import contextmanager

import torch
from safetensors import SafetensorError
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .errors import UsageError, option
from .parallel.precision import DTYPES

# Dropout rates that models keep as plain attributes instead of nn.Dropout modules (Llama, Mistral,
# Qwen: `attention_dropout`, read in the attention call while training).
DROPOUT_ATTRIBUTES = ("attention_dropout", "dropout", "attn_dropout", "resid_dropout")

# config.json sizes that must be positive integers where present (transformers builds tensors of
# negative size, or loops over them, otherwise); more layers than any real model has would make the
# --plan's meta-device build run for minutes.
POSITIVE_SIZES = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                  "intermediate_size", "max_position_embeddings", "n_embd", "n_layer", "n_head", "n_positions")
MAX_LAYERS = 1000
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# What a Hub download fetches: configs, safetensors weights, tokenizer files (no pickled .bin
# weights; Python files only for --trust-remote-code).
HUB_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, SafetensorError)

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
# Chat template of the tiny tokenizer, so that {"messages"} data works on the default model too.
TINY_CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] }}"
                      "{{ eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False,
                  attention_dropout=0.0, initializer_range=0.05, pad_token_id=None, bos_token_id=None,
                  eos_token_id=None)


def build_char_tokenizer(alphabet):
    """A character-level PreTrainedTokenizerFast over `alphabet` (plus pad/bos/eos/unk)."""
    vocab = {symbol: i for i, symbol in enumerate([PAD, BOS, EOS, UNK] + sorted(set(alphabet)))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    # BOS first, as Llama tokenizers do: `tokenizer("13+54=")` then prompts the exported model the
    # way training did (the trainer itself encodes with add_special_tokens=False and adds BOS).
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, chat_template=TINY_CHAT_TEMPLATE)


def build_tiny_llama(vocab_size, *, num_layers=2, num_heads=4, num_kv_heads=2, seed=0, dtype=torch.float32,
                     device="cpu", **config):
    """A randomly initialised Llama, by default small enough to train in seconds on a CPU. The weights
    depend only on `seed` (and the device's generator); the global RNG state is left as it was.
    `config` sets any other `LlamaConfig` field (TINY_LLAMA: the defaults)."""
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, **{**TINY_LLAMA, **config})
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        with device:
            model = LlamaForCausalLM(config)
    return model.to(dtype)


def create_default_model(out_dir, *, alphabet="0123456789+=", vocab_multiple=4, seed=0, **model_kwargs):
    """Builds the tiny tokenizer + Llama and saves both to `out_dir` (HF format); returns out_dir.
    The vocabulary is padded to a multiple of `vocab_multiple` to shard evenly under tensor parallelism."""
    tokenizer = build_char_tokenizer(alphabet)
    vocab_size = -(-len(tokenizer) // vocab_multiple) * vocab_multiple
    model = build_tiny_llama(vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, seed=seed, **model_kwargs)
    model.save_pretrained(out_dir)   # (which makes the directory)
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


def local_model_dir(name, *, trust_remote_code=False):
    """The local directory of --model: `name` itself, or a Hub id's files from the Hugging Face
    cache (downloaded if missing)."""
    path = name
    if not os.path.exists(name) and HUB_ID.fullmatch(name):
        from huggingface_hub import snapshot_download

        try:
            path = snapshot_download(name, allow_patterns=list(HUB_PATTERNS) + (["*.py"] if trust_remote_code else []))
        except Exception as exc:  # offline, unknown repository, gated, network: all mean the same to the user
            first_line = (str(exc).strip().splitlines() or [""])[0]
            raise UsageError(f"{option('model')} {name!r}: no such local directory, and the Hugging Face Hub could "
                             f"not provide it ({type(exc).__name__}: {first_line}); pass a local model directory, or "
                             f"check the name, the network and HF_HUB_OFFLINE / HF_TOKEN") from exc
    check_model_dir(path)
    return path


def check_model_dir(path):
    """UsageError unless `path` is a local Hugging Face model directory with a usable config.json;
    returns its content."""
    if not os.path.isdir(path):
        raise UsageError(f"{option('model')} {path!r}: no such directory (a local Hugging Face model directory "
                         f"with config.json, weights and tokenizer files, or a Hub id, is expected)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"{option('model')} {path!r}: config.json not found; is this a Hugging Face model directory?")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{option('model')} {path!r}: config.json is not valid JSON ({exc})") from exc
    check_config_values(config, f"{option('model')} {path!r}: config.json")
    return config


def check_config_values(config, where):
    """config.json's content: a mapping, its sizes positive integers, its layers within MAX_LAYERS."""
    if not isinstance(config, dict):
        raise UsageError(f"{where} holds {type(config).__name__}, not a mapping of settings")
    for name in POSITIVE_SIZES:
        value = config.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}")
    for name in ("num_hidden_layers", "n_layer"):
        if (config.get(name) or 0) > MAX_LAYERS:
            raise UsageError(f"{where}: {name} {config[name]} is more layers than any model this trainer is for "
                             f"(at most {MAX_LAYERS})")


def check_shipped_code(config, where, trust_remote_code):
    """transformers would run the model's own Python code for a model type it does not know."""
    if config.get("auto_map") and config.get("model_type") not in CONFIG_MAPPING_NAMES and not trust_remote_code:
        raise UsageError(f"{where}: model type {config.get('model_type')!r} exists only in Python code shipped with "
                         f"the model (config.json's auto_map: {config['auto_map']}); it runs only with "
                         f"{option('trust_remote_code')}, once you have read it")


def read_model_config(path, *, trust_remote_code=False):
    """transformers' config of the model directory `path` (checked by check_model_dir), of a causal LM."""
    check_shipped_code(check_model_dir(path), f"{option('model')} {path!r}", trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise UsageError(f"{option('model')} {path!r}: config.json could not be read ({exc})") from exc
    remote = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        raise UsageError(f"{option('model')} {path!r}: model type {config.model_type!r} is not a causal language "
                         f"model (transformers' AutoModelForCausalLM has no class for it)")
    return config


def check_context_length(max_length, model_config):
    """The context within the positions the model has (every generation is capped by it)."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and max_length > limit:
            raise UsageError(f"{option('max_length')} {max_length} is beyond the model's {name} ({limit}): prompts "
                             f"plus generated responses would not fit; use {option('max_length')} {limit} or less")


def load_tokenizer(path, *, trust_remote_code=False):
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
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


def load_failure(path, exc):
    """The UsageError for a causal LM that transformers could not build or load from `path`."""
    return UsageError(f"{option('model')} {path!r}: could not load a causal LM ({type(exc).__name__}: {exc})")


def check_weight_names(path, model, *, missing, unexpected, mismatched):
    """UsageError for weights of `model` missing from the files, in the files but not in `model`, or of
    another shape (transformers would train a randomly initialised model and only warn)."""
    kind = type(model).__name__
    for names, what in ((missing, f"weight(s) of {kind} are not in the weight files"),
                        (unexpected, f"weight(s) in the weight files are not part of {kind}"),
                        (mismatched, "weight(s) have another shape in the weight files than config.json gives")):
        names = sorted(str(n) for n in names or ())
        if names:
            raise UsageError(f"{option('model')} {path!r}: {len(names)} {what} (e.g. {names[:3]}); do config.json "
                             f"(model type {model.config.model_type!r}) and the weights belong to the same model?")


def load_model(path, *, attention="auto", dtype="float32", device=torch.device("cpu"), compute_dtype=None,
               trust_remote_code=False):
    """Loads a causal LM from a local directory with the chosen attention kernel and no dropout.
    `dtype`: what the parameters are stored in; `compute_dtype` (default: the same): what the forward
    computes in, which decides whether flash-attention can run."""
    read_model_config(path, trust_remote_code=trust_remote_code)   # the directory's checks
    attn_implementation = choose_attention(attention, device, DTYPES[compute_dtype or dtype])
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            output_loading_info=True)
    except LOAD_ERRORS as exc:
        raise load_failure(path, exc) from exc
    check_weight_names(path, model, missing=info.get("missing_keys"), unexpected=info.get("unexpected_keys"),
                       mismatched=info.get("mismatched_keys"))
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

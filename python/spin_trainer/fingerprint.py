"""Fingerprints of a run's inputs, kept in every checkpoint, so that --resume refuses other inputs.

    --model      config.json, generation_config.json (its EOS ids end the responses) and the
                 weight files of the model directory
    tokenizer    what the tokenizer maps: its vocabulary, special tokens and chat template
    --train-data, --val-data, --test-data
                 the data (a file; a directory: each of its files; a Hub dataset: its name)

A file of at most FULL_HASH_BYTES is hashed whole (SHA-256). A larger one is fingerprinted by its
size and a hash of SAMPLES evenly spaced blocks of SAMPLE_BYTES (4 MiB read per file, whatever its
size): another model or data set of the same size differs in the sampled blocks unless the change
is local. Only content counts, not paths or modification times, so a copy of the same files on
another machine resumes.
"""
import hashlib
import json
import os

from .errors import UsageError, option
from .manifest import files_under, sha256_of

FULL_HASH_BYTES = 64 << 20
SAMPLES = 64
SAMPLE_BYTES = 64 << 10
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
MODEL_CONFIGS = ("config.json", "generation_config.json")
DATA_OPTIONS = ("train_data", "val_data", "test_data")


def file_fingerprint(path):
    size = os.path.getsize(path)
    if size <= FULL_HASH_BYTES:
        return f"sha256 {sha256_of(path)}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for i in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * i // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return f"{size} bytes, sampled sha256 {digest.hexdigest()}"


def model_fingerprint(directory):
    """{file name: fingerprint} of the configs and the weight files of a HF model directory."""
    return {n: file_fingerprint(os.path.join(directory, n)) for n in sorted(os.listdir(directory))
            if (n in MODEL_CONFIGS or n.endswith(WEIGHT_SUFFIXES)) and os.path.isfile(os.path.join(directory, n))}


def tokenizer_fingerprint(tokenizer):
    mapping = {"vocab": sorted(tokenizer.get_vocab().items()), "special": tokenizer.special_tokens_map,
               "chat_template": getattr(tokenizer, "chat_template", None),
               "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]}
    return "sha256 " + hashlib.sha256(json.dumps(mapping, sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(spec):
    """A data file's fingerprint, a directory's per file, a Hub dataset's name; None for no data."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        return file_fingerprint(spec)
    if os.path.isdir(spec):
        return {name: file_fingerprint(os.path.join(spec, name)) for name in files_under(spec)}
    return f"hub dataset {spec}"


def run_fingerprints(model_dir, tokenizer, data_paths):
    """`data_paths`: {"train_data": path, "val_data": path or None, "test_data": path or None}."""
    return {"model": model_fingerprint(model_dir), "tokenizer": tokenizer_fingerprint(tokenizer),
            **{name: data_fingerprint(data_paths[name]) for name in DATA_OPTIONS}}


def check_fingerprints(saved, current, checkpoint_path, *, model_dir, data_paths):
    """UsageError naming the option whose input differs from the one the checkpoint was written with."""
    written = f"{option('resume')}: {checkpoint_path} was written"
    again = f"resume with the inputs it was written with, or use another {option('out')}"
    if saved.get("model") != current["model"]:
        before, now = saved.get("model") or {}, current["model"]
        changed = sorted(n for n in set(before) | set(now) if before.get(n) != now.get(n))
        raise UsageError(f"{written} from another {option('model')}: in {model_dir!r}, {', '.join(changed)} "
                         f"differ(s) from the model it was written from; {again}")
    if saved.get("tokenizer") != current["tokenizer"]:
        raise UsageError(f"{written} with another tokenizer (the vocabulary, special tokens or chat template of "
                         f"{option('model')} {model_dir!r} changed); {again}")
    for name in DATA_OPTIONS:
        if saved.get(name) != current[name]:
            raise UsageError(f"{written} with another {option(name)}: {data_paths[name]!r} has {current[name]}, "
                             f"the run's data had {saved.get(name)}; {again}")

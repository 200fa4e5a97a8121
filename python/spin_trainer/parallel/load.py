"""Loads the policy straight into the run's parallel layout, so that no rank ever holds the whole
model (torchtitan's recipe): built on the meta device from config.json, its weights checked against
the files, then parallelized; to_empty allocates the local shards alone, which
torch.distributed.checkpoint's HuggingFaceStorageReader fills from their slices of the safetensors
files (host memory: one slice at a time); transformers' initialize_weights sets the buffers the
files lack (RoPE's inv_freq), as from_pretrained does.

A directory without safetensors files (pickled .bin weights) loads the whole model, then parallelizes it.
"""
import json
import os
from contextlib import suppress
from itertools import chain

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader, load
from transformers import AutoModelForCausalLM, GenerationConfig

from ..checkpoint import dcp
from ..errors import UsageError, option
from ..model import (LOAD_ERRORS, check_weight_names, choose_attention, disable_dropout, load_failure,
                     load_model, read_model_config)
from .apply import parallelize_model, sharded
from .precision import DTYPES


def load_parallel_model(path, ctx, precision, *, attention="auto", compute_dtype=None, recompute="none",
                        trust_remote_code=False):
    """The causal LM of the model directory `path`, parallelized as ctx says, its parameters in
    precision's parameter dtype, no dropout, in eval mode (as model.load_model + parallelize_model)."""
    config = read_model_config(path, trust_remote_code=trust_remote_code)
    locations = weight_locations(path)
    if locations is None:
        model = load_model(path, attention=attention, dtype=precision.param_dtype_name, compute_dtype=compute_dtype,
                           device=ctx.device, trust_remote_code=trust_remote_code)
        return parallelize_model(model, ctx, precision, recompute=recompute)
    attn_implementation = choose_attention(attention, ctx.device, DTYPES[compute_dtype or precision.param_dtype_name])
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                                     dtype=precision.param_dtype, trust_remote_code=trust_remote_code)
    except LOAD_ERRORS as exc:
        raise load_failure(path, exc) from exc
    file_keys = match_weights(model, locations, path)
    disable_dropout(model)
    parallelize_model(model, ctx, precision, recompute=recompute)
    model.to_empty(device=ctx.device)
    model.tie_weights()   # to_empty gave each name of a tied weight a tensor of its own (without FSDP)
    with torch.no_grad(), sharded(model):
        loaded = {name: t for name, t in chain(model.named_parameters(), model.named_buffers()) if name in file_keys}
        dcp(load, {file_keys[name]: t for name, t in loaded.items()}, ctx,
            storage_reader=HuggingFaceStorageReader(path))
        for tensor in loaded.values():
            tensor._is_hf_initialized = True   # initialize_weights leaves it alone
        initialize_buffers(model, file_keys)
    with suppress(OSError):   # as from_pretrained: the directory's generation defaults, where it has readable ones
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def weight_locations(path):
    """{weight name: (file, shape)} over the directory's safetensors files; None when it has none."""
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted({os.path.join(path, name) for name in json.load(f)["weight_map"].values()})
        elif os.path.isfile(single):
            files = [single]
        else:
            return None
        locations = {}
        for file in files:
            with safe_open(file, framework="pt") as f:
                locations.update((key, (file, tuple(f.get_slice(key).get_shape()))) for key in f.keys())
    except LOAD_ERRORS as exc:
        raise load_failure(path, exc) from exc
    return locations


def match_weights(model, locations, path):
    """{tensor name: weight name in the files} for the parameters and persistent buffers of the
    (meta) `model`; a tied parameter is found under any of its names. UsageError, as load_model
    gives it, for weights missing, unexpected or of another shape."""
    file_keys, missing, mismatched = {}, [], []
    for tensor, names in aliases(model.state_dict(keep_vars=True).items()):
        found = [name for name in names if name in locations]
        if not found:
            missing.append(names[0])
        elif locations[found[0]][1] != tuple(tensor.shape):
            mismatched.append(found[0])
        file_keys.update((name, found[0]) for name in names if found)
    buffers = dict(model.named_buffers())   # the files' copy of a non-persistent buffer is not used
    unexpected = [key for key in locations if key not in file_keys and key not in buffers]
    check_weight_names(path, model, missing=missing, unexpected=unexpected, mismatched=mismatched)
    return file_keys


def aliases(named_tensors):
    """[(tensor, [its names])], each tensor once: a tied one has several names."""
    names = {}
    for name, tensor in named_tensors:
        names.setdefault(id(tensor), (tensor, []))[1].append(name)
    return list(names.values())


def initialize_buffers(model, file_keys):
    """transformers' initialize_weights on the model whose loaded tensors are marked: it sets the
    buffers no file holds (RoPE's inv_freq). A floating buffer it left unset is an error, not noise."""
    unset = [(name, b) for name, b in model.named_buffers() if name not in file_keys and b.is_floating_point()]
    for _, buffer in unset:
        buffer.fill_(float("nan"))
    model.initialize_weights()
    left = [name for name, buffer in unset if buffer.isnan().any()]
    if left:
        raise UsageError(f"{option('model')}: {type(model).__name__} does not initialise its buffer(s) {left} "
                         f"(not in the weight files either)")

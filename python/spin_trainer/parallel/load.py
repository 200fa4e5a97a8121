"""Loads the policy straight into the run's parallel layout, so that no rank ever holds the whole
model (torchtitan's recipe): built on the meta device from config.json, its weights checked against
the files, then parallelized; to_empty allocates the local shards alone, each filled from its slice
of the safetensors files (host memory: one slice at a time); transformers' initialize_weights sets
the buffers the files lack (RoPE's inv_freq), as from_pretrained does.

A directory without safetensors files (pickled .bin weights) loads the whole model, then parallelizes it.
"""
import json
import os
from contextlib import ExitStack, suppress

import torch
from safetensors import safe_open
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from transformers import AutoModelForCausalLM, GenerationConfig

from spin_kernels.dtensor import is_dtensor, local_tensor

from ..errors import UsageError, option
from ..model import (LOAD_ERRORS, check_model_dir, check_weight_names, choose_attention, disable_dropout, load_failure,
                     load_model, read_model_config)
from .apply import parallelize_model, sharded
from .precision import DTYPES

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS = "model.safetensors"


def load_parallel_model(path, ctx, precision, *, attention="auto", compute_dtype=None, recompute="none",
                        trust_remote_code=False):
    """The causal LM of the model directory `path`, parallelized as ctx says, its parameters in
    precision's parameter dtype, no dropout, in eval mode (as model.load_model + parallelize_model)."""
    check_model_dir(path)
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
    tied = tied_names(model)
    model.to_empty(device=ctx.device)
    retie(model, tied)
    with torch.no_grad(), sharded(model):
        read_local_shards(model, file_keys, locations)
        initialize_buffers(model, file_keys)
    with suppress(OSError):   # as from_pretrained: the directory's generation defaults, where it has readable ones
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def weight_locations(path):
    """{weight name: (file, shape)} over the directory's safetensors files; None when it has none."""
    index = os.path.join(path, SAFETENSORS_INDEX)
    try:
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif os.path.isfile(os.path.join(path, SAFETENSORS)):
            files = [SAFETENSORS]
        else:
            return None
        locations = {}
        for name in files:
            file = os.path.join(path, name)
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    locations[key] = (file, tuple(f.get_slice(key).get_shape()))
    except LOAD_ERRORS as exc:
        raise load_failure(path, exc) from exc
    return locations


def match_weights(model, locations, path):
    """{tensor name: weight name in the files} for the parameters and persistent buffers of the
    (meta) `model`; a tied parameter is found under any of its names. UsageError, as load_model
    gives it, for weights missing, unexpected or of another shape."""
    persistent = set(model.state_dict())
    named = list(model.named_parameters(remove_duplicate=False)) + [
        (name, buffer) for name, buffer in model.named_buffers(remove_duplicate=False) if name in persistent]
    file_keys, missing, mismatched = {}, [], []
    for tensor, names in aliases(named):
        found = [name for name in names if name in locations]
        if not found:
            missing.append(names[0])
        elif locations[found[0]][1] != tuple(tensor.shape):
            mismatched.append(found[0])
        file_keys.update((name, found[0]) for name in names if found)
    ignored = [name for name, buffer in model.named_buffers() if name not in persistent]
    unexpected = [key for key in locations if key not in file_keys and key not in ignored]
    check_weight_names(path, model, missing=missing, unexpected=unexpected, mismatched=mismatched)
    return file_keys


def aliases(named_tensors):
    """[(tensor, [its names])], each tensor once: a tied one has several names."""
    names = {}
    for name, tensor in named_tensors:
        names.setdefault(id(tensor), (tensor, []))[1].append(name)
    return list(names.values())


def tied_names(model):
    """The names of each parameter that is shared under more than one (tied embeddings)."""
    return [names for _, names in aliases(model.named_parameters(remove_duplicate=False)) if len(names) > 1]


def retie(model, tied):
    """Shares each tied parameter again: a module's to_empty (no FSDP) gives each name a tensor of its own."""
    for first, *others in tied:
        parameter = model.get_parameter(first)
        for name in others:
            module_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, parameter)


def local_region(tensor):
    """(offset, shape) of the rank's local shard of `tensor` within the full tensor."""
    if not is_dtensor(tensor):
        return (0,) * tensor.dim(), tuple(tensor.shape)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(offset), tuple(shape)


def read_local_shards(model, file_keys, locations):
    """Copies each parameter's and persistent buffer's local shard from its slice of the files."""
    tensors = [(name, t) for name, t in list(model.named_parameters()) + list(model.named_buffers())
               if name in file_keys]
    with ExitStack() as files:
        opened = {}
        for name, tensor in tensors:
            key = file_keys[name]
            file = locations[key][0]
            if file not in opened:
                opened[file] = files.enter_context(safe_open(file, framework="pt"))
            offset, shape = local_region(tensor)
            local = local_tensor(tensor)
            assert tuple(local.shape) == shape, (name, tuple(local.shape), shape)
            weight = opened[file].get_slice(key)
            local.copy_(weight[tuple(slice(o, o + s) for o, s in zip(offset, shape))] if shape else
                        opened[file].get_tensor(key))
            tensor._is_hf_initialized = True   # initialize_weights leaves it alone


def initialize_buffers(model, file_keys):
    """transformers' initialize_weights on the model whose loaded tensors are marked: it sets the
    buffers no file holds (RoPE's inv_freq). A floating buffer it left unset is an error, not noise."""
    unset = [(name, buffer) for name, buffer in model.named_buffers() if name not in file_keys]
    for _, buffer in unset:
        if buffer.is_floating_point():
            buffer.fill_(float("nan"))
    model.initialize_weights()
    left = [name for name, buffer in unset if buffer.is_floating_point() and buffer.isnan().any()]
    if left:
        raise UsageError(f"{option('model')}: {type(model).__name__} does not initialise its buffer(s) {left} "
                         f"(not in the weight files either)")

"""The model in Hugging Face format, consolidated on one rank, tensor by tensor.

Every rank writes its shards of the model's state dict as safetensors (PyTorch's
`HuggingFaceStorageWriter` through DCP); rank 0 then consolidates them into full tensors, copying
tensor by tensor, so no rank gathers the whole model in memory. Files hold at most `MAX_FILE_BYTES`
(HF's `model-0000i-of-0000n` layout with `model.safetensors.index.json`), beside config.json (with
the export dtype), the generation config and the tokenizer. The directory is built under a
temporary name and renamed into place.

Memory: a dtype conversion (e.g. fp32 master weights exported as bfloat16) makes one converted
copy of this rank's local shards on their device.
"""
import copy
import json
import os
import shutil

import torch
from torch.distributed.checkpoint import HuggingFaceStorageWriter, save
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from spin_kernels.dtensor import is_dtensor

from .checkpoint import dcp, fresh_directory, replace_directory
from .config import DTYPES
from .errors import UsageError, option
from .manifest import files_under, fsync_path

MAX_FILE_BYTES = 5 * 1024 ** 3   # HF's usual shard size


def resolve_export_dtype(requested, source_config, name="export_dtype"):
    """torch dtype of `--export-dtype` (or the setting `name`); "auto" is the input model's
    `config.torch_dtype` (float32 if unset)."""
    if requested != "auto":
        return getattr(torch, requested)
    dtype = getattr(source_config, "dtype", None) or getattr(source_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise UsageError(f"{option(name)} auto: the input model's config.torch_dtype is {dtype}; "
                         f"choose {option(name)} from {DTYPES}")
    return dtype


def file_index(state_dict, dtype, max_bytes=MAX_FILE_BYTES):
    """{name: output file number (1-based)}: tensors in order, a new file once one would pass `max_bytes`."""
    mapping, index, used = {}, 1, 0
    for name, tensor in state_dict.items():
        size = tensor.numel() * dtype.itemsize
        if used and used + size > max_bytes:
            index, used = index + 1, 0
        mapping[name] = index
        used += size
    return mapping


def without_tied_aliases(model, state):
    """`state` without the names that alias a parameter listed earlier (tied embeddings: lm_head.weight
    is model.embed_tokens.weight). safetensors refuses two names on one storage, and transformers
    writes the tied weight once, then re-ties it on load from config.tie_word_embeddings."""
    canonical = {name for name, _ in model.named_parameters()}   # one name per parameter object
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - canonical
    return {name: tensor for name, tensor in state.items() if name not in aliases}


def full_state_dict(model):
    """CPU state dict with every DTensor gathered to its full tensor, on every rank (a collective):
    for comparing and copying small models, not for export."""
    return {name: (tensor.full_tensor() if is_dtensor(tensor) else tensor).detach().to("cpu", copy=True)
            for name, tensor in model.state_dict().items()}


def staging_directory(out_dir, ctx):
    """An empty `.tmp-export-NAME` beside `out_dir`, where an export is built (all ranks call it)."""
    out_dir = os.path.abspath(out_dir)
    return fresh_directory(os.path.join(os.path.dirname(out_dir), f".tmp-export-{os.path.basename(out_dir)}"), ctx)


def single_file(directory):
    """One output file is named model.safetensors, without an index, as transformers writes it."""
    index = os.path.join(directory, "model.safetensors.index.json")
    with open(index, encoding="utf-8") as f:
        files = set(json.load(f)["weight_map"].values())
    if len(files) == 1:
        os.replace(os.path.join(directory, files.pop()), os.path.join(directory, "model.safetensors"))
        os.remove(index)


def export_hf(model, tokenizer, out_dir, ctx, *, dtype=torch.float32, max_file_bytes=MAX_FILE_BYTES):
    """Saves the full model in `dtype` + tokenizer to `out_dir` in HF format (all ranks call it)."""
    tmp = staging_directory(out_dir, ctx)
    state = {name: tensor.detach().to(dtype)
             for name, tensor in without_tied_aliases(model, get_model_state_dict(model)).items()}
    writer = HuggingFaceStorageWriter(tmp, fqn_to_index_mapping=file_index(state, dtype, max_file_bytes),
                                      save_distributed=True, enable_consolidation=True)
    dcp(save, state, ctx, storage_writer=writer)
    del state
    if ctx.is_main:
        shutil.rmtree(writer.path)   # the per-rank shards, now consolidated
        single_file(tmp)
        config = copy.deepcopy(model.config)   # the live model keeps its compute dtype
        config.dtype = dtype
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in files_under(tmp):
            fsync_path(os.path.join(tmp, name))
        replace_directory(tmp, out_dir)
    ctx.barrier()
    return out_dir


def link_export(source, out_dir, ctx):
    """`out_dir` as the export `source` again, its files hard links (no second copy of the weights on
    disk; copies where the filesystem has no links); appears atomically, as export_hf's (all ranks call it)."""
    tmp = staging_directory(out_dir, ctx)
    if ctx.is_main:
        for name in os.listdir(source):
            try:
                os.link(os.path.join(source, name), os.path.join(tmp, name))
            except OSError:
                shutil.copy2(os.path.join(source, name), os.path.join(tmp, name))
        replace_directory(tmp, out_dir)
    ctx.barrier()
    return out_dir

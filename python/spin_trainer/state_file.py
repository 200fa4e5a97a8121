"""The loop state of a checkpoint in files that cannot run code when they are read: `loop.json`
(the structure, numbers and strings) and `loop.safetensors` (its tensors).

A pickle (torch.load(weights_only=False)) runs whatever a crafted file holds on --resume, and the
manifest's SHA-256 is no protection: anyone can recompute it. JSON holds only dicts, lists,
strings and numbers, so the few other types of the state are tagged: {"__tensor__": name},
{"__tuple__": [...]}, {"__example__": [prompt ids, response ids]}. Reading builds nothing else.

Token ids go to the tensors file, not the JSON: a list of Examples (the iteration's pairs) as
{"__examples__": [lengths, ids]} and a list of token-id lists (the generations) as
{"__token_lists__": [lengths, ids]}, each two tensor names. UltraChat's 208k pairs are about 250M
ids per list; as JSON numbers a checkpoint took minutes to write and read and 3 GB of disk.
"""
import json
import os
from itertools import chain

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .data import Example, examples_from_buffers, token_buffers
from .manifest import fsync_path

STRUCTURE_FILE = "loop.json"
TENSORS_FILE = "loop.safetensors"
TAGS = ("__tensor__", "__tuple__", "__example__", "__examples__", "__token_lists__")


def _tensor(value, tensors):
    name = f"t{len(tensors)}"
    tensors[name] = value.detach().cpu().contiguous()
    return name


def _token_buffers(value):
    """(tag, lengths, flat int32 ids) of a non-empty list of Examples or of token-id lists, else None."""
    if value and all(isinstance(v, Example) for v in value):
        return "__examples__", *token_buffers(value)
    if not value or not all(type(v) is list for v in value):
        return None
    flat = np.array(list(chain.from_iterable(value)))
    if flat.size and (flat.dtype != np.int64 or flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
        return None
    return "__token_lists__", np.array([len(v) for v in value], dtype=np.int64), flat.astype(np.int32)


def _encode(value, tensors):
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _tensor(value, tensors)}
    if isinstance(value, list) and (buffers := _token_buffers(value)) is not None:
        tag, lengths, ids = buffers
        return {tag: [_tensor(torch.from_numpy(lengths), tensors), _tensor(torch.from_numpy(ids.copy()), tensors)]}
    if isinstance(value, Example):
        return {"__example__": [list(value.prompt_ids), list(value.response_ids)]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in value]}
    if isinstance(value, list):
        return [_encode(v, tensors) for v in value]
    if isinstance(value, dict):
        assert all(isinstance(k, str) and k not in TAGS for k in value), f"keys must be plain strings: {list(value)}"
        return {k: _encode(v, tensors) for k, v in value.items()}
    assert value is None or isinstance(value, (bool, int, float, str)), f"cannot store {type(value).__name__}"
    return value


def _decode(value, tensors):
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag = next(iter(value)) if len(value) == 1 else None
    if tag == "__tensor__":
        return tensors[value[tag]]
    if tag == "__tuple__":
        return tuple(_decode(v, tensors) for v in value[tag])
    if tag == "__example__":
        return Example(*value[tag])
    if tag in ("__examples__", "__token_lists__"):
        lengths, ids = (tensors[name] for name in value[tag])
        if tag == "__examples__":
            return examples_from_buffers(lengths.numpy(), ids.numpy())
        flat = ids.tolist()
        return [flat[end - n:end] for n, end in zip(lengths.tolist(), lengths.cumsum(0).tolist())]
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_state(state, directory):
    """Writes `state` (dicts, lists, tuples, numbers, strings, tensors, Examples) to `directory`, fsynced."""
    tensors = {}
    with open(os.path.join(directory, STRUCTURE_FILE), "w", encoding="utf-8") as f:
        json.dump(_encode(state, tensors), f)
    save_file(tensors, os.path.join(directory, TENSORS_FILE))
    for name in (STRUCTURE_FILE, TENSORS_FILE):
        fsync_path(os.path.join(directory, name))


def read_state(directory):
    """The state `write_state` wrote; an unreadable file raises (ValueError, OSError, ...)."""
    with open(os.path.join(directory, STRUCTURE_FILE), encoding="utf-8") as f:
        structure = json.load(f)
    return _decode(structure, load_file(os.path.join(directory, TENSORS_FILE)))

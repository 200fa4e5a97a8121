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

STRUCTURE_FILE = "loop.json"
TENSORS_FILE = "loop.safetensors"
TAGS = ("__tensor__", "__tuple__", "__example__", "__examples__", "__token_lists__")


def _tensor(value, tensors):
    name = f"t{len(tensors)}"
    tensors[name] = value.detach().cpu().contiguous()
    return name


def _flat_token_ids(lists):
    """The int32 ids of `lists` (lists of ints) flat, or None if any item is not an int id."""
    flat = np.array(list(chain.from_iterable(lists)))
    if flat.size and (flat.dtype != np.int64 or flat.min() < 0 or flat.max() > np.iinfo(np.int32).max):
        return None
    return flat.astype(np.int32)


def _encode_sequences(value, tensors):
    """The tagged form of a list of Examples or of token-id lists, or None for any other list."""
    if value and all(isinstance(v, Example) for v in value):
        lengths, ids = token_buffers(value)
        tag = "__examples__"
    elif value and all(type(v) is list for v in value) and (ids := _flat_token_ids(value)) is not None:
        lengths = np.array([len(v) for v in value], dtype=np.int64)
        tag = "__token_lists__"
    else:
        return None
    return {tag: [_tensor(torch.from_numpy(lengths), tensors), _tensor(torch.from_numpy(ids.copy()), tensors)]}


def _decode_sequences(tag, lengths, ids):
    if tag == "__examples__":
        return examples_from_buffers(lengths.numpy(), ids.numpy())
    ends = lengths.cumsum(0).tolist()
    flat = ids.tolist()
    return [flat[end - n:end] for n, end in zip(lengths.tolist(), ends)]


def _encode(value, tensors):
    if isinstance(value, torch.Tensor):
        return {"__tensor__": _tensor(value, tensors)}
    if isinstance(value, list) and (packed := _encode_sequences(value, tensors)) is not None:
        return packed
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
    if set(value) == {"__tensor__"}:
        return tensors[value["__tensor__"]]
    if set(value) == {"__tuple__"}:
        return tuple(_decode(v, tensors) for v in value["__tuple__"])
    if set(value) == {"__example__"}:
        return Example(*value["__example__"])
    if len(value) == 1 and next(iter(value)) in ("__examples__", "__token_lists__"):
        (tag, (lengths, ids)), = value.items()
        return _decode_sequences(tag, tensors[lengths], tensors[ids])
    return {k: _decode(v, tensors) for k, v in value.items()}


def write_state(state, directory):
    """Writes `state` (dicts, lists, tuples, numbers, strings, tensors, Examples) to `directory`;
    returns the paths written (to be fsynced by the caller)."""
    tensors = {}
    structure = _encode(state, tensors)
    paths = os.path.join(directory, STRUCTURE_FILE), os.path.join(directory, TENSORS_FILE)
    with open(paths[0], "w", encoding="utf-8") as f:
        json.dump(structure, f)
    save_file(tensors, paths[1])
    return paths


def read_state(directory):
    """The state `write_state` wrote; an unreadable file raises (ValueError, OSError, ...)."""
    with open(os.path.join(directory, STRUCTURE_FILE), encoding="utf-8") as f:
        structure = json.load(f)
    return _decode(structure, load_file(os.path.join(directory, TENSORS_FILE)))

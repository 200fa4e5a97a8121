"""The loop state of a checkpoint in files that cannot run code when they are read: `loop.json`
(the structure, numbers and strings) and `loop.safetensors` (its tensors).

A pickle (torch.load(weights_only=False)) runs whatever a crafted file holds on --resume, and the
manifest's SHA-256 is no protection: anyone can recompute it. JSON holds only dicts, lists,
strings and numbers, so the few other types of the state are tagged: {"__tensor__": name},
{"__tuple__": [...]}, {"__example__": [prompt ids, response ids]}. Reading builds nothing else.
"""
import json
import os

import torch
from safetensors.torch import load_file, save_file

from .data import Example

STRUCTURE_FILE = "loop.json"
TENSORS_FILE = "loop.safetensors"
TAGS = ("__tensor__", "__tuple__", "__example__")


def _encode(value, tensors):
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {"__tensor__": name}
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
        prompt, response = value["__example__"]
        return Example(tuple(prompt), tuple(response))
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

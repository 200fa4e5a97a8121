"""The file format of a saved `WeightBank`: safetensors, with two metadata entries of our own.

    spin_kernels.names    JSON list: the tensors in arena order (safetensors sorts its keys)
    spin_kernels.sha256   JSON {name: SHA-256 of the tensor's bytes}: a flipped byte on disk is found
                          on load and named, instead of becoming a silently wrong reference model

Any other safetensors file loads too (in its own key order, unverified). Writes are atomic: a
temporary file beside the target, fsync, rename, fsync of the directory.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch

NAMES_KEY = "spin_kernels.names"
CHECKSUMS_KEY = "spin_kernels.sha256"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a contiguous CPU tensor's bytes (hashlib releases the GIL on large buffers)."""
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


def write_tensor_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write `tensors` (contiguous CPU tensors, in arena order) with their order and checksums."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    metadata = {NAMES_KEY: json.dumps(list(tensors)),
                CHECKSUMS_KEY: json.dumps({name: tensor_digest(t) for name, t in tensors.items()})}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(dict(tensors), tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class TensorFileReader:
    """An open bank file: `specs` ({name: (shape, dtype)} in arena order) before any data is read,
    then `read_into` copies one tensor at a time (no second full copy in memory) and verifies it.

        with TensorFileReader(path) as reader:
            targets = allocate(reader.specs)
            reader.read_into(targets)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if os.path.isdir(self.path):
            raise ValueError(f"WeightBank.load: {self.path!r} is a directory; pass the .safetensors file "
                             f"that WeightBank.save wrote")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"WeightBank.load: no such file {self.path!r}")
        from safetensors import safe_open

        try:
            self._handle = safe_open(self.path, framework="pt")
            names = list(self._handle.keys())
            metadata = self._handle.metadata() or {}
            recorded = json.loads(metadata[NAMES_KEY]) if NAMES_KEY in metadata else None
            self._checksums = json.loads(metadata[CHECKSUMS_KEY]) if CHECKSUMS_KEY in metadata else {}
        except Exception as exc:  # safetensors' own error type, or JSON in damaged metadata
            raise ValueError(f"WeightBank.load: {self.path!r} is not a readable safetensors file "
                             f"({exc})") from exc
        if recorded is not None and sorted(recorded) == sorted(names):
            names = recorded
        if CHECKSUMS_KEY in metadata and sorted(self._checksums) != sorted(names):
            raise ValueError(f"WeightBank.load: {self.path!r}: the recorded checksums do not name the "
                             f"file's tensors (the file is corrupt)")
        self.specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in names:
            part = self._handle.get_slice(name)
            self.specs[name] = (tuple(part.get_shape()), self._dtype(part.get_dtype()))

    def _dtype(self, code: str) -> torch.dtype:
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"WeightBank.load: {self.path!r}: unsupported safetensors dtype {code!r}")
        return SAFETENSORS_DTYPES[code]

    def read_into(self, targets: Mapping[str, torch.Tensor]) -> None:
        """targets[name] <- the file's tensor, for every name of `specs` (contiguous CPU tensors);
        ValueError naming the file and the tensor when a recorded checksum does not match."""
        for name in self.specs:
            target = targets[name]
            target.copy_(self._handle.get_tensor(name))
            expected = self._checksums.get(name)
            if expected is not None and tensor_digest(target) != expected:
                raise ValueError(f"WeightBank.load: {self.path!r}: tensor {name!r} does not match the "
                                 f"checksum recorded when it was saved (the file is corrupt)")

    def __enter__(self) -> "TensorFileReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self._handle.__exit__(*exc_info)

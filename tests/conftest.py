"""Runs the Triton kernels under the interpreter when there is no GPU (how CI tests them)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported (spin_kernels imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

"""Runs the Triton kernels under the interpreter when there is no GPU (how CI tests them); one
intra-op thread per test module; the `one_rank_mesh` fixture."""
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


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's
    spin-waiting makes each small matmul ~100x slower; restored after the module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-rank gloo process group and its CPU DeviceMesh, for DTensor code in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the trainer loads a model: for errors that must come before any."""
    import spin_trainer.cli
    import spin_trainer.model

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")

    monkeypatch.setattr(spin_trainer.model, "load_model", refuse)
    monkeypatch.setattr(spin_trainer.cli, "load_parallel_model", refuse)   # the name the trainer calls

"""offload_optimizer / onload_optimizer: bit-exact state round trips in the middle of training."""
import os

import pytest
import torch
from torch import nn

from spin_kernels.swap import offload_optimizer, onload_optimizer

BACKENDS = [pytest.param("ext", marks=pytest.mark.skipif(os.environ.get("SPIN_KERNELS_NO_EXT") == "1",
                                                         reason="SPIN_KERNELS_NO_EXT=1")),
            "torch"]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _train(model, optimizer, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=generator)
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _state_bits(optimizer):
    return [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
], ids=["adamw", "adam-amsgrad"])
def test_offload_in_the_middle_of_training_changes_nothing(backend, make_optimizer):
    plain = _model()
    plain_optimizer = make_optimizer(plain.parameters())
    _train(plain, plain_optimizer, 3, seed=1)
    _train(plain, plain_optimizer, 3, seed=2)

    offloaded = _model()
    optimizer = make_optimizer(offloaded.parameters())
    _train(offloaded, optimizer, 3, seed=1)
    before = _state_bits(optimizer)
    record = offload_optimizer(optimizer, backend=backend)
    arena = record.bank.arena
    host_views = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert host_views and all(arena.data_ptr() <= v.data_ptr() < arena.data_ptr() + arena.numel()
                              for v in host_views)
    with torch.no_grad():
        offloaded(torch.randn(2, 8))  # "generation" while the state is parked
    onload_optimizer(record)
    after = _state_bits(optimizer)
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        for key in old:
            assert torch.equal(old[key], new[key]) and old[key].dtype == new[key].dtype, key
            assert new[key].data_ptr() < arena.data_ptr() or new[key].data_ptr() >= arena.data_ptr() + arena.numel()
    _train(offloaded, optimizer, 3, seed=2)

    for p, q in zip(plain.parameters(), offloaded.parameters()):
        assert torch.equal(p, q)
    # A second offload handed the first one's record reuses its host arena (pinning gigabytes is slow).
    again = offload_optimizer(optimizer, backend=backend, reuse=record)
    assert again is record and record.bank.arena.data_ptr() == arena.data_ptr()
    onload_optimizer(record, keep_host_buffer=False)
    assert record.bank is None
    _train(offloaded, optimizer, 1, seed=3)
    # ... and without the record there is nothing global that keeps an arena alive
    assert offload_optimizer(optimizer, backend=backend).bank.arena.data_ptr() != arena.data_ptr()


def test_offload_and_onload_errors():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="takes the OptimizerOffload that offload_optimizer returned"):
        onload_optimizer(optimizer)
    _train(model, optimizer, 1, seed=0)
    record = offload_optimizer(optimizer)
    with pytest.raises(ValueError, match="already offloaded"):
        offload_optimizer(optimizer, reuse=record)
    onload_optimizer(record)
    with pytest.raises(ValueError, match="not offloaded"):
        onload_optimizer(record)
    other = torch.optim.AdamW(_model().parameters())
    with pytest.raises(ValueError, match="same optimizer"):
        offload_optimizer(other, reuse=record)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        offload_optimizer(model)


def test_offload_of_an_optimizer_without_state_is_harmless():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters())
    record = offload_optimizer(optimizer)
    assert record.bank.nbytes == 0
    onload_optimizer(record)
    _train(model, optimizer, 1, seed=0)


def test_dtensor_state_comes_back_as_dtensor(one_rank_mesh):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    torch.manual_seed(0)
    layer = nn.Linear(4, 6, bias=False)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), one_rank_mesh, [Shard(0)]))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)

    def step():
        layer(distribute_tensor(torch.randn(3, 4), one_rank_mesh, [Replicate()])).sum().backward()
        optimizer.step()

    step()
    step()
    state = optimizer.state[layer.weight]
    was_dtensor = {k: isinstance(v, DTensor) for k, v in state.items()}
    assert was_dtensor["exp_avg"]
    before = {k: v.to_local().clone() if was_dtensor[k] else v.clone() for k, v in state.items()}
    record = offload_optimizer(optimizer)
    assert not isinstance(optimizer.state[layer.weight]["exp_avg"], DTensor)  # a host view of the shard
    onload_optimizer(record)
    after = optimizer.state[layer.weight]
    for key, value in before.items():
        assert isinstance(after[key], DTensor) == was_dtensor[key], key
        restored = after[key].to_local() if was_dtensor[key] else after[key]
        assert torch.equal(restored, value), key
    assert after["exp_avg"].placements == layer.weight.placements
    assert after["exp_avg"].shape == layer.weight.shape
    step()

"""WeightBank and swapped(): bit-exact round trips, in-place semantics, errors, backends."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from spin_kernels import swap
from spin_kernels.swap import WeightBank, swapped
from spin_kernels.swap.engine import ARENA_ALIGNMENT

EXTENSION_SKIPPED = os.environ.get("SPIN_KERNELS_NO_EXT") == "1"
BACKENDS = [pytest.param("ext", marks=pytest.mark.skipif(EXTENSION_SKIPPED, reason="SPIN_KERNELS_NO_EXT=1")),
            "torch"]


def test_backend_is_the_extension_when_it_was_built():
    # CI builds the extension (make test); if the C++ silently stopped building, this fails.
    if EXTENSION_SKIPPED:
        assert swap.backend == "torch"
        return
    from spin_kernels import _swap_ext

    assert swap.backend == ("cuda-ext" if _swap_ext.with_cuda else "cpu-ext")
    if not torch.cuda.is_available():
        assert swap.backend == "cpu-ext"


def test_cpu_build_refuses_cuda_only_calls_clearly():
    if swap.backend != "cpu-ext":
        pytest.skip("needs the CPU build of the extension")
    from spin_kernels import _swap_ext

    with pytest.raises(RuntimeError, match="built without CUDA"):
        _swap_ext.device_view(torch.zeros(4), 0)
    with pytest.raises(RuntimeError, match="pinned memory needs the CUDA build"):
        _swap_ext.alloc_host(16, True)
    with pytest.raises(RuntimeError, match=r"copy #1: shape mismatch, dst is \[3\] and src is \[4\]"):
        _swap_ext.copy_batch([torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.ones(4)])
    with pytest.raises(RuntimeError, match="copy #0: dtype mismatch"):
        _swap_ext.copy_batch([torch.zeros(4)], [torch.ones(4, dtype=torch.float64)])
    with pytest.raises(RuntimeError, match="contiguous"):
        _swap_ext.copy_batch([torch.zeros(4, 4).t()], [torch.ones(4, 4)])


@pytest.mark.skipif(EXTENSION_SKIPPED, reason="SPIN_KERNELS_NO_EXT=1")
def test_large_host_copies_are_split_across_threads_exactly():
    from spin_kernels import _swap_ext

    # 8 MB chunks: 3 whole chunks and a ragged tail, plus a small tensor in the same batch.
    big = torch.randint(0, 256, ((3 << 23) + 12345,), dtype=torch.uint8)
    small = torch.randn(7)
    arena = _swap_ext.alloc_host(big.numel() + 64, False)
    assert arena.numel() == big.numel() + 64 and arena.data_ptr() % _swap_ext.host_alignment == 0
    start = (big.numel() + 31) // 32 * 32
    small_dst = arena[start:start + 28].view(torch.float32)
    _swap_ext.copy_batch([arena[:big.numel()], small_dst], [big, small])
    assert torch.equal(arena[:big.numel()], big) and torch.equal(small_dst, small)


def test_torch_fallback_is_live_without_the_extension():
    script = (
        "import sys, torch\n"
        "sys.modules['spin_kernels._swap_ext'] = None\n"  # import of the extension now fails
        "from spin_kernels import swap\n"
        "assert swap.backend == 'torch', swap.backend\n"
        "src = {'a': torch.randn(3, 5), 'b': torch.arange(7)}\n"
        "bank = swap.WeightBank.from_tensors(src)\n"
        "dst = {k: torch.zeros_like(v) for k, v in src.items()}\n"
        "bank.load_into(dst)\n"
        "assert all(torch.equal(src[k], dst[k]) for k in src)\n"
        "print('torch-fallback-ok')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torch-fallback-ok" in result.stdout


def _special(shape, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=generator).to(dtype)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
        flat = values.view(-1)
        flat[:4] = specials[:flat.numel()]
        return values
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    info = torch.iinfo(dtype)
    values = torch.randint(-1000, 1000, shape, generator=generator).to(dtype)
    flat = values.view(-1)
    flat[:2] = torch.tensor([info.min, info.max], dtype=dtype)[:flat.numel()]
    return values


def _bits_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                     b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                                   torch.uint8, torch.bool])
def test_round_trip_is_bit_exact(backend, dtype):
    shapes = {"scalar": (), "vector": (33,), "matrix": (17, 9), "empty": (0, 4), "cube": (3, 4, 5)}
    src = {name: _special(shape, dtype, seed) for seed, (name, shape) in enumerate(shapes.items())}
    originals = {name: t.clone() for name, t in src.items()}
    bank = WeightBank.from_tensors(src, backend=backend)
    for name in src:
        src[name].zero_()  # the bank owns a copy, not a reference
    dst = {name: torch.full_like(t, 3) for name, t in src.items()}
    bank.load_into(dst)
    again = WeightBank.from_tensors(dst, backend=backend)
    for name, tensor in dst.items():
        assert _bits_equal(bank[name], originals[name])
        assert _bits_equal(tensor, originals[name])
        assert _bits_equal(again[name], originals[name])
    assert bank.names == list(shapes)
    assert bank.backend == ("torch" if backend == "torch" else swap.backend)


def test_arena_is_one_exact_allocation_with_aligned_views():
    if EXTENSION_SKIPPED:
        pytest.skip("the torch backend rounds pinned allocations")
    src = {f"t{i}": torch.randn(i + 1, 3) for i in range(20)}
    src["bf16"] = torch.randn(5, 7).to(torch.bfloat16)
    bank = WeightBank.from_tensors(src, backend="ext")
    base = bank.arena.data_ptr()
    last_end = 0
    for name, slot in bank.slots.items():
        assert slot.offset % ARENA_ALIGNMENT == 0
        assert bank[name].data_ptr() == base + slot.offset
        assert slot.offset >= last_end
        last_end = slot.offset + slot.nbytes
    assert bank.arena.numel() == last_end == bank.arena_nbytes
    assert bank.nbytes == sum(t.numel() * t.element_size() for t in src.values())
    assert bank.arena_nbytes - bank.nbytes < ARENA_ALIGNMENT * len(src)


class _Net(nn.Module):
    def __init__(self, tied=True):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.proj = nn.Linear(6, 6).to(torch.bfloat16)
        self.head = nn.Linear(6, 11, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.register_buffer("counts", torch.arange(5, dtype=torch.int64))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)


def _randomize(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator).to(tensor.dtype))
            else:
                tensor.copy_(torch.randint(0, 1 << 40, tensor.shape, generator=generator))


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_state(module, expected):
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert _bits_equal(state[name], tensor), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_into_module_copies_in_place(backend):
    reference, policy = _Net(), _Net()
    _randomize(reference, 1)
    _randomize(policy, 2)
    bank = WeightBank.from_module(reference, backend=backend)
    assert bank.names == ["embed.weight", "proj.weight", "proj.bias", "counts"]  # tied once, persistent only
    params_before = {name: p for name, p in policy.named_parameters()}
    versions = {name: p._version for name, p in params_before.items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    bank.load_into(policy)
    _assert_state(policy, _snapshot(reference))
    for name, param in policy.named_parameters():
        assert param is params_before[name]  # same objects: optimizer and autograd refs stay valid
        assert param._version > versions[name]
    assert all(p is q for p, q in zip(optimizer.param_groups[0]["params"], policy.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_holds_the_bank_inside_and_restores_after(backend):
    reference, policy = _Net(), _Net()
    _randomize(reference, 1)
    _randomize(policy, 2)
    bank = WeightBank.from_module(reference, backend=backend)
    own = _snapshot(policy)
    ids = torch.tensor([1, 5, 7])
    with swapped(policy, bank) as inside:
        assert inside is policy
        _assert_state(policy, _snapshot(reference))
        assert torch.equal(policy.head(policy.embed(ids)), reference.head(reference.embed(ids)))
        with pytest.raises(ValueError, match="already swapped"):
            with swapped(policy, bank):
                pass
    _assert_state(policy, own)
    with swapped(policy, bank):  # the stash is reused
        _assert_state(policy, _snapshot(reference))
    _assert_state(policy, own)
    _assert_state(reference, _snapshot(reference))
    bank.release_stash()


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_restores_after_an_exception(backend):
    reference, policy = _Net(), _Net()
    _randomize(reference, 3)
    _randomize(policy, 4)
    bank = WeightBank.from_module(reference, backend=backend)
    own = _snapshot(policy)
    with pytest.raises(RuntimeError, match="boom"):
        with swapped(policy, bank):
            with torch.no_grad():
                policy.proj.weight.add_(1)  # a write inside the block is discarded on exit
            raise RuntimeError("boom")
    _assert_state(policy, own)
    assert not bank.swap_active


def test_mismatched_banks_get_clear_errors():
    bank = WeightBank.from_module(_Net())
    untied = _Net(tied=False)
    with pytest.raises(ValueError, match="'head.weight'"):
        bank.load_into(untied)
    smaller = _Net()
    smaller.proj = nn.Linear(6, 5).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'proj.weight': bank has \[6, 6\] torch.bfloat16, target has \[5, 6\]"):
        bank.load_into(smaller)
    other_dtype = _Net()
    other_dtype.proj.float()
    with pytest.raises(ValueError, match=r"'proj.bias'.*torch.bfloat16.*torch.float32"):
        bank.load_into(other_dtype)
    with pytest.raises(ValueError, match="missing from the target: 'counts'"):
        bank.load_into({k: v for k, v in bank.tensors().items() if k != "counts"})
    with pytest.raises(ValueError, match="not in the bank"):
        with swapped(untied, bank):
            pass
    with pytest.raises(TypeError, match="tensors must be a mapping"):
        WeightBank.from_tensors([torch.zeros(2)])
    with pytest.raises(TypeError, match="bank must be a WeightBank"):
        with swapped(_Net(), {"a": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="backend"):
        WeightBank.from_tensors({"a": torch.zeros(1)}, backend="gpu")


def test_update_from_refreshes_without_reallocating():
    net = _Net()
    _randomize(net, 6)
    bank = WeightBank.from_module(net)
    arena = bank.arena.data_ptr()
    _randomize(net, 7)
    bank.update_from(net)
    assert bank.arena.data_ptr() == arena
    for name, tensor in bank.tensors().items():
        assert _bits_equal(tensor, net.state_dict()[name])


def test_dtensor_parameters_use_their_local_shard(one_rank_mesh):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    layer = nn.Linear(4, 6)
    layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), one_rank_mesh, [Shard(0)]))
    bank = WeightBank.from_module(layer)
    assert bank["weight"].shape == layer.weight.to_local().shape
    wrapper = layer.weight
    expected = layer.weight.to_local().clone()
    with torch.no_grad():
        layer.weight._local_tensor.zero_()
    bank.load_into(layer)
    assert layer.weight is wrapper and isinstance(layer.weight, DTensor)
    assert torch.equal(layer.weight.to_local(), expected)

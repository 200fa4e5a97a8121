"""GPU checks of the host-memory extension: pinned exact-size arenas, device round trips, freed
optimizer memory and the streamed forward. (Whether copies overlap compute is a speed claim:
benchmarks/bench_swap.py measures it.)"""
import pytest
import torch

from spin_kernels import swap
from spin_kernels.swap import WeightBank, offload_optimizer, onload_optimizer, streamed_reference_forward, swapped

pytestmark = pytest.mark.cuda


def _llama(seed, layers=3, hidden=64, intermediate=96, vocab=128, heads=4, kv_heads=2):
    pytest.importorskip("transformers")
    from spin_trainer.model import build_tiny_llama

    return build_tiny_llama(vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                            num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=4096, seed=seed,
                            dtype=torch.bfloat16, device="cuda").eval()


def test_the_cuda_extension_is_live():
    assert swap.backend == "cuda-ext", ("the extension was not built with CUDA (setup.py builds a "
                                        "CUDAExtension when torch has CUDA and CUDA_HOME is set)")


def test_arena_is_pinned_and_exactly_sized():
    # 200 tensors of 0.5-1.5 MB with odd sizes, as a model's weights are.
    tensors = {f"w{i}": torch.randn(257 + 7 * i, 1000 + i, device="cuda").to(torch.bfloat16) for i in range(200)}
    bank = WeightBank.from_tensors(tensors, backend="ext")
    assert bank.is_pinned and all(bank[name].is_pinned() for name in ("w0", "w199"))
    last = max(slot.offset + slot.nbytes for slot in bank.slots.values())
    assert bank.arena.numel() == bank.arena_nbytes == last
    assert bank.arena_nbytes - bank.nbytes <= 0.001 * bank.nbytes
    # Device -> host snapshot and host -> device load are bit-exact.
    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    bank.load_into(targets)
    for name, tensor in tensors.items():
        assert torch.equal(targets[name].view(torch.int16), tensor.view(torch.int16))
        assert torch.equal(bank[name].view(torch.int16), tensor.cpu().view(torch.int16))
    rounded = WeightBank.from_tensors(tensors, backend="torch")
    assert rounded.is_pinned and rounded.arena_nbytes >= rounded.arena.numel()


def test_device_view_reads_pinned_memory_in_place():
    source = torch.randn(1000, 64, device="cuda").to(torch.bfloat16)
    bank = WeightBank.from_tensors({"a": torch.zeros(3), "table": source}, backend="ext")
    view = bank.device_view("table", torch.device("cuda"))
    assert view is not None and view.is_cuda and view.shape == source.shape
    rows = torch.tensor([0, 999, 17, 17], device="cuda")
    assert torch.equal(view.index_select(0, rows), source.index_select(0, rows))
    pageable = WeightBank.from_tensors({"table": source}, backend="ext", pin_memory=False)
    assert pageable.device_view("table", torch.device("cuda")) is None
    rounded = WeightBank.from_tensors({"table": source}, backend="torch")  # torch's pinned allocator
    assert rounded.device_view("table", torch.device("cuda")) is None


def test_swapped_on_the_gpu_is_bit_exact():
    reference, policy = _llama(1), _llama(2)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 128, (2, 33), device="cuda")
    own = {k: v.clone() for k, v in policy.state_dict().items()}
    with torch.no_grad():
        expected = reference(ids).logits
        with swapped(policy, bank):
            inside = policy(ids).logits
    assert torch.equal(inside, expected)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, own[name]), name


def test_optimizer_offload_frees_device_memory_and_restores_bits():
    model = _llama(3, layers=2, hidden=256, intermediate=512)
    model.float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = {(id(p), k): v.clone() for p, s in optimizer.state.items() for k, v in s.items()}
    device_state_bytes = sum(v.numel() * v.element_size() for v in state.values() if v.is_cuda)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    record = offload_optimizer(optimizer)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= device_state_bytes
    assert record.bank.is_pinned
    onload_optimizer(record)
    for p, s in optimizer.state.items():
        for k, v in s.items():
            assert v.device == state[(id(p), k)].device and torch.equal(v, state[(id(p), k)]), k
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # the state is usable again


def test_streamed_forward_on_the_gpu_equals_the_resident_forward():
    reference, policy = _llama(4), _llama(5)
    bank = WeightBank.from_module(reference)
    ids = torch.randint(0, 128, (2, 40), device="cuda")
    with torch.no_grad():
        expected = reference(ids).logits
    assert torch.equal(streamed_reference_forward(policy, bank, ids), expected)


def test_a_cpu_write_into_the_bank_waits_for_the_streamed_forwards_copies():
    reference, policy = _llama(6), _llama(7)
    bank = WeightBank.from_module(reference)
    # Host ids: the forward reads them on the host, so CUDA ids would make it wait for the sleep
    # below before issuing any copy, and the window this test probes would be over before it began.
    ids = torch.randint(0, 128, (2, 40))
    torch.cuda._sleep(1_000_000_000)   # about a second of GPU work queued before the forward's copies
    streamed_reference_forward(policy, bank, ids)
    fresh = {name: torch.zeros_like(tensor) for name, tensor in bank.views().items()}
    bank.update_from(fresh)            # the CPU writes the arena that the copies read
    assert torch.cuda.current_stream().query(), "the CPU wrote the arena while the streamed copies could read it"

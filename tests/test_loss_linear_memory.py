"""The fused head's torch backend stays within the extra memory that spin_kernels/loss/linear.py
documents, on the CPU, and that extra does not grow with the number of rows.

How it is measured: torch keeps no allocator statistics on the CPU, but its profiler records every
allocation and free of the CPU allocator (tensors, and the temporaries inside ops) with its size and
time. Replaying them in order gives the peak bytes allocated above the start of the step, as
torch.cuda.max_memory_allocated would on a GPU. The step is a whole training step of the loss
(forward + backward); its gradients are held at the end, so the "extra" is that peak minus the
gradients (and the scalar outputs): the memory beyond inputs, outputs and gradients.
The eager head (logits materialized) is measured the same way, to show the measure sees a
logits-sized allocation: it must exceed the bound that ours stays under.
"""
import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from head_cases import chunk_bytes, leaves, make_head  # noqa: F401
from loss_cases import make_labels
from spin_kernels import linear_spin_loss, spin_loss
from spin_kernels.loss import torch_backend
from spin_kernels.loss.ops import linear_logprobs

H, V = 64, 2048


def _events(nodes):
    for node in nodes:
        yield node
        yield from _events(node.children)


def cpu_peak_bytes(step) -> int:
    """Peak bytes of the CPU allocator during step(), above what was allocated before it."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    tree = prof.profiler.kineto_results.experimental_event_tree()
    changes = sorted((e.start_time_ns, e.extra_fields.alloc_size) for e in _events(tree)
                     if e.tag == _EventType.Allocation)
    assert changes, "the profiler recorded no allocation: the measure would be meaningless"
    live = peak = 0
    for _, size in changes:  # + allocation, − free
        live += size
        peak = max(peak, live)
    return peak


def documented_bound(n_rows: int, chunk_rows: int, dtype: torch.dtype) -> int:
    """linear.py's bound for the torch backend on the CPU, in bytes."""
    item = dtype.itemsize
    block = min(chunk_rows, torch_backend._CHUNK_ELEMENTS // V)
    bound = chunk_rows * V * item  # the logits buffer
    bound += 4 * block * V * 4  # torch_backend.py: up to four fp32 copies of a block of the chunk
    bound += 2 * chunk_rows * H * item  # hidden rows and d hidden rows of a chunk
    if dtype != torch.float32:
        bound += 4 * V * H  # fp32 accumulator of d weight
        bound += 4 * chunk_rows * (V + H)  # CPU only: fp32 copies for the d weight product
    return bound + 100 * n_rows + (1 << 20)  # O(N) bookkeeping (row ids, stats); small tensors


def _measure(seq_len, dtype, fused):
    hidden, weight, _ = make_head((4, seq_len), H, V, dtype, "cpu", seed=1, bias=False)
    labels = make_labels((4, seq_len), V, "cpu", seed=2)
    ref = torch.randn(4) - 50
    h, w = leaves(hidden, weight)

    def step():
        if fused:
            out = linear_spin_loss(h, w, labels, ref, beta=0.1, backend="torch")
        else:  # the HF head, then the logits path
            out = spin_loss(torch.nn.functional.linear(h, w), labels, ref, beta=0.1,
                            backend="torch")
        out.loss.backward()

    peak = cpu_peak_bytes(step)
    gradients = sum(t.grad.numel() * t.grad.element_size() for t in (h, w))
    return peak - gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_extra_memory_within_bound_and_independent_of_rows(dtype, chunk_bytes):
    chunk_rows = 64
    chunk_bytes(chunk_rows * V * dtype.itemsize)
    extras = {}
    # Pairs of ~34 labelled rows (whole pairs per chunk), then ~135 and ~540 (pairs cut in chunks).
    for seq_len in (24, 96, 384):
        extras[seq_len] = _measure(seq_len, dtype, fused=True)
        assert extras[seq_len] <= documented_bound(4 * seq_len, chunk_rows, dtype), (seq_len, extras)
    # Once the chunks are full, 4x the rows cost no more than the O(N) bookkeeping's share.
    assert extras[384] - extras[96] <= 100 * 4 * (384 - 96), extras
    eager = _measure(384, dtype, fused=False)
    assert eager > documented_bound(4 * 384, chunk_rows, dtype), (eager, extras)


def test_chunk_buffer_is_what_the_budget_says():
    assert linear_logprobs.rows_per_chunk(128256, torch.bfloat16) == (1 << 30) // (128256 * 2)
    assert linear_logprobs.rows_per_chunk(10**12, torch.float32) == 1

"""Vocab-parallel log-probs and SPIN loss, from logits and from hidden states (a column-parallel
LM head): 2 gloo processes equal the unsharded computation."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from head_cases import leaves, make_head
from loss_cases import make_confident, make_labels, make_logits, oracle_logprobs
from spin_kernels import linear_spin_loss, linear_token_logprobs, spin_loss, token_logprobs
from spin_kernels.loss.ops import linear_logprobs
from spin_kernels.loss.torch_backend import naive_token_logprobs

WORLD, B, T, V = 2, 2, 9, 1202  # V_local = 601: odd, more than one block of the smallest config


def _worker(rank, store_path, backends):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=WORLD)
    try:
        logits = make_logits((2 * B, T), V, torch.float32, "cpu", seed=3)
        labels = make_labels((2 * B, T), V, "cpu", seed=4)
        ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(5)) - 70
        v_local = V // WORLD
        for backend in backends:
            full = logits.clone().requires_grad_()
            want = spin_loss(full, labels, ref, beta=0.4, backend="torch")
            want.loss.backward()
            want_tok = token_logprobs(logits, labels, backend="torch")

            shard = logits[..., rank * v_local:(rank + 1) * v_local].clone().requires_grad_()
            got = spin_loss(shard, labels, ref, beta=0.4, process_group=dist.group.WORLD,
                            backend=backend)
            got.loss.backward()
            got_tok = token_logprobs(shard.detach(), labels, process_group=dist.group.WORLD,
                                     backend=backend)
            torch.testing.assert_close(got_tok, want_tok, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
            for name in want.metrics:
                torch.testing.assert_close(got.metrics[name], want.metrics[name], atol=1e-5,
                                           rtol=1e-5)
            torch.testing.assert_close(shard.grad,
                                       full.grad[..., rank * v_local:(rank + 1) * v_local],
                                       atol=1e-7, rtol=1e-5)

            # Confident rows (targets 12 above the max, in either shard): as precise as eager fp32.
            sure = make_confident(logits, labels, margin=12.0)
            got = token_logprobs(sure[..., rank * v_local:(rank + 1) * v_local], labels,
                                 process_group=dist.group.WORLD, backend=backend)
            want = oracle_logprobs(sure, labels)
            eager = naive_token_logprobs(sure, labels, dtype=torch.float32)
            err, eager_err = [(v.double() - want).abs().max().item() for v in (got, eager)]
            assert err <= 1.5 * eager_err + 1e-9, (backend, err, eager_err)

            _check_fused_head(rank, backend)
            _check_packed(rank, backend)

        # Labels are global ids: valid up to V on every shard (above), out of range from V on.
        with pytest.raises(ValueError, match=rf"\[0, {V}\)"):
            token_logprobs(shard.detach(), labels.masked_fill(labels == labels[0, 0], V),
                           process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def _check_fused_head(rank, backend):
    """Each rank holds rows [r·V_local, (r+1)·V_local) of the LM head (weight and bias) and the
    whole hidden states: the log-probs, loss and metrics equal the unsharded head's; d weight and
    d bias are the unsharded ones' rows; d hidden is summed over the ranks."""
    hidden, weight, bias = make_head((2 * B, T), 13, V, torch.float32, "cpu", seed=6)
    labels = make_labels((2 * B, T), V, "cpu", seed=7)
    ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(8)) - 40
    mine = slice(rank * (V // WORLD), (rank + 1) * (V // WORLD))
    group = dist.group.WORLD
    linear_logprobs.CHUNK_BYTES = 20 * (V // WORLD) * 4  # pairs of ~12 rows: chunks of whole pairs
    for use in ("spin", "token"):
        full, shard = leaves(hidden, weight, bias), leaves(hidden, weight[mine], bias[mine])
        if use == "spin":
            want = linear_spin_loss(*full[:2], labels, ref, bias=full[2], beta=0.4, backend="torch")
            got = linear_spin_loss(*shard[:2], labels, ref, bias=shard[2], beta=0.4,
                                   process_group=group, backend=backend)
            for name in want.metrics:
                torch.testing.assert_close(got.metrics[name], want.metrics[name], atol=1e-5,
                                           rtol=1e-5)
            want, got = want.loss, got.loss
        else:
            upstream = torch.randn(labels.shape, generator=torch.Generator().manual_seed(9))
            want = linear_token_logprobs(*full[:2], labels, bias=full[2], backend="torch")
            got = linear_token_logprobs(*shard[:2], labels, bias=shard[2], process_group=group,
                                        backend=backend)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            want, got = (want * upstream).sum(), (got * upstream).sum()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        want.backward()
        got.backward()
        torch.testing.assert_close(shard[0].grad, full[0].grad, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(shard[1].grad, full[1].grad[mine], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(shard[2].grad, full[2].grad[mine], atol=1e-6, rtol=1e-5)


def _check_packed(rank, backend):
    """Packed input (shuffled tokens with sequence ids, -1 on some) on a vocab shard equals the
    unsharded padded call, from logits and from hidden states."""
    hidden, weight, bias = make_head((2 * B, T), 13, V, torch.float32, "cpu", seed=15)
    labels = make_labels((2 * B, T), V, "cpu", seed=16)
    ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(17)) - 40
    g = torch.Generator().manual_seed(18)
    order = torch.randperm(2 * B * T, generator=g)
    seq = torch.arange(2 * B).repeat_interleave(T)[order]
    none = (torch.rand(order.shape, generator=g) < 0.2)  # tokens in no sequence count nowhere
    seq[none] = -1
    mask = torch.ones(2 * B * T, dtype=torch.bool)
    mask[order[none]] = False
    mask = mask.view(2 * B, T)
    mine = slice(rank * (V // WORLD), (rank + 1) * (V // WORLD))
    full = leaves(hidden, weight, bias)
    want = linear_spin_loss(*full[:2], labels, ref, bias=full[2], loss_mask=mask, beta=0.4)
    want.loss.backward()
    flat = hidden.reshape(-1, 13)[order]
    packed = dict(seq_ids=seq, num_sequences=2 * B, beta=0.4, process_group=dist.group.WORLD,
                  backend=backend)
    shard = leaves(flat, weight[mine], bias[mine])
    got = linear_spin_loss(*shard[:2], labels.reshape(-1)[order], ref, bias=shard[2], **packed)
    got.loss.backward()
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(shard[0].grad, full[0].grad.reshape(-1, 13)[order], atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(shard[1].grad, full[1].grad[mine], atol=1e-6, rtol=1e-5)
    logits = torch.nn.functional.linear(flat, weight[mine], bias[mine])
    got = spin_loss(logits, labels.reshape(-1)[order], ref, **packed)
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)


def test_two_rank_vocab_parallel_equals_unsharded(tmp_path):
    backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    mp.spawn(_worker, args=(str(tmp_path / "store"), backends), nprocs=WORLD)

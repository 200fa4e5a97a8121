"""Packed (padding-free) input to the loss: flat [N, V] logits or [N, H] hidden states with
sequence ids or cu_seqlens give the padded call's log-probs, loss, metrics and gradients."""
import pytest
import torch

from head_cases import chunk_bytes, leaves, make_head, oracle_spin  # noqa: F401
from loss_cases import IGNORE, backend_cases, make_labels, make_logits
from spin_kernels import (SpinLoss, linear_sequence_logprobs, linear_spin_loss,
                          sequence_logprobs, spin_loss)
from spin_kernels.loss.torch_backend import naive_token_logprobs

B, T, V, H = 4, 7, 37, 13  # odd T, V, H; 2B = 8 padded sequences


def _padded(device, seed):
    """labels and loss_mask [2B, T] with a prompt, an empty actual response (row 1), an empty pair
    (rows 2 and B + 2) and a response of one token (row B)."""
    labels = make_labels((2 * B, T), V, device, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    mask = torch.rand(2 * B, T, generator=g) > 0.25
    mask[:, :2] = False  # the prompt
    mask[1] = mask[2] = mask[B + 2] = False
    mask[B] = False
    mask[B, 4] = True
    labels[B, 4] = 5
    return labels, mask.to(device)


def _packing(labels, mask, layout, seed):
    """The flat order of padded (row, t) tokens and their sequence ids for a packed call.

    "seq_ids": segments of pairs (row i and row B + i, the generated one first for odd i), uncounted tokens partly dropped (as
    padding is) and partly given id -1, and one counted token given -1 (and unmasked in the padded
    call: a token of no sequence counts nowhere). "cu_seqlens": rows in order, all their tokens,
    bounds from the row lengths (flash-attn's layout of the padded rows without padding).
    """
    g = torch.Generator().manual_seed(seed)
    counted = ((labels != IGNORE) & mask).cpu()
    if layout == "cu_seqlens":
        lengths = torch.randint(3, T + 1, (2 * B,), generator=g)
        lengths[B] = T  # keeps row B's single token
        rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths.tolist())])
        ts = torch.cat([torch.arange(n) for n in lengths.tolist()])
        keep_mask = torch.zeros(2 * B, T, dtype=torch.bool)
        keep_mask[rows, ts] = True
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]).to(torch.int32)
        return rows, ts, dict(cu_seqlens=cu.to(labels.device)), keep_mask.to(mask.device)
    order, seq = [], []
    dropped_counted = False
    for i in range(B):
        for r in ((B + i, i) if i % 2 else (i, B + i)):
            for t in range(T):
                drop = torch.rand((), generator=g).item()
                if not counted[r, t] and drop < 0.3:
                    continue  # padding: not in the packed batch at all
                sid = r
                if not counted[r, t] and drop < 0.6:
                    sid = -1  # a prompt token: in the batch, in no sequence
                if counted[r, t] and not dropped_counted and r == B + 1:
                    sid, dropped_counted = -1, True
                order.append((r, t))
                seq.append(sid)
    rows, ts = (torch.tensor(x) for x in zip(*order))
    seq = torch.tensor(seq)
    keep_mask = torch.zeros(2 * B, T, dtype=torch.bool)
    keep_mask[rows[seq >= 0], ts[seq >= 0]] = True
    args = dict(seq_ids=seq.to(labels.device), num_sequences=2 * B)
    return rows, ts, args, keep_mask.to(mask.device)


def _flat(tensor, rows, ts):
    return tensor[rows.to(tensor.device), ts.to(tensor.device)]


def _unflat(grad, rows, ts):
    """A packed gradient [N, X] back in padded [2B, T, X] form (zeros where no token)."""
    out = grad.new_zeros(2 * B, T, grad.shape[-1])
    out[rows.to(grad.device), ts.to(grad.device)] = grad
    return out


def _close(got, want, dtype, msg):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5, msg=msg)
    else:  # bf16 elements: equal up to one rounding of the same fp32 value
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-2, msg=msg)


LAYOUTS = ["seq_ids", "cu_seqlens"]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_logits_path_equals_padded_call(device, backend, layout, dtype):
    labels, mask = _padded(device, seed=1)
    rows, ts, packed, kept = _packing(labels, mask, layout, seed=2)
    mask = mask & kept
    logits = make_logits((2 * B, T), V, dtype, device, seed=3)
    ref_tok = naive_token_logprobs(make_logits((2 * B, T), V, torch.float32, device, seed=4),
                                   labels, ignore_index=IGNORE)
    ref = (ref_tok * ((labels != IGNORE) & mask)).sum(-1)

    full = logits.clone().requires_grad_()
    want = spin_loss(full, labels, ref_tok, loss_mask=mask, beta=0.6, backend=backend)
    (want.loss * 0.3).backward()
    flat = _flat(logits, rows, ts).requires_grad_()
    flat_labels, flat_mask = _flat(labels, rows, ts), _flat(mask, rows, ts)
    got = spin_loss(flat, flat_labels, _flat(ref_tok, rows, ts), loss_mask=flat_mask, beta=0.6,
                    backend=backend, **packed)
    (got.loss * 0.3).backward()
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    for name, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[name], value, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(got.policy_logps, want.policy_logps, atol=1e-5, rtol=1e-5)
    assert got.policy_logps[1] == 0 and got.policy_logps[2] == 0  # empty responses
    _close(_unflat(flat.grad, rows, ts), full.grad, dtype, "d logits")
    # Per-sequence reference sums (through the module), and the float64 oracle.
    again = SpinLoss(beta=0.6, backend=backend)(flat.detach(), flat_labels, ref, flat_mask,
                                                **packed)
    torch.testing.assert_close(again.loss, want.loss, atol=1e-6, rtol=1e-5)
    oracle = naive_token_logprobs(logits.cpu(), labels.masked_fill(~mask, IGNORE).cpu(),
                                  ignore_index=IGNORE, dtype=torch.float64).sum(-1)
    torch.testing.assert_close(got.policy_logps.double().cpu(), oracle, atol=2e-5, rtol=1e-5)
    for average in (False, True):
        seq = sequence_logprobs(flat.detach(), flat_labels, flat_mask, average=average,
                                backend=backend, **packed)
        pad = sequence_logprobs(logits, labels, mask, average=average, backend=backend)
        torch.testing.assert_close(seq, pad, atol=1e-5, rtol=1e-5)


ROUTES = [pytest.param(10**9, id="one-chunk"), pytest.param(12, id="pair-chunks"),
          pytest.param(3, id="split-pairs")]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("rows_per_chunk", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_head_equals_padded_call(device, backend, rows_per_chunk, layout, dtype,
                                       chunk_bytes):
    labels, mask = _padded(device, seed=5)
    rows, ts, packed, kept = _packing(labels, mask, layout, seed=6)
    mask = mask & kept
    hidden, weight, bias = make_head((2 * B, T), H, V, dtype, device, seed=7)
    ref = torch.randn(2 * B, generator=torch.Generator().manual_seed(8)).to(device) - 20
    chunk_bytes(rows_per_chunk * V * dtype.itemsize)

    h, w, b = leaves(hidden, weight, bias)
    want = linear_spin_loss(h, w, labels, ref, bias=b, loss_mask=mask, beta=0.4, backend=backend)
    (want.loss * 0.7).backward()
    hf, w2, b2 = leaves(_flat(hidden, rows, ts), weight, bias)
    flat_labels, flat_mask = _flat(labels, rows, ts), _flat(mask, rows, ts)
    got = linear_spin_loss(hf, w2, flat_labels, ref, bias=b2, loss_mask=flat_mask, beta=0.4,
                           backend=backend, **packed)
    (got.loss * 0.7).backward()
    torch.testing.assert_close(got.loss, want.loss, atol=1e-6, rtol=1e-5)
    for name, value in want.metrics.items():
        torch.testing.assert_close(got.metrics[name], value, atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(got.policy_logps, want.policy_logps, atol=1e-5, rtol=1e-5)
    _close(_unflat(hf.grad, rows, ts), h.grad, dtype, "d hidden")
    _close(w2.grad, w.grad, dtype, "d weight")
    _close(b2.grad, b.grad, dtype, "d bias")
    if dtype == torch.float32:  # and the float64 oracle of the padded formula
        oracle = oracle_spin(hidden, weight, bias, labels, ref, loss_mask=mask, beta=0.4,
                             upstream=0.7)
        torch.testing.assert_close(got.loss.double().cpu(), oracle[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(w2.grad.double().cpu(), oracle[2], atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        for average in (False, True):
            seq = linear_sequence_logprobs(hf, w2, flat_labels, flat_mask, bias=b2,
                                           average=average, backend=backend, **packed)
            pad = linear_sequence_logprobs(h, w, labels, mask, bias=b, average=average,
                                           backend=backend)
            torch.testing.assert_close(seq, pad, atol=1e-5, rtol=1e-5)


def test_trainer_layout_scores_a_shared_position_twice():
    # packing.py's layout: one prompt [p0 p1 p2] shared by gold [a0 a1] and generated [g0]; the
    # head runs on gathered rows [M, H], the last prompt position twice (gold[0], then gen[0]).
    hidden, weight, _ = make_head((1, 6), H, V, torch.float32, "cpu", seed=9, bias=False)
    # Tokens p0 p1 p2 a0 a1 | g0 (g0 after p2): hidden[0, t] is the output at token t.
    positions = torch.tensor([2, 3, 4, 2])  # p2 -> a0, a0 -> a1, a1 -> eos, p2 -> g0
    labels = torch.tensor([11, 30, 1, 7])
    seq = torch.tensor([0, 0, 0, 1])
    ref = torch.tensor([-9.0, -4.0])
    hp, wp = leaves(hidden[0], weight)
    got = linear_spin_loss(hp[positions], wp, labels, ref, seq_ids=seq, num_sequences=2, beta=0.5)
    got.loss.backward()
    # The same pair padded: rows [p0 p1 p2 a0 a1] and [p0 p1 p2 g0 -], the prompt's hidden states
    # shared (a causal model gives both rows the same ones).
    rows = torch.stack([hidden[0, :5], torch.cat([hidden[0, :3], hidden[0, 5:], hidden[0, :1]])])
    hr, wr = leaves(rows, weight)
    padded_labels = torch.full((2, 5), IGNORE)
    padded_labels[0, 2:] = torch.tensor([11, 30, 1])
    padded_labels[1, 2] = 7
    want = linear_spin_loss(hr, wr, padded_labels, ref, beta=0.5)
    want.loss.backward()
    torch.testing.assert_close(got.loss, want.loss)
    torch.testing.assert_close(wp.grad, wr.grad)
    # Position 2's gradient is the sum of both rows' (gold's p2 and generated's p2).
    torch.testing.assert_close(hp.grad[2], hr.grad[0, 2] + hr.grad[1, 2])


def _errors_case():
    logits = make_logits((6,), 11, torch.float32, "cpu", seed=1)
    labels = torch.tensor([3, 4, IGNORE, 5, 6, 7])
    return logits, labels, torch.tensor([0, 0, -1, 1, 1, 1])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(seq_ids="ids", num_sequences=2), ValueError, "seq_ids must be a 1-D integer tensor"),
    (dict(seq_ids=torch.zeros(6), num_sequences=2), TypeError, "seq_ids must be an integer"),
    (dict(seq_ids=torch.zeros(5, dtype=torch.long), num_sequences=2), ValueError, r"\[6\]"),
    (dict(seq_ids=torch.tensor([0, 0, -1, 1, 2, 1]), num_sequences=2), ValueError,
     r"\[0, 2\) or equal -1 \(no sequence\); found \[2\] at \[4\]"),
    (dict(seq_ids=torch.tensor([0, 0, -2, 1, 1, 1]), num_sequences=2), ValueError, "found \\[-2\\]"),
    (dict(seq_ids=torch.zeros(6, dtype=torch.long)), ValueError, "needs num_sequences="),
    (dict(seq_ids=torch.zeros(6, dtype=torch.long), num_sequences=True), ValueError,
     "num_sequences="),
    (dict(num_sequences=2), ValueError, "exactly one of"),
    (dict(seq_ids=torch.zeros(6, dtype=torch.long), num_sequences=2,
          cu_seqlens=torch.tensor([0, 3, 6])), ValueError, "exactly one of"),
    (dict(cu_seqlens=torch.tensor([0, 3, 5])), ValueError, "from 0 to the number of tokens 6"),
    (dict(cu_seqlens=torch.tensor([1, 3, 6])), ValueError, "from 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), ValueError, "without decreasing"),
    (dict(cu_seqlens=torch.tensor([0])), ValueError, "S \\+ 1 >= 2"),
    (dict(cu_seqlens=torch.tensor([0, 3, 6]), num_sequences=3), ValueError, "contradicts"),
])
def test_bad_packing_is_refused_with_its_name(kwargs, error, match):
    logits, labels, _ = _errors_case()
    with pytest.raises(error, match=match):
        sequence_logprobs(logits, labels, backend="torch", **kwargs)


def test_bad_packed_shapes_are_refused():
    logits, labels, seq = _errors_case()
    with pytest.raises(ValueError, match=r"packed logits must be \[N, V\]"):
        sequence_logprobs(logits[None], labels[None], seq_ids=seq, num_sequences=2)
    with pytest.raises(ValueError, match=r"packed labels must be \[N\] = \(6,\)"):
        sequence_logprobs(logits, labels[:5], seq_ids=seq, num_sequences=2)
    with pytest.raises(ValueError, match="even number of sequences"):
        spin_loss(logits, labels, torch.zeros(3), seq_ids=seq, num_sequences=3)
    with pytest.raises(ValueError, match=r"packed ref_logps must be \[2\] \(per sequence\) or \[6\]"):
        spin_loss(logits, labels, torch.zeros(4), seq_ids=seq, num_sequences=2)
    hidden, weight, _ = make_head((6,), H, 11, torch.float32, "cpu", bias=False)
    with pytest.raises(ValueError, match=r"packed hidden must be \[N, H\]"):
        linear_spin_loss(hidden[None], weight, labels[None], torch.zeros(2), seq_ids=seq,
                         num_sequences=2)
    with pytest.raises(ValueError, match=r"\[0, 2\) or equal -1"):
        linear_spin_loss(hidden, weight, labels, torch.zeros(2), seq_ids=seq + 1, num_sequences=2)


def test_fullgraph_compile_reads_no_ids_on_the_host():
    # No host sync: fullgraph would fail on a read of the ids (.item(), .tolist(), a branch). In a
    # graph the ids are not checked on the host, as on a GPU: bad ids give NaN, never a wrong sum.
    logits, labels, seq = _errors_case()
    hidden, weight, _ = make_head((6,), H, 11, torch.float32, "cpu", seed=2, bias=False)
    ref = torch.tensor([-5.0, -7.0])

    def loss_fn(x, h, ids):
        kwargs = dict(seq_ids=ids, num_sequences=2, beta=0.3, backend="torch")
        return (spin_loss(x, labels, ref, **kwargs).loss
                + linear_spin_loss(h, weight, labels, ref, **kwargs).loss)

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x_eager, h_eager, x_comp, h_comp = leaves(logits, hidden, logits, hidden)
    loss_eager = loss_fn(x_eager, h_eager, seq)
    loss_eager.backward()
    loss_comp = compiled(x_comp, h_comp, seq)
    loss_comp.backward()
    torch.testing.assert_close(loss_comp, loss_eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)
    torch.testing.assert_close(h_comp.grad, h_eager.grad)
    bad = torch.tensor([0, 0, -1, 1, 2, 1])
    assert torch.isnan(compiled(logits, hidden, bad))
    assert torch.isnan(torch.compile(lambda h, ids: linear_spin_loss(
        h, weight, labels, ref, seq_ids=ids, num_sequences=2, backend="torch").loss,
        fullgraph=True, backend="aot_eager")(hidden, bad))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_per_sequence_sums_are_exact_sums_and_the_same_on_every_call(device):
    """sums_by_index: the float64 sums within fp32 rounding, the gradient a gather, and bit for bit
    the same on every call (on CUDA, index_add's atomics may add 1M values into 3 ids in any order)."""
    from spin_kernels.loss.packed import sums_by_index
    g = torch.Generator().manual_seed(0)
    values = torch.randn(1 << 20, generator=g).to(device).requires_grad_()
    index = torch.randint(0, 3, (1 << 20,), generator=g).to(device)
    sums = sums_by_index(values, index, 4)   # id 3 has no value: 0
    exact = torch.zeros(4, dtype=torch.float64, device=device).index_add(0, index, values.double())
    magnitude = torch.zeros(4, dtype=torch.float64, device=device).index_add(0, index, values.double().abs())
    # fp32 adding 350k values in order is off by about 0.01; the bound (about 0.3) catches one value
    # (about 0.8) summed into the wrong id
    assert ((sums.double() - exact).abs() <= 2 ** -20 * magnitude).all()
    assert sums[3] == 0
    assert all(torch.equal(sums_by_index(values, index, 4), sums) for _ in range(5))
    upstream = torch.tensor([1.0, -2.0, 3.0, 4.0], device=device)
    (grad,) = torch.autograd.grad(sums, values, upstream)
    assert torch.equal(grad, upstream[index])

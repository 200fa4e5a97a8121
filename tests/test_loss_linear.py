"""linear_token_logprobs / linear_sequence_logprobs (the fused LM head) against the float64 oracle."""
import pytest
import torch

from head_cases import (HEAD_DTYPES, assert_grads_close, chunk_bytes, eager_token,  # noqa: F401
                        leaves, make_head, oracle_token)
from loss_cases import IGNORE, backend_cases, make_labels, make_upstream, rel_err
from spin_kernels import linear_sequence_logprobs, linear_token_logprobs
from spin_kernels.loss.torch_backend import naive_token_logprobs

pytestmark = pytest.mark.parametrize("device,backend", backend_cases())


def _check_values(got, want, eager, dtype, tol=2e-5):
    if dtype == torch.float32:
        torch.testing.assert_close(got.double().cpu(), want, atol=tol * 10, rtol=tol)
    else:  # the logits are rounded to bf16/fp16 by the matmul, as an LM head rounds them
        err, eager_err = [(v.double().cpu() - want).abs().max().item() for v in (got, eager)]
        assert err <= 1.5 * eager_err + 1e-5, (err, eager_err)


@pytest.mark.parametrize("dtype", HEAD_DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_gradients_match_float64(device, backend, dtype, temperature, chunk_bytes):
    # Odd H, V and rows; 30 % ignored; a bias; three chunks of 12 rows (the last one ragged).
    hidden, weight, bias = make_head((3, 11), 37, 301, dtype, device, seed=1)
    labels = make_labels((3, 11), 301, device, seed=2)
    chunk_bytes(12 * 301 * dtype.itemsize)
    upstream = make_upstream(labels.shape, device)
    h, w, b = leaves(hidden, weight, bias)
    got = linear_token_logprobs(h, w, labels, bias=b, temperature=temperature, backend=backend)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    (got * upstream).sum().backward()
    want = oracle_token(hidden, weight, bias, labels, upstream, temperature)
    eager = eager_token(hidden, weight, bias, labels, upstream, temperature)
    _check_values(got, want[0], eager[0], dtype)
    assert_grads_close((h.grad, w.grad, b.grad), want[1:], eager[1:], dtype)
    assert torch.all(h.grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_hidden_without_bias_and_frozen_parts(device, backend, dtype):
    # hidden_states[:, :-1], as a causal LM's caller passes them (rows not evenly spaced).
    full, weight, _ = make_head((2, 10), 24, 150, dtype, device, seed=3, bias=False)
    hidden = full[:, :-1]
    labels = make_labels((2, 9), 150, device, seed=4)
    upstream = make_upstream(labels.shape, device, seed=5)
    want = oracle_token(hidden, weight, None, labels, upstream)
    eager = eager_token(hidden, weight, None, labels, upstream)
    h, w = leaves(hidden, weight)
    (linear_token_logprobs(h, w, labels, backend=backend) * upstream).sum().backward()
    assert_grads_close((h.grad, w.grad), want[1:3], eager[1:3], dtype, names=("hidden", "weight"))
    # A frozen head (only hidden needs a gradient), then frozen hidden states.
    h2 = hidden.detach().clone().requires_grad_()
    (linear_token_logprobs(h2, weight, labels, backend=backend) * upstream).sum().backward()
    torch.testing.assert_close(h2.grad, h.grad, atol=0, rtol=0)
    w2 = weight.detach().clone().requires_grad_()
    (linear_token_logprobs(hidden, w2, labels, backend=backend) * upstream).sum().backward()
    torch.testing.assert_close(w2.grad, w.grad, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", HEAD_DTYPES)
def test_confident_rows(device, backend, dtype):
    # Row i's hidden state is e_i, and column i of the weight puts its target 12 above every other
    # logit: p_target = 1 − O(1e-5), where fp32 rounding of 1 − p dominates. Held, as the logits
    # kernels are, to what eager fp32 log_softmax achieves on the same logits.
    rows, vocab = 20, 97
    labels = make_labels((rows,), vocab, device, seed=6)
    weight = torch.randn(vocab, rows + 3, generator=torch.Generator().manual_seed(7))
    active = (labels != IGNORE).cpu()
    idx = torch.arange(rows)[active]
    weight[labels.cpu()[active].long(), idx] = weight[:, idx].max(0).values + 12.0
    hidden = torch.zeros(rows, rows + 3)
    hidden[torch.arange(rows), torch.arange(rows)] = 1.0
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    h, w = leaves(hidden, weight)
    got = linear_token_logprobs(h, w, labels, backend=backend)
    assert torch.all(got <= 0)
    logits = (hidden @ weight.T).float()  # exact: one nonzero term per logit
    want = naive_token_logprobs(logits.double().cpu(), labels.cpu(), dtype=torch.float64)
    eager = naive_token_logprobs(logits, labels, dtype=torch.float32)
    err, eager_err = [(v.double().cpu() - want).abs().max().item() for v in (got, eager)]
    assert err <= 1.5 * eager_err + 1e-9, (err, eager_err)
    got.sum().backward()
    ones = torch.ones(rows, device=device)
    want_grads = oracle_token(hidden, weight, None, labels, ones)
    eager_grads = eager_token(hidden, weight, None, labels, ones)
    for name, g, wg, eg in (("hidden", h.grad, want_grads[1], eager_grads[1]),
                            ("weight", w.grad, want_grads[2], eager_grads[2])):
        assert rel_err(g, wg) <= 2 * rel_err(eg, wg) + 1e-7, name


def test_sequence_logprobs_mask_and_all_masked(device, backend):
    hidden, weight, bias = make_head((4, 9), 16, 120, torch.float32, device, seed=8)
    labels = make_labels((4, 9), 120, device, seed=9)
    loss_mask = torch.ones(4, 9, dtype=torch.bool, device=device)
    loss_mask[:, :3] = False  # a prompt
    loss_mask[2] = False  # a sequence with no counted token
    h, w, b = leaves(hidden, weight, bias)
    seq = linear_sequence_logprobs(h, w, labels, loss_mask, bias=b, average=True, backend=backend)
    counted = ((labels != IGNORE) & loss_mask).cpu()
    tok = oracle_token(hidden, weight, bias, labels.masked_fill(~loss_mask, IGNORE),
                       torch.zeros(4, 9))[0]
    want = (tok * counted).sum(-1) / counted.sum(-1).clamp(min=1)
    torch.testing.assert_close(seq.double().cpu(), want, atol=1e-5, rtol=1e-5)
    assert seq[2] == 0
    seq.sum().backward()
    assert torch.isfinite(h.grad).all() and torch.all(h.grad[~loss_mask] == 0)
    # Nothing labelled at all: zeros and zero gradients, no matmul.
    none = torch.full((4, 9), IGNORE, device=device)
    h2, w2 = leaves(hidden, weight)
    out = linear_token_logprobs(h2, w2, none, backend=backend)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(h2.grad == 0) and torch.all(w2.grad == 0)


def test_no_grad_forward_and_chunking_change_nothing(device, backend, chunk_bytes):
    hidden, weight, bias = make_head((2, 3, 7), 20, 257, torch.bfloat16, device, seed=10)
    labels = make_labels((2, 3, 7), 257, device, seed=11)  # 3-D leading dims
    with torch.no_grad():
        one_chunk = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
        chunk_bytes(5 * 257 * 2)
        several = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend)
    torch.testing.assert_close(several, one_chunk, atol=0, rtol=0)
    # The logits as nn.Linear computes them (bias added inside the matmul, one rounding to bf16).
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    eager = naive_token_logprobs(logits, labels, dtype=torch.float32)
    torch.testing.assert_close(one_chunk, eager, atol=1e-5, rtol=1e-5)

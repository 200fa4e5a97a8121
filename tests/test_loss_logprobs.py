"""token_logprobs forward and gradient against the float64 reference, on every backend."""
import pytest
import torch

from loss_cases import (DTYPES, IGNORE, as_grad_input, backend_cases, interpreted, make_confident,
                        make_labels, make_logits, make_upstream, oracle_grad, oracle_logprobs,
                        rel_err, torch_same_dtype_grad)
from spin_kernels import token_logprobs
from spin_kernels.loss.torch_backend import naive_token_logprobs

pytestmark = pytest.mark.parametrize("device,backend", backend_cases())


def _check_grad(logits, labels, upstream, got, dtype, device, backend, temperature=1.0):
    want = oracle_grad(logits, labels, upstream, temperature)
    err = rel_err(got, want)
    if dtype == torch.float32:
        assert err < 1e-5, err
    else:
        # The gradient is stored in the logits' dtype: bound by what eager fp32 log_softmax gives.
        baseline = rel_err(torch_same_dtype_grad(logits, labels, upstream, temperature,
                                                 truncating_store=interpreted(device, backend)), want)
        assert err <= 2 * baseline + 1e-3, (err, baseline)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_odd_shape_several_vocab_blocks(device, backend, dtype, tol):
    # V = 32001 spans several vocab blocks with a ragged last one; T = 77 rows per sequence;
    # the logits are the usual shifted slice logits[:, :-1] (not collapsible into [N, V]).
    full = make_logits((2, 78), 32001, dtype, device)
    logits = full[:, :-1]
    labels = make_labels((2, 77), 32001, device)
    x = as_grad_input(logits)
    got = token_logprobs(x, labels, backend=backend)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got.double().cpu(), oracle_logprobs(logits, labels), atol=tol * 10,
                               rtol=tol)
    upstream = make_upstream(labels.shape, device)
    (grad,) = torch.autograd.grad((got * upstream).sum(), x)
    _check_grad(logits, labels, upstream, grad, dtype, device, backend)
    assert torch.all(grad[labels == IGNORE] == 0)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sliced_vocab_and_temperature(device, backend, dtype, tol, temperature):
    # A [..., :V] slice of a wider tensor: row stride V + 5; int32 labels.
    logits = make_logits((3, 9), 1000, dtype, device, pad_vocab=5, seed=3)
    labels = make_labels((3, 9), 1000, device, seed=4, dtype=torch.int32)
    x = as_grad_input(logits)
    got = token_logprobs(x, labels, temperature=temperature, backend=backend)
    want = oracle_logprobs(logits, labels, temperature)
    torch.testing.assert_close(got.double().cpu(), want, atol=tol * 10, rtol=tol)
    upstream = make_upstream(labels.shape, device)
    (grad,) = torch.autograd.grad((got * upstream).sum(), x)
    _check_grad(logits, labels, upstream, grad, dtype, device, backend, temperature)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_confident_rows(device, backend, dtype, tol):
    # Targets 12 above their row's max: p_target = 1 − O(1e-5), where fp32 rounding of 1 − p
    # dominates. Hold both outputs to (at most 1.5x / 2x) what eager fp32 log_softmax achieves.
    labels = make_labels((4, 6), 700, device, seed=5)
    logits = make_confident(make_logits((4, 6), 700, dtype, device, seed=6), labels, margin=12.0)
    x = logits.detach().clone().requires_grad_()
    got = token_logprobs(x, labels, backend=backend)
    assert torch.all(got <= 0)
    want = oracle_logprobs(logits, labels)
    eager = naive_token_logprobs(logits, labels, ignore_index=IGNORE, dtype=torch.float32)
    err, eager_err = [(v.double().cpu() - want).abs().max().item() for v in (got, eager)]
    assert err <= 1.5 * eager_err + 1e-9, (err, eager_err)
    upstream = torch.ones(labels.shape, device=device)
    got.sum().backward()
    want_grad = oracle_grad(logits, labels, upstream)
    eager_grad_err = rel_err(torch_same_dtype_grad(
        logits, labels, upstream, truncating_store=interpreted(device, backend)), want_grad)
    assert rel_err(x.grad, want_grad) <= 2 * eager_grad_err, eager_grad_err


def test_properties_log_prob_nonpositive_and_shift_invariant(device, backend):
    logits = make_logits((2, 5, 8), 513, torch.float32, device, scale=8.0, seed=7)
    labels = make_labels((2, 5, 8), 513, device, seed=8)  # 4-D logits
    base = token_logprobs(logits, labels, backend=backend)
    assert torch.all(base <= 0)
    shifted = token_logprobs(logits + 100.0, labels, backend=backend)
    torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-5)


def test_two_dim_logits_and_all_ignored(device, backend):
    logits = make_logits((11,), 300, torch.float32, device, seed=9)
    labels = make_labels((11,), 300, device, seed=10)
    got = token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(got.double().cpu(), oracle_logprobs(logits, labels), atol=2e-5,
                               rtol=2e-5)
    none = torch.full((11,), IGNORE, device=device)
    x = logits.detach().clone().requires_grad_()
    out = token_logprobs(x, none, backend=backend)
    out.sum().backward()
    assert torch.all(out == 0) and torch.all(x.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward(device, backend, dtype):
    logits = make_logits((2, 7), 900, dtype, device, seed=11)
    labels = make_labels((2, 7), 900, device, seed=12)
    upstream = make_upstream(labels.shape, device)
    x = logits.detach().clone().requires_grad_()
    (token_logprobs(x, labels, backend=backend) * upstream).sum().backward()
    leaf = logits.detach().clone().requires_grad_()
    work = leaf * 1  # a non-leaf: the logits a model produced
    (token_logprobs(work, labels, backend=backend, inplace_backward=True) * upstream).sum().backward()
    torch.testing.assert_close(leaf.grad, x.grad, atol=0, rtol=0)
    torch.testing.assert_close(work.detach(), x.grad, atol=0, rtol=0)  # storage reused


def test_no_grad_forward_matches(device, backend):
    logits = make_logits((3, 10), 2500, torch.bfloat16, device, seed=13)
    labels = make_labels((3, 10), 2500, device, seed=14)
    with torch.no_grad():
        got = token_logprobs(logits, labels, backend=backend)
    torch.testing.assert_close(got.double().cpu(), oracle_logprobs(logits, labels), atol=2e-4,
                               rtol=2e-5)

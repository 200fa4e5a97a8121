"""linear_spin_loss: the loss, metrics and gradients of spin_loss(hidden @ weight.T + bias), with the
gradients formed in the forward; against the logits path and the float64 oracle."""
import pytest
import torch

from head_cases import (HEAD_DTYPES, assert_grads_close, chunk_bytes, leaves,  # noqa: F401
                        make_head, oracle_spin)
from loss_cases import IGNORE, backend_cases, make_labels
from spin_kernels import linear_spin_loss, spin_loss, spin_loss_from_logps
from spin_kernels.loss.pair import pair_loss_slopes
from spin_kernels.loss.validation import LOSS_TYPES
from spin_kernels.loss.torch_backend import naive_token_logprobs

B, T, H, V = 3, 11, 29, 233


def _batch(device, dtype=torch.float32, seed=0, bias=True):
    hidden, weight, b = make_head((2 * B, T), H, V, dtype, device, seed=seed, bias=bias)
    labels = make_labels((2 * B, T), V, device, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    loss_mask = (torch.rand(2 * B, T, generator=g) > 0.2).to(device)
    loss_mask[:, :3] = False  # a prompt
    # Reference log-probs near the policy's, so that the margins are O(1) and both hinge branches occur.
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden, weight, b).float().cpu()
        ref_tok = naive_token_logprobs(logits + 0.3 * torch.randn(logits.shape, generator=g),
                                       labels.cpu(), ignore_index=IGNORE).to(device)
    counted = (labels != IGNORE) & loss_mask
    return hidden, weight, b, labels, loss_mask, ref_tok, (ref_tok * counted).sum(-1)


# Rows per chunk for the three routes of the chunk loop (pairs here have 9 to 14 labelled rows):
# every pair in one chunk; several chunks of whole pairs; pairs cut in two-pass chunks.
ROUTES = [pytest.param(10**9, id="one-chunk"), pytest.param(30, id="pair-chunks"),
          pytest.param(5, id="split-pairs")]


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("rows", ROUTES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
def test_equals_the_logits_path(device, backend, rows, loss_type, chunk_bytes):
    hidden, weight, bias, labels, loss_mask, ref_tok, _ = _batch(device, seed=3)
    chunk_bytes(rows * V * 4)
    # The trainer weights the loss for gradient accumulation: the upstream gradient is not 1.
    h, w, b = leaves(hidden, weight, bias)
    out = linear_spin_loss(h, w, labels, ref_tok, bias=b, loss_mask=loss_mask, beta=0.7,
                           loss_type=loss_type, backend=backend)
    (out.loss * 0.37).backward()
    h2, w2, b2 = leaves(hidden, weight, bias)
    want = spin_loss(torch.nn.functional.linear(h2, w2, b2), labels, ref_tok, loss_mask=loss_mask,
                     beta=0.7, loss_type=loss_type, backend=backend)
    (want.loss * 0.37).backward()
    torch.testing.assert_close(out.loss, want.loss, atol=1e-6, rtol=1e-5)
    assert set(out.metrics) == set(want.metrics)
    for name, value in want.metrics.items():
        assert not out.metrics[name].requires_grad, name
        torch.testing.assert_close(out.metrics[name], value, atol=1e-5, rtol=1e-5, msg=name)
    assert not out.policy_logps.requires_grad
    torch.testing.assert_close(out.policy_logps, want.policy_logps, atol=1e-5, rtol=1e-5)
    for name, got, ref in (("hidden", h.grad, h2.grad), ("weight", w.grad, w2.grad),
                           ("bias", b.grad, b2.grad)):
        torch.testing.assert_close(got, ref, atol=1e-7, rtol=1e-4, msg=name)
    assert torch.all(h.grad[~loss_mask] == 0)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("dtype", HEAD_DTYPES)
def test_matches_float64(device, backend, dtype, chunk_bytes):
    hidden, weight, bias, labels, loss_mask, _, ref = _batch(device, dtype, seed=10)
    chunk_bytes(30 * V * dtype.itemsize)
    h, w, b = leaves(hidden, weight, bias)
    out = linear_spin_loss(h, w, labels, ref, bias=b, loss_mask=loss_mask, beta=0.5,
                           temperature=0.8, backend=backend)
    (out.loss * 0.5).backward()
    kwargs = dict(loss_mask=loss_mask, beta=0.5, temperature=0.8, upstream=0.5)
    want = oracle_spin(hidden, weight, bias, labels, ref, **kwargs)
    eager = oracle_spin(hidden, weight, bias, labels, ref, dtype=dtype, **kwargs)
    if dtype == torch.float32:
        torch.testing.assert_close(out.loss.double().cpu(), want[0], atol=1e-5, rtol=1e-5)
    else:  # bf16/fp16 logits, as the LM head rounds them: held to eager's error
        err, eager_err = [abs(v.item() - want[0].item()) for v in (out.loss, eager[0])]
        assert err <= 1.5 * eager_err + 1e-5, (err, eager_err)
    assert_grads_close((h.grad, w.grad, b.grad), want[1:], eager[1:], dtype)


@pytest.mark.parametrize("device,backend", backend_cases())
def test_all_masked_sequences_no_bias_and_no_grad(device, backend, chunk_bytes):
    hidden, weight, _, labels, loss_mask, _, ref = _batch(device, seed=20, bias=False)
    loss_mask[1] = False  # an actual response with no counted token
    loss_mask[B + 2] = False  # a generated one
    loss_mask[0] = loss_mask[B] = False  # a whole pair
    chunk_bytes(12 * V * 4)
    h, w = leaves(hidden, weight)
    out = linear_spin_loss(h, w, labels, ref, loss_mask=loss_mask, beta=0.3, backend=backend)
    out.loss.backward()
    want = oracle_spin(hidden, weight, None, labels, ref, loss_mask=loss_mask, beta=0.3)
    torch.testing.assert_close(out.loss.double().cpu(), want[0], atol=1e-5, rtol=1e-5)
    assert_grads_close((h.grad, w.grad), want[1:3], (None, None), torch.float32,
                       names=("hidden", "weight"))
    assert torch.all(h.grad[[0, 1, B, B + 2]] == 0)
    with torch.no_grad():  # reference log-probs, validation: no gradient formed
        again = linear_spin_loss(hidden, weight, labels, ref, loss_mask=loss_mask, beta=0.3,
                                 backend=backend)
    torch.testing.assert_close(again.loss, out.loss.detach())
    assert again.loss.grad_fn is None


def test_second_backward_is_refused_not_scaled_twice(chunk_bytes):
    hidden, weight, bias, labels, loss_mask, _, ref = _batch("cpu", seed=30)
    h, w, b = leaves(hidden, weight, bias)
    out = linear_spin_loss(h, w, labels, ref, bias=b, loss_mask=loss_mask, backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_pair_slopes_are_the_gradient_of_spin_loss_from_logps(loss_type):
    # The forward forms the gradient from these slopes; they must be the pair loss's own gradient
    # (a new loss type in pair.py fails here until the slopes know it).
    g = torch.Generator().manual_seed(40)
    policy = (torch.randn(8, generator=g) * 3 - 50).requires_grad_()
    ref = torch.randn(8, generator=g) * 3 - 50
    with torch.no_grad():  # pair 1 sits on the hinge's kink: margin = 0.5·(2 − 0) = 1 exactly
        policy[1], ref[1], policy[5], ref[5] = -50.0, -52.0, -40.0, -40.0
    beta = torch.tensor(0.5)
    loss = spin_loss_from_logps(policy, ref, beta=beta, loss_type=loss_type).loss
    (want,) = torch.autograd.grad(loss, policy)
    got = sum(pair_loss_slopes(policy.detach(), ref, beta, loss_type, p, p + 1) for p in range(4))
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-6)

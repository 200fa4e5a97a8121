"""Shared helpers for the fused-head tests: LM-head inputs, the float64 oracle, the eager baseline."""
import pytest
import torch

from loss_cases import IGNORE, rel_err
from spin_kernels.loss.ops import linear_logprobs
from spin_kernels.loss.torch_backend import naive_spin_loss, naive_token_logprobs

# (dtype, tolerance of the forward log-probs vs float64 on the same rounded inputs, once the
# logits themselves are exact: fp32 only; bf16/fp16 logits are rounded by the matmul, as an LM
# head rounds them, and are held to eager PyTorch's error instead).
HEAD_DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.bfloat16, id="bf16"),
    pytest.param(torch.float16, id="fp16"),
]


def make_head(rows_shape, hidden_size, vocab, dtype, device, *, seed=0, bias=True, scale=3.0):
    """(hidden [..., H], weight [V, H], bias [V] or None) whose logits have std ≈ `scale`."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*rows_shape, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * (scale / hidden_size ** 0.5)
    b = torch.randn(vocab, generator=g) if bias else None
    to = dict(device=device, dtype=dtype)
    return hidden.to(**to), weight.to(**to), None if b is None else b.to(**to)


def leaves(*tensors):
    """Fresh leaves requiring grad (None stays None)."""
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def head_logits(hidden, weight, bias, dtype=None):
    """hidden @ weight.T + bias, in `dtype` (default: the inputs', as an LM head computes them)."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    logits = hidden @ weight.T
    return logits if bias is None else logits + bias


def oracle_token(hidden, weight, bias, labels, upstream, temperature=1.0):
    """float64 (log-probs, d hidden, d weight, d bias) of Σ upstream · log-prob, on the CPU."""
    h, w, b = leaves(*(None if t is None else t.detach().cpu().double()
                       for t in (hidden, weight, bias)))
    logp = naive_token_logprobs(head_logits(h, w, b), labels.cpu(), ignore_index=IGNORE,
                                temperature=temperature, dtype=torch.float64)
    (logp * upstream.cpu().double()).sum().backward()
    return logp.detach(), h.grad, w.grad, None if b is None else b.grad


def eager_token(hidden, weight, bias, labels, upstream, temperature=1.0):
    """What a user gets today: the head in the inputs' dtype, fp32 log_softmax, autograd."""
    h, w, b = leaves(hidden, weight, bias)
    logp = naive_token_logprobs(head_logits(h, w, b), labels, ignore_index=IGNORE,
                                temperature=temperature, dtype=torch.float32)
    (logp * upstream.float()).sum().backward()
    return logp.detach(), h.grad, w.grad, None if b is None else b.grad


def oracle_spin(hidden, weight, bias, labels, ref, *, loss_mask=None, beta=0.1, loss_type="sigmoid",
                temperature=1.0, dtype=torch.float64, upstream=1.0):
    """(loss, d hidden, d weight, d bias) of the textbook SPIN loss on hidden @ weight.T + bias, in
    `dtype` (float64: the oracle; the inputs' dtype with fp32 log_softmax: the eager baseline)."""
    dev = "cpu" if dtype == torch.float64 else hidden.device
    exact = dtype == torch.float64
    h, w, b = leaves(*(None if t is None else (t.detach().cpu().double() if exact else t)
                       for t in (hidden, weight, bias)))
    logits = head_logits(h, w, b)
    loss, _ = naive_spin_loss(logits, labels.to(dev), ref.to(dev),
                              loss_mask=None if loss_mask is None else loss_mask.to(dev), beta=beta,
                              loss_type=loss_type, ignore_index=IGNORE, temperature=temperature,
                              dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad, None if b is None else b.grad


def assert_grads_close(got, want, eager, dtype, names=("hidden", "weight", "bias"), factor=2.0):
    """fp32: rel. error < 1e-5 vs float64; bf16/fp16: at most `factor` x eager's error + 1e-3."""
    for name, g, w, e in zip(names, got, want, eager):
        if w is None:
            assert g is None, name
            continue
        err = rel_err(g, w)
        if dtype == torch.float32:
            assert err < 1e-5, (name, err)
        else:
            base = rel_err(e, w)
            assert err <= factor * base + 1e-3, (name, err, base)


@pytest.fixture
def chunk_bytes(monkeypatch):
    """Sets linear_logprobs.CHUNK_BYTES for one test (the chunk loop's routes at tiny shapes)."""
    def set_bytes(value):
        monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", value)
    return set_bytes

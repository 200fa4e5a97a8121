"""Shared helpers for the loss tests: (device, backend) cases, input makers, error measures."""
import os

import pytest
import torch

from spin_kernels.loss.torch_backend import naive_token_logprobs

IGNORE = -100


def backend_cases():
    """Every (device, backend) pair that can run here; CUDA pairs carry the `cuda` mark."""
    cases = [pytest.param("cpu", "torch", id="cpu-torch")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        cases.append(pytest.param("cpu", "triton", id="cpu-triton-interpreter"))
    cuda = pytest.mark.cuda
    cases += [pytest.param("cuda", "triton", id="cuda-triton", marks=cuda),
              pytest.param("cuda", "torch", id="cuda-torch", marks=cuda)]
    return cases


# (dtype, tolerance of the forward log-probs vs float64 on the same rounded inputs). The kernels
# convert every input to fp32 at once, so the forward is fp32-accurate whatever the input dtype.
DTYPES = [
    pytest.param(torch.float32, 2e-5, id="fp32"),
    pytest.param(torch.bfloat16, 2e-5, id="bf16"),
    pytest.param(torch.float16, 2e-5, id="fp16"),
]


def make_logits(rows_shape, vocab, dtype, device, *, scale=3.0, seed=0, pad_vocab=0):
    """Random logits; with `pad_vocab`, a [..., :vocab] slice of a wider tensor (row stride != V)."""
    g = torch.Generator().manual_seed(seed)
    wide = torch.randn(*rows_shape, vocab + pad_vocab, generator=g) * scale
    return wide.to(device=device, dtype=dtype)[..., :vocab]


def as_grad_input(logits):
    """A differentiable tensor with the values *and strides* of `logits`: for a view (a shifted or
    vocab-sliced slice), a view of a fresh leaf, so that the op under test sees the strides.
    Take its gradient with torch.autograd.grad."""
    if logits._base is None:
        return logits.detach().clone().requires_grad_()
    base = logits._base.detach().clone().requires_grad_()
    view = base.as_strided(logits.shape, logits.stride(), logits.storage_offset())
    assert view.stride() == logits.stride() and not view.is_contiguous()
    return view


def make_labels(rows_shape, vocab, device, *, ignored=0.3, seed=1, dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, rows_shape, generator=g)
    labels[torch.rand(rows_shape, generator=g) < ignored] = IGNORE
    return labels.to(device=device, dtype=dtype)


def make_confident(logits, labels, margin=40.0):
    """Put each target `margin` above its row's max: p_target -> 1 within fp32 rounding."""
    out = logits.float().clone()
    rows = out.reshape(-1, out.shape[-1])
    flat = labels.reshape(-1)
    active = flat != IGNORE
    idx = torch.arange(flat.numel(), device=flat.device)[active]
    rows[idx, flat[active].long()] = rows[active].max(-1).values + margin
    return out.to(logits.dtype)


def oracle_logprobs(logits, labels, temperature=1.0):
    return naive_token_logprobs(logits.cpu(), labels.cpu(), ignore_index=IGNORE,
                                temperature=temperature, dtype=torch.float64)


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def torch_same_dtype_grad(logits, labels, upstream, temperature=1.0, *, truncating_store=False):
    """Gradient a user gets today: eager fp32 log_softmax on these logits, grad in their dtype.

    `truncating_store`: round to bfloat16 by truncation, as the Triton interpreter's stores do
    (a GPU rounds to nearest even), so that kernel and baseline are held to the same rounding.
    """
    x = logits.detach().float().clone().requires_grad_()
    logp = naive_token_logprobs(x, labels, ignore_index=IGNORE, temperature=temperature,
                                dtype=torch.float32)
    (logp * upstream.float()).sum().backward()
    grad = x.grad
    if truncating_store and logits.dtype == torch.bfloat16:
        grad = (grad.view(torch.int32) & ~0xFFFF).view(torch.float32)  # exact in bfloat16
    return grad.to(logits.dtype)


def interpreted(device, backend):
    """True where the kernels run under the Triton interpreter (CPU tensors, triton backend)."""
    return backend == "triton" and torch.device(device).type == "cpu"


def make_upstream(shape, device, seed=7):
    """A fixed random upstream gradient (the global RNG would make the inputs depend on test order)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device)


def oracle_grad(logits, labels, upstream, temperature=1.0):
    x = logits.detach().cpu().double().requires_grad_()
    logp = naive_token_logprobs(x, labels.cpu(), ignore_index=IGNORE, temperature=temperature,
                                dtype=torch.float64)
    (logp * upstream.cpu().double()).sum().backward()
    return x.grad

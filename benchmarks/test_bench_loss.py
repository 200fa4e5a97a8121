"""pytest-benchmark suite: the torch backend of spin_loss against eager fp32 log_softmax, on the CPU.

    .venv/bin/python -m pytest benchmarks/test_bench_loss.py              # timings
CI runs it with --benchmark-disable (each case once), where it checks both against the float64
loss and gradient.
"""
import pytest
import torch

from spin_kernels import spin_loss
from spin_kernels.loss.torch_backend import naive_spin_loss

SHAPES = [(4, 256, 8000), (2, 128, 32000)]  # (sequences, tokens, vocab)


def _batch(n_seq, seq_len, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(n_seq, seq_len, vocab, generator=g) * 2).bfloat16()
    labels = torch.randint(0, vocab, (n_seq, seq_len), generator=g)
    loss_mask = torch.ones(n_seq, seq_len, dtype=torch.bool)
    loss_mask[:, : int(0.3 * seq_len)] = False
    ref = torch.randn(n_seq, generator=g) - seq_len * 8
    return logits, labels, loss_mask, ref


def _eager(x, labels, loss_mask, ref):
    return naive_spin_loss(x, labels, ref, loss_mask=loss_mask, beta=0.1)[0]


def _ours(x, labels, loss_mask, ref):
    return spin_loss(x, labels, ref, loss_mask=loss_mask, beta=0.1, backend="torch").loss


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("impl", [_eager, _ours], ids=["eager_fp32", "spin_kernels_torch"])
def test_fwd_bwd(benchmark, impl, shape):
    logits, labels, loss_mask, ref = _batch(*shape)
    x = logits.clone().requires_grad_()

    def step():
        loss = impl(x, labels, loss_mask, ref)
        (grad,) = torch.autograd.grad(loss, x)
        return loss, grad

    loss, grad = benchmark(step)
    exact = logits.double().requires_grad_()
    want = naive_spin_loss(exact, labels, ref, loss_mask=loss_mask, beta=0.1, dtype=torch.float64)[0]
    (want_grad,) = torch.autograd.grad(want, exact)
    torch.testing.assert_close(loss.double(), want.detach(), atol=1e-4, rtol=1e-5)
    # dlogits come back in bf16, the logits' dtype: each value is the float64 one rounded (or
    # computed in fp32, then rounded), so the error norm is at most bf16's unit roundoff 2^-8 of the
    # gradient's norm; masked positions get exactly zero.
    assert grad.dtype == torch.bfloat16 and grad.shape == logits.shape
    assert ((grad.double() - want_grad).norm() / want_grad.norm()).item() <= 2**-8
    assert torch.all(grad[~loss_mask] == 0)

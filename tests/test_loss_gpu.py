"""GPU-only checks: offsets past 2**31 elements, at a training-size vocabulary."""
import pytest
import torch

from loss_cases import IGNORE, oracle_grad, oracle_logprobs, rel_err, torch_same_dtype_grad
from spin_kernels import token_logprobs


@pytest.mark.cuda
def test_rows_past_int32_offsets():
    n, vocab = 17000, 128256  # n * vocab = 2.18e9 > 2**31: rows from 16,744 on need int64 offsets
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, device="cuda", generator=g) * 3).bfloat16()
    labels = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    labels[torch.rand(n, device="cuda", generator=g) < 0.3] = IGNORE
    upstream = torch.randn(n, device="cuda", generator=g)
    x = logits.clone().requires_grad_()
    logp = token_logprobs(x, labels)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), x)
    del x
    for rows in (slice(0, 64), slice(n - 200, n)):
        torch.testing.assert_close(logp[rows].double().cpu(),
                                   oracle_logprobs(logits[rows], labels[rows]), atol=2e-4, rtol=2e-5)
        want = oracle_grad(logits[rows], labels[rows], upstream[rows])
        baseline = rel_err(torch_same_dtype_grad(logits[rows], labels[rows], upstream[rows]), want)
        assert rel_err(grad[rows], want) <= 2 * baseline + 1e-3

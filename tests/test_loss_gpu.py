"""GPU-only checks: offsets past 2**31 elements, and the fused head, at a training-size vocabulary."""
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


@pytest.mark.cuda
def test_fused_head_at_a_training_vocab(monkeypatch):
    # bf16 at V = 128256, one pair a chunk: d weight accumulated in fp32 by cuBLAS (bf16 operands,
    # fp32 accumulator), two chunks. Equal to the logits path, and as close to float64.
    from spin_kernels import linear_spin_loss, spin_loss
    from spin_kernels.loss.ops import linear_logprobs
    from spin_kernels.loss.torch_backend import naive_spin_loss

    pairs, seq_len, hidden_size, vocab = 2, 512, 256, 128256
    monkeypatch.setattr(linear_logprobs, "CHUNK_BYTES", 800 * vocab * 2)  # pairs have ~720 rows
    g = torch.Generator(device="cuda").manual_seed(1)
    hidden = torch.randn(2 * pairs, seq_len, hidden_size, device="cuda", generator=g).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=g) * 0.2).bfloat16()
    labels = torch.randint(0, vocab, (2 * pairs, seq_len), device="cuda", generator=g)
    loss_mask = torch.rand(2 * pairs, seq_len, device="cuda", generator=g) > 0.1
    loss_mask[:, : seq_len // 4] = False
    ref = torch.randn(2 * pairs, device="cuda", generator=g) - 4000
    grads = {}
    for name in ("fused", "logits", "float64"):
        h = (hidden.double() if name == "float64" else hidden).clone().requires_grad_()
        w = (weight.double() if name == "float64" else weight).clone().requires_grad_()
        if name == "fused":
            out = linear_spin_loss(h, w, labels, ref, loss_mask=loss_mask, beta=0.1)
            loss, metrics = out.loss, out.metrics
        elif name == "logits":
            out = spin_loss(torch.nn.functional.linear(h, w), labels, ref, loss_mask=loss_mask,
                            beta=0.1)
            loss, metrics = out.loss, out.metrics
        else:
            loss, _ = naive_spin_loss(h @ w.T, labels, ref, loss_mask=loss_mask, beta=0.1,
                                      dtype=torch.float64)
        (loss * 0.5).backward()
        grads[name] = (loss.detach(), metrics if name != "float64" else None, h.grad, w.grad)
        del h, w
    fused, logits, exact = grads["fused"], grads["logits"], grads["float64"]
    torch.testing.assert_close(fused[0], logits[0], atol=1e-4, rtol=1e-4)
    for key in fused[1]:
        torch.testing.assert_close(fused[1][key], logits[1][key], atol=1e-3, rtol=1e-4, msg=key)
    for i, part in ((2, "hidden"), (3, "weight")):
        baseline = rel_err(logits[i], exact[i])
        assert rel_err(fused[i], exact[i]) <= 1.5 * baseline + 1e-4, (part, baseline)

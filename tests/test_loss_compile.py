"""torch.compile(fullgraph=True) traces training functions that call spin_loss and the fused head."""
import pytest
import torch

from loss_cases import backend_cases, make_labels, make_logits
from spin_kernels import linear_spin_loss, linear_token_logprobs, spin_loss, spin_loss_from_logps


@pytest.mark.parametrize("device,backend", backend_cases())
def test_fullgraph_compile_matches_eager(device, backend):
    logits = make_logits((4, 7), 600, torch.float32, device, seed=1)
    labels = make_labels((4, 7), 600, device, seed=2)
    ref = torch.randn(4, device=device) - 40

    def loss_fn(x):
        out = spin_loss(x, labels, ref, beta=0.2, backend=backend)
        return out.loss, out.metrics["acc"]

    # aot_eager runs dynamo + AOTAutograd (the custom ops' fake implementations, the autograd
    # Function) without inductor's code generation, which is not what is under test.
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    x_eager = logits.clone().requires_grad_()
    loss_eager, acc_eager = loss_fn(x_eager)
    loss_eager.backward()
    x_comp = logits.clone().requires_grad_()
    loss_comp, acc_comp = compiled(x_comp)
    loss_comp.backward()
    torch.testing.assert_close(loss_comp, loss_eager)
    torch.testing.assert_close(acc_comp, acc_eager)
    torch.testing.assert_close(x_comp.grad, x_eager.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fullgraph_compile_takes_a_tensor_beta_without_reading_it(device):
    # β as a graph input: a new value does not recompile, and the check cannot read it on the host
    # inside the graph (fullgraph would fail on the graph break); a bad β gives a NaN loss.
    policy = torch.randn(6, device=device)
    ref = torch.randn(6, device=device)

    def loss_fn(beta):
        return spin_loss_from_logps(policy, ref, beta=beta).loss

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for value in (0.2, 0.5):
        beta = torch.tensor(value, device=device)
        torch.testing.assert_close(compiled(beta), loss_fn(value))
    assert torch.isnan(compiled(torch.tensor(-0.5, device=device)))
    assert torch.isnan(compiled(torch.tensor(float("inf"), device=device)))


@pytest.mark.parametrize("device,backend", backend_cases())
def test_fused_head_fullgraph_compile_matches_eager(device, backend):
    # The chunk loops are custom ops with fake implementations: dynamo traces through them.
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(4, 7, 16, generator=g).to(device)
    weight = (torch.randn(300, 16, generator=g) * 0.7).to(device)
    bias = torch.randn(300, generator=g).to(device)
    labels = make_labels((4, 7), 300, device, seed=4)
    ref = torch.randn(4, device=device) - 40

    def loss_fn(h, w, b):
        out = linear_spin_loss(h, w, labels, ref, bias=b, beta=0.2, backend=backend)
        tok = linear_token_logprobs(h, w, labels, bias=b, backend=backend)
        return out.loss * 0.5 + tok.mean(), out.metrics["acc"]

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, acc = fn(*leaves)
        loss.backward()
        grads.append((loss, acc, *(t.grad for t in leaves)))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)

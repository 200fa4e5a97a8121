"""torch.compile(fullgraph=True) traces a training function that calls spin_loss."""
import pytest
import torch

from loss_cases import backend_cases, make_labels, make_logits
from spin_kernels import spin_loss


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

"""spin_loss / sequence_logprobs / SpinLoss against autograd of the float64 formula."""
import pytest
import torch
import torch.nn.functional as F

from loss_cases import IGNORE, as_grad_input, backend_cases, make_labels, make_logits, rel_err
from spin_kernels import SpinLoss, sequence_logprobs, spin_loss, spin_loss_from_logps
from spin_kernels.loss.torch_backend import naive_spin_loss, naive_token_logprobs

pytestmark = pytest.mark.parametrize("device,backend", backend_cases())

B, T, V = 3, 13, 1500


def _batch(device, dtype=torch.float32, seed=0):
    # The shifted slice a causal LM's caller passes: logits[:, :-1] (rows not evenly spaced).
    logits = make_logits((2 * B, T + 1), V, dtype, device, seed=seed)[:, :-1]
    labels = make_labels((2 * B, T), V, device, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    loss_mask = (torch.rand(2 * B, T, generator=g) > 0.25).to(device)
    loss_mask[:, : T // 4] = False  # a prompt
    return logits, labels, loss_mask


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("per_token_ref", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_and_gradient_match_float64(device, backend, loss_type, per_token_ref, dtype):
    logits, labels, loss_mask = _batch(device, dtype)
    g = torch.Generator().manual_seed(5)
    # Reference log-probs near the policy's so that the margin is O(1) and both hinge branches occur.
    ref_tok = naive_token_logprobs(logits.float().cpu() + 0.3 * torch.randn(logits.shape, generator=g),
                                   labels.cpu(), ignore_index=IGNORE).to(device)
    counted = (labels != IGNORE) & loss_mask
    ref = ref_tok if per_token_ref else (ref_tok * counted).sum(-1)
    beta = 0.5
    x = as_grad_input(logits)
    out = spin_loss(x, labels, ref, loss_mask=loss_mask, beta=beta, loss_type=loss_type,
                    backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)

    xd = logits.detach().cpu().double().requires_grad_()
    want, policy = naive_spin_loss(xd, labels.cpu(), ref.cpu(), loss_mask=loss_mask.cpu(),
                                   beta=beta, loss_type=loss_type, dtype=torch.float64)
    want.backward()
    torch.testing.assert_close(out.loss.double().cpu(), want.detach(), atol=1e-5, rtol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16: one rounding of each gradient value
    assert rel_err(grad, xd.grad) < tol
    assert torch.all(grad[~counted] == 0)


def test_metrics(device, backend):
    logits, labels, loss_mask = _batch(device, seed=10)
    ref = torch.randn(2 * B, device=device) * 5 - 60
    beta = 0.2
    out = spin_loss(logits, labels, ref, loss_mask=loss_mask, beta=beta, backend=backend)
    policy = naive_token_logprobs(logits.cpu(), labels.cpu(), ignore_index=IGNORE,
                                  dtype=torch.float64)
    policy = (policy * loss_mask.cpu()).sum(-1)
    rewards = beta * (policy - ref.cpu().double())
    margin = rewards[:B] - rewards[B:]
    want = {
        "acc": (margin > 0).double().mean(),
        "rewards_actual_mean": rewards[:B].mean(),
        "rewards_generated_mean": rewards[B:].mean(),
        "rewards_all_mean": rewards.mean(),
        "rewards_all_std": rewards.std(),  # Bessel-corrected, as NeMo-Aligner logs it
        "margin_mean": margin.mean(),
        "logps_actual_mean": policy[:B].mean(),
        "logps_generated_mean": policy[B:].mean(),
    }
    assert set(out.metrics) == set(want)
    for name, value in want.items():
        got = out.metrics[name]
        assert not got.requires_grad and got.dim() == 0, name
        torch.testing.assert_close(got.double().cpu(), value, atol=1e-4, rtol=1e-5, msg=name)
    torch.testing.assert_close(out.loss.double().cpu(), -F.logsigmoid(margin).mean(), atol=1e-5,
                               rtol=1e-5)
    # The per-sequence log-probs a trainer takes the global rewards' statistics from.
    assert not out.policy_logps.requires_grad and out.policy_logps.shape == (2 * B,)
    torch.testing.assert_close(out.policy_logps.double().cpu(), policy, atol=1e-4, rtol=1e-5)


def test_rewards_all_std_is_bessel_corrected(device, backend):
    # rewards 0.5 * ([3, 1, -1, 1] - 0) = [1.5, 0.5, -0.5, 0.5]: mean 0.5, Σ(r - mean)² = 2, / (4 - 1)
    out = spin_loss_from_logps(torch.tensor([3.0, 1.0, -1.0, 1.0], device=device), torch.zeros(4, device=device),
                               beta=0.5)
    torch.testing.assert_close(out.metrics["rewards_all_std"].cpu(), torch.tensor((2 / 3) ** 0.5))
    torch.testing.assert_close(out.metrics["rewards_all_mean"].cpu(), torch.tensor(0.5))


def test_all_masked_sequence(device, backend):
    logits, labels, loss_mask = _batch(device, seed=20)
    loss_mask[1] = False  # an actual response with no counted token
    x = as_grad_input(logits)
    out = spin_loss(x, labels, torch.zeros(2 * B, device=device), loss_mask=loss_mask,
                    backend=backend)
    (grad,) = torch.autograd.grad(out.loss, x)
    assert torch.isfinite(out.loss) and torch.isfinite(grad).all()
    assert torch.all(grad[1] == 0)
    seq = sequence_logprobs(logits, labels, loss_mask, average=True, backend=backend)
    assert seq[1] == 0
    counted = (labels != IGNORE) & loss_mask
    tok = naive_token_logprobs(logits.cpu(), labels.cpu(), ignore_index=IGNORE, dtype=torch.float64)
    want = (tok * counted.cpu()).sum(-1) / counted.sum(-1).clamp(min=1).cpu()
    torch.testing.assert_close(seq.double().cpu(), want, atol=1e-5, rtol=1e-5)


def test_module_and_from_logps_agree(device, backend):
    logits, labels, loss_mask = _batch(device, seed=30)
    ref = torch.randn(2 * B, device=device) - 40
    module = SpinLoss(beta=0.1, backend=backend)
    module.beta = 0.3  # a new iteration's β
    out = module(logits, labels, ref, loss_mask=loss_mask)
    policy = sequence_logprobs(logits, labels, loss_mask, backend=backend)
    direct = spin_loss_from_logps(policy, ref, beta=0.3)
    torch.testing.assert_close(out.loss, direct.loss)
    for name in direct.metrics:
        torch.testing.assert_close(out.metrics[name], direct.metrics[name])

"""SpinLossOutput.rewards: β·(π − ref) per sequence from every entry point, against the float64
oracle, consistent with the metrics, and enough for a trainer's global-batch statistics."""
import pytest
import torch
import torch.nn.functional as F

from head_cases import head_logits, make_head
from loss_cases import IGNORE, backend_cases, make_labels
from spin_kernels import (SpinLoss, linear_spin_loss, sequence_logprobs, spin_loss,
                          spin_loss_from_logps)
from spin_kernels.loss.torch_backend import naive_token_logprobs

B, T, H, V = 3, 9, 16, 97


def _batch(device, seed=0):
    hidden, weight, bias = make_head((2 * B, T), H, V, torch.float32, device, seed=seed)
    labels = make_labels((2 * B, T), V, device, seed=seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    loss_mask = (torch.rand(2 * B, T, generator=g) > 0.2).to(device)
    loss_mask[:, :2] = False  # a prompt
    # Per-token reference log-probs near the policy's: rewards of both signs.
    with torch.no_grad():
        logits = head_logits(hidden, weight, bias).cpu()
        ref_tok = naive_token_logprobs(logits + 0.5 * torch.randn(logits.shape, generator=g),
                                       labels.cpu(), ignore_index=IGNORE).to(device)
    return hidden, weight, bias, labels, loss_mask, ref_tok


def _oracle_policy(hidden, weight, bias, labels, loss_mask):
    """float64 per-sequence masked sums of the log-probs, on the CPU."""
    logits = head_logits(*(t.detach().cpu().double() for t in (hidden, weight, bias)))
    tok = naive_token_logprobs(logits, labels.cpu(), ignore_index=IGNORE, dtype=torch.float64)
    return (tok * loss_mask.cpu()).sum(-1)


def _logits(h, w, b):
    return F.linear(h, w, b)


@torch.no_grad()
def _linear_no_grad(h, w, b, y, m, ref, ref_tok, kw):  # reference log-probs, validation
    return linear_spin_loss(h, w, y, ref, bias=b, loss_mask=m, **kw)


# Every entry point that returns a SpinLossOutput; `ref` is [2B] sums, `ref_tok` [2B, T].
ENTRIES = {
    "spin_loss": lambda h, w, b, y, m, ref, ref_tok, kw: spin_loss(
        _logits(h, w, b), y, ref_tok, loss_mask=m, **kw),
    "SpinLoss": lambda h, w, b, y, m, ref, ref_tok, kw: SpinLoss(
        kw["beta"], kw["loss_type"], backend=kw["backend"])(_logits(h, w, b), y, ref, loss_mask=m),
    "spin_loss_from_logps": lambda h, w, b, y, m, ref, ref_tok, kw: spin_loss_from_logps(
        sequence_logprobs(_logits(h, w, b), y, m, backend=kw["backend"]), ref,
        beta=kw["beta"], loss_type=kw["loss_type"]),
    "linear_spin_loss": lambda h, w, b, y, m, ref, ref_tok, kw: linear_spin_loss(
        h, w, y, ref, bias=b, loss_mask=m, **kw),
    "linear_spin_loss per-token ref": lambda h, w, b, y, m, ref, ref_tok, kw: linear_spin_loss(
        h, w, y, ref_tok, bias=b, loss_mask=m, **kw),
    "linear_spin_loss no_grad": _linear_no_grad,
}


def _call(entry, device, backend, *, loss_type="sigmoid", beta=0.3, grad=True, seed=0):
    hidden, weight, bias, labels, loss_mask, ref_tok = _batch(device, seed)
    ref = (ref_tok * ((labels != IGNORE) & loss_mask)).sum(-1)
    h, w, b = (t.detach().clone().requires_grad_(grad) for t in (hidden, weight, bias))
    kw = dict(beta=beta, loss_type=loss_type, backend=backend)
    out = ENTRIES[entry](h, w, b, labels, loss_mask, ref, ref_tok, kw)
    return out, _oracle_policy(hidden, weight, bias, labels, loss_mask), ref


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge"])
@pytest.mark.parametrize("entry", list(ENTRIES))
def test_rewards_are_beta_times_policy_minus_ref(device, backend, loss_type, entry):
    beta = 0.3
    out, policy, ref = _call(entry, device, backend, loss_type=loss_type, beta=beta)
    want = beta * (policy - ref.cpu().double())  # rows [0, B) actual, [B, 2B) generated
    assert want.min() < 0 < want.max()  # both signs occur: a flipped sign cannot pass
    rewards = out.rewards
    assert rewards.dtype == torch.float32 and rewards.shape == (2 * B,)
    assert not rewards.requires_grad and rewards.device == out.loss.device
    torch.testing.assert_close(rewards.double().cpu(), want, atol=1e-4, rtol=1e-5)
    # Fields in their order, rewards last: a trainer may unpack the first three positionally.
    assert out._fields == ("loss", "metrics", "policy_logps", "rewards")
    torch.testing.assert_close(out.policy_logps.double().cpu(), policy, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("device,backend", backend_cases())
@pytest.mark.parametrize("entry", ["spin_loss", "linear_spin_loss"])
def test_rewards_give_the_metrics(device, backend, entry):
    out, _, _ = _call(entry, device, backend, beta=0.7, seed=10)
    r, m = out.rewards, out.metrics
    margin = r[:B] - r[B:]
    for name, value in (("rewards_all_mean", r.sum() / (2 * B)), ("rewards_all_std", r.std()),
                        ("rewards_actual_mean", r[:B].mean()),
                        ("rewards_generated_mean", r[B:].mean()),
                        ("margin_mean", margin.mean()), ("acc", (margin > 0).float().mean())):
        torch.testing.assert_close(m[name], value, atol=1e-6, rtol=1e-6, msg=name)


def test_rewards_of_micro_batches_give_the_global_batch_statistics():
    # A trainer splits a global batch into micro-batches of pairs and logs the rewards' mean and
    # Bessel-corrected std of the whole batch from the micro-batches' rewards (Σr, Σr², count).
    g = torch.Generator().manual_seed(50)
    pairs = 6
    policy = torch.randn(2 * pairs, generator=g) * 4 - 60
    ref = policy + torch.randn(2 * pairs, generator=g)
    whole = spin_loss_from_logps(policy, ref, beta=0.4)
    sums = torch.zeros(3, dtype=torch.float64)
    for part in (slice(0, 2), slice(2, 3), slice(3, 6)):  # uneven micro-batches of pairs
        rows = torch.cat([torch.arange(pairs)[part], pairs + torch.arange(pairs)[part]])
        r = spin_loss_from_logps(policy[rows], ref[rows], beta=0.4).rewards.double()
        sums += torch.stack([r.new_tensor(r.numel()), r.sum(), r.square().sum()])
    count, total, squares = sums
    mean = total / count
    std = ((squares - count * mean ** 2) / (count - 1)).sqrt()
    for got, name in ((mean, "rewards_all_mean"), (std, "rewards_all_std")):
        torch.testing.assert_close(got.float(), whole.metrics[name], atol=1e-5, rtol=1e-5, msg=name)

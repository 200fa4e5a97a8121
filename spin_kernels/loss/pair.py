"""The SPIN pair loss from per-sequence log-probs, and its metrics.

    rewards = β·(π − ref)                     per sequence, [2B]: rows [0, B) actual, [B, 2B) generated
    margin  = rewards_actual − rewards_generated
    loss    = mean −log σ(margin)  (sigmoid, the paper)   or   mean relu(1 − margin)  (hinge)

Every entry point (logits, hidden states) ends here, so the loss, the metrics and the rewards
are one code; `pair_loss_slopes` is the loss's gradient, which the fused head forms in its forward.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from spin_kernels.loss.validation import check_loss_args


class SpinLossOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, torch.Tensor]  # detached scalars; reading them is the caller's host sync
    # [2B] detached per-sequence policy log-prob sums.
    policy_logps: Optional[torch.Tensor] = None
    # [2B] detached float32 β·(π − ref) per sequence, rows [0, B) actual, [B, 2B) generated: what
    # a trainer takes the rewards' statistics from over a batch larger than one call (Σr, Σr² for
    # the global rewards_all_std), never recomputing them.
    rewards: Optional[torch.Tensor] = None


def spin_loss_from_logps(policy_logps: torch.Tensor, ref_logps: torch.Tensor, *,
                         beta=0.1, loss_type: str = "sigmoid") -> SpinLossOutput:
    """SPIN loss from per-sequence log-probs `[2B]`: rows [0, B) actual, [B, 2B) generated.

    Metrics (0-dim float tensors of this call's batch, no host sync): `acc` (fraction of pairs with
    margin > 0), `rewards_actual_mean`, `rewards_generated_mean`, `rewards_all_mean`,
    `rewards_all_std`, `margin_mean`, `logps_actual_mean`, `logps_generated_mean`. Rewards
    include β. `policy_logps` is the input, detached; `rewards` is β·(π − ref) per sequence,
    detached, float32.
    `beta`: a number or a 0-dim tensor, > 0 (see `validation.check_loss_args` for a tensor on a
    device). `rewards_all_std` is the Bessel-corrected (correction=1, as `torch.std`) standard
    deviation of all 2B rewards, as NeMo-Aligner logs it; a trainer that splits a batch into
    micro-batches takes it from the whole batch's `rewards` (Σr, Σr², count), not as a mean of
    per-call values.
    """
    beta = check_loss_args(beta, loss_type)
    if policy_logps.dim() != 1 or policy_logps.shape[0] % 2 or policy_logps.shape[0] == 0:
        raise ValueError("policy_logps must be [2B] (B actual rows, then B generated rows), got "
                         f"shape {tuple(policy_logps.shape)}")
    if tuple(ref_logps.shape) != tuple(policy_logps.shape):
        raise ValueError(f"ref_logps must match policy_logps {tuple(policy_logps.shape)}, got "
                         f"{tuple(ref_logps.shape)}")
    return pair_loss(policy_logps, ref_logps, beta, loss_type)


def pair_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, beta,
              loss_type: str) -> SpinLossOutput:
    """`spin_loss_from_logps` on arguments its public caller has checked (β from
    `check_loss_args`, both log-probs [2B])."""
    half = policy_logps.shape[0] // 2
    rewards = beta * (policy_logps - ref_logps.detach().to(policy_logps.dtype))  # [2B]
    margin = rewards[:half] - rewards[half:]  # [B]
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(margin).mean()
    else:
        loss = F.relu(1 - margin).mean()
    with torch.no_grad():  # few, batched ops: a training step pays their launch overhead
        rewards, margin = rewards.detach(), margin.detach()
        rewards_std, rewards_mean = torch.std_mean(rewards, correction=1)
        rewards_by_half = rewards.view(2, half).mean(1)  # [actual, generated]
        logps_by_half = policy_logps.detach().view(2, half).mean(1)
        metrics = {
            "acc": (margin > 0).float().mean(),
            "rewards_actual_mean": rewards_by_half[0],
            "rewards_generated_mean": rewards_by_half[1],
            "rewards_all_mean": rewards_mean,
            "rewards_all_std": rewards_std,
            "margin_mean": margin.mean(),
            "logps_actual_mean": logps_by_half[0],
            "logps_generated_mean": logps_by_half[1],
        }
    return SpinLossOutput(loss, metrics, policy_logps.detach(), rewards.float())


def pair_loss_slopes(policy: torch.Tensor, ref: torch.Tensor, beta: torch.Tensor, loss_type: str,
                     first: int, end: int) -> torch.Tensor:
    """d loss / d policy_logps [2B] of `spin_loss_from_logps`, for pairs [first, end) (0 elsewhere).

    loss = mean_i ℓ(margin_i), margin_i = β(π_i − ref_i) − β(π_{B+i} − ref_{B+i}): pair i's
    slope depends on pair i alone, so it is known once the pair's rows are folded. `loss_type` is
    checked by the public entry point. The fused head (`ops/linear_logprobs.py`) forms its
    gradients from these slopes in the forward; `pair_loss` is their loss.
    """
    half = policy.shape[0] // 2
    actual, generated = slice(first, end), slice(half + first, half + end)
    margin = (beta * (policy[actual] - ref[actual])
              - beta * (policy[generated] - ref[generated]))  # as pair_loss rounds it
    if loss_type == "sigmoid":  # −log σ(m)
        dloss_dmargin = -torch.sigmoid(-margin)
    else:  # hinge: relu(1 − m); relu' (0) = 0, as autograd takes it
        dloss_dmargin = -(margin < 1).float()
    slope = dloss_dmargin * beta / half
    coef = torch.zeros_like(policy)
    coef[actual], coef[generated] = slope, -slope
    return coef

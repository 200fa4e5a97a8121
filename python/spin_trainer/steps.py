"""One optimizer step of SPIN or SFT: micro-batches with gradient accumulation, the data-parallel
gradient sum, clipping by the global norm, the update. Every log-prob and the SPIN loss come from
spin_trainer.logprobs (the LM head on labelled positions only, logits or fused: --head).

Scaling: each micro-batch's loss is weighted by its share of the global batch (pairs for SPIN,
response tokens for SFT) and the gradients are summed over micro-batches and data-parallel ranks
(FSDP's reduce-scatter set to a plain sum, spin_trainer.parallelize; or the by-hand all-reduce of
--no-dp-shard), so the update is the same for any micro-batch size, accumulation and
data-parallel width.

Metrics are global: the weighted means sum to the global batch's means, and the rewards' std is
taken from the global Σr, Σr² and count (Bessel-corrected, as NeMo-Aligner logs
`rewards_all.std()`), never as an average of per-micro-batch stds.
"""
import math

import torch
from spin_kernels.dtensor import local_tensor

from .distributed import all_reduce_sum
from .logprobs import labelled_logps, pair_loss
from .optim import global_grad_norm

REWARD_SUMS = ("rewards_sum", "rewards_sq_sum", "rewards_count")


def spin_micro_loss(model, batch, ref_logps, *, beta, loss_type, weight, ctx):
    """(weighted loss, metric tensors) of one [2b]-row pair batch."""
    out = pair_loss(model, batch, ref_logps, ctx, beta=beta, loss_type=loss_type)
    metrics = {"loss": out.loss.detach() * weight}
    metrics.update({name: value.detach().float() * weight for name, value in out.metrics.items()
                    if name != "rewards_all_std"})
    rewards = beta * (out.policy_logps.double() - ref_logps.detach().double())
    # new_full fills on the device; torch.tensor(x, device=cuda) would copy from the host and wait
    # for the stream, so the backward could not be launched before the forward had finished.
    metrics.update(rewards_sum=rewards.sum(), rewards_sq_sum=rewards.square().sum(),
                   rewards_count=rewards.new_full((), float(rewards.numel())))
    return out.loss * weight, metrics


def sft_micro_loss(model, batch, *, total_tokens, ctx):
    """Token-level negative log-likelihood of the responses, as a share of the global batch."""
    token_logps = labelled_logps(model, batch, ctx).token_logps   # [N]
    loss = -token_logps.sum() / total_tokens
    return loss, {"sft_loss": loss.detach()}


def rewards_std(sums):
    """Bessel-corrected std from global sums (count, Σr, Σr²); 0 for a single reward."""
    count, total, squares = sums["rewards_count"], sums["rewards_sum"], sums["rewards_sq_sum"]
    if count < 2:
        return 0.0
    return math.sqrt(max(0.0, (squares - total * total / count) / (count - 1)))


def sync_data_parallel_gradients(parameters, ctx):
    """--no-dp-shard: sums the replicas' gradients (FSDP reduce-scatters its own)."""
    if ctx.dp_group is None or ctx.dp_shard:
        return
    with torch.no_grad():
        for p in parameters:
            if p.grad is not None:
                all_reduce_sum(local_tensor(p.grad), ctx.dp_group)


def clip_gradients(parameters, max_norm):
    """The global gradient norm; scales the gradients to `max_norm` when it is larger (> 0)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    with torch.no_grad():
        norm = global_grad_norm(grads)
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for grad in grads:
                local = local_tensor(grad)
                local.mul_(scale.to(local.dtype))
    return norm


def optimizer_step(model, optimizer, scheduler, micro_items, micro_loss, *, ctx, max_grad_norm):
    """Accumulates `micro_loss(item) -> (loss, metrics)` over `micro_items`, then one update.

    Returns the metrics summed over micro-batches and data-parallel ranks (each already weighted
    by its share, so the sums are global means; REWARD_SUMS become `rewards_all_std`), plus
    grad_norm and lr, as Python floats. With an optimizer-in-backward the update happened in the
    backward (spin_trainer.optim.InBackwardOptimizer).
    """
    in_backward = getattr(optimizer, "in_backward", False)
    lr = optimizer.param_groups[0]["lr"]
    model.train()
    totals = {}
    for item in micro_items:
        loss, metrics = micro_loss(item)
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value
    if in_backward:
        grad_norm = optimizer.take_grad_norm()
    else:
        parameters = [p for p in model.parameters() if p.requires_grad]
        sync_data_parallel_gradients(parameters, ctx)
        grad_norm = clip_gradients(parameters, max_grad_norm)
    if not torch.isfinite(grad_norm):
        losses = {k: float(v) for k, v in totals.items() if "loss" in k}
        applied = ("; the update was applied inside the backward (--optimizer-in-backward), so the weights in "
                   "memory are not usable, but" if in_backward else "; no update was made and")
        # Stop before the update: a NaN step would poison every weight and every later checkpoint.
        raise ValueError(f"training diverged: the gradient norm is {float(grad_norm)} (loss {losses}){applied} "
                         "the last checkpoint is intact. With --dtype float16 (no loss scaling) use bfloat16 or "
                         "float32, or lower --lr")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    names = sorted(totals)
    stacked = torch.stack([totals[name].double().reshape(()) for name in names])
    all_reduce_sum(stacked, ctx.dp_group)
    result = dict(zip(names, stacked.tolist()))
    if "rewards_count" in result:
        result["rewards_all_std"] = rewards_std(result)
        for name in REWARD_SUMS:
            del result[name]
    result["grad_norm"] = float(grad_norm)
    result["lr"] = float(lr)
    return result

"""One optimizer step of SPIN or SFT: micro-batches with gradient accumulation, the data-parallel
gradient sum, tensor-parallel-aware clipping, the update. Every log-prob comes from spin_kernels.loss.

Scaling: each micro-batch's loss is weighted by its share of the global batch (pairs for SPIN,
response tokens for SFT) and the gradients are summed over micro-batches and data-parallel ranks,
so the update is the same for any micro-batch size, accumulation and data-parallel width.
"""
import torch
from spin_kernels.dtensor import is_dtensor, local_tensor
from spin_kernels.loss import sequence_logprobs, spin_loss, token_logprobs

from .distributed import all_reduce_sum

SPIN_METRICS = ("loss", "acc", "rewards_actual_mean", "rewards_generated_mean", "rewards_all_mean",
                "rewards_all_std", "margin_mean", "logps_actual_mean", "logps_generated_mean")


def shifted_logits(model, batch):
    """[S, T, V or V/tp] logits aligned with batch.labels (position t scores token t + 1)."""
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    return output.logits


@torch.no_grad()
def sequence_logps(model, batch, ctx):
    """[S] masked sums of the response log-probs (EOS included), float32, no gradient."""
    logits = shifted_logits(model, batch)
    return sequence_logprobs(logits, batch.labels, batch.loss_mask, process_group=ctx.tp_group)


def spin_micro_loss(model, batch, ref_logps, *, beta, loss_type, weight, ctx):
    """(weighted loss, weighted metric tensors) of one [2b]-row pair batch."""
    logits = shifted_logits(model, batch)
    # Nothing else reads the logits after the loss: their gradient can take their memory.
    out = spin_loss(logits, batch.labels, ref_logps, loss_mask=batch.loss_mask, beta=beta,
                    loss_type=loss_type, process_group=ctx.tp_group, inplace_backward=True)
    metrics = {"loss": out.loss.detach() * weight}
    metrics.update({name: value.detach().float() * weight for name, value in out.metrics.items()})
    return out.loss * weight, metrics


def sft_micro_loss(model, batch, *, total_tokens, ctx):
    """Token-level negative log-likelihood of the responses, as a share of the global batch."""
    logits = shifted_logits(model, batch)
    token_logps = token_logprobs(logits, batch.labels, process_group=ctx.tp_group)  # [S, T]
    loss = -(token_logps * batch.loss_mask).sum() / total_tokens
    return loss, {"sft_loss": loss.detach()}


def sync_data_parallel_gradients(parameters, ctx):
    if ctx.dp_group is None:
        return
    with torch.no_grad():
        for p in parameters:
            if p.grad is not None:
                all_reduce_sum(local_tensor(p.grad), ctx.dp_group)


def clip_gradients(parameters, max_norm, ctx):
    """Global gradient norm (shards summed over the tp group, replicas counted once); clips if > 0."""
    sharded_sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    replicated_sq = torch.zeros((), dtype=torch.float32, device=ctx.device)
    grads = []
    with torch.no_grad():
        for p in parameters:
            if p.grad is None:
                continue
            grad = local_tensor(p.grad)
            grads.append(grad)
            if is_dtensor(p.grad) and any(placement.is_shard() for placement in p.grad.placements):
                sharded_sq += grad.float().pow(2).sum()
            else:
                replicated_sq += grad.float().pow(2).sum()
        norm = (replicated_sq + all_reduce_sum(sharded_sq, ctx.tp_group)).sqrt()
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for grad in grads:
                grad.mul_(scale.to(grad.dtype))
    return norm


def optimizer_step(model, optimizer, scheduler, micro_items, micro_loss, *, ctx, max_grad_norm):
    """Accumulates `micro_loss(item) -> (loss, metrics)` over `micro_items`, then one update.

    Returns the metrics summed over micro-batches and data-parallel ranks (each already weighted
    by its share, so the sums are global means), plus grad_norm and lr, as Python floats.
    """
    model.train()
    totals = {}
    for item in micro_items:
        loss, metrics = micro_loss(item)
        loss.backward()
        for name, value in metrics.items():
            totals[name] = totals.get(name, 0.0) + value
    parameters = [p for p in model.parameters() if p.requires_grad]
    sync_data_parallel_gradients(parameters, ctx)
    grad_norm = clip_gradients(parameters, max_grad_norm, ctx)
    if not torch.isfinite(grad_norm):
        # Stop before the update: a NaN step would poison every weight and every later checkpoint.
        raise ValueError(f"training diverged: the gradient norm is {float(grad_norm)} (loss "
                         f"{ {k: float(v) for k, v in totals.items() if 'loss' in k} }); the last "
                         "checkpoint is intact. With --dtype float16 (no loss scaling) use bfloat16 or "
                         "float32, or lower --lr")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

    names = sorted(totals)
    stacked = torch.stack([totals[name].float().reshape(()) for name in names])
    all_reduce_sum(stacked, ctx.dp_group)
    result = dict(zip(names, stacked.tolist()))
    result["grad_norm"] = float(grad_norm)
    result["lr"] = float(lr)
    return result


def make_optimizer(model, *, weight_decay, ctx, betas=(0.9, 0.999)):
    """AdamW whose learning rate is driven entirely by the scheduler (base lr 1.0)."""
    # foreach kernels cannot mix DTensor and plain-tensor parameters in one list.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1.0, betas=betas,
                             weight_decay=weight_decay, foreach=False if ctx.tp_size > 1 else None)


def make_scheduler(optimizer, learning_rate_at):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_at)

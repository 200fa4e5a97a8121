"""Supervised fine-tuning on the gold responses: the demo's warm-up and its continued-SFT baseline.

Same optimizer, schedule shape, batch sizes and held-out evaluation as the SPIN loop, so that a
comparison on an equal number of optimizer steps is fair.
"""
import torch
from tqdm.auto import tqdm

from .data import collate_sft
from .distributed import all_reduce_sum
from .optim import make_optimizer
from .schedule import check_batch_sizes, epoch_order, learning_rate_schedule, make_scheduler
from .steps import optimizer_step, sft_micro_loss


def run_sft(model, tokenizer, examples, ctx, *, steps, lr, micro_batch_size, global_batch_size, seed,
            metrics, run, held_out=None, eval_at=(), warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            progress=True, stop=None, optimizer="adamw", lr_schedule="constant", warmup_ratio=0.0):
    """`steps` optimizer steps over reshuffled epochs of `examples`; evaluates after each step in `eval_at`.

    Returns the eval rows (row i is written after step eval_at[i - 1]; row 0 is the start).
    `stop(row) -> bool` is called with each eval row after a step; True ends training there
    (early stopping: spin_trainer.diagnostics.EarlyStopping).
    """
    check_batch_sizes(global_batch_size, micro_batch_size, ctx.dp_size, len(examples), "examples")
    optimizer = make_optimizer(model, ctx=ctx, name=optimizer, weight_decay=weight_decay)
    scheduler = make_scheduler(optimizer, learning_rate_schedule(
        [lr], [steps], shape=lr_schedule, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps))
    per_rank = global_batch_size // ctx.dp_size
    steps_per_epoch = len(examples) // global_batch_size
    rows = []

    def evaluate(iteration, step):
        row = {"kind": "eval", "run": run, "iteration": iteration, "step": step, **held_out(model)}
        metrics.write(row)
        rows.append(row)

    metrics.truncate_after(run, -1)
    if held_out is not None:
        evaluate(0, 0)
    bar = tqdm(total=steps, desc=f"{run} steps", disable=not (progress and ctx.is_main))
    for step in range(steps):
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(examples), seed, 0, epoch)
        start = index * global_batch_size + ctx.dp_rank * per_rank
        chunk = [examples[k] for k in order[start:start + per_rank]]
        batches = [collate_sft(chunk[i:i + micro_batch_size], tokenizer.pad_token_id).to(ctx.device)
                   for i in range(0, len(chunk), micro_batch_size)]
        total_tokens = torch.stack([b.loss_mask.sum() for b in batches]).sum().reshape(1)
        total_tokens = all_reduce_sum(total_tokens, ctx.dp_group)

        def micro_loss(batch):
            return sft_micro_loss(model, batch, total_tokens=total_tokens, ctx=ctx)

        record = optimizer_step(model, optimizer, scheduler, batches, micro_loss, ctx=ctx, max_grad_norm=max_grad_norm)
        record.update(kind="train", run=run, step=step + 1, epoch=epoch)
        metrics.write(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['sft_loss']:.4f}")
        if held_out is not None and step + 1 in eval_at:
            evaluate(list(eval_at).index(step + 1) + 1, step + 1)
            if stop is not None and stop(rows[-1]):
                break
    bar.close()
    return rows

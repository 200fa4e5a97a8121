"""Supervised fine-tuning on the gold responses: the comparison's start and its continued-SFT arm.

Same optimizer, schedule, update (spin_trainer.optim), batch sizes and held-out evaluation as
SpinTrainer, so that a comparison on an equal number of optimizer steps is fair. `EarlyStopping`
is the `stop` hook that ends SFT once the validation loss has stopped improving.
"""
import math

import torch
from tqdm.auto import tqdm

from spin_trainer.data import collate_sft
from spin_trainer.errors import UsageError
from spin_trainer.export import full_state_dict
from spin_trainer.optim import StepScheduler, apply_update, epoch_order, learning_rate_schedule, make_optimizer
from spin_trainer.parallel.mesh import all_reduce_sum


def run_sft(model, tokenizer, examples, scorer, *, steps, lr, micro_batch_size, global_batch_size, seed,
            metrics, run, held_out=None, eval_at=(), warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
            progress=True, stop=None, optimizer="adamw", lr_schedule="constant", warmup_ratio=0.0):
    """`steps` optimizer steps over reshuffled epochs of `examples`; evaluates after each step in `eval_at`.

    Returns the eval rows (row i is written after step eval_at[i - 1]; row 0 is the start).
    `stop(row) -> bool` is called with each eval row after a step; True ends training there
    (early stopping: EarlyStopping).
    """
    ctx = scorer.ctx
    if global_batch_size % (micro_batch_size * ctx.dp_size) or len(examples) < global_batch_size:
        raise UsageError(f"SFT: the global batch size {global_batch_size} must be a multiple of the micro-batch "
                         f"size {micro_batch_size} x data-parallel size {ctx.dp_size}, and at most the "
                         f"{len(examples)} examples")
    lr_at = learning_rate_schedule([lr], [steps], shape=lr_schedule, warmup_ratio=warmup_ratio,
                                   warmup_steps=warmup_steps)
    optimizer = make_optimizer(model, ctx=ctx, lr=lr_at(0), name=optimizer, weight_decay=weight_decay)
    scheduler = StepScheduler(optimizer, lr_at)
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
        step_lr = optimizer.param_groups[0]["lr"]
        model.train()
        loss_sum = 0.0
        for batch in batches:
            # Token-level negative log-likelihood of the responses, as a share of the global batch.
            loss = -scorer.labelled_logps(model, batch).token_logps.sum() / total_tokens
            loss.backward()
            loss_sum = loss_sum + loss.detach()
        grad_norm = apply_update(model, optimizer, scheduler, max_grad_norm=max_grad_norm, loss=loss_sum)
        sft_loss = all_reduce_sum(loss_sum.double().reshape(1), ctx.dp_group).item()
        metrics.write({"sft_loss": sft_loss, "grad_norm": float(grad_norm), "lr": float(step_lr), "kind": "train",
                       "run": run, "step": step + 1, "epoch": epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{sft_loss:.4f}")
        if held_out is not None and step + 1 in eval_at:
            evaluate(list(eval_at).index(step + 1) + 1, step + 1)
            if stop is not None and stop(rows[-1]):
                break
    bar.close()
    return rows


class EarlyStopping:
    """`stop(row) -> bool` for run_sft: True once `patience` evaluations in a row brought no new
    lowest `val_sft_loss`. The best weights are kept (`best_state`, a CPU copy) for the caller to
    load; `best_step` is the step they were taken at."""

    def __init__(self, model, patience):
        if patience < 1:
            raise UsageError(f"patience must be >= 1 evaluation, got {patience}")
        self.model, self.patience = model, patience
        self.best_loss, self.best_step, self.best_state = math.inf, None, None
        self.evaluations_since_best = 0

    def __call__(self, row):
        loss = row["val_sft_loss"]
        if loss is None:
            raise UsageError("early stopping needs validation data (val_sft_loss is None)")
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, row["step"]
            self.best_state = full_state_dict(self.model)
            self.evaluations_since_best = 0
            return False
        self.evaluations_since_best += 1
        return self.evaluations_since_best >= self.patience

"""The SPIN loop: iterations x epochs, generation from θ_t, reference log-probs, checkpoints, resume.

At the start of iteration t the policy *is* the reference θ_t, so generations and (by default)
the reference log-probs of the whole iteration are computed then, from the policy itself. The
reference weights are kept only where a mode needs them (reference_modes.py: a WeightBank for
`--reference swap` or regeneration every epoch, a resident copy for `--reference resident`).
The loop's position and the iteration's data are dataclasses (loop_state.py). Everything random is a
function of (seed, iteration, epoch): a run resumed from a checkpoint replays the same batches and
samples and reproduces the uninterrupted run.
"""
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from spin_kernels.dtensor import local_tensor
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, restore_rng, save_checkpoint
from .config import SpinConfig
from .data import collate_pairs
from .diagnostics import fraction_equal_to_gold, iteration_diagnostics
from .evaluate import spin_pair_accuracy
from .loop_state import IterationData, LoopPosition
from .optim import make_optimizer
from .reference_modes import make_reference
from .rollouts import ParkedOptimizer, drop_truncated, generate, pair_logps, sampling_seed
from .schedule import epoch_order, learning_rate_schedule, make_scheduler
from .steps import optimizer_step, spin_micro_loss


class TrainingStopped(Exception):
    """Raised after SIGTERM once the checkpoint is written; carries its path."""


class SpinTrainer:
    """The SPIN loop over a validated SpinConfig (the command line calls `config.validate` first)."""

    def __init__(self, model, tokenizer, train_examples, val_examples, config: SpinConfig, ctx, *, out_dir,
                 held_out, metrics, run="spin", report=print, fingerprints=None):
        self.model, self.tokenizer, self.config, self.ctx = model, tokenizer, config, ctx
        self.examples, self.val_examples = train_examples, val_examples
        self.held_out, self.metrics, self.run, self.report = held_out, metrics, run, report
        self.fingerprints = fingerprints or {}   # of the inputs, kept in checkpoints (fingerprint.py)
        self.checkpoint_root = os.path.join(out_dir, "checkpoints", run)
        self.steps_per_epoch = [config.pairs_in_iteration(t, len(train_examples)) // config.global_batch_size
                                for t in range(config.iterations)]
        self.steps_per_iteration = [s * config.epochs for s in self.steps_per_epoch]
        self.optimizer = make_optimizer(model, ctx=ctx, **config.optimizer_options())
        self.scheduler = make_scheduler(self.optimizer, learning_rate_schedule(
            config.lrs, self.steps_per_iteration, **config.schedule_options()))
        self.reference = make_reference(config.reference, model, ctx,
                                        generate_every_epoch=config.generate_every == "epoch")
        self.position = LoopPosition()
        self.data = None             # IterationData of the current iteration (None between iterations)
        self.previous_pairs = None   # (examples, generated) of the last iteration, for mixing
        self.parked_optimizer = ParkedOptimizer(self.optimizer) if config.offload_optimizer else None
        self.stop_requested = False
        self.eval_rows = []
        self.last_checkpoint = None   # (step, path) of the newest checkpoint written or resumed from
        self.stopped_early = None     # the checkpoint's path when --max-steps ended the run early

    # ---- generation and reference log-probs --------------------------------------------------
    def generate_for(self, model, examples, iteration, epoch):
        sampling = replace(self.config.sampling, seed=sampling_seed(self.config.seed, iteration, epoch))
        return generate(model, examples, sampling, self.ctx, tokenizer=self.tokenizer,
                        max_length=self.config.max_length, batch_size=self.config.gen_batch_size,
                        progress=self.config.progress, parked_optimizer=self.parked_optimizer)

    def logps_of(self, model, examples, generated):
        return pair_logps(model, examples, generated, self.ctx, micro_batch_size=self.config.micro_batch_size,
                          pad_token_id=self.tokenizer.pad_token_id)

    def iteration_pairs(self, iteration, generated):
        examples = list(self.examples)
        if self.config.drop_truncated:
            examples, generated = drop_truncated(examples, generated, seed=self.config.seed * 37 + iteration)
        generated = list(generated)
        n_mix = self.config.mixed_pairs(len(self.examples)) if iteration > 0 else 0
        if n_mix and self.previous_pairs is not None:
            prev_examples, prev_generated = self.previous_pairs
            picks = random.Random(self.config.seed * 31 + iteration).sample(range(len(prev_examples)), n_mix)
            examples += [prev_examples[i] for i in picks]
            generated += [prev_generated[i] for i in picks]
        return examples, generated

    def prepare_epoch_data(self, model, iteration, epoch):
        """Generations for the training and validation prompts, and their reference log-probs, from
        `model`, which holds θ_t: the policy at the start of an iteration, else the reference's weights."""
        samples = self.generate_for(model, self.examples, iteration, epoch)
        examples, generated = self.iteration_pairs(iteration, samples)
        ref = self.logps_of(model, examples, generated) if self.reference.precomputes_logps else None
        val_generated = self.generate_for(model, self.val_examples, iteration, epoch + 10_000)
        # The diagnostics describe what the model sampled, one response per training prompt in the
        # prompts' order: before --drop-truncated reassigns slots and the previous iteration's mix.
        lengths = [len(g) for g in samples]
        return IterationData(examples=examples, generated=generated, ref_logps=ref, val_generated=val_generated,
                             val_ref_logps=self.logps_of(model, self.val_examples, val_generated),
                             generated_epoch=epoch, train_gen_length=sum(lengths) / len(lengths),
                             gen_equals_gold=fraction_equal_to_gold(self.examples, samples))

    def begin_iteration(self, iteration):
        self.reference.begin_iteration()
        self.data = self.prepare_epoch_data(self.model, iteration, 0)

    def regenerate(self, iteration, epoch):
        """Per-epoch regeneration (NeMo-Aligner's mode): θ_t samples again, from the reference's weights."""
        history = self.data.history
        with self.reference.weights() as reference_model:
            self.data = self.prepare_epoch_data(reference_model, iteration, epoch)
        self.data.history = history

    # ---- one optimizer step ----------------------------------------------------------------------
    def micro_items(self, indices):
        """(pair batch, its reference log-probs, pairs, generated tokens) per micro-batch."""
        c, data = self.config, self.data
        for i in range(0, len(indices), c.micro_batch_size):
            chunk = indices[i:i + c.micro_batch_size]
            generated = [data.generated[k] for k in chunk]
            batch = collate_pairs([data.examples[k] for k in chunk], generated,
                                  self.tokenizer.pad_token_id).to(self.ctx.device)
            rows = data.ref_logps[chunk] if data.ref_logps is not None else None
            yield batch, self.reference.batch_logps(batch, rows), len(chunk), sum(len(g) for g in generated)

    def train_step(self):
        c, p = self.config, self.position
        order = epoch_order(len(self.data.examples), c.seed, p.iteration, p.epoch)
        per_rank = c.global_batch_size // self.ctx.dp_size
        start = p.step * c.global_batch_size + self.ctx.dp_rank * per_rank
        beta = c.betas[p.iteration]

        def micro_loss(item):
            batch, ref, pairs, generated_tokens = item
            loss, metrics = spin_micro_loss(self.model, batch, ref, beta=beta, loss_type=c.loss_type,
                                            weight=pairs / c.global_batch_size, ctx=self.ctx)
            # Summed over micro-batches and data-parallel ranks by optimizer_step, like the loss.
            metrics["tokens"] = batch.attention_mask.sum().float()
            metrics["generated_length_mean"] = torch.full((), generated_tokens / c.global_batch_size,
                                                          device=self.ctx.device)   # no host copy (steps.py)
            return loss, metrics

        started = time.perf_counter()
        metrics = optimizer_step(self.model, self.optimizer, self.scheduler,
                                 self.micro_items(order[start:start + per_rank]), micro_loss,
                                 ctx=self.ctx, max_grad_norm=c.max_grad_norm)
        step_time = time.perf_counter() - started   # optimizer_step ends reading its metrics: synchronized
        p.step += 1
        p.global_step += 1
        record = {"kind": "train", "run": self.run, "iteration": p.iteration + 1, "epoch": p.epoch,
                  "step": p.global_step, "beta": beta, "generated_at_epoch": self.data.generated_epoch, **metrics,
                  "step_time": step_time, "consumed_samples": p.global_step * c.global_batch_size,
                  "tokens_per_second": metrics["tokens"] / step_time}
        self.data.history.append(record)
        self.metrics.write(record)
        return record

    # ---- evaluation ------------------------------------------------------------------------------
    def validation_row(self, kind):
        """The held-out numbers, and SPIN acc and margin of the policy on the validation pairs."""
        p, data = self.position, self.data
        row = {"kind": kind, "run": self.run, "iteration": p.iteration + 1, "step": p.global_step,
               **self.held_out(self.model)}
        row["val_spin_acc"], row["val_margin"] = spin_pair_accuracy(
            self.model, self.val_examples, data.val_generated, data.val_ref_logps, self.ctx,
            beta=self.config.betas[p.iteration], micro_batch_size=self.config.micro_batch_size,
            pad_token_id=self.tokenizer.pad_token_id)
        return row

    def validate(self):
        """--val-every: a "val" record mid-iteration (the per-iteration table keeps "eval" rows)."""
        self.metrics.write(self.validation_row("val"))

    def end_iteration(self):
        p, data = self.position, self.data
        row = self.validation_row("eval")
        history = data.history
        for key, name in (("acc", "spin_acc"), ("rewards_actual_mean", "rewards_actual"),
                          ("rewards_generated_mean", "rewards_generated"), ("loss", "spin_loss")):
            row[name] = sum(r[key] for r in history) / len(history) if history else None
        row["train_gen_length"] = data.train_gen_length
        row["gen_equals_gold"] = data.gen_equals_gold
        row.update(iteration_diagnostics(history))
        self.metrics.write(row)
        self.eval_rows.append(row)
        self.previous_pairs = (data.examples[:len(self.examples)], data.generated[:len(self.examples)])
        self.data = None
        p.iteration, p.epoch, p.step = p.iteration + 1, 0, 0

    # ---- checkpoints -----------------------------------------------------------------------------
    def loop_state(self):
        """Everything of the run that is not a tensor of the model, optimizer or reference."""
        return {"settings": self.config.resume_settings(), "fingerprints": self.fingerprints,
                "position": self.position.state(),
                "scheduler": self.scheduler.state_dict(), "data": self.data.state() if self.data else None,
                "previous_pairs": self.previous_pairs, "eval_rows": self.eval_rows,
                "world": {"world_size": self.ctx.world_size, "tp_size": self.ctx.tp_size}}

    def check_finite_weights(self):
        """A non-finite update must never reach a checkpoint (or the export): stop with a true message."""
        finite = torch.stack([torch.isfinite(local_tensor(p)).all() for p in self.model.parameters()]).all()
        flag = (~finite).to(torch.int32).reshape(1)
        if self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            newest = (f"the newest checkpoint, {self.last_checkpoint[1]} (step {self.last_checkpoint[0]}), is intact"
                      if self.last_checkpoint is not None else "no checkpoint had been written yet")
            raise ValueError(f"training diverged: after step {self.position.global_step} the weights hold non-finite "
                             f"values (NaN or inf), so no checkpoint was written for it; {newest}. Lower --lr (with "
                             f"--dtype float16, which has no loss scaling here, use bfloat16 or float32)")

    def save(self):
        """Writes a checkpoint of the current step (once per step); returns its path."""
        step = self.position.global_step
        if self.last_checkpoint is None or self.last_checkpoint[0] != step:
            self.check_finite_weights()
            path = save_checkpoint(self.checkpoint_root, step, model=self.model, optimizer=self.optimizer,
                                   reference=self.reference.state if self.data is not None else None,
                                   loop_state=self.loop_state(), ctx=self.ctx, keep=self.config.keep)
            self.last_checkpoint = (step, path)
        return self.last_checkpoint[1]

    def restore(self, checkpoint):
        """Continues from `checkpoint` (found, and its settings checked, by the caller)."""
        state = checkpoint.loop_state
        load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer, reference=self.reference.load_state,
                        ctx=self.ctx)
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = LoopPosition.from_state(state["position"])
        self.data = IterationData.from_state(state["data"])
        self.previous_pairs, self.eval_rows = state["previous_pairs"], state["eval_rows"]
        restore_rng(state["rng"], self.ctx)
        self.last_checkpoint = (self.position.global_step, checkpoint.path)
        if self.ctx.is_main:
            p, world = self.position, state["world"]
            moved = (f"; written by {world['world_size']} process(es) with --tp {world['tp_size']}, resharded to "
                     f"{self.ctx.world_size} with --tp {self.ctx.tp_size}"
                     if (world["world_size"], world["tp_size"]) != (self.ctx.world_size, self.ctx.tp_size) else "")
            self.report(f"resumed from {checkpoint.path} (iteration {p.iteration + 1}, epoch {p.epoch}, "
                        f"step {p.global_step}{moved})")

    @contextmanager
    def stop_on_sigterm(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            self.stop_requested = True

        previous = signal.signal(signal.SIGTERM, request_stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)

    def check_stop(self):
        """After SIGTERM on any rank: every rank writes its part of a checkpoint, then stops."""
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], device=self.ctx.device)
        if self.ctx.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            path = self.save()
            raise TrainingStopped(path)

    # ---- the loop --------------------------------------------------------------------------------
    def max_steps_reached(self):
        return bool(self.config.max_steps) and self.position.global_step >= self.config.max_steps

    def run_iteration(self, bar, on_step):
        """The current iteration from where the position is; False if --max-steps stopped it midway."""
        c, p = self.config, self.position
        t = p.iteration
        if self.data is None:
            self.begin_iteration(t)
            self.check_stop()
        while p.epoch < c.epochs:
            if c.generate_every == "epoch" and self.data.generated_epoch < p.epoch:
                self.regenerate(t, p.epoch)
            while p.step < self.steps_per_epoch[t]:
                record = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.2f}")
                if on_step is not None:
                    on_step(record)
                last_of_iteration = p.epoch == c.epochs - 1 and p.step == self.steps_per_epoch[t]
                if c.val_every and p.global_step % c.val_every == 0 and not last_of_iteration:
                    self.validate()
                if c.save_every and p.global_step % c.save_every == 0 and not last_of_iteration:
                    self.save()
                self.check_stop()
                if self.max_steps_reached() and not last_of_iteration:
                    return False
            p.epoch += 1
            p.step = 0
        self.end_iteration()
        self.save()
        self.check_stop()
        return True

    def train(self, resume=None, on_step=None):
        """Runs every iteration, or continues from the Checkpoint `resume`; returns the eval rows.

        `on_step(record)` after each step. With --max-steps, stops after that many optimizer steps
        of the run with a checkpoint: `self.stopped_early` is then its path.
        """
        c = self.config
        if resume is not None:
            self.restore(resume)
        p = self.position
        self.metrics.truncate_after(self.run, p.global_step if resume is not None else -1)
        if resume is None:
            row = {"kind": "eval", "run": self.run, "iteration": 0, "step": 0, **self.held_out(self.model)}
            self.metrics.write(row)
            self.eval_rows.append(row)
        total = sum(self.steps_per_iteration)
        bar = tqdm(total=total, initial=p.global_step, desc=f"{self.run} steps",
                   disable=not (c.progress and self.ctx.is_main))
        with self.stop_on_sigterm():
            while p.iteration < c.iterations and not self.max_steps_reached():
                self.run_iteration(bar, on_step)
        bar.close()
        if p.iteration < c.iterations:
            self.stopped_early = self.save()
        return self.eval_rows

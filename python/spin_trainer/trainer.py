"""SpinTrainer: the SPIN loop, readable top to bottom, and one training step.

Per iteration t (`train`):

    generate     θ_t (the policy as it is at the iteration's start) answers the training and
                 validation prompts (`begin_iteration`)
    score        the reference log-probs of every pair under θ_t (`compute_ref_logps`): cached at the
                 iteration's start by default, or computed per batch from the reference policy
    train        epochs x optimizer steps (`train_step`: forward, loss, backward, update)
    evaluate     held-out numbers and SPIN acc on the validation pairs (`end_iteration`)
    checkpoint   after each iteration (and every `save_every` steps)

At the start of iteration t the policy *is* the reference θ_t, so generations and (by default)
the reference log-probs of the whole iteration are computed then, from the policy itself, in the
first epoch's own micro-batches (π − ref is then exactly 0 at its first step); the reference
policy's weights are kept only where a mode needs them (ref_policy.py). Everything random is a
function of (seed, iteration, epoch): a resumed run replays the same batches and samples.

Scaling: each micro-batch's loss is weighted by its share of the global batch, and the gradients
are summed over micro-batches and data-parallel ranks (FSDP's reduce-scatter set to a plain sum),
so the update is the same for any micro-batch size, token bound, accumulation and data-parallel
width (micro_batches.py cuts the step's pairs, the same number of micro-batches on every rank). The
logged metrics are global: weighted means summed, and the rewards' std from the global Σr, Σr² and
count (Bessel-corrected, as NeMo-Aligner logs `rewards_all.std()`).
"""
import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from .checkpoint import check_finite_weights, checkpoint_root, load_checkpoint, restore_rng, save_checkpoint
from .config import RunConfig
from .errors import option
from .evaluate import fraction_equal_to_gold, iteration_diagnostics, spin_pair_accuracy
from .generation.rollouts import ParkedOptimizer, generate, iteration_pairs, pair_logps, sampling_seed
from .generations import generation_rows, generations_path, write_generations
from .loop_state import IterationData, LoopPosition, StopSignal, TrainingStopped
from .metrics import ProgressLines, flushed_print, global_step_metrics
from .optim import (StepScheduler, apply_update, epoch_order, learning_rate_schedule, make_optimizer,
                    reset_state)
from .micro_batches import rank_spans
from .packed_scoring import choose_packing, pair_batch, pair_batch_tokens, sequence_tokens
from .ref_policy import make_reference


class SpinTrainer:
    """The SPIN loop of a checked RunConfig on a parallelized model (see python/spin_trainer/cli.py)."""

    def __init__(self, model, tokenizer, train_examples, val_examples, config: RunConfig, scorer, *, out_dir,
                 held_out, metrics, sampling, run="spin", fingerprints=None, lines=None, on_iteration_end=None):
        self.model, self.tokenizer, self.config, self.scorer, self.ctx = model, tokenizer, config, scorer, scorer.ctx
        self.examples, self.val_examples = train_examples, val_examples
        self.held_out, self.metrics, self.run = held_out, metrics, run
        self.lines = lines or ProgressLines()   # plain progress lines for a log file (off by default)
        self.sampling = sampling    # SamplingConfig of θ_t's answers; its seed is set per (iteration, epoch)
        self.fingerprints = fingerprints or {}   # of the inputs, kept in checkpoints (fingerprint.py)
        self.out_dir = out_dir
        self.on_iteration_end = on_iteration_end   # (iterations done, eval rows) after each iteration's checkpoint
        self.checkpoint_root = checkpoint_root(out_dir, run)
        s, t = config.spin, config.train
        self.betas = config.per_iteration("beta")
        n = len(train_examples)
        self.steps_per_epoch = [(n + config.mixed_pairs(i, n)) // t.global_batch_size for i in range(s.iterations)]
        self.steps_per_iteration = [steps * s.epochs for steps in self.steps_per_epoch]
        lr_at = learning_rate_schedule(config.per_iteration("lr"), self.steps_per_iteration, shape=t.lr_schedule,
                                       warmup_ratio=t.warmup_ratio, warmup_steps=t.warmup_steps, span=t.schedule_span)
        self.optimizer = make_optimizer(model, ctx=self.ctx, lr=lr_at(0), name=t.optimizer, weight_decay=t.weight_decay,
                                        betas=t.adam_betas, eps=t.adam_eps, in_backward=t.optimizer_in_backward)
        self.scheduler = StepScheduler(self.optimizer, lr_at)
        # The Scorer scores what pair_batch and sft_batch make, in the trainer and in evaluate.py alike.
        scorer.packing, padded_because = choose_packing(model, s.reference, t.pack_pairs)
        if padded_because and self.ctx.is_main:
            flushed_print(f"padded pair batches: {padded_because}")
        self.reference = make_reference(s.reference, model, scorer, generate_every_epoch=s.generate_every == "epoch")
        self.parked_optimizer = ParkedOptimizer(self.optimizer) if t.offload_optimizer else None
        self.position = LoopPosition()
        self.data = None             # IterationData of the current iteration (None between iterations)
        self.previous_pairs = None   # (examples, generated) of the last iteration, for mixing
        self.eval_rows = []
        self.last_checkpoint = None  # (step, path) of the newest checkpoint written or resumed from
        self.stopped_early = None    # the checkpoint's path when max_steps ended the run early
        self.stop_signal = StopSignal(self.ctx)

    # ---- the loop --------------------------------------------------------------------------------
    def train(self, resume=None, on_step=None):
        """Runs every iteration, or continues from the Checkpoint `resume`; returns the eval rows.

        `on_step(record)` after each step. With max_steps, stops after that many optimizer steps of
        the run with a checkpoint: `self.stopped_early` is then its path.
        """
        c = self.config
        if resume is not None:
            self.restore(resume)
        p = self.position
        self.metrics.truncate_after(self.run, p.global_step if resume is not None else -1)
        self.lines.begin(sum(self.steps_per_iteration), c.spin.iterations, p.global_step)
        if resume is None:
            with self.lines.phase("evaluation of the starting model"):
                self.record_eval({"iteration": 0, "step": 0, **self.held_out(self.model)})
        bar = tqdm(total=sum(self.steps_per_iteration), initial=p.global_step, desc=f"{self.run} steps",
                   disable=not (c.progress and self.ctx.is_main))
        with self.stop_signal.installed():
            while p.iteration < c.spin.iterations and not self.max_steps_reached():
                if self.data is None:
                    self.begin_iteration()                  # generate from θ_t, score under θ_t
                    self.check_stop()
                if self.train_iteration(bar, on_step):      # train
                    self.end_iteration()                    # evaluate
                    self.save()                             # checkpoint
                    if self.on_iteration_end is not None:   # the results table, the iteration's export
                        self.on_iteration_end(p.iteration, self.eval_rows)
                    self.check_stop()
        bar.close()
        if p.iteration < c.spin.iterations:
            self.stopped_early = self.save()
        return self.eval_rows

    def train_iteration(self, bar, on_step):
        """The current iteration's steps from where the position is; False if max_steps stopped it midway."""
        c, p = self.config, self.position
        while p.epoch < c.spin.epochs:
            if c.spin.generate_every == "epoch" and self.data.generated_epoch < p.epoch:
                self.regenerate()
            while p.step < self.steps_per_epoch[p.iteration]:
                record = self.record_step(self.train_step(self.micro_batches(self.step_pairs())))
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.2f}")
                if on_step is not None:
                    on_step(record)
                last = p.epoch == c.spin.epochs - 1 and p.step == self.steps_per_epoch[p.iteration]
                if c.run.val_every and p.global_step % c.run.val_every == 0 and not last:
                    with self.lines.phase(f"validation at step {p.global_step}"):
                        row = {"kind": "val", "run": self.run, **self.validation_row()}
                    self.metrics.write(row)
                    self.lines.eval(row)
                if c.run.save_every and p.global_step % c.run.save_every == 0 and not last:
                    self.save()
                self.check_stop()
                if self.max_steps_reached() and not last:
                    return False
            p.epoch, p.step = p.epoch + 1, 0
        return True

    def max_steps_reached(self):
        return bool(self.config.run.max_steps) and self.position.global_step >= self.config.run.max_steps

    # ---- generate and score ----------------------------------------------------------------------
    def generate_for(self, model, examples, epoch):
        sampling = replace(self.sampling, seed=sampling_seed(self.config.run.seed, self.position.iteration, epoch))
        return generate(model, examples, sampling, self.scorer, tokenizer=self.tokenizer,
                        max_length=self.config.data.max_length, batch_size=self.config.generation.gen_batch_size,
                        progress=self.config.progress, parked_optimizer=self.parked_optimizer)

    def prepare_data(self, model, epoch):
        """θ_t's answers to the training and validation prompts, and their reference log-probs, from
        `model`, which holds θ_t: the policy at the start of an iteration, else the reference's weights.
        The validation prompts are answered only for the evaluation at the iteration's end and --val-every."""
        c, t = self.config, self.position.iteration
        val_examples = self.val_examples if c.evaluates(t) or c.run.val_every else []
        with self.lines.phase(f"iteration {t + 1}, epoch {epoch}: generation and reference log-probs "
                              f"({len(self.examples)} training, {len(val_examples)} validation prompts)"):
            samples = self.generate_for(model, self.examples, epoch)
            examples, generated, dropped = iteration_pairs(
                self.examples, samples, self.previous_pairs, drop=c.spin.drop_truncated,
                mixed=c.mixed_pairs(t, len(self.examples)), seed=c.run.seed, iteration=t)
            if dropped is not None and self.ctx.is_main:
                flushed_print(f"iteration {t + 1}: {option('drop_truncated')} left out {dropped} of {len(samples)} "
                              f"pairs (their generation was cut at {option('max_new_tokens')} or the context); their "
                              f"slots went to finished pairs")
            cached = (self.pair_logps(model, examples, generated, batches=self.step_batches(len(examples), epoch))
                      if self.reference.precomputes_logps else None)
            self.record_generations(model, samples, cached, epoch)
            val_generated = self.generate_for(model, val_examples, epoch + 10_000)
            val_ref = self.pair_logps(model, val_examples, val_generated)
        # The diagnostics describe what the model sampled, one response per training prompt in the
        # prompts' order: before drop_truncated reassigns slots and the previous iteration's mix.
        lengths = [len(g) for g in samples]
        return IterationData(examples=examples, generated=generated, ref_logps=cached, val_generated=val_generated,
                             val_ref_logps=val_ref, generated_epoch=epoch,
                             train_gen_length=sum(lengths) / len(lengths),
                             gen_equals_gold=fraction_equal_to_gold(self.examples, samples),
                             dropped_truncated=dropped)

    def pair_logps(self, model, examples, generated, batches=None):
        """[P, 2] log-prob sums of pairs under `model`, in the training step's micro-batches' bounds
        (`batches`: the steps' global batches, scored as the steps take them; rollouts.pair_logps)."""
        t = self.config.train
        return pair_logps(model, examples, generated, self.scorer, micro_batch_size=t.micro_batch_size,
                          pad_token_id=self.tokenizer.pad_token_id, max_tokens=t.max_tokens_per_batch,
                          batches=batches)

    def record_generations(self, model, samples, cached, epoch):
        """θ_t's answers to the training prompts as text (generations.py), with their reference log-probs:
        the cache's first rows where they are these pairs, else scored now by `model`, which holds θ_t."""
        if cached is not None and not self.config.spin.drop_truncated:
            ref = cached[:len(self.examples)]
        else:
            ref = self.pair_logps(model, self.examples, samples)
        if self.ctx.is_main:
            write_generations(generations_path(self.out_dir, self.position.iteration, epoch, self.run),
                              generation_rows(self.examples, samples, ref, self.tokenizer))

    def begin_iteration(self):
        self.reference.begin_iteration()   # the policy, as it is now, becomes θ_t
        if self.config.train.optimizer_state == "reset":
            # Here and not at the previous iteration's end: a run resumed from that iteration's last
            # checkpoint (which holds its optimizer state) passes here too and starts as fresh.
            reset_state(self.optimizer)
        self.data = self.prepare_data(self.model, epoch=0)

    def regenerate(self):
        """Per-epoch regeneration (NeMo-Aligner's mode): θ_t samples again, from the reference's weights."""
        history, dropped = self.data.history, self.data.dropped_truncated
        with self.reference.weights() as reference_model:
            self.data = self.prepare_data(reference_model, epoch=self.position.epoch)
        self.data.history = history
        if dropped is not None:   # the iteration's count: every epoch's generations together
            self.data.dropped_truncated += dropped

    def compute_ref_logps(self, batch, pairs):
        """[2b] reference log-prob sums of a pair batch under θ_t (rows [0, b) actual, [b, 2b)
        generated): the iteration's cache, computed at its start from the policy that was θ_t, or
        the reference policy's own forward."""
        if self.data.ref_logps is not None:
            rows = self.data.ref_logps[pairs]   # [b, 2]
            return torch.cat([rows[:, 0], rows[:, 1]]).to(batch.input_ids.device)
        return self.reference.batch_logps(batch)

    # ---- train -----------------------------------------------------------------------------------
    def step_batches(self, count, epoch):
        """The global batches of the current iteration's `epoch` over its `count` pairs, one per
        optimizer step: indices into the pairs, rank r's share the r-th of dp-size equal slices."""
        size = self.config.train.global_batch_size
        order = epoch_order(count, self.config.run.seed, self.position.iteration, epoch)
        return [order[start:start + size] for start in range(0, count - size + 1, size)]

    def step_pairs(self):
        return self.step_batches(len(self.data.examples), self.position.epoch)[self.position.step]

    def micro_batches(self, pairs):
        """(pair batch, its reference log-probs, generated tokens) of each of this rank's micro-batches
        of the global batch `pairs`, as many as every other rank's (micro_batches.py)."""
        data, t, dp = self.data, self.config.train, self.ctx.dp_size
        examples, generated = [data.examples[k] for k in pairs], [data.generated[k] for k in pairs]
        per_rank = len(pairs) // dp
        spans = rank_spans([(r * per_rank, (r + 1) * per_rank) for r in range(dp)], self.ctx.dp_rank,
                           lambda i, j: pair_batch_tokens(examples[i:j], generated[i:j], self.scorer.packing),
                           max_items=t.micro_batch_size, max_tokens=t.max_tokens_per_batch)
        for i, j, counted in spans:
            assert counted, "training shards are equal: no filler forward"
            batch = pair_batch(examples[i:j], generated[i:j], self.tokenizer.pad_token_id,
                               self.scorer.packing).to(self.ctx.device)
            yield batch, self.compute_ref_logps(batch, pairs[i:j]), sum(map(len, generated[i:j]))

    def train_step(self, micro_batches):
        """One optimizer step: for each micro-batch (pair batch, reference log-probs, generated tokens)
        the forward and the SPIN loss against θ_t, and the backward of its share of the global batch;
        then the update. Returns the step's global metrics."""
        c = self.config
        beta, global_batch = self.betas[self.position.iteration], c.train.global_batch_size
        self.model.train()
        started = time.perf_counter()
        sums = {}
        for batch, ref_logps, generated_tokens in micro_batches:
            out = self.scorer.pair_loss(self.model, batch, ref_logps, beta=beta, loss_type=c.spin.loss_type)
            weight = out.policy_logps.shape[0] // 2 / global_batch   # the micro-batch's share of the global batch
            (out.loss * weight).backward()
            rewards = out.rewards.double()
            step_sums = {"loss": out.loss.detach() * weight, "tokens": sequence_tokens(batch).float(),
                         # new_full fills on the device: no host copy holding the backward's launch
                         "generated_length_mean": rewards.new_full((), generated_tokens / global_batch),
                         "rewards_sum": rewards.sum(), "rewards_sq_sum": rewards.square().sum(),
                         "rewards_count": rewards.new_full((), float(rewards.numel())),
                         **{k: v.detach().float() * weight for k, v in out.metrics.items() if k != "rewards_all_std"}}
            for name, value in step_sums.items():
                sums[name] = sums.get(name, 0.0) + value
        lr = self.optimizer.param_groups[0]["lr"]
        grad_norm = apply_update(self.model, self.optimizer, self.scheduler, max_grad_norm=c.train.max_grad_norm,
                                 loss=sums["loss"])
        record = global_step_metrics(sums, self.ctx.dp_group)
        step_time = time.perf_counter() - started   # global_metrics read the device: synchronized
        return {"beta": beta, **record, "grad_norm": float(grad_norm), "lr": float(lr), "step_time": step_time,
                "tokens_per_second": record["tokens"] / step_time}

    def record_step(self, metrics):
        """The step's record in the run's history and metrics.jsonl; the position moves on."""
        p, c = self.position, self.config
        p.step, p.global_step = p.step + 1, p.global_step + 1
        record = {"kind": "train", "run": self.run, "iteration": p.iteration + 1, "epoch": p.epoch,
                  "step": p.global_step, "generated_at_epoch": self.data.generated_epoch, **metrics,
                  "consumed_samples": p.global_step * c.train.global_batch_size}
        self.data.history.append(record)
        self.metrics.write(record)
        self.lines.step(record)
        return record

    # ---- evaluate --------------------------------------------------------------------------------
    def record_eval(self, row):
        row = {"kind": "eval", "run": self.run, **row}
        self.metrics.write(row)
        self.eval_rows.append(row)
        self.lines.eval(row)

    def validation_row(self):
        """The held-out numbers; SPIN acc and margin of the policy on the validation pairs, and the mean
        length of θ_t's samples in them (made at the iteration's start)."""
        p, data = self.position, self.data
        row = {"iteration": p.iteration + 1, "step": p.global_step, **self.held_out(self.model)}
        if self.val_examples and len(data.val_generated) == len(self.val_examples):   # generated for this
            row["val_spin_acc"], row["val_margin"] = spin_pair_accuracy(
                self.model, self.val_examples, data.val_generated, data.val_ref_logps, self.scorer,
                beta=self.betas[p.iteration], micro_batch_size=self.config.train.micro_batch_size,
                pad_token_id=self.tokenizer.pad_token_id, max_tokens=self.config.train.max_tokens_per_batch)
            row["val_gen_length"] = sum(map(len, data.val_generated)) / len(data.val_generated)
        return row

    def end_iteration(self):
        p, data = self.position, self.data
        row = {"iteration": p.iteration + 1, "step": p.global_step}
        if self.config.evaluates(p.iteration):
            with self.lines.phase(f"iteration {p.iteration + 1}: evaluation"):
                row = self.validation_row()
        history = data.history
        for key, name in (("acc", "spin_acc"), ("rewards_actual_mean", "rewards_actual"),
                          ("rewards_generated_mean", "rewards_generated"), ("loss", "spin_loss")):
            row[name] = sum(r[key] for r in history) / len(history) if history else None
        row.update(train_gen_length=data.train_gen_length, gen_equals_gold=data.gen_equals_gold,
                   **iteration_diagnostics(history))
        if data.dropped_truncated is not None:
            row["dropped_truncated"] = data.dropped_truncated
        self.record_eval(row)
        self.previous_pairs = (data.examples[:len(self.examples)], data.generated[:len(self.examples)])
        self.data = None
        p.iteration, p.epoch, p.step = p.iteration + 1, 0, 0

    # ---- checkpoint ------------------------------------------------------------------------------
    def loop_state(self):
        """Everything of the run that is not a tensor of the model, optimizer or reference policy."""
        return {"settings": self.config.as_options(resume_only=True), "fingerprints": self.fingerprints,
                "position": vars(self.position), "scheduler": self.scheduler.state_dict(),
                "data": vars(self.data) if self.data else None, "previous_pairs": self.previous_pairs,
                "eval_rows": self.eval_rows,
                "world": {"world_size": self.ctx.world_size, "tp_size": self.ctx.tp_size}}

    def save(self):
        """Writes a checkpoint of the current step (once per step); returns its path."""
        step = self.position.global_step
        if self.last_checkpoint is None or self.last_checkpoint[0] != step:
            check_finite_weights(self.model, self.ctx, step, self.last_checkpoint)
            with self.lines.phase(f"checkpoint at step {step}"):
                path = save_checkpoint(self.checkpoint_root, step, model=self.model, optimizer=self.optimizer,
                                       reference=self.reference.state if self.data is not None else None,
                                       loop_state=self.loop_state(), ctx=self.ctx, keep=self.config.run.keep)
            self.last_checkpoint = (step, path)
        return self.last_checkpoint[1]

    def restore(self, checkpoint):
        """Continues from `checkpoint` (found, and its settings checked, by the caller)."""
        state = checkpoint.loop_state
        load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer, reference=self.reference.load_state,
                        ctx=self.ctx)
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = LoopPosition(**state["position"])
        self.data = IterationData(**state["data"]) if state["data"] else None
        self.previous_pairs, self.eval_rows = state["previous_pairs"], state["eval_rows"]
        restore_rng(state["rng"], self.ctx)
        self.last_checkpoint = (self.position.global_step, checkpoint.path)
        if self.ctx.is_main:
            p, world = self.position, state["world"]
            moved = (f"; written by {world['world_size']} process(es) with {option('tp')} {world['tp_size']}, "
                     f"resharded to {self.ctx.world_size} with {option('tp')} {self.ctx.tp_size}"
                     if (world["world_size"], world["tp_size"]) != (self.ctx.world_size, self.ctx.tp_size) else "")
            flushed_print(f"resumed from {checkpoint.path} (iteration {p.iteration + 1}, epoch {p.epoch}, "
                          f"step {p.global_step}{moved})")

    def check_stop(self):
        """After SIGTERM or SIGINT on any rank: every rank writes its part of a checkpoint, then stops."""
        signal_number = self.stop_signal.received()
        if signal_number:
            raise TrainingStopped(self.save(), signal_number)

"""The SPIN loop: iterations x epochs, generation from θ_t, reference log-probs, checkpoints, resume.

At the start of iteration t the policy *is* the reference θ_t, so generations and (by default)
the reference log-probs of the whole iteration are computed then, from the policy itself. The
reference weights are kept only where a mode needs them: a WeightBank (`--reference swap`, or
regeneration every epoch) or a resident copy (`--reference resident`). Everything random is a
function of (seed, iteration, epoch): a run resumed from a checkpoint replays the same batches and
samples and reproduces the uninterrupted run.
"""
import copy
import os
import random
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .checkpoint import (load_latest_checkpoint, load_local_state, load_optimizer_local_state, local_state,
                         optimizer_local_state, save_checkpoint)
from .config import SpinConfig
from .data import collate_pairs
from .evaluate import spin_pair_accuracy
from .generation import SamplingConfig
from .rollouts import generate, pair_logps, sampling_seed
from .steps import make_optimizer, make_scheduler, optimizer_step, sequence_logps, spin_micro_loss


class TrainingStopped(Exception):
    """Raised after SIGTERM once the checkpoint is written; carries its path."""


def epoch_order(count, seed, iteration, epoch):
    generator = torch.Generator().manual_seed(seed * 7919 + iteration * 104_729 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def learning_rate_schedule(lrs, steps_per_iteration, warmup_steps):
    """step -> lr: each iteration's rate, linearly warmed up over its first `warmup_steps` steps."""
    def lr_at(step):
        start = 0
        for lr, steps in zip(lrs, steps_per_iteration):
            if step < start + steps:
                k = step - start
                return lr * min(1.0, (k + 1) / warmup_steps) if warmup_steps > 0 else lr
            start += steps
        return lrs[-1]
    return lr_at


class SpinTrainer:
    def __init__(self, model, tokenizer, train_examples, val_examples, test_examples, config: SpinConfig,
                 ctx, *, out_dir, held_out, metrics, run="spin", report=print):
        config.validate(len(train_examples), ctx)
        self.model, self.tokenizer, self.config, self.ctx = model, tokenizer, config, ctx
        self.examples, self.val_examples, self.test_examples = train_examples, val_examples, test_examples
        self.held_out, self.metrics, self.run, self.report = held_out, metrics, run, report
        self.checkpoint_root = os.path.join(out_dir, "checkpoints", run)
        self.steps_per_epoch = [config.pairs_in_iteration(t, len(train_examples)) // config.global_batch_size
                                for t in range(config.iterations)]
        self.steps_per_iteration = [s * config.epochs for s in self.steps_per_epoch]
        self.optimizer = make_optimizer(model, weight_decay=config.weight_decay, ctx=ctx)
        self.scheduler = make_scheduler(self.optimizer, learning_rate_schedule(
            config.lrs, self.steps_per_iteration, config.warmup_steps))
        self.position = {"iteration": 0, "epoch": 0, "step": 0, "global_step": 0}
        self.cache = None            # the current iteration's pairs, generations, reference log-probs
        self.previous_pairs = None   # (examples, generated) of the last iteration, for mixing
        self.bank = None
        self.reference_model = None
        self.stop_requested = False
        self.eval_rows = []

    # ---- reference -------------------------------------------------------------------------
    def needs_bank(self):
        return self.config.reference == "swap" or self.config.generate_every == "epoch"

    def snapshot_reference(self):
        """The policy becomes the reference θ_t (the end of one iteration is the start of the next)."""
        if self.needs_bank():
            self._snapshot_into_bank()
        if self.config.reference == "resident":
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def _snapshot_into_bank(self):
        # Each iteration reuses the pinned arena (and its swap stash) instead of allocating anew.
        if self.bank is None:
            from spin_kernels.swap import WeightBank
            self.bank = WeightBank.from_module(self.model)
        else:
            self.bank.update_from(self.model)

    @contextmanager
    def reference_weights(self):
        from spin_kernels.swap import swapped
        with swapped(self.model, self.bank):
            yield

    def reference_state(self):
        if self.reference_model is not None:
            return local_state(self.reference_model)
        if self.bank is not None:
            with self.reference_weights():
                return local_state(self.model)
        return None

    def restore_reference(self, state):
        if state is None:
            return
        if self.config.reference == "resident":
            self.reference_model = copy.deepcopy(self.model).eval().requires_grad_(False)
            load_local_state(self.reference_model, state, what="reference")
        if self.needs_bank():
            policy = local_state(self.model)
            load_local_state(self.model, state, what="reference")
            self._snapshot_into_bank()
            load_local_state(self.model, policy)

    # ---- generation and reference log-probs --------------------------------------------------
    def sampling(self, iteration, epoch):
        c = self.config
        return SamplingConfig(max_new_tokens=c.max_new_tokens, do_sample=c.do_sample, temperature=c.temperature,
                              top_p=c.top_p, top_k=c.top_k,
                              seed=sampling_seed(c.seed, iteration, epoch, self.ctx.dp_rank))

    def generate_for(self, examples, iteration, epoch):
        return generate(self.model, examples, self.sampling(iteration, epoch), self.ctx, tokenizer=self.tokenizer,
                        max_length=self.config.max_length, batch_size=self.config.gen_batch_size,
                        progress=self.config.progress, optimizer=self.optimizer,
                        offload_optimizer=self.config.offload_optimizer)

    def reference_logps(self, examples, generated):
        """Log-probs under the model as it is now: callers make sure that is the reference θ_t."""
        return pair_logps(self.model, examples, generated, self.ctx, micro_batch_size=self.config.micro_batch_size,
                          pad_token_id=self.tokenizer.pad_token_id)

    def iteration_pairs(self, iteration, generated):
        examples, generated = list(self.examples), list(generated)
        n_mix = self.config.mixed_pairs(len(self.examples)) if iteration > 0 else 0
        if n_mix and self.previous_pairs is not None:
            prev_examples, prev_generated = self.previous_pairs
            picks = random.Random(self.config.seed * 31 + iteration).sample(range(len(prev_examples)), n_mix)
            examples += [prev_examples[i] for i in picks]
            generated += [prev_generated[i] for i in picks]
        return examples, generated

    def prepare_epoch_data(self, iteration, epoch):
        """Generations for the training and validation prompts, and their reference log-probs.

        Called while the model holds θ_t: at the start of an iteration (the policy is θ_t) or with
        the reference swapped in (per-epoch regeneration).
        """
        generated = self.generate_for(self.examples, iteration, epoch)
        examples, generated = self.iteration_pairs(iteration, generated)
        ref = self.reference_logps(examples, generated) if self.config.reference == "precompute" else None
        val_generated = self.generate_for(self.val_examples, iteration, epoch + 10_000)
        val_ref = self.reference_logps(self.val_examples, val_generated)
        lengths = [len(g) for g in generated[:len(self.examples)]]
        return {"examples": examples, "generated": generated, "ref_logps": ref, "val_generated": val_generated,
                "val_ref_logps": val_ref, "generated_epoch": epoch, "history": [],
                "train_gen_length": sum(lengths) / len(lengths)}

    def begin_iteration(self, iteration):
        self.snapshot_reference()
        self.cache = self.prepare_epoch_data(iteration, 0)

    def regenerate(self, iteration, epoch):
        """Per-epoch regeneration (NeMo-Aligner's mode): the reference θ_t is swapped in to sample."""
        history = self.cache["history"]
        with self.reference_weights():
            self.cache = self.prepare_epoch_data(iteration, epoch)
        self.cache["history"] = history

    # ---- one optimizer step ----------------------------------------------------------------------
    def micro_items(self, indices):
        c, cache = self.config, self.cache
        for i in range(0, len(indices), c.micro_batch_size):
            chunk = indices[i:i + c.micro_batch_size]
            examples = [cache["examples"][k] for k in chunk]
            batch = collate_pairs(examples, [cache["generated"][k] for k in chunk],
                                  self.tokenizer.pad_token_id).to(self.ctx.device)
            if c.reference == "precompute":
                rows = cache["ref_logps"][chunk]
                ref = torch.cat([rows[:, 0], rows[:, 1]]).to(self.ctx.device)
            elif c.reference == "swap":
                with self.reference_weights():
                    ref = sequence_logps(self.model, batch, self.ctx)
            else:
                ref = sequence_logps(self.reference_model, batch, self.ctx)
            yield batch, ref, len(chunk)

    def train_step(self):
        c, p = self.config, self.position
        order = epoch_order(len(self.cache["examples"]), c.seed, p["iteration"], p["epoch"])
        per_rank = c.global_batch_size // self.ctx.dp_size
        start = p["step"] * c.global_batch_size + self.ctx.dp_rank * per_rank
        beta = c.betas[p["iteration"]]

        def micro_loss(item):
            batch, ref, pairs = item
            return spin_micro_loss(self.model, batch, ref, beta=beta, loss_type=c.loss_type,
                                   weight=pairs / c.global_batch_size, ctx=self.ctx)

        metrics = optimizer_step(self.model, self.optimizer, self.scheduler,
                                 self.micro_items(order[start:start + per_rank]), micro_loss,
                                 ctx=self.ctx, max_grad_norm=c.max_grad_norm)
        p["step"] += 1
        p["global_step"] += 1
        record = {"kind": "train", "run": self.run, "iteration": p["iteration"] + 1, "epoch": p["epoch"],
                  "step": p["global_step"], "beta": beta,
                  "generated_at_epoch": self.cache["generated_epoch"], **metrics}
        self.cache["history"].append(record)
        self.metrics.write(record)
        return record

    # ---- evaluation ------------------------------------------------------------------------------
    def end_iteration(self):
        p, cache = self.position, self.cache
        row = {"kind": "eval", "run": self.run, "iteration": p["iteration"] + 1, "step": p["global_step"]}
        row.update(self.held_out(self.model))
        history = cache["history"]
        for key, name in (("acc", "spin_acc"), ("rewards_actual_mean", "rewards_actual"),
                          ("rewards_generated_mean", "rewards_generated"), ("loss", "spin_loss")):
            row[name] = sum(r[key] for r in history) / len(history) if history else None
        row["val_spin_acc"], row["val_margin"] = spin_pair_accuracy(
            self.model, self.val_examples, cache["val_generated"], cache["val_ref_logps"], self.ctx,
            beta=self.config.betas[p["iteration"]], micro_batch_size=self.config.micro_batch_size,
            pad_token_id=self.tokenizer.pad_token_id)
        row["train_gen_length"] = cache["train_gen_length"]
        self.metrics.write(row)
        self.eval_rows.append(row)
        self.previous_pairs = (cache["examples"][:len(self.examples)], cache["generated"][:len(self.examples)])
        self.cache = None
        self.bank = self.reference_model = None
        p.update(iteration=p["iteration"] + 1, epoch=0, step=0)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save(self):
        rank_state = {"policy": local_state(self.model), "optimizer": optimizer_local_state(self.optimizer),
                      "reference": self.reference_state() if self.cache is not None else None,
                      "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
        shared_state = {"settings": self.config.resume_settings(), "position": dict(self.position),
                        "scheduler": self.scheduler.state_dict(),
                        "cache": self.cache, "previous_pairs": self.previous_pairs, "eval_rows": self.eval_rows}
        return save_checkpoint(self.checkpoint_root, self.position["global_step"], rank_state, shared_state,
                               self.ctx, keep=self.config.keep)

    def restore(self):
        found = load_latest_checkpoint(self.checkpoint_root, self.ctx, report=self.report)
        if found is None:
            if self.ctx.is_main:
                self.report(f"--resume: no usable checkpoint under {self.checkpoint_root}; starting from the beginning")
            return False
        path, rank_state, shared = found
        for name, value in self.config.resume_settings().items():
            if shared["settings"].get(name) != value:
                raise ValueError(f"--resume: {path} was written with {name} = {shared['settings'].get(name)!r}, "
                                 f"this run has {value!r}; resume with the same settings or use another --out")
        load_local_state(self.model, rank_state["policy"])
        load_optimizer_local_state(self.optimizer, rank_state["optimizer"])
        self.scheduler.load_state_dict(shared["scheduler"])
        self.position, self.cache = shared["position"], shared["cache"]
        self.previous_pairs, self.eval_rows = shared["previous_pairs"], shared["eval_rows"]
        if self.cache is not None:
            self.restore_reference(rank_state["reference"])
        torch.set_rng_state(rank_state["rng"]["torch"])
        random.setstate(rank_state["rng"]["python"])
        if rank_state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rank_state["rng"]["cuda"])
        if self.ctx.is_main:
            self.report(f"resumed from {path} (iteration {self.position['iteration'] + 1}, "
                        f"epoch {self.position['epoch']}, step {self.position['global_step']})")
        return True

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
    def train(self, resume=False, on_step=None):
        """Runs (or resumes) every iteration; returns the eval rows. `on_step(record)` after each step."""
        c, p = self.config, self.position
        resumed = self.restore() if resume else False
        self.metrics.truncate_after(self.run, self.position["global_step"] if resumed else -1)
        p = self.position
        if not resumed:
            row = {"kind": "eval", "run": self.run, "iteration": 0, "step": 0, **self.held_out(self.model)}
            self.metrics.write(row)
            self.eval_rows.append(row)
        total = sum(self.steps_per_iteration)
        bar = tqdm(total=total, initial=p["global_step"], desc=f"{self.run} steps",
                   disable=not (c.progress and self.ctx.is_main))
        with self.stop_on_sigterm():
            while p["iteration"] < c.iterations:
                t = p["iteration"]
                if self.cache is None:
                    self.begin_iteration(t)
                    self.check_stop()
                while p["epoch"] < c.epochs:
                    if c.generate_every == "epoch" and self.cache["generated_epoch"] < p["epoch"]:
                        self.regenerate(t, p["epoch"])
                    while p["step"] < self.steps_per_epoch[t]:
                        record = self.train_step()
                        bar.update(1)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['acc']:.2f}")
                        if on_step is not None:
                            on_step(record)
                        last_of_iteration = p["epoch"] == c.epochs - 1 and p["step"] == self.steps_per_epoch[t]
                        if c.save_every and p["global_step"] % c.save_every == 0 and not last_of_iteration:
                            self.save()
                        self.check_stop()
                    p["epoch"] += 1
                    p["step"] = 0
                self.end_iteration()
                self.save()
                self.check_stop()
        bar.close()
        return self.eval_rows

"""`make demo`: the whole pipeline on the built-in default, no download, a few minutes on 2 CPU cores.

A tiny Llama and a character tokenizer are built and saved in HF format; a short SFT warm-up on
two-digit addition leaves the model weak; then SPIN runs for a few iterations and, from the same
start and on the same number of optimizer steps, continued SFT. Both get the same per-iteration
table and the verdict says which ended with the higher held-out exact-match accuracy.
"""
import math
import os
import shutil
import time

import torch

from .export import export_hf, full_state_dict
from .config import SpinConfig
from .data import load_examples
from .distributed import setup_parallel, teardown_parallel
from .evaluate import HeldOut
from .generation import SamplingConfig
from .loop import SpinTrainer
from .metrics import MetricsLog, format_table, plot_curves, read_records
from .model import create_default_model, load_model, load_tokenizer
from .sft import run_sft

DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "data", "arith")
MAX_LENGTH = 16
WARMUP_STEPS = 300
# Chosen on this task so that SPIN neither collapses (lr 1e-3 drove the SFT loss from 1.3 to 3.3 in
# 48 steps) nor stands still; continued SFT gets the same learning rate, batch and step count.
SPIN_PROMPTS = 1024
SPIN_ITERATIONS = 4
SPIN_LR = 5e-5
SPIN_BETA = 0.5
SPIN_BATCH = 32


def demo_data(tokenizer):
    paths = {split: os.path.join(DATA_DIR, f"{split}.jsonl") for split in ("train", "val", "test")}
    if not all(os.path.isfile(p) for p in paths.values()):
        raise ValueError(f"demo data missing under {DATA_DIR}; regenerate it with python data/make_arith.py")
    return {split: load_examples(path, tokenizer, max_length=MAX_LENGTH, option=f"demo {split} data")
            for split, path in paths.items()}


def verdict(spin_rows, sft_rows, num_test):
    """Which run ended better on held-out exact match, with the binomial noise of the comparison."""
    spin_final, sft_final = spin_rows[-1], sft_rows[-1]
    a, b = spin_final["exact_match"], sft_final["exact_match"]
    noise = math.sqrt((a * (1 - a) + b * (1 - b)) / num_test)
    summary = (f"After {spin_final['step']} optimizer steps each: held-out exact match SPIN {a:.3f} vs "
               f"continued SFT {b:.3f} ({num_test} test problems, standard error of the difference {noise:.3f}); "
               f"SFT validation loss SPIN {spin_final['val_sft_loss']:.4f} vs continued SFT "
               f"{sft_final['val_sft_loss']:.4f}.")
    loss_a, loss_b = spin_final["val_sft_loss"], sft_final["val_sft_loss"]
    loss_note = (" Both have the same SFT validation loss." if loss_a == loss_b else
                 f" {'SPIN' if loss_a < loss_b else 'continued SFT'} has the lower SFT validation loss.")
    if a == b:
        return summary + " Neither did better on exact match in this run." + loss_note
    winner = "SPIN" if a > b else "continued SFT"
    if abs(a - b) < 2 * noise:
        return summary + (f" {winner} ended higher on exact match, but by less than two standard errors: "
                          f"on this run the two are not distinguishable.") + loss_note
    return summary + f" {winner} did better on exact match in this run (one seed, tiny model)." + loss_note


def run_demo(args):
    start_time = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    # The demo's model is tiny: intra-op threads only add OpenMP synchronisation (and on a busy
    # machine, spin-waiting that slows each small matmul by orders of magnitude).
    torch.set_num_threads(1)
    ctx = setup_parallel(1, "cpu")
    try:
        torch.manual_seed(args.seed)
        out = args.out
        base_dir = create_default_model(os.path.join(out, "base_model"), seed=args.seed)
        tokenizer = load_tokenizer(base_dir)
        data = demo_data(tokenizer)
        model = load_model(base_dir, attention=args.attn)
        metrics = MetricsLog(os.path.join(out, "metrics.jsonl"))
        # The demo always starts from scratch: a previous demo's metrics and checkpoints would mix
        # with this run's (and a stale later step would outrank the new checkpoints when pruning).
        if os.path.exists(metrics.path):
            os.remove(metrics.path)
        shutil.rmtree(os.path.join(out, "checkpoints", "spin"), ignore_errors=True)
        held_out = HeldOut(data["test"], data["val"], ctx, tokenizer=tokenizer, max_length=MAX_LENGTH,
                           max_new_tokens=6, batch_size=256, micro_batch_size=64)
        progress = not args.no_progress

        warm = run_sft(model, tokenizer, data["train"], ctx, steps=WARMUP_STEPS, lr=3e-3, micro_batch_size=32,
                       global_batch_size=32, seed=args.seed, metrics=metrics, run="sft_warmup",
                       held_out=held_out, eval_at=(WARMUP_STEPS,), warmup_steps=10, progress=progress)
        print(f"SFT warm-up: {WARMUP_STEPS} steps, held-out exact match {warm[-1]['exact_match']:.3f}")
        start_state = full_state_dict(model)

        config = SpinConfig(iterations=SPIN_ITERATIONS, epochs=1, betas=(SPIN_BETA,), lrs=(SPIN_LR,),
                            micro_batch_size=SPIN_BATCH, global_batch_size=SPIN_BATCH,
                            sampling=SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.0),
                            gen_batch_size=256, max_length=MAX_LENGTH, seed=args.seed, keep=1, progress=progress)
        spin_prompts = data["train"][:SPIN_PROMPTS]
        trainer = SpinTrainer(model, tokenizer, spin_prompts, data["val"], config, ctx,
                              out_dir=out, held_out=held_out, metrics=metrics)
        spin_rows = trainer.train()
        export_hf(model, tokenizer, os.path.join(out, "final"), ctx)

        baseline = load_model(base_dir, attention=args.attn)
        baseline.load_state_dict(start_state)
        boundaries = [sum(trainer.steps_per_iteration[:t + 1]) for t in range(config.iterations)]
        sft_rows = run_sft(baseline, tokenizer, spin_prompts, ctx, steps=boundaries[-1], lr=config.lrs[0],
                           micro_batch_size=SPIN_BATCH, global_batch_size=SPIN_BATCH, seed=args.seed,
                           metrics=metrics, run="sft",
                           held_out=held_out, eval_at=boundaries, progress=progress)

        print()
        print(format_table(spin_rows, "SPIN from the SFT warm-up (iteration 0 = start; SPIN acc and rewards: "
                                      "training means over the iteration)"))
        print()
        print(format_table(sft_rows, "Continued SFT from the same start, same optimizer steps and batch size"))
        print()
        print(verdict(spin_rows, sft_rows, len(data["test"])))
        plot_curves(read_records(metrics.path), os.path.join(out, "curves.png"), ["sft_warmup", "spin", "sft"],
                    offsets={"spin": WARMUP_STEPS, "sft": WARMUP_STEPS})
        print(f"wrote {metrics.path}, {os.path.join(out, 'curves.png')}, final SPIN model {os.path.join(out, 'final')} "
              f"({time.time() - start_time:.0f} s)")
        return spin_rows, sft_rows
    finally:
        teardown_parallel(ctx)

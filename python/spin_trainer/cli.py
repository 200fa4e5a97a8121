"""SPIN (Self-Play Fine-Tuning) trainer: one CPU, one GPU, or tensor parallel under torchrun.

    spin-train --demo --out runs/demo          # built-in tiny model + task, no download
    spin-train --model PATH --train-data train.jsonl --val-data val.jsonl --out runs/x
    torchrun --nproc_per_node 8 python/train.py --tp 4 --model PATH ...   # 2-way FSDP x 4-way tensor parallel
    spin-train --plan --model configs/llama-3-70b --nproc 64 --tp 8 ...   # per-rank memory, no GPU needed

`spin-train` and `python python/train.py` are the same command.

Data: JSONL records {"prompt", "response"} or chat {"messages": [..., {"role": "assistant", ...}]}.
Writes OUT/metrics.jsonl, OUT/curves.png, OUT/checkpoints/, and the final model to OUT/final.
SIGTERM writes a checkpoint and exits with status 143; --max-steps N stops after N optimizer steps
with a checkpoint; --resume continues from the newest intact one, also on another process count or
--tp (checkpoints reshard through torch.distributed.checkpoint).
"""
import argparse
import os
import sys
import textwrap
from dataclasses import replace

from spin_trainer.export import EXPORT_DTYPES
from spin_trainer.logprobs import HEADS
from spin_trainer.config import (GENERATE_EVERY, LOSS_TYPES, REFERENCE_MODES, SpinConfig, sampling_config,
                                 stop_sequences)
from spin_trainer.model import ATTENTION_CHOICES
from spin_trainer.optim import OPTIMIZERS
from spin_trainer.precision import DTYPES, Precision
from spin_trainer.recompute import RECOMPUTE_MODES
from spin_trainer.schedule import LR_SCHEDULES

STOPPED_BY_SIGTERM = 143


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and each option's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not no_default and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    add = parser.add_argument
    add("--demo", action="store_true",
        help="run the built-in end-to-end demo (tiny model, built-in task, no download); it takes no model, "
             "data or training options: only --out, --seed, --attn and --no-progress")
    add("--out", help="output directory (metrics, checkpoints, final model); required except with --plan")
    add("--model", help="local Hugging Face causal-LM directory")
    add("--train-data", help="JSONL of training prompts and gold responses")
    add("--val-data", help="JSONL of held-out records: SFT validation loss and SPIN acc on held-out pairs")
    add("--test-data", help="JSONL of held-out records for exact-match accuracy (default: --val-data)")
    add("--prompt-template", default="{prompt}", help="template of {prompt,response} records' prompts")
    add("--max-length", type=int, default=1024,
        help="context length: prompt + response tokens (at most the model's max_position_embeddings)")
    add("--iterations", type=int, default=2, help="SPIN iterations (θ_t → θ_t+1)")
    add("--epochs", type=int, default=1, help="epochs over the iteration's pairs")
    add("--beta", type=float, nargs="+", default=[0.1], help="one value, or one per iteration")
    add("--lr", type=float, nargs="+", default=[5e-7], help="one value, or one per iteration")
    add("--loss-type", choices=LOSS_TYPES, default="sigmoid", help="sigmoid (the paper) or hinge")
    add("--micro-batch-size", type=int, default=1, help="pairs per forward on each rank")
    add("--global-batch-size", type=int, default=8, help="pairs per optimizer step, all ranks together")
    add("--optimizer", choices=OPTIMIZERS, default="adamw", help="the SPIN paper's recipe uses rmsprop")
    add("--adam-betas", type=float, nargs=2, default=[0.9, 0.999], metavar=("BETA1", "BETA2"), help="AdamW betas")
    add("--adam-eps", type=float, default=1e-8, help="epsilon of AdamW and of RMSprop")
    add("--weight-decay", type=float, default=0.0, help="weight decay (AdamW: decoupled; RMSprop: L2)")
    add("--lr-schedule", choices=LR_SCHEDULES, default="constant",
        help="shape of each iteration's learning rate after the warm-up (it restarts every iteration; "
             "the paper: linear with --warmup-ratio 0.1)")
    add("--warmup-ratio", type=float, default=0.0, help="linear warm-up over this fraction of each iteration's steps")
    add("--warmup-steps", type=int, default=0, help="warm-up steps per iteration; when > 0 it overrides --warmup-ratio")
    add("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    add("--optimizer-in-backward", action="store_true",
        help="update each parameter as soon as its gradient is complete, freeing it (needs one micro-batch per "
             "step and --max-grad-norm 0)")
    add("--generate-every", choices=GENERATE_EVERY, default="iteration",
        help="iteration: once from θ_t; epoch: every epoch with the reference swapped in")
    add("--mix-previous", type=float, default=0.0, help="fraction of the previous iteration's pairs mixed in")
    add("--reference", choices=REFERENCE_MODES, default="precompute",
        help="reference log-probs: precomputed per iteration, swapped in per batch, or a resident copy")
    add("--max-new-tokens", type=int, default=None,
        help="default: half of --max-length (as NeMo-Aligner); always capped by the context left after each "
             "prompt. A response cut there is trained on as sampled, without an EOS (see --drop-truncated)")
    add("--min-new-tokens", type=int, default=0, help="tokens before a response may end (EOS and stops masked)")
    add("--stop", nargs="+", default=[], metavar="TEXT",
        help="strings that end a response besides the EOS ids (matched as the tokens of the string alone; "
             "kept in the response)")
    add("--stop-ids", nargs="+", type=int, default=[], metavar="ID", help="token ids that end a response, as --stop")
    add("--drop-truncated", action="store_true",
        help="leave out of training the pairs whose generation was cut at --max-new-tokens (their slots go "
             "to other pairs of the iteration)")
    add("--greedy", action="store_true", help="greedy decoding instead of sampling")
    add("--temperature", type=float, default=1.0, help="sampling temperature")
    add("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    add("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    add("--gen-batch-size", type=int, default=64, help="prompts per generation batch")
    add("--offload-optimizer", action="store_true", help="optimizer state in host memory while generating")
    add("--tp", type=int, default=1, help="tensor-parallel size (torchrun --nproc_per_node a multiple of it)")
    add("--dp-shard", action=argparse.BooleanOptionalAction, default=None,
        help="FSDP2 on the data-parallel axis: parameters, gradients and optimizer state sharded (default: on "
             "with more than one data-parallel rank; with one there is nothing to shard and it has no effect); "
             "--no-dp-shard keeps a full replica on every rank")
    add("--recompute", choices=RECOMPUTE_MODES, default="none",
        help="activation recompute of the decoder layers: elementwise (norms, SwiGLU product) or full layers")
    add("--device", default="auto", help="auto, cpu or cuda")
    add("--attn", choices=ATTENTION_CHOICES, default="auto", help="auto: flash_attention_2 if usable, else sdpa")
    add("--head", choices=HEADS, default=None,
        help="how the LM head scores tokens: fused (hidden states -> log-probs, or the SPIN loss with its gradients "
             "formed in the forward, never materializing the [tokens, vocab] logits: memory one chunk of at most "
             "1 GiB; FLOPs 6·N·H·V for the loss, as logits) or logits (the model's head, then the log-prob "
             "kernels). Default: fused on CUDA, logits elsewhere. See spin_kernels/loss/linear.py")
    add("--dtype", choices=sorted(DTYPES), default="float32",
        help="compute dtype; bfloat16 on GPUs: bf16 compute with fp32 master weights, fp32 gradient reduction "
             "and fp32 optimizer state (float16 has no loss scaling here)")
    add("--pure-low-precision", action="store_true",
        help="keep the parameters, gradients and optimizer state themselves in --dtype (half the weight memory; "
             "updates smaller than a weight's rounding step, e.g. at lr 5e-7 in bf16, are lost)")
    add("--seed", type=int, default=0, help="data order, sampling and initialization")
    add("--save-every", type=int, default=0,
        help="a checkpoint every N optimizer steps besides the one at each iteration's end (0: at iteration "
             "ends only)")
    add("--val-every", type=int, default=0,
        help="validation (held-out exact match, SFT loss, SPIN acc) every N optimizer steps besides each "
             "iteration's end (0: at iteration ends only)")
    add("--keep", type=int, default=2, help="checkpoints kept")
    add("--max-steps", type=int, default=0,
        help="stop after N optimizer steps of the run (counted across resumes) with a checkpoint, without "
             "exporting; --resume continues (0: no limit)")
    add("--resume", action="store_true",
        help="continue from the newest intact checkpoint in --out, also with another process count or --tp")
    add("--export-dtype", choices=EXPORT_DTYPES, default="auto",
        help="dtype of the final Hugging Face model; auto: the input model's config.torch_dtype")
    add("--no-progress", action="store_true",
        help="no progress bars, Hugging Face's loading bars included (bars show only on a terminal anyway)")
    add("--plan", action="store_true",
        help="print the per-rank memory plan of this run on --nproc processes and exit: the model is built on the "
             "meta device from --model's config.json alone (no weights, no tokenizer) and parallelized as training "
             "would be, on a fake process group (e.g. --model configs/llama-3-70b --nproc 64 --tp 8)")
    add("--nproc", type=int, help="--plan: the number of processes (GPUs) of the run")
    add("--device-memory-gib", type=float,
        help="memory of one device: --plan compares its estimate with it (default 80); training with --no-dp-shard "
             "uses the visible GPU's memory, or this on a CPU run")
    return parser


def max_new_tokens(args):
    """--max-new-tokens, by default half the context (each prompt's cap is what is left after it)."""
    return args.max_new_tokens if args.max_new_tokens is not None else max(1, args.max_length // 2)


def spin_config(args):
    return SpinConfig(
        iterations=args.iterations, epochs=args.epochs, betas=args.beta, lrs=args.lr, loss_type=args.loss_type,
        micro_batch_size=args.micro_batch_size, global_batch_size=args.global_batch_size,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm,
        optimizer=args.optimizer, adam_betas=args.adam_betas, adam_eps=args.adam_eps,
        lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio,
        optimizer_in_backward=args.optimizer_in_backward,
        generate_every=args.generate_every, mix_previous=args.mix_previous, reference=args.reference,
        sampling=sampling_config(max_new_tokens=max_new_tokens(args), do_sample=not args.greedy,
                                 temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                 min_new_tokens=args.min_new_tokens),
        gen_batch_size=args.gen_batch_size, drop_truncated=args.drop_truncated,
        offload_optimizer=args.offload_optimizer, max_length=args.max_length, seed=args.seed,
        save_every=args.save_every, keep=args.keep, max_steps=args.max_steps, val_every=args.val_every,
        progress=show_progress(args))


def show_progress(args):
    """Progress bars on a terminal only: in a log file each redraw would be a line of its own."""
    return not args.no_progress and sys.stderr.isatty()


def check_output_dir(out, resume, runs):
    """Refuses to start over checkpoints a previous run left (they would be overwritten)."""
    from spin_trainer.checkpoint import list_checkpoints

    for run in runs:
        if not resume and list_checkpoints(os.path.join(out, "checkpoints", run)):
            raise ValueError(f"--out {out!r} already holds checkpoints of a run; pass --resume to continue it "
                             f"or choose another --out")


def check_output_path(out):
    """--out must be a directory this process can write (it is created if missing)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {out!r} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out!r} lies under {existing!r}, which is a file")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise ValueError(f"--out {out!r} is not writable ({exc.strerror or exc})") from exc


def check_context_length(max_length, model_config):
    """--max-length within the positions the model has (every generation is capped by it)."""
    for name in ("max_position_embeddings", "n_positions"):
        limit = getattr(model_config, name, None)
        if isinstance(limit, int) and max_length > limit:
            raise ValueError(f"--max-length {max_length} is beyond the model's {name} ({limit}): prompts plus "
                             f"generated responses would not fit; use --max-length {limit} or less")


def resume_checkpoint(out, config, ctx, fingerprints, *, model_dir, train_data):
    """The newest intact checkpoint of the run in `out` (None: start over), its settings and inputs
    checked against this run's."""
    from spin_trainer.checkpoint import find_latest_checkpoint
    from spin_trainer.fingerprint import check_fingerprints

    root = os.path.join(out, "checkpoints", "spin")
    found = find_latest_checkpoint(root, ctx)
    if found is None:
        if ctx.is_main:
            print(f"--resume: no usable checkpoint under {root}; starting from the beginning")
        return None
    saved = found.loop_state["settings"]
    for option, value in config.resume_settings().items():
        if saved.get(option) != value:
            raise ValueError(f"--resume: {found.path} was written with {option} {saved.get(option)!r}, this run has "
                             f"{option} {value!r}; resume with the same options or use another --out")
    check_fingerprints(found.loop_state["fingerprints"], fingerprints, found.path, model_dir=model_dir,
                       train_data=train_data)
    return found


def train(args, on_step=None):
    """The general path: --model + data files. Returns the SPIN eval rows."""
    from transformers import AutoConfig

    from spin_trainer.data import load_examples
    from spin_trainer.distributed import setup_parallel, teardown_parallel
    from spin_trainer.evaluate import HeldOut
    from spin_trainer.export import export_hf, resolve_export_dtype
    from spin_trainer.fingerprint import run_fingerprints
    from spin_trainer.loop import SpinTrainer
    from spin_trainer.metrics import MetricsLog, read_records
    from spin_trainer.model import check_model_dir, load_model, load_tokenizer
    from spin_trainer.parallelize import parallelize_model
    from spin_trainer.plots import TABLE_LEGEND, format_table, plot_curves
    from spin_trainer.tp_plan import check_tensor_parallel

    for option, value in (("--model", args.model), ("--train-data", args.train_data)):
        if not value:
            raise ValueError(f"{option} is required (or use --demo)")
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    check_output_path(args.out)
    config = spin_config(args)
    precision = Precision(args.dtype, pure=args.pure_low_precision)
    if not show_progress(args):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    check_model_dir(args.model)
    source_config = AutoConfig.from_pretrained(args.model)
    check_context_length(args.max_length, source_config)
    check_tensor_parallel(source_config, args.tp)
    if args.dp_shard is False:
        from spin_trainer.distributed import choose_device
        from spin_trainer.plan_report import check_replicas_fit
        check_replicas_fit(args, source_config, choose_device(args.device))
    export_dtype = resolve_export_dtype(args.export_dtype, source_config)
    tokenizer = load_tokenizer(args.model)
    config.sampling = replace(config.sampling, stop_sequences=stop_sequences(args.stop, args.stop_ids, tokenizer))
    kwargs = dict(max_length=args.max_length, template=args.prompt_template)
    train_examples = load_examples(args.train_data, tokenizer, option="--train-data", **kwargs)
    val_examples = load_examples(args.val_data, tokenizer, option="--val-data", **kwargs) if args.val_data else []
    test_examples = (load_examples(args.test_data, tokenizer, option="--test-data", **kwargs)
                     if args.test_data else val_examples)
    check_output_dir(args.out, args.resume, ["spin"])
    fingerprints = run_fingerprints(args.model, tokenizer, args.train_data)

    ctx = setup_parallel(args.tp, args.device, dp_shard=args.dp_shard, precision=precision, head=args.head)
    try:
        config.validate(len(train_examples), ctx)
        checkpoint = (resume_checkpoint(args.out, config, ctx, fingerprints, model_dir=args.model,
                                        train_data=args.train_data) if args.resume else None)
        model = load_model(args.model, attention=args.attn, dtype=precision.param_dtype_name,
                           compute_dtype=args.dtype, device=ctx.device)
        parallelize_model(model, ctx, recompute=args.recompute)
        metrics = MetricsLog(os.path.join(args.out, "metrics.jsonl"), enabled=ctx.is_main)
        held_out = HeldOut(test_examples, val_examples, ctx, tokenizer=tokenizer, max_length=args.max_length,
                           max_new_tokens=config.sampling.max_new_tokens, batch_size=args.gen_batch_size,
                           micro_batch_size=args.micro_batch_size)
        trainer = SpinTrainer(model, tokenizer, train_examples, val_examples, config, ctx,
                              out_dir=args.out, held_out=held_out, metrics=metrics, fingerprints=fingerprints)
        rows = trainer.train(resume=checkpoint, on_step=on_step)
        if trainer.stopped_early:
            if ctx.is_main:
                print(f"stopped after {trainer.position.global_step} of {sum(trainer.steps_per_iteration)} optimizer "
                      f"steps (--max-steps {config.max_steps}); checkpoint: {trainer.stopped_early}; rerun with "
                      f"--resume and a larger --max-steps (or none) to finish; no final model was exported")
            return rows
        export_hf(model, tokenizer, os.path.join(args.out, "final"), ctx, dtype=export_dtype)
        if ctx.is_main:
            title = "SPIN, per iteration (iteration 0 = the starting model)"
            if not args.test_data:
                title += "; no --test-data given: 'test exact match' is measured on --val-data"
            print(format_table(rows, title))
            print(textwrap.fill(TABLE_LEGEND, 100))
            plot_curves([read_records(metrics.path)], os.path.join(args.out, "curves.png"), ["spin"])
            print(f"final model: {os.path.join(args.out, 'final')}")
        return rows
    finally:
        teardown_parallel(ctx)


def main(argv=None, on_step=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.plan:
        from spin_trainer.plan_report import run_plan
        return run_plan(args)
    if not args.out:
        parser.error("the following arguments are required: --out")
    if args.demo:
        from spin_trainer.demo import check_demo_options, run_demo
        check_demo_options(parser, sys.argv[1:] if argv is None else argv)
        return run_demo(args)
    return train(args, on_step=on_step)


def cli():
    from spin_trainer.loop import TrainingStopped

    try:
        main()
    except TrainingStopped as stopped:
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per torchrun process
            print(f"stopped by SIGTERM; checkpoint written to {stopped}; rerun with --resume to continue",
                  file=sys.stderr)
        sys.exit(STOPPED_BY_SIGTERM)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()

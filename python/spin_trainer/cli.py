"""SPIN (Self-Play Fine-Tuning) trainer: one CPU, one GPU, or FSDP x tensor parallel under torchrun.

    spin-train --model PATH --train-data train.jsonl --val-data val.jsonl --out runs/x
    spin-train --config run.yaml --out runs/x          # settings from a file; the command line overrides it
    torchrun --nproc_per_node 8 python/train.py --tp 4 --model PATH ...   # 2-way FSDP x 4-way tensor parallel
    spin-train --plan --model configs/llama-3-70b --nproc 64 --tp 8 ...   # per-rank memory, no GPU needed

`spin-train` and `python python/train.py` are the same command.

Data: JSONL records {"prompt", "response"} or chat {"messages": [..., {"role": "assistant", ...}]}.
Writes OUT/config.yaml (the resolved settings), OUT/metrics.jsonl, OUT/curves.png, OUT/checkpoints/
and the final model to OUT/final. SIGTERM writes a checkpoint and exits with status 143; --max-steps
N stops after N optimizer steps with a checkpoint; --resume continues from the newest intact one,
also on another process count or --tp (checkpoints reshard through torch.distributed.checkpoint).
"""
import os
import sys
import textwrap

from transformers import AutoConfig
from transformers.utils import logging as hf_logging

from .checkpoint import find_latest_checkpoint, list_checkpoints
from .options import parse_config, read_saved_options, write_config
from .data import load_examples
from .errors import UsageError, option
from .evaluate import HeldOut
from .export import export_hf, resolve_export_dtype
from .fingerprint import check_fingerprints, run_fingerprints
from .generation.sampling import SamplingConfig
from .logprobs import Scorer, default_head
from .loop_state import TrainingStopped
from .metrics import MetricsLog, read_records
from .model import check_context_length, check_model_dir, load_model, load_tokenizer
from .parallel.apply import parallelize_model
from .parallel.mesh import choose_device, setup_parallel, teardown_parallel
from .parallel.precision import Precision
from .parallel.tp_plan import check_tensor_parallel
from .plan.report import check_memory, run_plan
from .plots import TABLE_LEGEND, format_table, plot_curves
from .trainer import SpinTrainer

STOPPED_BY_SIGTERM = 143
CONFIG_FILE = "config.yaml"


def check_output_path(out):
    """The output directory must be one this process can write (it is created if missing)."""
    path = os.path.abspath(out)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{option('out')} {out!r} is a file, not a directory")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{option('out')} {out!r} lies under {existing!r}, which is a file")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w", encoding="utf-8"):
            pass
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{option('out')} {out!r} is not writable ({exc.strerror or exc})") from exc


def stop_sequences(strings, ids, tokenizer):
    """Token-id sequences of the stop strings (each tokenized alone, no special tokens) and stop ids
    (one token each). A string is matched as that token sequence; where the tokenizer merges it with
    the text before it differently, the stop is missed."""
    sequences = []
    for text in strings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise UsageError(f"{option('stop')} {text!r}: the tokenizer gives no tokens for it")
        sequences.append(tuple(tokens))
    for token in ids:
        if not 0 <= token < len(tokenizer):
            raise UsageError(f"{option('stop_ids')} {token}: not a token id of the tokenizer [0, {len(tokenizer)})")
        sequences.append((token,))
    return tuple(sequences)


def find_resume_checkpoint(config, ctx, fingerprints):
    """The newest intact checkpoint of the run in --out (None: start over), after checking that this
    run keeps every setting that changes results (against OUT/config.yaml) and the same inputs."""
    out = config.run.out
    root = os.path.join(out, "checkpoints", "spin")
    found = find_latest_checkpoint(root, ctx)
    if found is None:
        if ctx.is_main:
            print(f"{option('resume')}: no usable checkpoint under {root}; starting from the beginning")
        return None
    saved_file = os.path.join(out, CONFIG_FILE)
    saved = read_saved_options(saved_file) if os.path.isfile(saved_file) else found.loop_state["settings"]
    mismatches = config.resume_mismatches(saved)
    if mismatches:
        name, before, now = mismatches[0]
        raise UsageError(f"{option('resume')}: the run in {out} was written with {name} {before!r}, this run has "
                         f"{name} {now!r}; resume with the same settings or use another {option('out')}")
    check_fingerprints(found.loop_state["fingerprints"], fingerprints, found.path, model_dir=config.model.model,
                       train_data=config.data.train_data)
    return found


def check_no_earlier_run(config):
    """Refuses to start over checkpoints a previous run left (they would be overwritten)."""
    if not config.run.resume and list_checkpoints(os.path.join(config.run.out, "checkpoints", "spin")):
        raise UsageError(f"{option('out')} {config.run.out!r} already holds checkpoints of a run; pass "
                         f"{option('resume')} to continue it or choose another {option('out')}")


def train(config, on_step=None):
    """A SPIN run of `config` (checked): set-up, the SpinTrainer's loop, the export and the report.
    Returns the per-iteration eval rows."""
    m, d, g, par, run = config.model, config.data, config.generation, config.parallel, config.run
    for name, value in (("model", m.model), ("train_data", d.train_data)):
        if not value:
            raise UsageError(f"{option(name)} is required")
    check_output_path(run.out)
    if not config.progress:
        hf_logging.disable_progress_bar()
    check_model_dir(m.model)
    source_config = AutoConfig.from_pretrained(m.model)
    check_context_length(d.max_length, source_config)
    check_tensor_parallel(source_config, par.tp)
    device_type = choose_device(m.device)
    check_memory(config, source_config, device_type)
    export_dtype = resolve_export_dtype(m.export_dtype, source_config)
    tokenizer = load_tokenizer(m.model)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, do_sample=not g.greedy,
                              temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                              min_new_tokens=g.min_new_tokens,
                              stop_sequences=stop_sequences(g.stop, g.stop_ids, tokenizer))

    def examples(name):
        return load_examples(getattr(d, name), tokenizer, max_length=d.max_length, template=d.prompt_template,
                             source=option(name))

    train_examples = examples("train_data")
    val_examples = examples("val_data") if d.val_data else []
    test_examples = examples("test_data") if d.test_data else val_examples
    check_no_earlier_run(config)
    fingerprints = run_fingerprints(m.model, tokenizer, d.train_data)

    ctx = setup_parallel(par.tp, device_type, dp_shard=par.dp_shard)
    try:
        config.check_layout(ctx.dp_size, ctx.dp_shard, len(train_examples))
        checkpoint = find_resume_checkpoint(config, ctx, fingerprints) if run.resume else None
        if ctx.is_main:
            write_config(config, os.path.join(run.out, CONFIG_FILE))
        precision = Precision(m.dtype, pure=m.pure_low_precision)
        scorer = Scorer(ctx, precision, m.head or default_head(device_type))
        model = load_model(m.model, attention=m.attn, dtype=precision.param_dtype_name, compute_dtype=m.dtype,
                           device=ctx.device)
        parallelize_model(model, ctx, precision, recompute=par.recompute)
        metrics = MetricsLog(os.path.join(run.out, "metrics.jsonl"), enabled=ctx.is_main)
        held_out = HeldOut(test_examples, val_examples, scorer, tokenizer=tokenizer, max_length=d.max_length,
                           max_new_tokens=config.max_new_tokens, batch_size=g.gen_batch_size,
                           micro_batch_size=config.train.micro_batch_size)
        trainer = SpinTrainer(model, tokenizer, train_examples, val_examples, config, scorer, out_dir=run.out,
                              held_out=held_out, metrics=metrics, sampling=sampling, fingerprints=fingerprints)
        rows = trainer.train(resume=checkpoint, on_step=on_step)
        if trainer.stopped_early:
            if ctx.is_main:
                print(f"stopped after {trainer.position.global_step} of {sum(trainer.steps_per_iteration)} optimizer "
                      f"steps ({option('max_steps')} {run.max_steps}); checkpoint: {trainer.stopped_early}; rerun "
                      f"with {option('resume')} and a larger {option('max_steps')} (or none) to finish; no final "
                      f"model was exported")
            return rows
        export_hf(model, tokenizer, os.path.join(run.out, "final"), ctx, dtype=export_dtype)
        if ctx.is_main:
            title = "SPIN, per iteration (iteration 0 = the starting model)"
            if not d.test_data:
                title += f"; no {option('test_data')} given: 'test exact match' is measured on {option('val_data')}"
            print(format_table(rows, title))
            print(textwrap.fill(TABLE_LEGEND, 100))
            plot_curves(read_records(metrics.path), os.path.join(run.out, "curves.png"))
            print(f"final model: {os.path.join(run.out, 'final')}")
        return rows
    finally:
        teardown_parallel(ctx)


def main(argv=None, on_step=None):
    """Parses `argv` (default: sys.argv[1:]) and runs it: the plan, or a training run."""
    config = parse_config(argv, __doc__)
    if config.plan.plan:
        return run_plan(config)
    if not config.run.out:
        raise UsageError(f"{option('out')} is required (except with {option('plan')})")
    return train(config, on_step=on_step)


def cli():
    try:
        main()
    except TrainingStopped as stopped:
        if os.environ.get("RANK", "0") == "0":  # once per run, not once per torchrun process
            print(f"stopped by SIGTERM; checkpoint written to {stopped}; rerun with {option('resume')} to continue",
                  file=sys.stderr)
        sys.exit(STOPPED_BY_SIGTERM)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()

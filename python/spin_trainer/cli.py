"""SPIN (Self-Play Fine-Tuning) trainer: one CPU, one GPU, or FSDP x tensor parallel under torchrun.

    spin-train --model PATH --train-data train.jsonl --val-data val.jsonl --out runs/x
    spin-train --config run.yaml --out runs/x          # settings from a file; the command line overrides it
    torchrun --nproc_per_node 8 python/train.py --tp 4 --model PATH ...   # 2-way FSDP x 4-way tensor parallel
    spin-train --plan --model configs/llama-3-70b --nproc 64 --tp 8 ...   # per-rank memory, no GPU needed
    spin-train export OUT/checkpoints/spin/step-N HF_DIR [--dtype bfloat16]   # a checkpoint as a HF model

`spin-train` and `python python/train.py` are the same command.

Data: JSONL records {"prompt", "response"} or chat {"messages": [..., {"role": "assistant", ...}]}.
Writes OUT/config.yaml (the resolved settings), OUT/metrics.jsonl, OUT/curves.png, OUT/checkpoints/,
each iteration's generations (OUT/generations/iter-N.jsonl) and model (OUT/iter-N), and the final
model to OUT/final. SIGTERM or SIGINT (Ctrl-C) writes a checkpoint and exits with status 128 + the
signal's number (143, 130); --max-steps
N stops after N optimizer steps with a checkpoint; --resume continues from the newest intact one,
also on another process count or --tp (checkpoints reshard through torch.distributed.checkpoint).
"""
import os
import signal
import sys
import textwrap
import time

from transformers.utils import logging as hf_logging

from . import export_command
from .checkpoint import checkpoint_root, find_latest_checkpoint, list_checkpoints
from .options import CONFIG, parse_config, read_saved_options, write_config
from .data import load_examples
from .errors import CheckpointNotWritten, UsageError, option
from .evaluate import HeldOut
from .export import resolve_export_dtype
from .fingerprint import DATA_OPTIONS, check_fingerprints, run_fingerprints
from .generation.sampling import SamplingConfig
from .logprobs import Scorer, default_head
from .loop_state import TrainingStopped
from .metrics import MetricsLog, ProgressLines, check_installed, make_sinks, plain_lines_wanted, read_records
from .model import check_context_length, load_tokenizer, local_model_dir, read_model_config
from .parallel.load import load_parallel_model
from .parallel.mesh import choose_device, setup_parallel, teardown_parallel
from .parallel.precision import Precision
from .parallel.tp_plan import check_tensor_parallel
from .plan.report import check_memory, run_plan
from .plots import plot_curves, table_legend
from .run_dir import CONFIG_FILE, TOKENIZED_DIR, check_output_path, lock_run, remove_if_empty
from .run_outputs import RunOutputs
from .trainer import SpinTrainer

RANK_0_FIRST_S = 5


def stop_sequences(strings, ids, tokenizer):
    """Token-id sequences of the stop strings (each tokenized alone, no special tokens) and stop ids
    (one token each). A string is matched as that token sequence; where the tokenizer merges it with
    the text before it differently, the stop is missed."""
    sequences = []
    for text in strings:
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not tokens:
            raise UsageError(f"{option('stop')} {text!r}: the tokenizer gives no tokens for it")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in tokens:   # would stop at any unknown text
            raise UsageError(f"{option('stop')} {text!r}: the tokenizer does not know it (it gives "
                             f"{tokenizer.unk_token!r})")
        sequences.append(tuple(tokens))
    for token in ids:
        if not 0 <= token < len(tokenizer):
            raise UsageError(f"{option('stop_ids')} {token}: not a token id of the tokenizer [0, {len(tokenizer)})")
        sequences.append((token,))
    return tuple(sequences)


def find_resume_checkpoint(config, ctx, fingerprints):
    """The newest intact checkpoint of the run in --out (none: refused), after checking that this
    run keeps every setting that changes results (against OUT/config.yaml) and the same inputs."""
    out = config.run.out
    found = find_latest_checkpoint(checkpoint_root(out), ctx)
    saved_file = os.path.join(out, CONFIG_FILE)
    saved = read_saved_options(saved_file) if os.path.isfile(saved_file) else found.loop_state["settings"]
    mismatches = config.resume_mismatches(saved)
    if mismatches:
        name, before, now = mismatches[0]
        raise UsageError(f"{option('resume')}: the run in {out} was written with {name} {before!r}, this run has "
                         f"{name} {now!r}; resume with the same settings or use another {option('out')}")
    check_fingerprints(found.loop_state["fingerprints"], fingerprints, found.path, model_dir=config.model.model,
                       data_paths=data_paths(config))
    return found


def data_paths(config):
    return {name: getattr(config.data, name) for name in DATA_OPTIONS}


def check_min_new_tokens(min_new_tokens, max_length, named_examples):
    """Every prompt leaves room for --min-new-tokens within --max-length (else its response is cut
    before it may end, every time)."""
    for name, examples in named_examples:
        left = [max_length - len(e.prompt_ids) for e in examples]
        if left and min_new_tokens > min(left):
            raise UsageError(f"{option('min_new_tokens')} {min_new_tokens} does not fit after "
                             f"{sum(room < min_new_tokens for room in left)} of the {len(left)} prompts of "
                             f"{option(name)} ({option('max_length')} {max_length} leaves {min(left)} tokens after "
                             f"the longest): their responses would be cut before they may end; lower "
                             f"{option('min_new_tokens')} or raise {option('max_length')}")


def train(config, on_step=None):
    """A SPIN run of `config` (checked): set-up, the SpinTrainer's loop, the export and the report.
    Returns the per-iteration eval rows. A run that fails leaves no --out behind that it created
    and wrote nothing into."""
    for name, value in (("model", config.model.model), ("train_data", config.data.train_data)):
        if not value:
            hint = (f"; a resumed run takes its settings again: {CONFIG} "
                    f"{os.path.join(config.run.out, CONFIG_FILE)} {option('resume')}" if config.run.resume else "")
            raise UsageError(f"{option(name)} is required{hint}")
    check_installed(config.run.report_to)
    created = check_output_path(config.run.out)
    try:
        return run_training(config, on_step)
    except BaseException:
        if created:
            remove_if_empty(config.run.out)
        raise


def run_training(config, on_step):
    m, d, g, t, par, run = config.model, config.data, config.generation, config.train, config.parallel, config.run
    if not config.progress:
        hf_logging.disable_progress_bar()
    model_dir = local_model_dir(m.model, trust_remote_code=m.trust_remote_code)
    source_config = read_model_config(model_dir, trust_remote_code=m.trust_remote_code)
    check_context_length(d.max_length, source_config)
    check_tensor_parallel(source_config, par.tp)
    device_type = choose_device(m.device)
    check_memory(config, source_config, device_type)
    export_dtype = resolve_export_dtype(m.export_dtype, source_config)
    iteration_dtype = resolve_export_dtype(m.iteration_export_dtype, source_config, name="iteration_export_dtype")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=m.trust_remote_code)
    sampling = SamplingConfig(max_new_tokens=config.max_new_tokens, do_sample=not g.greedy, temperature=g.temperature,
                              top_p=g.top_p, top_k=g.top_k, min_new_tokens=g.min_new_tokens,
                              stop_sequences=stop_sequences(g.stop, g.stop_ids, tokenizer))

    precision = Precision(m.dtype, pure=m.pure_low_precision)
    # Mixed precision is FSDP's cast in every layout, one process included (parallel/precision.py).
    ctx = setup_parallel(par.tp, device_type, dp_shard=par.dp_shard, fsdp_alone=precision.mixed)
    lock = None
    try:
        lock = lock_run(run.out, ctx)   # every rank learns the verdict before anything is written
        # Before the data is tokenized (minutes on a large set): a refused resume costs nothing.
        fingerprints = run_fingerprints(model_dir, tokenizer, data_paths(config))
        checkpoint = find_resume_checkpoint(config, ctx, fingerprints) if run.resume else None

        def examples(name):
            return load_examples(getattr(d, name), tokenizer, max_length=d.max_length, template=d.prompt_template,
                                 source=option(name), split=getattr(d, name.replace("data", "split")),
                                 fields=d.record_fields(), max_prompt_length=d.max_prompt_length,
                                 long_prompts=d.long_prompts, cache_dir=os.path.join(run.out, TOKENIZED_DIR))

        loaded = {name: examples(name) for name in ("train_data", "val_data", "test_data") if getattr(d, name)}
        check_min_new_tokens(g.min_new_tokens, d.max_length, loaded.items())
        train_examples, val_examples = loaded["train_data"], loaded.get("val_data", [])
        test_examples = loaded.get("test_data", val_examples)
        if not run.resume and list_checkpoints(checkpoint_root(run.out)):   # they would be overwritten
            raise UsageError(f"{option('out')} {run.out!r} already holds checkpoints of a run; pass "
                             f"{option('resume')} to continue it or choose another {option('out')}")
        config.check_layout(ctx.dp_size, ctx.dp_shard, len(train_examples))
        scorer = Scorer(ctx, precision, m.head or default_head(device_type))
        model = load_parallel_model(model_dir, ctx, precision, attention=m.attn, compute_dtype=m.dtype,
                                    recompute=par.recompute, trust_remote_code=m.trust_remote_code)
        if ctx.is_main:   # after the model loaded: a model refused leaves the run's --out as it was
            write_config(config, os.path.join(run.out, CONFIG_FILE))
        metrics = MetricsLog(os.path.join(run.out, "metrics.jsonl"), enabled=ctx.is_main,
                             sinks=make_sinks(run.report_to, run.out, config.as_options()) if ctx.is_main else ())
        lines = ProgressLines(enabled=ctx.is_main and plain_lines_wanted(sys.stdout.isatty(), config.progress),
                              every=run.log_every)
        held_out = HeldOut(test_examples, val_examples, scorer, tokenizer=tokenizer, exact_match=config.exact_match,
                           max_length=d.max_length, max_new_tokens=config.max_new_tokens, batch_size=g.gen_batch_size,
                           micro_batch_size=t.micro_batch_size, max_tokens=t.max_tokens_per_batch)
        title = "SPIN, per iteration (iteration 0 = the starting model)"
        if config.exact_match and not d.test_data:
            title += f"; no {option('test_data')} given: 'test exact match' is measured on {option('val_data')}"
        outputs = RunOutputs(model, tokenizer, ctx, out=run.out, table_title=title, final_dtype=export_dtype,
                             iteration_dtype=iteration_dtype if m.export_every_iteration else None)
        trainer = SpinTrainer(model, tokenizer, train_examples, val_examples, config, scorer, out_dir=run.out,
                              held_out=held_out, metrics=metrics, sampling=sampling, fingerprints=fingerprints,
                              lines=lines, on_iteration_end=outputs.iteration_end)
        try:
            rows = trainer.train(resume=checkpoint, on_step=on_step)
        finally:
            metrics.close()
        if trainer.stopped_early:
            if ctx.is_main:
                print(f"stopped after {trainer.position.global_step} of {sum(trainer.steps_per_iteration)} optimizer "
                      f"steps ({option('max_steps')} {run.max_steps}); checkpoint: {trainer.stopped_early}; rerun "
                      f"with {option('resume')} and a larger {option('max_steps')} (or none) to finish; no final "
                      f"model was exported")
            return rows
        final = outputs.final(config.spin.iterations, rows)
        if ctx.is_main:
            print(textwrap.fill(table_legend(rows), 100))
            plot_curves(read_records(metrics.path), os.path.join(run.out, "curves.png"))
            print(f"final model: {final}")
        return rows
    finally:
        if lock is not None:
            os.close(lock)   # releases the flock
        teardown_parallel(ctx)


def main(argv=None, on_step=None):
    """Parses `argv` (default: sys.argv[1:]) and runs it: the export command, the plan, or a training run."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_command.main(argv[1:])
    config = parse_config(argv, __doc__)
    if config.plan.plan:
        return run_plan(config)
    if not config.run.out:
        raise UsageError(f"{option('out')} is required (except with {option('plan')})")
    return train(config, on_step=on_step)


def cli():
    main_rank = os.environ.get("RANK", "0") == "0"   # print once per run, not once per torchrun process
    try:
        main()
    except TrainingStopped as stopped:
        if main_rank:
            print(f"stopped by {stopped.signal_name}; checkpoint written to {stopped.checkpoint}; rerun with "
                  f"{option('resume')} to continue", file=sys.stderr)
        sys.exit(stopped.exit_status)
    except KeyboardInterrupt:   # Ctrl-C before the training loop took SIGINT over: nothing to save yet
        if main_rank:
            print("stopped by SIGINT before training started; no checkpoint was written", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except (UsageError, CheckpointNotWritten) as exc:
        if main_rank:
            print(f"error: {exc}", file=sys.stderr)
        else:
            # torchrun stops every worker as soon as one exits: let rank 0's line get out first.
            time.sleep(RANK_0_FIRST_S)
        sys.exit(2 if isinstance(exc, UsageError) else 1)


if __name__ == "__main__":
    cli()

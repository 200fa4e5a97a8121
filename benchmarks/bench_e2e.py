"""End-to-end SPIN benchmark through the trainer's own code, on a random-init Llama shape (default:
the ~1.24 B shape of ANCHORS.md: hidden 2048, 16 layers, V = 128256, tied embeddings).

(a) One SPIN training step: 4 pairs x 1024 tokens (8192 tokens per step), the first quarter of
    each sequence a prompt, beta 0.1. One precision for the baseline and every "ours" row but the
    last: fp32 weights, bf16 compute, fp32 gradients and optimizer state.
    baseline   the SPIN paper's recipe as Hugging Face Trainer runs it (`bf16: true`: fp32 weights
               under bf16 autocast), a resident reference model run forward every step, fp32
               log_softmax + gather over the full vocabulary (uclaml/SPIN, TRL's DPOTrainer), torch AdamW.
    ours       SpinTrainer.train_step (spin_trainer/trainer.py), the step `spin-train` runs, with
               the CLI flags named in each row (`--dtype bfloat16`: fp32 master weights, bf16 compute
               by FSDP's cast on a 1-rank mesh, as spin-train runs one process, and `--head`: the trainer's default LM head on the device, fused on
               CUDA (the SPIN loss from hidden states with its gradients formed in the forward, no
               logits), logits elsewhere); the reference log-probs precomputed once per iteration from
               θ_t (`--reference precompute`, the default; timed separately, Scorer.sequence_logps,
               through the same head), the LM head on labelled positions only.
    pure bf16  the last "ours" row's flags plus `--pure-low-precision`: weights, gradients and AdamW
               state in bf16, the old mode, which loses SPIN-sized updates (tests/test_train_precision.py);
               the cost of correct precision is the difference to the row above it.
(b) Generation, 64 prompts x 128 tokens, exactly 256 new tokens sampled, in the same precision
    (fp32 weights under bf16 autocast): Hugging Face `generate()` with its default cache against
    spin_trainer.generation.decode.generate_responses (the trainer's generation).

Peak memory is the peak allocated on the device while a row runs, everything counted (weights,
reference copy, gradients, optimizer state, activations). Prints markdown tables and writes
<out>.json and <out>.md (atomically). Without CUDA it runs a tiny shape (seconds) so that the
script itself is tested (tests/test_benchmarks.py).

    python benchmarks/bench_e2e.py            # the tables (GPU)
    python benchmarks/bench_e2e.py --tiny     # seconds on the CPU
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
import traceback
import warnings
from pathlib import Path

import torch

from spin_kernels.loss import spin_loss_from_logps
from spin_kernels.loss.torch_backend import naive_token_logprobs
from spin_trainer.options import parse_config
from spin_trainer.data import Example, collate_pairs
from spin_trainer.generation.decode import GenerationStats, SamplingConfig, generate_responses
from spin_trainer.logprobs import Scorer, default_head
from spin_trainer.model import build_tiny_llama, evaluating
from spin_trainer.parallel.apply import decoder_layers, parallelize_model
from spin_trainer.parallel.mesh import ParallelContext, setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.parallel.recompute import apply_recompute
from spin_trainer.trainer import SpinTrainer

from results_file import write_results
from timing import GIB, PeakMemory, median_ms, synchronize

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                  pairs=4, seq_len=1024, gen_prompts=64, gen_prompt_len=128, gen_new_tokens=256)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                  pairs=2, seq_len=64, gen_prompts=4, gen_prompt_len=16, gen_new_tokens=16)
IN_BACKWARD = "--optimizer-in-backward --max-grad-norm 0"
# The spin-train flags of the "ours" rows: each row runs what the trainer's parser makes of them.
OURS = [
    "--dtype bfloat16",
    f"--dtype bfloat16 {IN_BACKWARD}",
    f"--dtype bfloat16 {IN_BACKWARD} --recompute elementwise",
    f"--dtype bfloat16 {IN_BACKWARD} --recompute full",
]
PURE = f"--dtype bfloat16 --pure-low-precision {IN_BACKWARD} --recompute elementwise"
TARGET_SPEED, TARGET_MEMORY = 1.6, 0.45
PRECISION = ("fp32 weights, bf16 compute (the baseline: autocast, as HF Trainer bf16: true; ours: FSDP's cast), "
             "fp32 gradients and optimizer state, for every row but the pure-bf16 one")


def build_model(args, device):
    max_positions = max(args.seq_len, args.gen_prompt_len + args.gen_new_tokens) + 64
    return build_tiny_llama(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                            num_kv_heads=args.kv_heads, intermediate_size=args.intermediate,
                            max_position_embeddings=max_positions, device=device, initializer_range=0.02,
                            # Llama-3.2-1B ties them: this is what makes the shape 1.24 B parameters
                            tie_word_embeddings=True, attn_implementation="sdpa")


def make_batch(args, device):
    """The trainer's Batch (collate_pairs) of 2P rows ([0, P) actual, [P, 2P) generated, pair i
    sharing its prompt), every row args.seq_len tokens."""
    generator = torch.Generator().manual_seed(1)
    prompt_len = max(1, int(args.seq_len * args.prompt_fraction))
    prompts = torch.randint(0, args.vocab, (args.pairs, prompt_len), generator=generator).tolist()
    responses = torch.randint(0, args.vocab, (2 * args.pairs, args.seq_len - prompt_len), generator=generator).tolist()
    examples = [Example(tuple(p), tuple(r)) for p, r in zip(prompts, responses[:args.pairs])]
    return collate_pairs(examples, responses[args.pairs:], pad_token_id=0).to(device), prompt_len


def run_row(step, args, device):
    """(seconds per step, peak GiB or None): median of args.steps calls after one warm-up."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with PeakMemory(device) as peak:
        seconds = median_ms(step, device, args.steps) / 1e3
    return seconds, None if peak.extra_bytes is None else (base + peak.extra_bytes) / GIB


# ------------------------------------------------------------------------------ training steps


def paper_step(model, reference, optimizer, batch, beta, device):
    # In the order of uclaml/SPIN (TRL's DPOTrainer): the policy's fp32 log-probs first, so their
    # fp32 log_softmax is held while the reference runs forward.
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    policy_logps = naive_token_logprobs(logits, batch.labels).sum(-1)   # fp32 log_softmax + gather
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        ref_logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        ref_logps = naive_token_logprobs(ref_logits, batch.labels).sum(-1)
        del ref_logits
    loss = spin_loss_from_logps(policy_logps, ref_logps, beta=beta).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert torch.isfinite(loss)


def ours_row(model, batch, ref_logps, flags, args, device, rows, precompute_s, ctx):
    flags = f"{flags} --head {default_head(device.type)}"
    # As spin-train reads them: one step is the benchmark's batch, in one micro-batch.
    config = parse_config(["--global-batch-size", str(args.pairs), "--micro-batch-size", str(args.pairs),
                           "--lr", "1e-6", "--beta", str(args.beta), *flags.split()])
    precision = Precision(config.model.dtype, pure=config.model.pure_low_precision)
    scorer = Scorer(ctx, precision, config.model.head)
    apply_recompute(decoder_layers(model), config.parallel.recompute)
    trainer = SpinTrainer(model, None, [None] * args.pairs, [], config, scorer, out_dir="unused", held_out=None,
                          metrics=None, sampling=None)
    generated_tokens = int(batch.loss_mask[args.pairs:].sum())

    def step():
        trainer.train_step([(batch, ref_logps, generated_tokens)])

    try:
        seconds, peak = run_row(step, args, device)
    finally:
        if config.train.optimizer_in_backward:
            trainer.optimizer.remove_hooks()
        apply_recompute(decoder_layers(model), "none")
    impl = "pure bf16 (the old mode)" if precision.pure else "ours"
    record(rows, impl, flags, seconds, peak, batch, precompute_s)


def record(rows, impl, flags, seconds, peak, batch, precompute_s=None):
    tokens = batch.input_ids.numel()
    row = dict(impl=impl, flags=flags, s_per_step=seconds, tokens_per_s=tokens / seconds, peak_gib=peak)
    if precompute_s is not None:
        row["tokens_per_s_with_precompute"] = tokens / (seconds + precompute_s)
    rows.append(row)
    print(f"  {impl} [{flags}]: {seconds:.4f} s/step, peak {peak if peak is None else round(peak, 2)} GiB", flush=True)


def bench_train(model, args, device):
    batch, prompt_len = make_batch(args, device)
    rows = []
    model.train()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)   # what HF Trainer builds
    seconds, peak = run_row(lambda: paper_step(model, reference, optimizer, batch, args.beta, device), args, device)
    record(rows, "baseline: SPIN paper / HF Trainer bf16: true, resident reference, fp32 log_softmax",
           "(not spin-train)", seconds, peak, batch)
    del reference, optimizer
    model.zero_grad(set_to_none=True)

    with evaluating(model), torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        paper_logps = naive_token_logprobs(logits, batch.labels).sum(-1)
        del logits

    # The old mode keeps the weights themselves in bf16: a bf16 copy, while the fp32 model waits in
    # host memory (so that the row's peak is its own).
    pure_model, pure_rows = copy.deepcopy(model).to(torch.bfloat16), []
    model.to("cpu")
    plain = ParallelContext(0, 1, 1, 1, 0, 0, device)
    ours_row(pure_model, batch, paper_logps, PURE, args, device, pure_rows, None, plain)
    del pure_model
    model.to(device)

    # spin-train's --dtype bfloat16 in one process: FSDP's cast on a 1-rank mesh (parallel/precision.py).
    precision = Precision("bfloat16")
    ctx = setup_parallel(1, device.type, fsdp_alone=True)
    try:
        parallelize_model(model, ctx, precision)
        # Reference log-probs, once per iteration from θ_t (the policy at its start is the reference).
        scorer = Scorer(ctx, precision, default_head(device.type))
        with evaluating(model):
            ref_logps = scorer.sequence_logps(model, batch)
            precompute_s = median_ms(lambda: scorer.sequence_logps(model, batch), device, args.steps) / 1e3
        # Both implementations score the same tokens: the paper's full-vocabulary sums over every
        # position equal ours over the labelled ones (same weights, bf16 matmuls, other shapes).
        assert torch.allclose(paper_logps, ref_logps, rtol=1e-3, atol=5e-2), (paper_logps, ref_logps)
        precompute = dict(s_per_batch=precompute_s, tokens_per_s=batch.input_ids.numel() / precompute_s)
        for flags in OURS:
            ours_row(model, batch, ref_logps, flags, args, device, rows, precompute_s, ctx)
    finally:
        teardown_parallel(ctx)
    pure = pure_rows[0]
    pure["tokens_per_s_with_precompute"] = batch.input_ids.numel() / (pure["s_per_step"] + precompute_s)
    rows += pure_rows

    baseline = rows[0]
    for row in rows:
        row["x_baseline_tokens_per_s"] = row["tokens_per_s"] / baseline["tokens_per_s"]
        row["x_baseline_peak"] = None if baseline["peak_gib"] is None else row["peak_gib"] / baseline["peak_gib"]
    met = [r["flags"] for r in rows[1:] if r["impl"] == "ours" and r["x_baseline_tokens_per_s"] >= TARGET_SPEED
           and r["x_baseline_peak"] is not None and r["x_baseline_peak"] <= TARGET_MEMORY]
    target = f"met by {met}" if met else "not met by any ours row"
    return dict(tokens_per_step=batch.input_ids.numel(), prompt_tokens=prompt_len, precision=PRECISION, rows=rows,
                reference_precompute=precompute, target=target)


# ---------------------------------------------------------------------------------- generation


def bench_generate(model, args, device):
    """Both in the trainer's precision for --dtype bfloat16 in one process: fp32 weights, bf16 autocast."""
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, args.vocab, (args.gen_prompts, args.gen_prompt_len), generator=generator)
    new = args.gen_new_tokens
    rows = []

    def hf_call():
        ids = prompts.to(device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
        assert out.shape[1] == args.gen_prompt_len + new, out.shape
        return args.gen_prompts * new, {}

    def ours_call():
        stats = GenerationStats()
        with warnings.catch_warnings():
            if device.type != "cuda":
                warnings.simplefilter("ignore", RuntimeWarning)   # the expected cuda_graph -> static
            out = generate_responses(model, prompts.tolist(), SamplingConfig(max_new_tokens=new, seed=0),
                                     eos_token_id=-1, pad_token_id=0, max_length=args.gen_prompt_len + new,
                                     batch_size=args.gen_batch_size, progress=False, backend=args.gen_backend,
                                     stats=stats)
        assert all(len(r) == new for r in out)
        return sum(len(r) for r in out), dict(backend=stats.backend, capture_s=stats.capture_seconds,
                                              fallback=stats.fallback_reasons)

    with evaluating(model), torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for name, call in (("HF generate(), dynamic cache", hf_call), ("generate_responses", ours_call)):
            timings = []
            with PeakMemory(device) as peak:
                for _ in range(1 + args.gen_repeats):
                    synchronize(device)
                    began = time.perf_counter()
                    produced, extra = call()
                    synchronize(device)
                    timings.append(time.perf_counter() - began)
            steady = statistics.median(timings[1:] or timings)   # after the first call (graph capture)
            rows.append(dict(impl=name, first_call_s=timings[0], s=steady, tokens_per_s=produced / steady,
                             extra_gib=peak.extra_gib, **extra))
            print(f"  {name}: first {timings[0]:.2f} s, then {steady:.3f} s, {produced / steady:.0f} tok/s", flush=True)
    for row in rows:
        row["x_hf_tokens_per_s"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    ratio = rows[1]["x_hf_tokens_per_s"]
    return dict(prompts=args.gen_prompts, prompt_len=args.gen_prompt_len, new_tokens=new, rows=rows,
                target=f"{'met' if ratio >= 2 else 'not met'} ({ratio:.2f}x)")


# ------------------------------------------------------------------------------------ reports


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(results) -> str:
    lines = [f"# End-to-end SPIN benchmark\n\n{results['device']}; {results['shape']}\n"]
    train = results.get("train")
    if train:
        pre = train["reference_precompute"]
        lines += [
            f"## One training step ({train['tokens_per_step']} tokens, first {train['prompt_tokens']} of each row prompt)\n",
            f"Precision: {train['precision']}.\n",
            "| impl | spin-train flags | s/step | tokens/s | tokens/s incl. ref precompute | peak GiB | "
            "x baseline tokens/s | x baseline peak |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in train["rows"]:
            lines.append(
                f"| {r['impl']} | `{r['flags']}` | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | "
                f"{fmt(r.get('tokens_per_s_with_precompute'), ',.0f')} | {fmt(r['peak_gib'], '.2f')} | "
                f"{r['x_baseline_tokens_per_s']:.2f} | {fmt(r['x_baseline_peak'], '.2f')} |")
        lines.append(f"\nReference log-probs precompute (no grad, once per iteration): {pre['s_per_batch']:.4f} s per "
                     f"batch, {pre['tokens_per_s']:,.0f} tokens/s.\n")
        lines.append(f"Target: >= {TARGET_SPEED}x the baseline's tokens/s at <= {TARGET_MEMORY}x its peak memory: "
                     f"{train['target']}\n")
    generation = results.get("generate")
    if generation:
        lines += [
            f"## Generation ({generation['prompts']} prompts x {generation['prompt_len']} tokens, "
            f"{generation['new_tokens']} new tokens sampled; fp32 weights under bf16 autocast)\n",
            "| impl | first call s | s | tokens/s | x HF | extra GiB | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in generation["rows"]:
            notes = (f"backend {r['backend']}, capture {r['capture_s']:.2f} s {'; '.join(r['fallback'])}"
                     if "backend" in r else "")
            lines.append(f"| {r['impl']} | {r['first_call_s']:.2f} | {r['s']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['x_hf_tokens_per_s']:.2f} | {fmt(r['extra_gib'], '.2f')} | {notes} |")
        lines.append(f"\nTarget: >= 2x HF generate() tokens/s: {generation['target']}\n")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (default when CUDA is unavailable)")
    for name, value in FULL_SHAPE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"default {value} (tiny: {TINY_SHAPE[name]})")
    parser.add_argument("--prompt-fraction", type=float, default=0.25)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per row (after one warm-up)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--gen-batch-size", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=1, help="timed calls after the first")
    parser.add_argument("--gen-backend", default="cuda_graph", choices=["auto", "cuda_graph", "static", "hf"])
    parser.add_argument("--out", type=Path, default=None,
                        help="output prefix (default benchmarks/results/e2e, tiny: e2e_tiny)")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("e2e_tiny" if args.tiny else "e2e")
    if args.steps < 1 or args.gen_repeats < 0:
        parser.error("--steps must be >= 1 and --gen-repeats >= 0")
    if not 0 < args.prompt_fraction < 1:
        parser.error("--prompt-fraction must be in (0, 1)")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    began = time.perf_counter()
    model = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    shape = (f"Llama shape: hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
             f"intermediate {args.intermediate}, V = {args.vocab}, {params / 1e9:.3f} B parameters")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = dict(device=f"{name}, torch {torch.__version__}", shape=shape, args={k: str(v) for k, v in vars(args).items()})
    print(f"{results['device']}\n{shape}\nmodel built in {time.perf_counter() - began:.1f} s", flush=True)
    failed = []
    # Generation first: the training part ends with the pure-bf16 row, which casts the weights to bf16.
    for part, skip, run in (("generate", args.skip_generate, bench_generate), ("train", args.skip_train, bench_train)):
        if skip:
            continue
        print(f"{part}:", flush=True)
        try:   # one part failing must not cost the other's numbers
            results[part] = run(model, args, device)
        except Exception:
            traceback.print_exc()
            failed.append(part)
    results["total_s"] = time.perf_counter() - began
    results["failed_parts"] = failed
    report = markdown(results)
    print("\n" + report)
    write_results(args.out, results, report)
    print(f"total {results['total_s']:.1f} s; wrote {args.out}.json and .md")
    if failed:
        raise SystemExit(f"failed parts: {failed}")
    return results


if __name__ == "__main__":
    main()

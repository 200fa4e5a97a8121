"""End-to-end SPIN benchmark on a random-init Llama shape (default: the ~1.24 B shape of ANCHORS.md).

(a) One SPIN training step, 4 pairs x 1024 tokens, bf16, AdamW:
    paper  uclaml/SPIN style: a resident reference copy run forward every step, fp32 log_softmax
           + gather over the full vocabulary (spin_kernels.loss.reference.naive_token_logprobs), torch AdamW.
    ours   reference log-probs precomputed once per iteration (timed separately and reported),
           hidden states from model.model with the LM head applied to response positions only,
           spin_kernels.loss.spin_loss(inplace_backward=True), fused AdamW stepped inside the backward
           (each gradient freed once used; --no-optimizer-in-backward for a plain step); then with
           cheap elementwise recompute (RMSNorm, SwiGLU product), with all decoder layers
           checkpointed, and with as few whole layers checkpointed as fit half the paper's peak.
(b) Generation, 64 prompts x 128 tokens, exactly 256 new tokens sampled: Hugging Face
    `generate()` with its default cache against spin_trainer.generation.generate_responses.

Prints markdown tables and writes <out>.json and <out>.md (atomically). On a machine without CUDA
it runs a tiny shape (seconds) so that the script itself is testable.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

from spin_kernels.loss import sequence_logprobs, spin_loss, spin_loss_from_logps  # noqa: E402
from spin_kernels.loss.reference import naive_token_logprobs  # noqa: E402
from spin_trainer.generation import GenerationStats, SamplingConfig, generate_responses  # noqa: E402
from e2e_recompute import configure_recompute  # noqa: E402

FULL_SHAPE = dict(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=128256,
                  pairs=4, seq_len=1024, gen_prompts=64, gen_prompt_len=128, gen_new_tokens=256)
TINY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512,
                  pairs=2, seq_len=64, gen_prompts=4, gen_prompt_len=16, gen_new_tokens=16)
GIB = 2**30


# ------------------------------------------------------------------------------------ helpers


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def build_model(args, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(args.seq_len, args.gen_prompt_len + args.gen_new_tokens) + 64,
        tie_word_embeddings=True,  # Llama-3.2-1B: this is what makes the shape 1.24 B parameters
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(torch.bfloat16)


def make_batch(args, device):
    """[2P, T] ids: rows [0, P) actual, [P, 2P) generated, pair i sharing its prompt; prompt = T/4."""
    generator = torch.Generator().manual_seed(1)
    prompt_len = max(1, int(args.seq_len * args.prompt_fraction))
    prompts = torch.randint(0, args.vocab, (args.pairs, prompt_len), generator=generator)
    responses = torch.randint(0, args.vocab, (2 * args.pairs, args.seq_len - prompt_len), generator=generator)
    input_ids = torch.cat([prompts.repeat(2, 1), responses], dim=1).to(device)
    labels = input_ids[:, 1:].clone()
    labels[:, : prompt_len - 1] = -100  # a label scores the next token; prompt tokens are not scored
    return input_ids, labels, prompt_len


def make_optimizer(model, device, *, in_backward: bool, paper: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    if paper:  # what the HF Trainer of uclaml/SPIN builds: torch AdamW, default implementation
        return torch.optim.AdamW(params, lr=1e-6)
    fused = device.type == "cuda"
    if not in_backward:
        return torch.optim.AdamW(params, lr=1e-6, fused=fused)
    # One optimizer per parameter, stepped as soon as its gradient is complete, after which the
    # gradient is freed: the full set of gradients never exists at once.
    per_param = {p: torch.optim.AdamW([p], lr=1e-6, fused=fused) for p in params}

    def step_and_free(param):
        per_param[param].step()
        per_param[param].zero_grad(set_to_none=True)

    handles = [p.register_post_accumulate_grad_hook(step_and_free) for p in params]
    return per_param, handles


def release_optimizer(optimizer) -> None:
    if isinstance(optimizer, tuple):
        for handle in optimizer[1]:
            handle.remove()


# ------------------------------------------------------------------------------ training steps


def paper_step(model, reference, optimizer, input_ids, labels, beta):
    # In the order of uclaml/SPIN (TRL's DPOTrainer): the policy's fp32 log-probs first, so their
    # fp32 log_softmax is held while the reference runs forward.
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]  # [2P, T-1, V] bf16
    policy_logps = naive_token_logprobs(logits, labels).sum(-1)  # fp32 log_softmax + gather
    with torch.no_grad():
        ref_logits = reference(input_ids=input_ids, use_cache=False).logits[:, :-1]
        ref_logps = naive_token_logprobs(ref_logits, labels).sum(-1)
        del ref_logits
    loss = spin_loss_from_logps(policy_logps, ref_logps, beta=beta).loss  # -logsigmoid(beta * margin)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def response_logits(model, input_ids, prompt_len):
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # [2P, T, H]
    # Only positions that score a response token go through the LM head (prompt rows need none).
    return model.lm_head(hidden[:, prompt_len - 1:-1])  # [2P, T-prompt_len, V]


@torch.no_grad()
def reference_logps(model, input_ids, prompt_len):
    return sequence_logprobs(response_logits(model, input_ids, prompt_len), input_ids[:, prompt_len:])


def ours_step(model, optimizer, input_ids, prompt_len, ref_logps, beta):
    logits = response_logits(model, input_ids, prompt_len)
    out = spin_loss(logits, input_ids[:, prompt_len:], ref_logps, beta=beta, inplace_backward=True)
    out.loss.backward()
    if not isinstance(optimizer, tuple):
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out.loss.detach()


def time_steps(step, args, device):
    """Median seconds of `args.steps` calls after `args.warmup`; peak memory covers all of them."""
    reset_peak(device)
    for _ in range(args.warmup):
        loss = step()
    sync(device)
    seconds = []
    for _ in range(args.steps):
        began = time.perf_counter()
        loss = step()
        sync(device)
        seconds.append(time.perf_counter() - began)
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    return statistics.median(seconds), peak_gib(device)


def bench_train(model, args, device):
    input_ids, labels, prompt_len = make_batch(args, device)
    tokens = input_ids.numel()
    model.train()
    rows = []

    def record(name, seconds, peak, **extra):
        rows.append(dict(impl=name, s_per_step=seconds, tokens_per_s=tokens / seconds, peak_gib=peak, **extra))
        print(f"  {name}: {seconds:.4f} s/step, peak {peak if peak is None else round(peak, 2)} GiB", flush=True)

    # Paper style: a second, frozen model resident on the device.
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = make_optimizer(model, device, in_backward=False, paper=True)
    seconds, peak = time_steps(lambda: paper_step(model, reference, optimizer, input_ids, labels, args.beta), args, device)
    record("paper: resident reference, fp32 log_softmax", seconds, peak)
    del reference, optimizer
    paper = rows[0]

    # Reference log-probs, computed once per iteration (the policy at its start is the reference).
    reset_peak(device)
    reference_logps(model, input_ids, prompt_len)
    sync(device)
    began = time.perf_counter()
    ref_logps = reference_logps(model, input_ids, prompt_len)
    sync(device)
    precompute_s = time.perf_counter() - began
    precompute = dict(s_per_batch=precompute_s, tokens_per_s=tokens / precompute_s, peak_gib=peak_gib(device))

    # Both implementations must score the same tokens: the paper's masked full-sequence sums equal
    # ours over the response positions (same weights; bf16 logits from differently shaped matmuls).
    with torch.no_grad():
        paper_logps = naive_token_logprobs(model(input_ids=input_ids, use_cache=False).logits[:, :-1], labels).sum(-1)
    assert torch.allclose(paper_logps, ref_logps, rtol=1e-3, atol=1e-2), (paper_logps, ref_logps)
    del paper_logps

    in_backward = args.optimizer_in_backward
    label = "ours" + (" + optimizer in backward" if in_backward else "")

    def run_ours(name, full_layers=0, elementwise=False):
        configure_recompute(model, full_layers=full_layers, elementwise=elementwise)
        optimizer = make_optimizer(model, device, in_backward=in_backward, paper=False)
        try:
            seconds, peak = time_steps(lambda: ours_step(model, optimizer, input_ids, prompt_len, ref_logps, args.beta), args, device)
        finally:
            release_optimizer(optimizer)
            configure_recompute(model)
        record(name, seconds, peak, checkpointed_layers=full_layers, elementwise_recompute=elementwise,
               tokens_per_s_with_precompute=tokens / (seconds + precompute_s))
        return rows[-1]

    run_ours(label)
    if not args.skip_checkpointing:
        layers = len(model.model.layers)
        label += " + recompute norms/SwiGLU"
        selective = run_ours(label, elementwise=True)
        full = run_ours(f"{label} + checkpointing {layers}/{layers} layers", layers, True)
        budget = paper["peak_gib"] * args.memory_target if paper["peak_gib"] is not None else None
        # The peak falls about linearly with the number of whole-layer checkpoints: take just
        # enough to fit the budget, and correct once from the measured result.
        if budget is not None and selective["peak_gib"] > budget and full["peak_gib"] <= budget:
            per_layer = max((selective["peak_gib"] - full["peak_gib"]) / layers, 1e-6)
            needed, peak = 0, selective["peak_gib"]
            for _ in range(2):
                needed = min(layers - 1, needed + math.ceil((peak - budget) / per_layer))
                peak = run_ours(f"{label} + checkpointing {needed}/{layers} layers", needed, True)["peak_gib"]
                if peak <= budget or needed == layers - 1:
                    break
    for row in rows:
        row["x_paper_tokens_per_s"] = row["tokens_per_s"] / paper["tokens_per_s"]
        row["x_paper_peak"] = None if paper["peak_gib"] is None else row["peak_gib"] / paper["peak_gib"]
    return dict(tokens_per_step=tokens, prompt_tokens=prompt_len, rows=rows, reference_precompute=precompute)


# ---------------------------------------------------------------------------------- generation


def bench_generate(model, args, device):
    model.eval()
    generator = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, args.vocab, (args.gen_prompts, args.gen_prompt_len), generator=generator)
    new = args.gen_new_tokens
    max_length = args.gen_prompt_len + new
    rows = []

    def hf_call():
        ids = prompts.to(device)
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
            do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0,
        )
        assert out.shape[1] == args.gen_prompt_len + new, out.shape
        return args.gen_prompts * new, {}

    def ours_call():
        stats = GenerationStats()
        with warnings.catch_warnings():
            if device.type != "cuda":
                warnings.simplefilter("ignore", RuntimeWarning)  # the expected cuda_graph -> static
            out = generate_responses(
                model, prompts.tolist(), SamplingConfig(max_new_tokens=new, seed=0), eos_token_id=-1,
                pad_token_id=0, max_length=max_length, batch_size=args.gen_batch_size, progress=False,
                backend=args.gen_backend, stats=stats,
            )
        assert all(len(r) == new for r in out)
        return sum(len(r) for r in out), dict(backend=stats.backend, capture_s=stats.capture_seconds,
                                              fallback=stats.fallback_reasons)

    for name, call in (("HF generate(), dynamic cache", hf_call), ("generate_responses", ours_call)):
        reset_peak(device)
        timings = []
        for _ in range(1 + args.gen_repeats):
            sync(device)
            began = time.perf_counter()
            produced, extra = call()
            sync(device)
            timings.append(time.perf_counter() - began)
        steady = statistics.median(timings[1:]) if len(timings) > 1 else timings[0]
        rows.append(dict(impl=name, first_call_s=timings[0], s=steady, tokens_per_s=produced / steady,
                         peak_gib=peak_gib(device), **extra))
        print(f"  {name}: first {timings[0]:.2f} s, then {steady:.3f} s, {produced / steady:.0f} tok/s", flush=True)
    for row in rows:
        row["x_hf_tokens_per_s"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return dict(prompts=args.gen_prompts, prompt_len=args.gen_prompt_len, new_tokens=new, rows=rows)


# ------------------------------------------------------------------------------------ reports


def run_train(model, args, device):
    train = bench_train(model, args, device)
    met = [r["impl"] for r in train["rows"][1:]
           if r["x_paper_tokens_per_s"] >= 1.5 and r["x_paper_peak"] is not None and r["x_paper_peak"] <= 0.5]
    train["target"] = f"met by {met}" if met else "not met by any variant"
    return train


def run_generate(model, args, device):
    generation = bench_generate(model, args, device)
    ratio = generation["rows"][1]["x_hf_tokens_per_s"]
    generation["target"] = f"{'met' if ratio >= 2 else 'not met'} ({ratio:.2f}x)"
    return generation


def fmt(value, spec):
    return "n/a" if value is None else format(value, spec)


def markdown(results) -> str:
    lines = [f"# End-to-end SPIN benchmark\n\n{results['device']}; {results['shape']}\n"]
    train = results.get("train")
    if train:
        pre = train["reference_precompute"]
        lines += [
            f"## One training step ({train['tokens_per_step']} tokens, first {train['prompt_tokens']} of each row prompt)\n",
            "| impl | s/step | tokens/s | tokens/s incl. ref precompute | peak GiB | x paper tokens/s | x paper peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in train["rows"]:
            lines.append(
                f"| {r['impl']} | {r['s_per_step']:.4f} | {r['tokens_per_s']:,.0f} | "
                f"{fmt(r.get('tokens_per_s_with_precompute'), ',.0f')} | {fmt(r['peak_gib'], '.2f')} | "
                f"{r['x_paper_tokens_per_s']:.2f} | {fmt(r['x_paper_peak'], '.2f')} |")
        lines.append(f"\nReference log-probs precompute (no grad, once per iteration): {pre['s_per_batch']:.4f} s per "
                     f"batch, {pre['tokens_per_s']:,.0f} tokens/s, peak {fmt(pre['peak_gib'], '.2f')} GiB.\n")
        lines.append(f"Target: >= 1.5x paper tokens/s at <= 0.5x its peak memory: {train['target']}\n")
    generation = results.get("generate")
    if generation:
        lines += [
            f"## Generation ({generation['prompts']} prompts x {generation['prompt_len']} tokens, "
            f"{generation['new_tokens']} new tokens sampled)\n",
            "| impl | first call s | s | tokens/s | x HF | peak GiB | notes |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in generation["rows"]:
            notes = f"backend {r['backend']}, capture {r['capture_s']:.2f} s {'; '.join(r['fallback'])}" if "backend" in r else ""
            lines.append(f"| {r['impl']} | {r['first_call_s']:.2f} | {r['s']:.3f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['x_hf_tokens_per_s']:.2f} | {fmt(r['peak_gib'], '.2f')} | {notes} |")
        lines.append(f"\nTarget: >= 2x HF generate() tokens/s: {generation['target']}\n")
    return "\n".join(lines)


def write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (default when CUDA is unavailable)")
    for name, value in FULL_SHAPE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"default {value} (tiny: {TINY_SHAPE[name]})")
    parser.add_argument("--prompt-fraction", type=float, default=0.25)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per implementation")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-target", type=float, default=0.5, help="fraction of the paper peak to fit")
    parser.add_argument("--no-optimizer-in-backward", dest="optimizer_in_backward", action="store_false")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--skip-checkpointing", action="store_true")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--gen-batch-size", type=int, default=64)
    parser.add_argument("--gen-repeats", type=int, default=1, help="timed calls after the first")
    parser.add_argument("--gen-backend", default="cuda_graph", choices=["auto", "cuda_graph", "static", "hf"])
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default benchmarks/results/e2e, tiny: e2e_tiny)")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    shape = TINY_SHAPE if args.tiny else FULL_SHAPE
    for name, value in shape.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("e2e_tiny" if args.tiny else "e2e")
    if args.steps < 1 or args.warmup < 0 or args.gen_repeats < 0:
        parser.error("--steps must be >= 1, --warmup and --gen-repeats >= 0")
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
             f"intermediate {args.intermediate}, V = {args.vocab}, {params / 1e9:.3f} B parameters, bf16")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = dict(device=f"{name}, torch {torch.__version__}", shape=shape, args={k: str(v) for k, v in vars(args).items()})
    print(f"{results['device']}\n{shape}\nmodel built in {time.perf_counter() - began:.1f} s", flush=True)
    failed = []
    for part, skip, run in (("train", args.skip_train, run_train), ("generate", args.skip_generate, run_generate)):
        if skip:
            continue
        print(f"{part}:", flush=True)
        try:  # one part failing must not cost the other's numbers
            results[part] = run(model, args, device)
        except Exception:
            traceback.print_exc()
            failed.append(part)
            reset_peak(device)
    results["total_s"] = time.perf_counter() - began
    results["failed_parts"] = failed
    report = markdown(results)
    print("\n" + report)
    write_atomically(Path(f"{args.out}.json"), json.dumps(results, indent=2))
    write_atomically(Path(f"{args.out}.md"), report)
    print(f"total {results['total_s']:.1f} s; wrote {args.out}.json and .md")
    if failed:
        raise SystemExit(f"failed parts: {failed}")
    return results


if __name__ == "__main__":
    main()

"""Packed pair batches (spin_trainer.packing) against the trainer's padded pair batches.

(a) Tokens computed per pair against the information-carrying minimum P + A + G (prompt, actual
    response, generated response), over many pairs drawn from the length distribution below, for
    micro-batches of b pairs: padded = 2b rows x the longest `prompt + response` row (data.collate_pairs);
    packed = one flat row of `[prompt | actual | generated]` segments (each prompt once, no padding).
(b) One optimizer step of the trainer's own `SpinTrainer.train_step` (SPIN forward + backward of
    one micro-batch, AdamW update) on a small Llama (hidden 256, 4 layers, GQA 8/4 heads, V 8192,
    fp32, sdpa, "logits" head) at the same pairs per step, with `--no-pack-pairs` and `--pack-pairs`
    (this model's default): the micro-batch made as the trainer makes it (packed_scoring.pair_batch:
    data.collate_pairs, or packing.pack_pairs scored through packed_attention's "segments"
    attention, HF's sdpa per pair).
    Both start from a tokenized pair list (collation included). Time is the median over `--reps`
    timed steps, each step a fresh draw of pairs (the same draws for both layouts). Memory: the
    bytes autograd saves for the backward (activations; the CPU keeps no allocator peak), median
    over the same steps; on CUDA the allocator's peak too.

Length distribution, shaped like HuggingFaceH4/ultrachat_200k single-turn pairs (SPIN's data). No
published per-turn token statistics were found, so this is an assumption, checked against the
dataset card's sizes: train_sft is 1,397,058,554 bytes for 207,865 dialogues (6.7 kB, about 1,700
tokens at ~4 characters a token, multi-turn, the first prompt stored twice), consistent with turns
of ~150-200 prompt and ~300 response tokens. Prompt: 20 template tokens + lognormal(median 120,
sigma 0.9), cut to [8, 1024]; each response (actual, generated independently): lognormal(median
260, sigma 0.6), cut to [16, 1024]. `--length-scale` divides all lengths (CPU time).

    python benchmarks/bench_packing.py               # the tables (CPU: a couple of minutes)
    python benchmarks/bench_packing.py --tiny        # seconds, a smoke run
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import write_results  # noqa: E402
from timing import PeakMemory, synchronize  # noqa: E402

from spin_trainer.data import Example  # noqa: E402
from spin_trainer.logprobs import Scorer  # noqa: E402
from spin_trainer.options import parse_config  # noqa: E402
from spin_trainer.packed_scoring import pair_batch  # noqa: E402
from spin_trainer.packing import pack_pairs  # noqa: E402
from spin_trainer.parallel.mesh import ParallelContext  # noqa: E402

TEMPLATE_TOKENS = 20


def draw_lengths(generator, count, scale):
    def lognormal(median, sigma, low, high):
        values = torch.exp(math.log(median) + sigma * torch.randn(count, generator=generator))
        return (values / scale).round().clamp(max(1, low // scale), high // scale).long()

    prompt = lognormal(120, 0.9, 8, 1024) + TEMPLATE_TOKENS // scale
    return prompt, lognormal(260, 0.6, 16, 1024), lognormal(260, 0.6, 16, 1024)


def draw_pairs(generator, count, scale, vocab):
    lengths = zip(*(t.tolist() for t in draw_lengths(generator, count, scale)))
    return [tuple(torch.randint(1, vocab, (n,), generator=generator).tolist() for n in (p, a, g))
            for p, a, g in lengths]


def padded_tokens(pairs):
    return 2 * len(pairs) * max(len(p) + max(len(a), len(g)) for p, a, g in pairs)


def token_table(pairs_per_batch, num_pairs, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.stack(draw_lengths(generator, num_pairs, scale), 1)   # [num_pairs, 3]
    minimum = lengths.sum().item()
    rows = []
    for b in pairs_per_batch:
        used = lengths[: num_pairs - num_pairs % b]
        batches = used.reshape(-1, b, 3)
        padded = (2 * b * (batches[..., 0] + batches[..., 1:].max(-1).values).max(-1).values).sum().item()
        # Generated tokens unlike the gold ones: a generated response equal to its gold one packs as no token.
        packed = sum(pack_pairs([([1] * p, [1] * a, [2] * g) for p, a, g in batch.tolist()]).num_tokens
                     for batch in batches)
        floor = used.sum().item()
        rows.append({"pairs_per_batch": b, "min_per_pair": floor / len(used), "padded_per_pair": padded / len(used),
                     "packed_per_pair": packed / len(used), "padded_ratio": padded / floor,
                     "packed_ratio": packed / floor})
    return {"num_pairs": num_pairs, "mean_pair_tokens": minimum / num_pairs, "rows": rows}


def tiny_llama(vocab, hidden, layers):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=4096, pad_token_id=0)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def saved_bytes(step):
    """Bytes of the distinct storages autograd saves for the backward while `step()` runs."""
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        step()
    return sum(storages.values())


def trainer_for(model, device, pairs_per_step, pack):
    """A SpinTrainer whose train_step takes one micro-batch of `pairs_per_step` pairs (no data or
    generation: the benchmark hands it the micro-batch)."""
    from spin_trainer.trainer import SpinTrainer

    flags = ["--global-batch-size", str(pairs_per_step), "--micro-batch-size", str(pairs_per_step), "--lr", "1e-6",
             "--beta", "0.1", "--pack-pairs" if pack else "--no-pack-pairs"]
    scorer = Scorer(ParallelContext(0, 1, 1, 1, 0, 0, device))
    return SpinTrainer(model, None, [None] * pairs_per_step, [], parse_config(flags), scorer, out_dir="unused",
                       held_out=None, metrics=None, sampling=None)


def trainer_step(trainer, pairs, ref, device):
    examples = [Example(tuple(p), tuple(a)) for p, a, _ in pairs]
    generated = [g for _, _, g in pairs]
    batch = pair_batch(examples, generated, 0, trainer.scorer.packing).to(device)
    trainer.train_step(iter([(batch, ref, sum(map(len, generated)))]))


def step_table(args, device):
    model = tiny_llama(args.vocab, args.hidden, args.layers).to(device)
    trainers = {"padded": trainer_for(model, device, args.pairs_per_step, pack=False),
                "packed": trainer_for(model, device, args.pairs_per_step, pack=True)}
    assert trainers["packed"].scorer.packing == "shared" and trainers["padded"].scorer.packing is None
    generator = torch.Generator().manual_seed(args.seed + 1)
    draws = [draw_pairs(generator, args.pairs_per_step, args.length_scale, args.vocab) for _ in range(args.reps + 1)]
    results = {"padded": [], "packed": []}
    for rep, pairs in enumerate(draws):
        ref = torch.zeros(2 * len(pairs), device=device)
        for name, trainer in trainers.items():
            synchronize(device)
            began = time.perf_counter()
            with PeakMemory(device) as peak:
                saved = saved_bytes(lambda: trainer_step(trainer, pairs, ref, device))
            synchronize(device)
            if rep > 0:   # the first draw warms up
                results[name].append({"ms": (time.perf_counter() - began) * 1e3, "saved_mib": saved / 2**20,
                                      "peak_mib": None if peak.extra_bytes is None else peak.extra_bytes / 2**20,
                                      "tokens": padded_tokens(pairs) if name == "padded" else
                                      sum(len(p) + len(a) + len(g) for p, a, g in pairs)})
    summary = {}
    for name, runs in results.items():
        summary[name] = {key: (None if runs[0][key] is None else statistics.median(r[key] for r in runs))
                         for key in ("ms", "saved_mib", "peak_mib", "tokens")}
        summary[name]["all_ms"] = [round(r["ms"], 1) for r in runs]
    summary["speedup"] = summary["padded"]["ms"] / summary["packed"]["ms"]
    # Each draw runs both layouts back to back: the ratio per draw is less exposed to a shared CPU's load.
    summary["speedup_per_draw"] = statistics.median(a["ms"] / b["ms"] for a, b in zip(results["padded"],
                                                                                        results["packed"]))
    return summary


def markdown(args, device, tokens, steps):
    lines = [f"# bench_packing on {device.type}", "",
             f"(a) tokens computed per pair, {tokens['num_pairs']} pairs, mean P + A + G = "
             f"{tokens['mean_pair_tokens']:.1f} (length scale 1/{args.length_scale})", "",
             "| pairs per micro-batch | P+A+G | padded | packed | padded / min | packed / min |",
             "|---|---|---|---|---|---|"]
    for row in tokens["rows"]:
        lines.append(f"| {row['pairs_per_batch']} | {row['min_per_pair']:.1f} | {row['padded_per_pair']:.1f} | "
                     f"{row['packed_per_pair']:.1f} | {row['padded_ratio']:.3f} | {row['packed_ratio']:.3f} |")
    lines += ["", f"(b) SpinTrainer.train_step (--no-pack-pairs / --pack-pairs), Llama hidden {args.hidden}, "
              f"{args.layers} layers, V {args.vocab}, "
              f"{args.pairs_per_step} pairs per step, median of {args.reps} steps, {args.threads} thread(s)", "",
              "| layout | tokens | ms | saved for backward MiB | peak MiB | steps ms |", "|---|---|---|---|---|---|"]
    for name in ("padded", "packed"):
        row = steps[name]
        peak = "-" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"
        lines.append(f"| {name} | {row['tokens']:.0f} | {row['ms']:.0f} | {row['saved_mib']:.0f} | {peak} | "
                     f"{row['all_ms']} |")
    lines += ["", f"packed is {steps['speedup']:.2f}x faster (ratio of medians); median of the per-draw "
              f"ratios {steps['speedup_per_draw']:.2f}x"]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a smoke run of seconds")
    parser.add_argument("--pairs-per-step", type=int, default=4)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--length-scale", type=int, default=1)
    parser.add_argument("--token-pairs", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU intra-op threads (1: on a shared machine OpenMP's spin-waiting distorts both layouts)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "packing"))
    args = parser.parse_args()
    if args.tiny:
        args.reps, args.hidden, args.layers, args.vocab, args.length_scale, args.token_pairs = 2, 32, 1, 128, 16, 256
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    tokens = token_table((1, 2, 4, 8, 16), args.token_pairs, args.length_scale, args.seed)
    steps = step_table(args, device)
    text = markdown(args, device, tokens, steps)
    print(text)
    write_results(args.out, {"args": vars(args), "device": device.type, "tokens": tokens, "steps": steps}, text)


if __name__ == "__main__":
    main()

"""Host-memory benchmarks (issue 3), baselines and ours in one process.

(a) host -> device swap of ~3 GB of bf16 weights in ~200 tensors:
    NeMo-Aligner style (pageable CPU state dict, tensor-by-tensor copy), pinned tensors with a
    `copy_(non_blocking=True)` loop, `WeightBank.load_into`; plus a whole `swapped()` round trip
    (enter + exit) against NeMo-Aligner's three pageable full-model transfers.
(b) reference log-probs of a ~1.2 B-parameter random-init Llama shape for 16k tokens:
    resident reference model, NeMo-style swap + forward, `swapped()` + forward, streamed forward.

Prints markdown tables and writes benchmarks/results/swap.{json,md}. On a machine without CUDA it
runs a tiny version (numbers meaningless) and writes nothing unless --out is given.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from spin_kernels import swap
from spin_kernels.swap import WeightBank, streamed_reference_forward, swapped
from spin_trainer.model import build_tiny_llama

from results_file import write_results
from timing import GIB, PeakMemory, median_ms

GB = 1e9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gbytes", type=float, default=3.0, help="size of the swapped weight set (a)")
    parser.add_argument("--tensors", type=int, default=200, help="number of tensors in the weight set (a)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward (b)")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence (b): 8 x 2048 = 16k")
    parser.add_argument("--skip-forward", action="store_true", help="only run part (a)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (default on a machine without CUDA)")
    parser.add_argument("--out", default=None, help="results prefix (default benchmarks/results/swap on CUDA)")
    args = parser.parse_args(argv)
    if args.tiny or not torch.cuda.is_available():
        args.tiny = True
        args.gbytes, args.tensors, args.repeats = 0.004, 20, 2
        args.hidden, args.intermediate, args.layers, args.vocab, args.batch, args.seq = 64, 128, 3, 512, 2, 32
    return args


def pinned_footprint(nbytes):
    """torch's pinned (caching host) allocator reserves the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def weight_set(total_bytes, count, device):
    """`count` bf16 matrices of uneven sizes (as a model's are) adding up to about `total_bytes`."""
    weights = [1.0 + (i % 7) / 3 for i in range(count)]
    elements = [int(total_bytes / 2 * w / sum(weights)) // 64 * 64 for w in weights]
    generator = torch.Generator(device=device).manual_seed(0)
    return {f"layer{i}.weight": torch.randn((n // 64, 64), generator=generator, device=device).to(torch.bfloat16)
            for i, n in enumerate(elements)}


def bench_transfers(args, device):
    live = weight_set(args.gbytes * GB, args.tensors, device)
    nbytes = sum(t.numel() * t.element_size() for t in live.values())
    on_cuda = device.type == "cuda"
    pageable = {n: t.to("cpu", copy=True) for n, t in live.items()}
    pinned = {n: t.cpu().pin_memory() if on_cuda else t.clone() for n, t in live.items()}
    bank = WeightBank.from_tensors(live)
    rows = []

    def row(impl, ms, pinned_bytes, note=""):
        rows.append({"impl": impl, "ms": ms, "GB/s": nbytes / GB / (ms / 1e3), "pinned_bytes": pinned_bytes,
                     "note": note})

    # Ceiling: one large pinned buffer, one copy.
    big_host = torch.empty(min(nbytes, int(1 * GB)), dtype=torch.uint8, pin_memory=on_cuda)
    big_device = torch.empty_like(big_host, device=device)
    ceiling_ms = median_ms(lambda: big_device.copy_(big_host, non_blocking=True), device, args.repeats)
    pinned_rate = big_host.numel() / GB / (ceiling_ms / 1e3)
    del big_host, big_device

    def per_tensor(source):
        for name, dst in live.items():
            dst.copy_(source[name], non_blocking=True)

    row("NeMo-Aligner style: pageable state dict, per-tensor copy", median_ms(lambda: per_tensor(pageable), device,
                                                                               args.repeats), 0)
    pinned_bytes = sum(pinned_footprint(t.numel() * t.element_size()) for t in pinned.values()) if on_cuda else 0
    row("pinned tensors, per-tensor copy_(non_blocking=True)", median_ms(lambda: per_tensor(pinned), device,
                                                                          args.repeats), pinned_bytes)
    row(f"WeightBank.load_into ({bank.backend})", median_ms(lambda: bank.load_into(live), device, args.repeats),
        bank.arena_nbytes if bank.is_pinned else 0)

    # A whole swap: NeMo-Aligner moves the model out, the reference in and the model back (pageable).
    stash = {n: torch.empty_like(t, device="cpu") for n, t in live.items()}

    def nemo_swap():
        for name, tensor in live.items():
            stash[name].copy_(tensor)
        per_tensor(pageable)
        per_tensor(stash)

    def our_swap():
        with swapped(live, bank):
            pass

    round_trips = [("NeMo-Aligner style swap round trip (3 pageable transfers)", median_ms(nemo_swap, device,
                                                                                         args.repeats), 0)]
    with swapped(live, bank):  # allocate the stash outside the timing
        pass
    round_trips.append((f"swapped() enter + exit ({bank.backend})", median_ms(our_swap, device, args.repeats),
                        2 * bank.arena_nbytes if bank.is_pinned else 0))
    for impl, ms, footprint in round_trips:
        rows.append({"impl": impl, "ms": ms, "GB/s": 3 * nbytes / GB / (ms / 1e3), "pinned_bytes": footprint,
                     "note": "3 x tensor bytes moved"})
    return {"tensor_bytes": nbytes, "tensors": len(live), "pinned_copy_GBps": pinned_rate, "rows": rows,
            "arena_overhead_fraction": (bank.arena_nbytes - bank.nbytes) / bank.nbytes}


def chunked_logprobs(logits, labels, rows=4096):
    """Per-token log-probs with fp32 log-sum-exp over row chunks (same for every variant)."""
    flat, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows].float()
        out[start:start + rows] = chunk.gather(1, flat_labels[start:start + rows, None])[:, 0] - chunk.logsumexp(-1)
    return out.view(labels.shape)


def build_llama(args, device, seed):
    return build_tiny_llama(args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_layers=args.layers, num_heads=max(args.hidden // 64, 1),
                            num_kv_heads=max(args.hidden // 256, 1),
                            max_position_embeddings=max(args.seq, 128), seed=seed, dtype=torch.bfloat16,
                            device=device).eval()


def bench_reference_logprobs(args, device):
    reference = build_llama(args, device, seed=1)
    policy = build_llama(args, device, seed=2)
    params = sum(p.numel() for p in reference.parameters())
    bank = WeightBank.from_module(reference)
    pageable = {n: t.detach().cpu() for n, t in reference.state_dict().items()}
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=device)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    tokens = inputs.numel()
    results = {}

    def resident():
        return chunked_logprobs(reference(inputs).logits, labels)

    def nemo_swap_forward():
        own = {n: t.detach().cpu() for n, t in policy.state_dict().items()}
        policy.load_state_dict(pageable)
        try:
            return chunked_logprobs(policy(inputs).logits, labels)
        finally:
            policy.load_state_dict(own)

    def swap_forward():
        with swapped(policy, bank):
            return chunked_logprobs(policy(inputs).logits, labels)

    def streamed():
        return chunked_logprobs(streamed_reference_forward(policy, bank, inputs), labels)

    variants = [("resident reference model", resident), ("NeMo-Aligner style swap + forward", nemo_swap_forward),
                ("swapped() + forward", swap_forward), ("streamed_reference_forward", streamed)]
    with torch.no_grad():
        expected = resident()
        with swapped(policy, bank):  # allocate the stash outside the timing
            pass
        for name, fn in variants:
            # Same weights, same kernels: every variant must give the resident reference's numbers.
            max_diff = (fn() - expected).abs().max().item()
            with PeakMemory(device) as peak:
                ms = median_ms(fn, device, args.repeats)
            results[name] = {"ms": ms, "tokens/s": tokens / (ms / 1e3), "peak_extra_GiB": peak.extra_gib or 0.0,
                             "max_abs_diff_vs_resident": max_diff}
    weights_gib = sum(p.numel() * p.element_size() for p in reference.parameters()) / GIB
    return {"params": params, "tokens": tokens, "reference_weights_GiB": weights_gib, "rows": results}


def markdown(report):
    a = report["transfers"]
    lines = [f"## (a) host -> device swap: {a['tensor_bytes'] / GB:.2f} GB bf16 in {a['tensors']} tensors",
             f"measured pinned copy rate (one 1 GB copy): {a['pinned_copy_GBps']:.1f} GB/s; "
             f"arena alignment overhead: {100 * a['arena_overhead_fraction']:.4f} %", "",
             "| impl | ms | GB/s | x NeMo-style | of pinned rate | pinned bytes / tensor bytes |",
             "|---|---|---|---|---|---|"]
    nemo = {r["note"]: r["ms"] for r in a["rows"] if r["impl"].startswith("NeMo")}
    for r in a["rows"]:
        base = nemo.get(r["note"], r["ms"])
        lines.append(f"| {r['impl']} | {r['ms']:.1f} | {r['GB/s']:.1f} | {base / r['ms']:.2f} | "
                     f"{r['GB/s'] / a['pinned_copy_GBps']:.2f} | {r['pinned_bytes'] / a['tensor_bytes']:.4f} |")
    b = report.get("reference_logprobs")
    if b:
        lines += ["", f"## (b) reference log-probs: {b['params'] / 1e9:.2f} B-parameter Llama shape, "
                  f"{b['tokens']} tokens", "", "| impl | ms | tokens/s | x resident | peak extra GPU GiB | max abs diff vs resident |",
                  "|---|---|---|---|---|---|"]
        resident = b["rows"]["resident reference model"]["ms"]
        for name, r in b["rows"].items():
            lines.append(f"| {name} | {r['ms']:.1f} | {r['tokens/s']:,.0f} | {r['ms'] / resident:.2f} | "
                         f"{r['peak_extra_GiB']:.2f} | {r['max_abs_diff_vs_resident']:.2e} |")
        lines.append(f"\nresident reference weights (extra GPU memory held all the time): "
                     f"{b['reference_weights_GiB']:.2f} GiB")
    lines += ["", "## issue 3 targets", "", "| target | measured | met |", "|---|---|---|"]
    ours = next(r for r in a["rows"] if r["impl"].startswith("WeightBank.load_into"))
    nemo_ms = a["rows"][0]["ms"]
    checks = [("load_into >= 0.9 x pinned copy rate", ours["GB/s"] / a["pinned_copy_GBps"], 0.9),
              ("load_into >= 5.5 x NeMo-Aligner style", nemo_ms / ours["ms"], 5.5),
              ("arena bytes <= tensor bytes + 0.1 %", 1 + a["arena_overhead_fraction"], None)]
    for name, value, floor in checks:
        met = value >= floor if floor is not None else value <= 1.001
        lines.append(f"| {name} | {value:.4f} | {'yes' if met else 'NO'} |")
    if b:
        ratio = b["rows"]["streamed_reference_forward"]["ms"] / b["rows"]["resident reference model"]["ms"]
        lines.append(f"| streamed forward <= 1.1 x resident | {ratio:.3f} | {'yes' if ratio <= 1.1 else 'NO'} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        print("tiny run (no CUDA or --tiny): sizes shrunk, numbers are not meaningful", file=sys.stderr)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "backend": swap.backend, "args": vars(args)}
    report["transfers"] = bench_transfers(args, device)
    if not args.skip_forward:
        report["reference_logprobs"] = bench_reference_logprobs(args, device)
    text = markdown(report)
    print(text)
    out = args.out or (None if args.tiny else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                           "results", "swap"))
    if out:
        write_results(out, report, f"# bench_swap on {report['device']} (torch {report['torch']}, "
                                   f"{report['backend']})\n\n{text}")
        print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()

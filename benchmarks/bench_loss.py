"""SPIN loss from logits: spin_kernels against what users run today, measured in one process.

For each vocab size: forward+backward and no-grad forward of the SPIN loss on N = 16384 rows
(8 sequences x 2048 tokens, the first 30 % of each a prompt), bf16 logits. Baselines: eager fp32
log_softmax + gather (NeMo-Aligner, the SPIN paper's code), torch.compile of it, and Liger-Kernel's
cross_entropy(reduction="none") when importable. The same run measures the device copy bandwidth
(bytes read + written) that defines the floors: 3 passes over the logits for forward+backward
(read, read, write), 1 for the no-grad forward.

    python benchmarks/bench_loss.py                       # full table (GPU)
    python benchmarks/bench_loss.py --sweep               # first pick each kernel's launch config
Writes benchmarks/results/loss.json and loss.md.
"""
import argparse
import pathlib

import torch

from spin_kernels import spin_loss
from spin_kernels.loss.ops import logprobs as triton_ops
from spin_kernels.loss.torch_backend import naive_spin_loss

from results_file import write_results
from timing import GIB, PeakMemory, median_ms

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BETA = 0.1


def copy_bandwidth(device) -> float:
    """Bytes read + written per second of a large device-to-device copy."""
    src = torch.empty(2 * GIB if device.type == "cuda" else 64 * 2**20, dtype=torch.uint8,
                      device=device).random_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=20)
    return 2 * src.numel() / (ms / 1e3)


def make_batch(n_seq, seq_len, vocab, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(n_seq, seq_len, vocab, device=device, generator=g) * 2).bfloat16()
    labels = torch.randint(0, vocab, (n_seq, seq_len), device=device, generator=g)
    loss_mask = torch.ones(n_seq, seq_len, dtype=torch.bool, device=device)
    loss_mask[:, : int(0.3 * seq_len)] = False
    ref = torch.randn(n_seq, device=device, generator=g) - seq_len * 8
    return logits, labels, loss_mask, ref


def liger_loss_fn():
    try:
        from liger_kernel.transformers.functional import liger_cross_entropy
    except ImportError as err:
        print(f"Liger-Kernel not importable ({err}): its rows are skipped")
        return None

    def loss(logits, labels, loss_mask, ref):
        masked = labels.masked_fill(~loss_mask, -100)
        nll = liger_cross_entropy(logits.view(-1, logits.shape[-1]), masked.view(-1),
                                  reduction="none")
        policy = -nll.view(labels.shape).float().sum(-1)
        half = policy.shape[0] // 2
        margin = BETA * ((policy[:half] - ref[:half]) - (policy[half:] - ref[half:]))
        return -torch.nn.functional.logsigmoid(margin).mean()

    return loss


def implementations(vocab, compile_vocabs):
    def eager(logits, labels, loss_mask, ref):
        return naive_spin_loss(logits, labels, ref, loss_mask=loss_mask, beta=BETA)[0]

    impls = {"eager fp32 log_softmax (NeMo-Aligner, SPIN paper)": eager}
    if vocab in compile_vocabs:
        impls["torch.compile(eager)"] = torch.compile(eager)
    liger = liger_loss_fn()
    if liger is not None:
        impls["Liger cross_entropy(reduction=none)"] = liger
    impls["spin_kernels"] = lambda x, y, m, r: spin_loss(x, y, r, loss_mask=m, beta=BETA).loss
    impls["spin_kernels inplace_backward"] = lambda x, y, m, r: spin_loss(
        x, y, r, loss_mask=m, beta=BETA, inplace_backward=True).loss
    return impls


def gradient_error(impl, vocab, device) -> float:
    """Relative error of dlogits vs float64 autograd, on 2 x 512 rows of the same kind."""
    logits, labels, loss_mask, ref = make_batch(2, 512, vocab, device, seed=1)
    x = logits.clone().requires_grad_()
    (grad,) = torch.autograd.grad(impl(x, labels, loss_mask, ref), x)
    xd = logits.double().requires_grad_()
    want = naive_spin_loss(xd, labels, ref, loss_mask=loss_mask, beta=BETA, dtype=torch.float64)[0]
    (want_grad,) = torch.autograd.grad(want, xd)
    return ((grad.double() - want_grad).norm() / want_grad.norm()).item()


def measure(name, impl, batch, reps, device):
    logits, labels, loss_mask, ref = batch
    x = logits.clone().requires_grad_()

    # autograd.grad hands the gradient back as a model's lm_head backward would receive it
    # (no accumulation into a .grad, which could add a copy of an in-place gradient).
    def step():
        return torch.autograd.grad(impl(x, labels, loss_mask, ref), x)

    def forward_only():
        with torch.no_grad():
            impl(x, labels, loss_mask, ref)

    # An in-place backward overwrites the logits with their gradient: restore them, untimed.
    restore = (lambda: x.detach().copy_(logits)) if "inplace" in name else None
    row = {"impl": name}
    try:
        row["fwd_bwd_ms"] = median_ms(step, device, reps, setup=restore)
        row["no_grad_ms"] = median_ms(forward_only, device, reps, setup=restore)
        with PeakMemory(device) as peak:
            step()
        if peak.extra_gib is not None:
            row["extra_gib"] = peak.extra_gib
        if not name.startswith("torch.compile"):  # the same arithmetic as eager; spare a recompile
            row["grad_rel_err"] = gradient_error(impl, logits.shape[-1], device)
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    del x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


SWEEP_CONFIGS = [(block_v, warps) for block_v in (1024, 2048, 4096, 8192, 16384)
                 for warps in (2, 4, 8, 16, 32) if 4 <= block_v // (32 * warps) <= 32]


def sweep(batch, reps):
    """Time each kernel alone over launch configs; returns the rows and the best per kernel.

    (BLOCK_V, num_warps) first at 3 pipeline stages, then the best three at 1, 2 and 4 stages.
    """
    logits, labels, loss_mask, _ = batch
    labels = labels.masked_fill(~loss_mask, -100).reshape(-1)
    vocab = logits.shape[-1]
    stats = triton_ops.logprob_stats(logits, labels, -100, 1.0, 0, vocab)
    grad = torch.randn(labels.shape, device=logits.device)
    calls = {
        "stats": ("_stats_config", lambda: triton_ops.logprob_stats(logits, labels, -100, 1.0, 0, vocab)),
        "grad": ("_grad_config", lambda: triton_ops.logprob_grad(grad, logits, labels, stats, -100, 1.0, 0)),
    }
    rows, best = [], {}
    for kernel, (attr, call) in calls.items():
        default = getattr(triton_ops, attr)
        timed = {}
        try:
            def time_config(config):
                setattr(triton_ops, attr, lambda v: config)
                timed[config] = median_ms(call, logits.device, reps)
                rows.append({"kernel": kernel, "config": config, "ms": timed[config]})
            for block_v, warps in SWEEP_CONFIGS:
                time_config((block_v, warps, 3))
            for block_v, warps, _ in sorted(timed, key=timed.get)[:3]:
                for stages in (1, 2, 4):
                    time_config((block_v, warps, stages))
        finally:
            setattr(triton_ops, attr, default)
        best[kernel] = min(timed, key=timed.get)
        print(f"  sweep V={vocab} {kernel}: best (BLOCK_V, num_warps, num_stages) = {best[kernel]}, "
              f"{timed[best[kernel]]:.3f} ms; default {default(vocab)}: "
              f"{timed.get(default(vocab), float('nan')):.3f} ms", flush=True)
    return rows, best


def markdown(results) -> str:
    lines = [f"Device: {results['device']}; torch {results['torch']}, triton {results['triton']}; "
             f"copy bandwidth {results['copy_tb_s']:.2f} TB/s (read + write)", ""]
    for table in results["tables"]:
        n, v = table["rows"], table["vocab"]
        ours = next(r for r in table["impls"] if r["impl"] == "spin_kernels")
        lines += [f"### V = {v}, N = {n} rows, bf16, 30 % masked; floor: fwd+bwd "
                  f"{table['floor_ms']:.2f} ms (3 passes), no-grad {table['floor_fwd_ms']:.2f} ms (1 pass)",
                  ""]
        if "launch_config" in table:
            lines += [f"Launch configs (BLOCK_V, num_warps, num_stages), sweep winners: forward "
                      f"{tuple(table['launch_config']['stats'])}, backward "
                      f"{tuple(table['launch_config']['grad'])}", ""]
        lines += [ "| impl | fwd+bwd ms | x floor | x spin_kernels | no-grad ms | x floor | "
                  "extra GiB | dlogits rel. err vs fp64 |", "|---|---|---|---|---|---|---|---|"]
        for r in table["impls"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['error']} | | | | | | |")
                continue
            extra = f"{r['extra_gib']:.2f}" if "extra_gib" in r else "n/a"
            err = f"{r['grad_rel_err']:.1e}" if "grad_rel_err" in r else "as eager"
            lines.append(
                f"| {r['impl']} | {r['fwd_bwd_ms']:.2f} | {r['fwd_bwd_ms'] / table['floor_ms']:.2f} | "
                f"{r['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f} | {r['no_grad_ms']:.2f} | "
                f"{r['no_grad_ms'] / table['floor_fwd_ms']:.2f} | {extra} | {err} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--compile-vocab", type=int, nargs="*", default=[128256],
                        help="vocab sizes that also time torch.compile (each compiles anew)")
    parser.add_argument("--sweep", action="store_true",
                        help="time each kernel's launch configs at every vocab and use the winners")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "loss")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No GPU: timing the torch backend on the CPU (for a smoke run; the tables are GPU numbers)")
    import triton

    bandwidth = copy_bandwidth(device)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "copy_tb_s": bandwidth / 1e12, "tables": []}
    print(f"copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    committed_configs = (triton_ops._stats_config, triton_ops._grad_config)
    for vocab in args.vocab:
        batch = make_batch(args.seqs, args.seq_len, vocab, device)
        n = args.seqs * args.seq_len
        logit_bytes = n * vocab * 2
        table = {"vocab": vocab, "rows": n, "floor_ms": 3 * logit_bytes / bandwidth * 1e3,
                 "floor_fwd_ms": logit_bytes / bandwidth * 1e3, "impls": []}
        if args.sweep and device.type == "cuda":
            triton_ops._stats_config, triton_ops._grad_config = committed_configs
            table["sweep"], best = sweep(batch, max(5, args.reps // 2))
            table["launch_config"] = best
            # This vocab's table runs with the winners (they become the defaults when committed).
            triton_ops._stats_config = lambda v, c=best["stats"]: c
            triton_ops._grad_config = lambda v, c=best["grad"]: c
        for name, impl in implementations(vocab, args.compile_vocab).items():
            row = measure(name, impl, batch, args.reps, device)
            print(f"V={vocab} {name}: {row}", flush=True)
            table["impls"].append(row)
        results["tables"].append(table)
        del batch
    text = markdown(results)
    write_results(args.out, results, text)
    print(text)


if __name__ == "__main__":
    main()

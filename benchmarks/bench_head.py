"""SPIN loss from hidden states (the LM head fused): spin_kernels against what users run, in one process.

For each (H, V): forward + backward of the SPIN loss from hidden states [2B, T, H] and an LM head
weight [V, H] (no bias, as Llama's), bf16, 8 sequences x 2048 tokens with the first 30 % of each a
prompt, beta = 0.1. Reference log-probs are 0 for every row: Liger's module takes no precomputed
ones (it runs "policy side only"), and so every row computes the same loss and the same gradient.

    eager                 HF head (F.linear) + fp32 log_softmax + gather (NeMo-Aligner, SPIN paper code)
    HF head + logits      HF head + spin_kernels.spin_loss(inplace_backward=True)
    Liger                 LigerFusedLinearDPOLoss(use_ref_model=False)
    CCE                   cut_cross_entropy.linear_cross_entropy(reduction="none") + our pair loss
    TRL                   trl.kernels.ChunkedLogProbFunction on the labelled rows, as TRL's trainers
                          call it, + our pair loss
    spin_kernels          spin_kernels.linear_spin_loss (the public API)

Columns: median ms of forward + backward (autograd.grad of hidden and weight); x floor, the floor
being 6·N_labelled·H·V FLOPs at the bf16 matmul rate (8192^3) measured in this run; extra GiB,
the peak memory allocated during forward + backward above its start, less the returned gradients
(d hidden, d weight); relative error of d hidden and d weight against float64, on 2 x 512 tokens
of the same kind. A peer that cannot be imported or run gets a row saying why.

    python benchmarks/bench_head.py            # the tables (GPU), ~2 minutes on an H200
    python benchmarks/bench_head.py --tiny     # seconds on the CPU, torch backend, for the tests
Writes benchmarks/results/head.json and head.md.
"""
import argparse
import pathlib

import torch
import torch.nn.functional as F

from spin_kernels import linear_spin_loss, spin_loss, spin_loss_from_logps
from spin_kernels.loss.torch_backend import naive_spin_loss

from results_file import write_results
from timing import GIB, PeakMemory, median_ms

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BETA = 0.1
IGNORE = -100


def matmul_tflops(device, size: int) -> float:
    """bf16 matmul rate (size^3), the rate the floor is counted at."""
    a, b = (torch.randn(size, size, device=device).bfloat16() for _ in range(2))
    c = torch.empty_like(a)
    ms = median_ms(lambda: torch.mm(a, b, out=c), device, reps=10)
    return 2 * size**3 / (ms / 1e3) / 1e12


def make_batch(n_seq, seq_len, hidden_size, vocab, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(n_seq, seq_len, hidden_size, device=device, generator=g).bfloat16()
    # logits of std ~2, as bench_loss.py's
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g)
              * (2 / hidden_size**0.5)).bfloat16()
    labels = torch.randint(0, vocab, (n_seq, seq_len), device=device, generator=g)
    loss_mask = torch.ones(n_seq, seq_len, dtype=torch.bool, device=device)
    loss_mask[:, : int(0.3 * seq_len)] = False
    ref = torch.zeros(n_seq, device=device)
    return hidden, weight, labels, loss_mask, ref


def pair_loss(per_token, loss_mask, ref):
    """Our pair loss on per-token log-probs [2B, T] (0 outside the mask)."""
    policy = (per_token.float() * loss_mask).sum(-1)
    return spin_loss_from_logps(policy, ref, beta=BETA).loss


def _eager(h, w, labels, mask, ref):
    return naive_spin_loss(F.linear(h, w), labels, ref, loss_mask=mask, beta=BETA)[0]


def _hf_head_logits_kernels(h, w, labels, mask, ref):
    return spin_loss(F.linear(h, w), labels, ref, loss_mask=mask, beta=BETA,
                     inplace_backward=True).loss


def _ours(h, w, labels, mask, ref):
    return linear_spin_loss(h, w, labels, ref, loss_mask=mask, beta=BETA).loss


def _liger(device):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    module = LigerFusedLinearDPOLoss(ignore_index=IGNORE, beta=BETA, use_ref_model=False,
                                     compiled=device.type == "cuda")

    def loss(h, w, labels, mask, ref):  # ref is 0: the module's policy-side-only loss is the same
        out = module(w, h, labels.masked_fill(~mask, IGNORE))
        return out[0] if isinstance(out, tuple) else out

    return loss


def _cce(device):
    from cut_cross_entropy import linear_cross_entropy

    def loss(h, w, labels, mask, ref):
        nll = linear_cross_entropy(h, w, labels.masked_fill(~mask, IGNORE), reduction="none")
        return pair_loss(-nll, mask, ref)

    return loss


def _trl(device):
    from trl.kernels import ChunkedLogProbFunction

    from_trainer = 32768  # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, its trainers' vocab tile

    def loss(h, w, labels, mask, ref):
        logps = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, from_trainer,
                                             None, 1.0, ())[0]
        return pair_loss(logps.new_zeros(mask.shape).masked_scatter(mask, logps), mask, ref)

    return loss


def implementations(device):
    """{name: loss fn or the reason it cannot run}."""
    impls = {"eager: HF head + fp32 log_softmax": _eager,
             "HF head + spin_kernels logits kernels": _hf_head_logits_kernels}
    for name, make in (("Liger LigerFusedLinearDPOLoss", _liger),
                       ("CCE linear_cross_entropy + our pair loss", _cce),
                       ("TRL ChunkedLogProbFunction + our pair loss", _trl)):
        try:
            impls[name] = make(device)
        except Exception as err:  # ImportError, or a peer that refuses this machine at import
            impls[name] = f"not importable: {type(err).__name__}: {err}".replace("\n", " ")[:200]
    impls["spin_kernels linear_spin_loss"] = _ours
    return impls


def float64_grads(batch):
    h, w, labels, mask, ref = batch
    hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
    loss = naive_spin_loss(hd @ wd.T, labels, ref, loss_mask=mask, beta=BETA, dtype=torch.float64)[0]
    return torch.autograd.grad(loss, (hd, wd))


def rel_err(got, want) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def measure(name, impl, batch, error_batch, exact, reps, device, floor_ms):
    hidden, weight, labels, mask, ref = batch
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()

    def step():  # gradients handed back as a backbone and an optimizer would receive them
        return torch.autograd.grad(impl(h, w, labels, mask, ref), (h, w))

    row = {"impl": name}
    try:
        row["fwd_bwd_ms"] = median_ms(step, device, reps)
        row["x_floor"] = row["fwd_bwd_ms"] / floor_ms
        with PeakMemory(device) as peak:
            grads = step()
        if peak.extra_bytes is not None:
            returned = sum(g.numel() * g.element_size() for g in grads)
            row["extra_gib"] = (peak.extra_bytes - returned) / GIB
        del grads
        eh, ew, *rest = error_batch
        eh, ew = eh.clone().requires_grad_(), ew.clone().requires_grad_()
        got = torch.autograd.grad(impl(eh, ew, *rest), (eh, ew))
        row["d_hidden_rel_err"], row["d_weight_rel_err"] = (rel_err(g, e) for g, e in zip(got, exact))
    except torch.OutOfMemoryError:
        row["error"] = "out of memory"
    except Exception as err:  # a peer failing on this machine is a row, not the end of the table
        row["error"] = f"{type(err).__name__}: {err}".replace("\n", " ")[:200]
    del h, w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown(results) -> str:
    lines = [f"# bench_head on {results['device']}", "",
             f"torch {results['torch']}, triton {results['triton']}; bf16 matmul "
             f"{results['matmul_tflops']:.3g} TFLOP/s ({results['matmul_size']}^3); "
             f"{results['rows']} rows, 30 % masked, bf16; reference log-probs 0 (every row the "
             "same loss); extra = peak above the start less the returned gradients", ""]
    for table in results["tables"]:
        lines += [f"### H = {table['hidden']}, V = {table['vocab']}: {table['labelled']} labelled "
                  f"rows; floor 6·N·H·V = {table['floor_ms']:.1f} ms", "",
                  "| impl | fwd+bwd ms | x floor | extra GiB | d hidden rel. err | d weight rel. err |",
                  "|---|---|---|---|---|---|"]
        for r in table["impls"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {r['error']} | | | | |")
                continue
            extra = f"{r['extra_gib']:.2f}" if "extra_gib" in r else "n/a (cpu)"
            lines.append(f"| {r['impl']} | {r['fwd_bwd_ms']:.1f} | {r['x_floor']:.2f} | {extra} | "
                         f"{r['d_hidden_rel_err']:.1e} | {r['d_weight_rel_err']:.1e} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="2048x128256,4096x128256,8192x128256",
                        help="comma-separated HxV")
    parser.add_argument("--seqs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true",
                        help="CPU smoke run: 32x512, 4 x 32 tokens, 1 rep")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "head")
    args = parser.parse_args()
    if args.tiny:
        args.shapes, args.seqs, args.seq_len, args.reps = "32x512", 4, 32, 1
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    for h, v in shapes:
        if h <= 0 or v <= 0:
            parser.error(f"--shapes: H and V must be > 0, got {h}x{v}")
    if args.seqs <= 0 or args.seqs % 2 or args.seq_len <= 0:
        parser.error("--seqs must be even and > 0, --seq-len > 0")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        print("No GPU: the torch backend on the CPU (a smoke run; the tables are GPU numbers)")
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU: OpenMP's spin-waits cost 100x
    import triton

    size = 8192 if device.type == "cuda" else 256
    tflops = matmul_tflops(device, size)
    print(f"bf16 matmul {size}^3: {tflops:.1f} TFLOP/s", flush=True)
    results = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "triton": triton.__version__,
               "matmul_tflops": tflops, "matmul_size": size, "rows": args.seqs * args.seq_len,
               "tables": []}
    impls = implementations(device)
    error_len = min(512, args.seq_len)
    for hidden_size, vocab in shapes:
        batch = make_batch(args.seqs, args.seq_len, hidden_size, vocab, device)
        labelled = int(batch[3].sum())
        floor_ms = 6 * labelled * hidden_size * vocab / (tflops * 1e12) * 1e3
        error_batch = make_batch(2, error_len, hidden_size, vocab, device, seed=1)
        exact = float64_grads(error_batch)
        table = {"hidden": hidden_size, "vocab": vocab, "labelled": labelled,
                 "floor_ms": floor_ms, "impls": []}
        for name, impl in impls.items():
            row = ({"impl": name, "error": impl} if isinstance(impl, str) else
                   measure(name, impl, batch, error_batch, exact, args.reps, device, floor_ms))
            print(f"H={hidden_size} V={vocab} {name}: {row}", flush=True)
            table["impls"].append(row)
        results["tables"].append(table)
        del batch, error_batch, exact
    text = markdown(results)
    write_results(args.out, results, text)
    print(text)


if __name__ == "__main__":
    main()

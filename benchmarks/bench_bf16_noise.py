"""bf16 rounding noise against SPIN's signal, through the trainer's own code.

At the paper's lr (5e-7) and β (0.1), one optimizer step changes each sequence's β·(π − ref) by
little. This measures that change exactly (a float64 forward and log_softmax of the weights before
and after one step of the trainer) against what the trainer computes for it (Scorer.sequence_logps,
the log-probs the reference and the SPIN loss see) in each precision: fp32, bf16 with fp32 master
weights (FSDP's cast, on a 1-rank mesh as spin-train runs one process). Per precision: mean |signal|, mean |error| of the computed change, their ratio, and
the correlation of computed and exact change over the sequences. On a random-init Llama (CPU,
seconds); the numbers in README.md come from the default shape.

    python benchmarks/bench_bf16_noise.py [--hidden 256 --layers 4 --vocab 4096 --pairs 32]
"""
import argparse

import torch

from spin_trainer.data import Example, collate_pairs
from spin_trainer.logprobs import Scorer
from spin_trainer.model import build_tiny_llama
from spin_trainer.options import parse_config
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.mesh import ParallelContext, setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.trainer import SpinTrainer

PRECISIONS = {"float32": Precision("float32"), "bfloat16": Precision("bfloat16")}


def build(args, state=None):
    model = build_tiny_llama(args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                             num_kv_heads=args.heads, intermediate_size=4 * args.hidden,
                             max_position_embeddings=args.seq_len + 8, initializer_range=0.02,
                             attn_implementation="sdpa")
    if state is not None:
        model.load_state_dict(state)
    return model


def make_batch(args):
    generator = torch.Generator().manual_seed(1)
    prompt = args.seq_len // 4
    prompts = torch.randint(0, args.vocab, (args.pairs, prompt), generator=generator).tolist()
    responses = torch.randint(0, args.vocab, (2 * args.pairs, args.seq_len - prompt), generator=generator).tolist()
    examples = [Example(tuple(p), tuple(r)) for p, r in zip(prompts, responses[:args.pairs])]
    return collate_pairs(examples, responses[args.pairs:], pad_token_id=0)


@torch.no_grad()
def exact_logps(args, state, batch):
    """[2P] float64 forward and log_softmax: the exact log-probs of these weights."""
    logits = build(args, state).double()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    token = logits.log_softmax(-1).gather(-1, batch.labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token * batch.loss_mask).sum(-1)


def trainer_logps(args, state, batch, precision):
    """[2P] what the trainer computes (the reference's and the loss's log-probs) in `precision`."""
    ctx = setup_parallel(1, "cpu", fsdp_alone=precision.mixed)
    try:
        model = parallelize_model(build(args, state), ctx, precision)
        return Scorer(ctx, precision, args.head).sequence_logps(model, batch).double()
    finally:
        teardown_parallel(ctx)


def one_step(args, batch):
    """θ_0 and θ_1: the weights before and after one fp32 SPIN step at θ_0 (policy = reference)."""
    model = build(args)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = Scorer(ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")))
    config = parse_config(["--global-batch-size", str(args.pairs), "--micro-batch-size", str(args.pairs),
                           "--lr", str(args.lr), "--beta", str(args.beta), "--weight-decay", "0"])
    trainer = SpinTrainer(model, None, [None] * args.pairs, [], config, scorer, out_dir="unused", held_out=None,
                          metrics=None, sampling=None)
    ref = scorer.sequence_logps(model, batch)
    trainer.train_step([(batch, ref, int(batch.loss_mask[args.pairs:].sum()))])
    return before, {k: v.clone() for k, v in model.state_dict().items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("vocab", 4096), ("pairs", 32),
                          ("seq_len", 64)):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    parser.add_argument("--lr", type=float, default=5e-7)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--head", choices=("logits", "fused"), default="logits")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    batch = make_batch(args)
    theta0, theta1 = one_step(args, batch)
    signal = args.beta * (exact_logps(args, theta1, batch) - exact_logps(args, theta0, batch))
    print(f"lr {args.lr:g}, beta {args.beta:g}, {2 * args.pairs} sequences of {args.seq_len} tokens, hidden "
          f"{args.hidden}, {args.layers} layers, V = {args.vocab}, --head {args.head}")
    print(f"mean |one step's change of beta*(pi - ref)| (float64): {signal.abs().mean():.3g}")
    print("| precision | mean abs error | error / signal | correlation with the exact change |")
    print("|---|---|---|---|")
    rows = {}
    for name, precision in PRECISIONS.items():
        computed = args.beta * (trainer_logps(args, theta1, batch, precision)
                                - trainer_logps(args, theta0, batch, precision))
        error = (computed - signal).abs().mean()
        correlation = torch.corrcoef(torch.stack([computed, signal]))[0, 1]
        rows[name] = dict(error=float(error), correlation=float(correlation))
        print(f"| {name} | {error:.3g} | {error / signal.abs().mean():.3g} | {correlation:.3f} |")
    return dict(signal=float(signal.abs().mean()), rows=rows)


if __name__ == "__main__":
    main()

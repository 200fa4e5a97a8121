"""Writes the demo's synthetic task: two-number addition, answers checkable by exact match.

    python data/make_arith.py --out data/arith      (the committed files were made with the defaults)

Each record is {"prompt": "37+48=", "response": "85"}. train.jsonl feeds the SFT warm-up and the
SPIN prompts, val.jsonl the SFT validation loss and held-out SPIN pairs, test.jsonl the held-out
exact-match accuracy. The three splits never share a problem, so the accuracy measures
generalisation, not memorisation.
"""
import argparse
import os
import random

from splits import write_splits


def all_problems(max_operand):
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "arith"))
    parser.add_argument("--max-operand", type=int, default=99)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=128)
    parser.add_argument("--test", type=int, default=256)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)

    problems = all_problems(args.max_operand)
    needed = args.train + args.val + args.test
    if needed > len(problems):
        raise ValueError(f"--train + --val + --test = {needed} exceeds the {len(problems)} distinct "
                         f"problems with --max-operand {args.max_operand}")
    random.Random(args.seed).shuffle(problems)
    records = [{"prompt": f"{a}+{b}=", "response": str(a + b)} for a, b in problems[:needed]]
    write_splits(args.out, records, args.train, args.val)


if __name__ == "__main__":
    main()

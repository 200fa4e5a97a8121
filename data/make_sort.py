"""Writes the study's second task: sorting a list of digits, answers checkable by exact match.

    python data/make_sort.py --out data/sort      (the committed files were made with the defaults)

Each record is {"prompt": "7391593=", "response": "1335799"}: 6 to 9 digits, then the same digits
in ascending order. Responses (7 to 10 tokens with EOS) are three times as long as the arithmetic
task's, and a weak model gets them wrong in many ways (a digit dropped, doubled, or out of
place), so its own generations differ from the gold response in varied, partly right ways.
train.jsonl feeds the SFT start and the SPIN prompts, val.jsonl the SFT validation loss, held-out
SPIN pairs and the choice of learning rate and β, test.jsonl the held-out exact-match accuracy.
The three splits never share a problem.
"""
import argparse
import os
import random

from splits import write_splits


def sample_problems(count, min_digits, max_digits, seed):
    """`count` distinct digit strings with lengths uniform in [min_digits, max_digits]."""
    rng = random.Random(seed)
    problems, seen = [], set()
    while len(problems) < count:
        digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(min_digits, max_digits)))
        if digits not in seen:
            seen.add(digits)
            problems.append(digits)
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sort"))
    parser.add_argument("--min-digits", type=int, default=6)
    parser.add_argument("--max-digits", type=int, default=9)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=256)
    parser.add_argument("--test", type=int, default=512)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    if not 1 <= args.min_digits <= args.max_digits:
        raise ValueError(f"--min-digits {args.min_digits} and --max-digits {args.max_digits}: "
                         f"need 1 <= --min-digits <= --max-digits")
    # 10^6 distinct lists of 6 digits alone: far more than any split needs.
    distinct = sum(10 ** n for n in range(args.min_digits, args.max_digits + 1))
    needed = args.train + args.val + args.test
    if needed > distinct // 2:
        raise ValueError(f"--train + --val + --test = {needed} is too many for the {distinct} distinct lists of "
                         f"{args.min_digits} to {args.max_digits} digits")
    problems = sample_problems(needed, args.min_digits, args.max_digits, args.seed)
    records = [{"prompt": f"{digits}=", "response": "".join(sorted(digits))} for digits in problems]
    write_splits(args.out, records, args.train, args.val)


if __name__ == "__main__":
    main()

"""Tokenization throughput of the trainer's data path (spin_trainer.data.load_data: read through
`datasets`, render the chat template, tokenize the whole conversation once, split it), on synthetic
UltraChat-sized records: UltraChat's layout (`prompt`, `prompt_id`, `messages`), a prompt of 100 to
300 words and a gold response of 200 to 800 words, in a JSONL file. The tokenizer is built locally
(no download): the zephyr/Llama-style one of tests/tokenizer_families.py (Metaspace BPE, BOS,
zephyr's chat template), trained to a 16k vocabulary on the synthetic text.

Prints records/s (wall clock; on a shared machine, also read the CPU seconds) and the time 208k records (UltraChat 200k's train_sft) would take at that rate,
and the time to read the same data back from the tokenization cache (what a resume does), and
the process's peak RSS.

    python benchmarks/bench_tokenize.py --records 20000
"""
import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from tokenizer_families import llama_style  # noqa: E402  (the tests' tokenizer builders)

from spin_trainer.data import load_data  # noqa: E402

ULTRACHAT_RECORDS = 207_865


def synthetic_words(rng, count=6000):
    syllables = ["ka", "lo", "mi", "tra", "son", "de", "vi", "ne", "qu", "ar", "is", "ple", "men", "to", "ry"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)]


def text(rng, words, low, high):
    out = []
    for i in range(rng.randint(low, high)):
        word = words[min(int(rng.paretovariate(1.1)) - 1, len(words) - 1)]
        out.append(word.capitalize() if i == 0 or out[-1].endswith(".") else word)
        if rng.random() < 0.08:
            out[-1] += rng.choice([".", ",", ".\n", ":", "?"])
    return " ".join(out) + "."


def write_records(path, count, seed=0):
    rng = random.Random(seed)
    words = synthetic_words(rng)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(count):
            prompt, response = text(rng, words, 100, 300), text(rng, words, 200, 800)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            f.write(json.dumps({"prompt": prompt, "prompt_id": str(i), "messages": messages}) + "\n")
    return [text(rng, words, 200, 400) for _ in range(200)]


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)   # every thread of this process (the tokenizer's too)
    return usage.ru_utime + usage.ru_stime


def peak_rss_gib():
    """This process's peak resident memory (Linux reports KiB): the tokenized Examples' cost."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--max-length", type=int, default=2048)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ultrachat.jsonl")
        corpus = write_records(path, args.records)
        tokenizer = llama_style(vocab_size=16000, corpus=corpus)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        examples, summary = load_data(path, tokenizer, max_length=args.max_length, cache_dir=os.path.join(tmp, "c"))
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        start = time.perf_counter()
        load_data(path, tokenizer, max_length=args.max_length, cache_dir=os.path.join(tmp, "c"))
        cached = time.perf_counter() - start
    tokens = sum(len(e.prompt_ids) + len(e.response_ids) for e in examples)
    rate = len(examples) / seconds
    print(f"{len(examples)} records ({tokens / len(examples):.0f} tokens each on average) in {seconds:.1f} s "
          f"({cpu:.1f} CPU-s, all threads): {rate:.0f} records/s on {len(os.sched_getaffinity(0))} CPUs; "
          f"{ULTRACHAT_RECORDS} records would take {ULTRACHAT_RECORDS / rate / 60:.1f} min; read back from the "
          f"cache in {cached:.1f} s; peak RSS {peak_rss_gib():.1f} GiB" + (f"; {summary}" if summary else ""))


if __name__ == "__main__":
    main()

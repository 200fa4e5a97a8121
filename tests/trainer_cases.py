"""Shared set-up of the trainer tests (no tests here): a tiny model directory and small data files."""
import json
import os
import socket

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARITH = os.path.join(ROOT, "data", "arith")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def arith_records(split, count):
    with open(os.path.join(ARITH, f"{split}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f][:count]


def tiny_setup(root, *, train=32, val=8, test=8):
    """(model_dir, train_path, val_path, test_path) of a tiny Llama and arithmetic data under `root`."""
    from spin_trainer.model import create_default_model

    model_dir = os.path.join(root, "tiny_model")
    if not os.path.isdir(model_dir):
        create_default_model(model_dir, seed=0, hidden_size=32, intermediate_size=64)
    paths = []
    for split, count in (("train", train), ("val", val), ("test", test)):
        paths.append(write_jsonl(os.path.join(root, f"{split}.jsonl"), arith_records(split, count)))
    return (model_dir, *paths)


def train_args(model_dir, train_path, val_path, test_path, out, *extra):
    return ["--model", model_dir, "--train-data", train_path, "--val-data", val_path, "--test-data", test_path,
            "--out", out, "--max-length", "16", "--iterations", "2", "--global-batch-size", "8",
            "--micro-batch-size", "4", "--lr", "1e-3", "--max-new-tokens", "5", "--no-progress",
            "--device", "cpu", *extra]


def fixed_pairs(tokenizer, count):
    """`count` (examples, generated responses): gold arithmetic answers, and generated responses of
    different lengths (one without EOS) to exercise padding and masks."""
    from spin_trainer.data import Example

    examples = []
    for record in arith_records("train", count):
        prompt = [tokenizer.bos_token_id] + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(tuple(prompt), tuple(response)))
    texts = (("1", True), ("123", True), ("77", False), ("4", True))
    generated = [tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
                 for text, eos in (texts[i % len(texts)] for i in range(count))]
    return examples, generated


def free_port():
    """A free TCP port on this host, for the rendezvous of spawned gloo processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

"""Shared set-up of the trainer tests (no tests here): a tiny model directory and small data files, and
the comparison of two runs' outputs."""
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


# Eval-row keys that average the acc of an iteration's first step, where the policy is the reference
# and every margin is 0 up to float rounding: which pairs count as won there is rounding noise.
FIRST_STEP_ACC = ("spin_acc", "spin_acc_start")


def metric_records(out, kind):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def assert_runs_match(got_out, want_out, *, steps, tolerance=1e-4, eval_tolerance=1e-5, weight_tolerance=1e-5):
    """Two runs' `--out` agree: per-step losses, rewards std and (after each iteration's first step)
    acc; evaluation rows; final weights."""
    import torch
    from safetensors.torch import load_file

    train_got, train_want = metric_records(got_out, "train"), metric_records(want_out, "train")
    assert [r["step"] for r in train_got] == [r["step"] for r in train_want] == list(steps)
    for got, want in zip(train_got, train_want):
        assert abs(got["loss"] - want["loss"]) <= tolerance, (got["step"], got["loss"], want["loss"])
        assert abs(got["rewards_all_std"] - want["rewards_all_std"]) <= tolerance * (1 + want["rewards_all_std"])
    for previous, got, want in zip(train_want, train_got[1:], train_want[1:]):
        if previous["iteration"] == want["iteration"]:
            assert got["acc"] == want["acc"], (got["step"], got["acc"], want["acc"])
    for got, want in zip(metric_records(got_out, "eval"), metric_records(want_out, "eval"), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if key in FIRST_STEP_ACC:
                continue
            if isinstance(value, float):
                assert abs(got[key] - value) <= eval_tolerance * (1 + abs(value)), key
            else:
                assert got[key] == value, key
    got_weights = load_file(os.path.join(got_out, "final", "model.safetensors"))
    want_weights = load_file(os.path.join(want_out, "final", "model.safetensors"))
    assert got_weights.keys() == want_weights.keys()
    for name, tensor in want_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=weight_tolerance, atol=weight_tolerance, msg=name)


def saved_activation_bytes(model, forward):
    """Bytes of the distinct storages autograd saves for the backward while `forward()` runs, the
    model's parameters excluded (what activation recompute exists to cut)."""
    import torch

    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for pointer, size in storages.items() if pointer not in params)


def step_trainer(model, scorer, *, pairs, lr=1e-2, beta=0.1, micro_batch_size=1, weight_decay=0.0,
                 max_grad_norm=1.0, optimizer="adamw", in_backward=False, extra=()):
    """A SpinTrainer whose `train_step` runs steps of `pairs` pairs at a constant `lr` (no data, no
    generation: the caller hands it micro-batches)."""
    from spin_trainer.options import parse_config
    from spin_trainer.trainer import SpinTrainer

    flags = ["--global-batch-size", str(pairs), "--micro-batch-size", str(micro_batch_size), "--lr", str(lr),
             "--beta", str(beta), "--weight-decay", str(weight_decay), "--max-grad-norm", str(max_grad_norm),
             "--optimizer", optimizer] + (["--optimizer-in-backward"] if in_backward else []) + list(extra)
    return SpinTrainer(model, None, [None] * pairs, [], parse_config(flags), scorer, out_dir="unused",
                       held_out=None, metrics=None, sampling=None)


def pair_items(examples, generated, reference, pad_token_id, *, start, count, micro):
    """(pair batch, reference [2b], generated tokens) micro-batches of pairs [start, start + count)."""
    from spin_trainer.data import collate_pairs

    for i in range(start, start + count, micro):
        batch = collate_pairs(examples[i:i + micro], generated[i:i + micro], pad_token_id)
        yield batch, torch_cat_pairs(reference[i:i + micro]), sum(len(g) for g in generated[i:i + micro])


def torch_cat_pairs(rows):
    """[b, 2] (actual, generated) rows as the [2b] order of a pair batch."""
    import torch

    return torch.cat([rows[:, 0], rows[:, 1]])


def independent_logps(model, prompt_ids, response_ids):
    """Σ log p(response | prompt) of one unpadded row by a plain Hugging Face forward and a float64
    log_softmax (no trainer or spin_kernels code): the oracle of every log-prob the trainer logs or
    uses. Differentiable; call it under torch.no_grad() for a number."""
    import torch

    ids = torch.tensor([list(prompt_ids) + list(response_ids)])
    logits = model(ids).logits[0, len(prompt_ids) - 1:-1].double()
    return logits.log_softmax(-1).gather(-1, torch.tensor(list(response_ids))[:, None]).sum()


def loop_data(out, step):
    """The loop state a checkpoint of `out` holds (the iteration's pairs, generations, reference
    log-probs)."""
    from spin_trainer.state_file import read_state

    return read_state(os.path.join(out, "checkpoints", "spin", f"step-{step:08d}"))

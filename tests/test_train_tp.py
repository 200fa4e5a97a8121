"""2 gloo processes: a tensor-parallel (tp=2) and a data-parallel (dp=2) SPIN step equal the
1-process step (log-probs, loss, updated parameters; fp32, 1e-5), sharded optimizer state
survives a torch.distributed.checkpoint round trip, and the whole loop under --tp 2 (generation with gathered vocab
shards, sharded checkpoints, export) gives the 1-process run's results."""
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_cases import arith_records, tiny_setup, train_args

from spin_trainer import cli as train_cli

from spin_trainer.checkpoint import load_train_state, save_train_state
from spin_trainer.export import full_state_dict
from spin_trainer.data import collate_pairs
from spin_trainer.distributed import setup_parallel
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.rollouts import pair_logps
from spin_trainer.steps import make_optimizer, make_scheduler, optimizer_step, spin_micro_loss
from spin_trainer.tp_plan import apply_tensor_parallel

PAIRS = 4
BETA = 0.1


def fixed_pairs(tokenizer):
    from spin_trainer.data import Example

    examples = []
    for record in arith_records("train", PAIRS):
        prompt = [tokenizer.bos_token_id] + tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        response = tokenizer(record["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append(Example(tuple(prompt), tuple(response)))
    # Generated responses of different lengths (one without EOS) to exercise padding and masks.
    generated = [tokenizer(text, add_special_tokens=False)["input_ids"] + eos
                 for text, eos in (("1", [2]), ("123", [2]), ("77", []), ("4", [2]))]
    return examples, generated


def spin_steps(model_dir, tp, checkpoint_dir):
    """Log-probs, two optimizer steps and a checkpoint round trip; returns full (unsharded) results."""
    ctx = setup_parallel(tp, "cpu")
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, attention="sdpa")
    apply_tensor_parallel(model, ctx)
    examples, generated = fixed_pairs(tokenizer)
    logps = pair_logps(model, examples, generated, ctx, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id)
    reference = logps - torch.linspace(-0.5, 0.5, PAIRS * 2).reshape(PAIRS, 2)   # a reference != policy
    optimizer = make_optimizer(model, weight_decay=0.01, ctx=ctx)
    scheduler = make_scheduler(optimizer, lambda step: 1e-2)
    per_rank = PAIRS // ctx.dp_size
    mine = range(ctx.dp_rank * per_rank, (ctx.dp_rank + 1) * per_rank)

    def items():
        for i in mine:   # micro-batch of one pair: gradient accumulation over the rank's pairs
            batch = collate_pairs(examples[i:i + 1], generated[i:i + 1], tokenizer.pad_token_id)
            yield batch, reference[i], 1

    def micro_loss(item):
        batch, ref, pairs = item
        return spin_micro_loss(model, batch, ref, beta=BETA, loss_type="sigmoid", weight=pairs / PAIRS, ctx=ctx)

    step1 = optimizer_step(model, optimizer, scheduler, items(), micro_loss, ctx=ctx, max_grad_norm=1.0)
    after1 = full_state_dict(model)
    save_train_state(checkpoint_dir, model, optimizer, ctx)
    scheduler_state = scheduler.state_dict()
    step2 = optimizer_step(model, optimizer, scheduler, items(), micro_loss, ctx=ctx, max_grad_norm=1.0)
    after2 = full_state_dict(model)
    load_train_state(checkpoint_dir, model, optimizer, ctx)
    scheduler.load_state_dict(scheduler_state)
    optimizer_step(model, optimizer, scheduler, items(), micro_loss, ctx=ctx, max_grad_norm=1.0)
    head = model.get_output_embeddings().weight
    return {"lm_head_rows_here": tuple(getattr(head, "to_local", lambda: head)().shape)[0],
            "logps": logps, "step1": step1, "step2": step2, "after1": after1, "after2": after2,
            "after2_resumed": full_state_dict(model)}


LOOP_ARGS = ("--iterations", "1", "--greedy", "--save-every", "2")


def _worker(rank, world_size, port, model_dir, out_path, setup, loop_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    scratch = os.path.dirname(out_path)
    results = {"tp": spin_steps(model_dir, tp=2, checkpoint_dir=os.path.join(scratch, "tp_ckpt")),
               "dp": spin_steps(model_dir, tp=1, checkpoint_dir=os.path.join(scratch, "dp_ckpt"))}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    # Last: the trainer tears the process group down when it is done.
    train_cli.main(train_args(*setup, loop_out, "--tp", "2", *LOOP_ARGS))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return create_default_model(str(tmp_path_factory.mktemp("tp") / "model"), hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="module")
def loop_setup(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("tp_loop")))


@pytest.fixture(scope="module")
def two_process_results(model_dir, loop_setup, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp_out")
    out_path, loop_out = str(out_dir / "results.pt"), str(out_dir / "loop")
    mp.spawn(_worker, args=(2, free_port(), model_dir, out_path, loop_setup, loop_out), nprocs=2, join=True)
    results = torch.load(out_path, weights_only=False)
    results["loop_out"] = loop_out
    return results


@pytest.fixture(scope="module")
def one_process_results(model_dir, tmp_path_factory):
    return spin_steps(model_dir, tp=1, checkpoint_dir=str(tmp_path_factory.mktemp("tp_one") / "ckpt"))


def assert_states_close(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("layout", ["tp", "dp"])
def test_two_process_step_equals_one_process_step(two_process_results, one_process_results, layout):
    got, want = two_process_results[layout], one_process_results
    # Under tp=2 each rank really holds half of the vocabulary rows of the LM head.
    assert got["lm_head_rows_here"] == want["lm_head_rows_here"] // (2 if layout == "tp" else 1)
    torch.testing.assert_close(got["logps"], want["logps"], rtol=1e-5, atol=1e-5)
    for step in ("step1", "step2"):
        for name in ("loss", "acc", "margin_mean", "rewards_actual_mean", "rewards_generated_mean", "grad_norm"):
            assert abs(got[step][name] - want[step][name]) <= 1e-5 * (1 + abs(want[step][name])), (step, name)
    assert_states_close(got["after1"], want["after1"])
    assert_states_close(got["after2"], want["after2"])
    # The step moved the weights well beyond the tolerance, so the comparison has teeth.
    start = want["after1"]["lm_head.weight"]
    assert (want["after2"]["lm_head.weight"] - start).abs().max() > 1e-3


@pytest.mark.parametrize("layout", ["tp", "dp"])
def test_sharded_optimizer_state_survives_a_checkpoint_round_trip(two_process_results, layout):
    got = two_process_results[layout]
    for name, tensor in got["after2"].items():
        assert torch.equal(got["after2_resumed"][name], tensor), name


def test_whole_loop_under_tp_matches_one_process(two_process_results, loop_setup, tmp_path):
    import json

    from safetensors.torch import load_file

    from spin_trainer.checkpoint import list_checkpoints

    single = str(tmp_path / "single")
    train_cli.main(train_args(*loop_setup, single, *LOOP_ARGS))
    sharded = two_process_results["loop_out"]
    checkpoint = list_checkpoints(os.path.join(sharded, "checkpoints", "spin"))[-1]
    assert {"model", "loop.pt", "manifest.json"} <= set(os.listdir(checkpoint))
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(os.path.join(checkpoint, "model")))

    def eval_rows(out):
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            return [r for r in map(json.loads, f) if r["kind"] == "eval"]

    for got, want in zip(eval_rows(sharded), eval_rows(single), strict=True):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert abs(got[key] - value) <= 1e-5 * (1 + abs(value)), key
            else:
                assert got[key] == value, key
    assert_states_close(load_file(os.path.join(sharded, "final", "model.safetensors")),
                        load_file(os.path.join(single, "final", "model.safetensors")))

"""--max-tokens-per-batch: micro-batches bounded by tokens as well as pairs (micro_batches.py).

Each micro-batch holds at most the bound's tokens as its layout computes them (one pair over it
alone); the token counts are the batches' own sizes; every data-parallel rank runs as many forwards
as the others (FSDP would hang otherwise), also where a validation shard is shorter or empty; and
the bound changes no number: one step, the reference and validation log-probs, and a whole run on
two FSDP ranks with uneven micro-batch counts equal the unbounded one-process run.
"""
import os
import random
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_cases import assert_runs_match, fixed_pairs, free_port, step_trainer, tiny_setup, train_args

import spin_trainer.evaluate as evaluate
import spin_trainer.generation.rollouts as rollouts
import spin_trainer.trainer as trainer_module
from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError
from spin_trainer.evaluate import sft_loss
from spin_trainer.generation.rollouts import pair_logps
from spin_trainer.logprobs import Scorer
from spin_trainer.loop_state import IterationData
from spin_trainer.micro_batches import greedy_spans, rank_spans
from spin_trainer.model import load_model, load_tokenizer
from spin_trainer.options import parse_config
from spin_trainer.packed_scoring import pair_batch, pair_batch_tokens, sft_batch, sft_batch_tokens
from spin_trainer.packing import PackedPairs
from spin_trainer.parallel.mesh import ParallelContext, shard_range

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
UNTIMED = ("step_time", "tokens_per_second")


def test_greedy_spans_keep_both_bounds_and_a_long_item_alone():
    sizes = [3, 4, 9, 2, 2, 2, 1, 12, 1]

    def tokens(i, j):
        return sum(sizes[i:j])

    assert greedy_spans(0, 9, tokens, max_items=3, max_tokens=8) == [(0, 2), (2, 3), (3, 6), (6, 7), (7, 8), (8, 9)]
    assert greedy_spans(0, 9, tokens, max_items=2) == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]   # 0: pairs only
    assert greedy_spans(4, 4, tokens, max_items=2, max_tokens=5) == []


@pytest.mark.parametrize("seed", range(6))
def test_every_rank_gets_the_same_number_of_micro_batches_within_both_bounds(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 40) for _ in range(rng.randint(0, 30))]
    dp, max_items, max_tokens = rng.randint(1, 4), rng.randint(1, 5), rng.randint(20, 90)

    def tokens(i, j):   # the padded layout's rows x the longest: not additive, still monotone
        return (j - i) * max(lengths[i:j])

    shards = [shard_range(len(lengths), rank, dp) for rank in range(dp)]
    per_rank = [rank_spans(shards, rank, tokens, max_items=max_items, max_tokens=max_tokens) for rank in range(dp)]
    assert len({len(spans) for spans in per_rank}) == 1   # no rank waits for a forward the others skip
    count = len(per_rank[0])
    assert count == max(len(greedy_spans(a, b, tokens, max_items=max_items, max_tokens=max_tokens))
                        for a, b in shards)
    for (start, end), spans in zip(shards, per_rank):
        counted = [(a, b) for a, b, kept in spans if kept]
        assert [a for a, _ in counted] + [end] == [start] + [b for _, b in counted]   # the shard, in order, once
        assert all(b > a for a, b in counted)
        for a, b in counted:
            assert b - a <= max_items and (tokens(a, b) <= max_tokens or b - a == 1), (a, b)
        fillers = [(a, b) for a, b, kept in spans if not kept]
        assert len(fillers) == max(0, count - (end - start)) and all(b - a == 1 for a, b in fillers)


def _pairs(tokenizer, count=8):
    """Pairs of fixed_pairs, pair 5's generated response the gold one (packed, it costs no token)."""
    examples, generated = fixed_pairs(tokenizer, count)
    return examples, [list(e.response_ids) if i == 5 else list(g) for i, (e, g) in enumerate(zip(examples, generated))]


@pytest.mark.parametrize("packing", [None, "shared", "separate"])
def test_the_token_counts_are_the_sizes_of_the_batches(tiny, packing):
    examples, generated = _pairs(load_tokenizer(tiny[0]))
    for i, j in ((0, 1), (0, 3), (2, 7)):
        batch = pair_batch(examples[i:j], generated[i:j], 0, packing)
        size = batch.num_tokens if isinstance(batch, PackedPairs) else batch.input_ids.numel()
        assert pair_batch_tokens(examples[i:j], generated[i:j], packing) == size
        sft = sft_batch(examples[i:j], 0, packing)
        size = sft.num_tokens if isinstance(sft, PackedPairs) else sft.input_ids.numel()
        assert sft_batch_tokens(examples[i:j], packing) == size
    # A micro-batch with an empty generated response is padded, and counted so.
    batch = pair_batch(examples[:2], [generated[0], []], 0, packing)
    assert pair_batch_tokens(examples[:2], [generated[0], []], packing) == batch.input_ids.numel()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("token_bound")), train=16, val=3, test=2)


def _bounded_step(model_dir, pairs, *, packing_flag, max_tokens):
    """(metrics, weights after one step, the micro-batches' (pairs, tokens)) of a 8-pair step."""
    tokenizer = load_tokenizer(model_dir)
    examples, generated = pairs
    model = load_model(model_dir)
    trainer = step_trainer(model, Scorer(CTX), pairs=8, lr=1e-3, beta=0.5, micro_batch_size=4,
                           extra=["--adam-eps", "1e-4", packing_flag, "--max-tokens-per-batch", str(max_tokens)])
    trainer.tokenizer = tokenizer
    reference = pair_logps(model, examples, generated, trainer.scorer, micro_batch_size=8,
                           pad_token_id=tokenizer.pad_token_id)
    reference += torch.linspace(-1, 1, reference.numel()).reshape(reference.shape)   # a reference != θ
    trainer.data = IterationData(examples=examples, generated=generated, ref_logps=reference, val_generated=[],
                                 val_ref_logps=None, generated_epoch=0, train_gen_length=0.0)
    batches = list(trainer.micro_batches(trainer.step_pairs()))
    sizes = [(b.num_sequences // 2 if isinstance(b, PackedPairs) else b.input_ids.shape[0] // 2,
              b.num_tokens if isinstance(b, PackedPairs) else b.input_ids.numel()) for b, _, _ in batches]
    metrics = {k: v for k, v in trainer.train_step(iter(batches)).items() if k not in UNTIMED}
    return metrics, {n: p.detach().clone() for n, p in model.named_parameters()}, sizes


@pytest.mark.parametrize("packing_flag,bound", [("--pack-pairs", 24), ("--no-pack-pairs", 40)])
def test_a_step_bounded_by_tokens_equals_the_unbounded_step(tiny, packing_flag, bound):
    pairs = _pairs(load_tokenizer(tiny[0]))
    want_metrics, want_weights, want_sizes = _bounded_step(tiny[0], pairs, packing_flag=packing_flag, max_tokens=0)
    got_metrics, got_weights, got_sizes = _bounded_step(tiny[0], pairs, packing_flag=packing_flag, max_tokens=bound)
    assert [n for n, _ in want_sizes] == [4, 4]
    assert len(got_sizes) > 2 and sum(n for n, _ in got_sizes) == 8   # the bound cut the step finer
    assert all(tokens <= bound or n == 1 for n, tokens in got_sizes), got_sizes
    assert got_metrics.keys() == want_metrics.keys()
    for key, value in want_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    initial = load_model(tiny[0]).state_dict()
    for name, tensor in want_weights.items():
        assert not torch.equal(tensor, initial[name]), name
        torch.testing.assert_close(got_weights[name], tensor, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("packing", [None, "shared"])
def test_bounded_reference_and_validation_log_probs_equal_the_unbounded_ones(tiny, packing):
    tokenizer = load_tokenizer(tiny[0])
    examples, generated = _pairs(tokenizer)
    model, scorer, pad = load_model(tiny[0]), Scorer(CTX, packing=packing), tokenizer.pad_token_id
    want = pair_logps(model, examples, generated, scorer, micro_batch_size=8, pad_token_id=pad)
    got = pair_logps(model, examples, generated, scorer, micro_batch_size=8, pad_token_id=pad, max_tokens=20)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    want = sft_loss(model, examples, scorer, micro_batch_size=8, pad_token_id=pad)
    assert sft_loss(model, examples, scorer, micro_batch_size=8, pad_token_id=pad, max_tokens=15) == \
        pytest.approx(want, rel=1e-6)


def test_the_bound_is_refused_with_the_optimizer_in_backward():
    """That optimizer steps once per micro-batch: a step cut into several would be several updates."""
    parse_config(["--optimizer-in-backward", "--max-grad-norm", "0"])
    with pytest.raises(UsageError, match="--optimizer-in-backward.*--max-tokens-per-batch"):
        parse_config(["--optimizer-in-backward", "--max-grad-norm", "0", "--max-tokens-per-batch", "64"])


def _counting(module, log):
    """`module`'s rank_spans, logging (module, every rank's greedy count) of each call."""
    real = module.rank_spans

    def wrapped(shards, rank, tokens, *, max_items, max_tokens=0):
        log.append((module.__name__, [len(greedy_spans(a, b, tokens, max_items=max_items, max_tokens=max_tokens))
                                      for a, b in shards]))
        return real(shards, rank, tokens, max_items=max_items, max_tokens=max_tokens)
    return wrapped


def _run_on_ranks(rank, world_size, port, args, log_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # A forward one rank runs and the other does not stalls FSDP's all-gather: fail in a minute, not hang.
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    log = []
    for module in (trainer_module, rollouts, evaluate):
        module.rank_spans = _counting(module, log)
    train_cli.main(args)   # the trainer tears the process group down when it is done
    if rank == 0:
        torch.save(log, log_path)


def test_uneven_micro_batch_counts_under_fsdp_neither_hang_nor_change_the_run(tiny, tmp_path):
    single, bounded, log_path = str(tmp_path / "single"), str(tmp_path / "bounded"), str(tmp_path / "log.pt")
    common = ("--greedy", "--iterations", "1", "--reference", "swap")
    train_cli.main(train_args(*tiny, single, *common))
    mp.spawn(_run_on_ranks, nprocs=2, join=True,
             args=(2, free_port(), train_args(*tiny, bounded, *common, "--max-tokens-per-batch", "30"), log_path))
    log = torch.load(log_path)
    # The pairs here have 15 or 16 tokens packed (5 generated each): under a bound of 30 one step's
    # shares were cut into different numbers of micro-batches (e.g. 4 and 3), and the 3 validation
    # pairs' shards (2 and 1) made rank 1 run a filler forward.
    assert any(len(set(counts)) > 1 for module, counts in log if module == trainer_module.__name__), log
    assert (rollouts.__name__, [2, 1]) in log, log
    assert_runs_match(bounded, single, steps=[1, 2], tolerance=1e-5)

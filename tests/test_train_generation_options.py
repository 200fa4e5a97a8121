"""The trainer's generation: the same samples on any data-parallel shard, every EOS id of the model,
--stop / --min-new-tokens / --max-new-tokens / --drop-truncated from the command line to the pairs."""
import os
from types import SimpleNamespace

import pytest
import torch

from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.cli import stop_sequences
from spin_trainer.options import parse_config
from spin_trainer.data import Example
from spin_trainer.errors import UsageError
from spin_trainer.generation.decode import Responses, SamplingConfig
from spin_trainer.generation.rollouts import drop_truncated, eos_token_ids, generate
from spin_trainer.logprobs import Scorer
from spin_trainer.model import build_char_tokenizer, build_tiny_llama
from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.state_file import read_state


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer("0123456789+=")


def rank(dp_rank, dp_size):
    return Scorer(ParallelContext(dp_rank, dp_size, 1, dp_size, 0, dp_rank, torch.device("cpu")))


def test_a_data_parallel_shard_samples_what_one_process_samples(tokenizer):
    model = build_tiny_llama(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                             initializer_range=0.3, seed=1).eval()
    examples = [Example(tuple(tokenizer(f"{a}+{a * 7 % 10}=")["input_ids"]), ()) for a in range(7)]
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=5)
    common = dict(tokenizer=tokenizer, max_length=16, progress=False)
    whole = generate(model, examples, sampling, rank(0, 1), batch_size=7, **common)
    assert len(set(map(tuple, whole))) > 1  # a real sample, not one repeated answer
    # Rank 1 of 2 holds examples 4..6 (without a process group the gather returns its own part),
    # and samples exactly what the single process sampled for them, in another batch size.
    shard = generate(model, examples, sampling, rank(1, 2), batch_size=2, **common)
    assert shard == whole[4:] and shard.truncated == whole.truncated[4:]


def test_every_eos_id_of_the_generation_config_ends_a_response(tokenizer):
    model = SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=[7, tokenizer.eos_token_id, 9]))
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 7, 9]
    model.generation_config.eos_token_id = 11
    assert eos_token_ids(model, tokenizer) == [tokenizer.eos_token_id, 11]
    assert eos_token_ids(SimpleNamespace(), tokenizer) == [tokenizer.eos_token_id]


def test_drop_truncated_gives_cut_pairs_slots_to_finished_ones():
    examples = list("abcdef")
    generated = Responses([[1], [2, 2], [3], [4], [5], [6]], [False, True, True, False, False, True])
    kept_examples, kept = drop_truncated(examples, generated, seed=0)
    assert len(kept) == 6 and kept_examples[0] == "a" and kept_examples[3:5] == ["d", "e"]
    assert all(e in "ade" for e in kept_examples)
    assert [list(g) for g in kept] == [["abcdef".index(e) + 1] for e in kept_examples]  # pairs stay pairs
    assert drop_truncated(examples, generated, seed=0) == (kept_examples, kept)
    with pytest.raises(UsageError, match="--drop-truncated: all 2 generated responses were cut"):
        drop_truncated(examples[:2], Responses([[1], [2]], [True, True]), seed=0)


def test_stop_strings_and_ids(tokenizer):
    one, plus, equals = tokenizer.convert_tokens_to_ids(["1", "+", "="])
    assert stop_sequences(["1", "+="], [5, 12], tokenizer) == ((one,), (plus, equals), (5,), (12,))
    with pytest.raises(UsageError, match=r"--stop-ids 99: not a token id of the tokenizer \[0, 16\)"):
        stop_sequences([], [99], tokenizer)
    with pytest.raises(UsageError, match="--stop '': the tokenizer gives no tokens"):
        stop_sequences([""], [], tokenizer)
    with pytest.raises(UsageError, match="--stop 'x': the tokenizer does not know it \\(it gives '<unk>'\\)"):
        stop_sequences(["x"], [], tokenizer)   # '<unk>' would end a response at any unknown text


def test_generation_options_from_the_command_line():
    assert parse_config(["--out", "x", "--max-length", "300"]).max_new_tokens == 150  # half the context by default
    config = parse_config(["--out", "x", "--max-new-tokens", "20", "--min-new-tokens", "3", "--drop-truncated"])
    assert config.max_new_tokens == 20 and config.generation.min_new_tokens == 3 and config.spin.drop_truncated
    with pytest.raises(UsageError, match=r"--min-new-tokens must be in \[0, --max-new-tokens 20\], got 21"):
        parse_config(["--out", "x", "--max-new-tokens", "20", "--min-new-tokens", "21"])


def test_drop_truncated_and_stops_in_a_run(tmp_path):
    """'+' and '=' stop a response; most of the tiny model's 4-token answers are cut instead, and the
    pairs trained on (kept in the checkpoint) are only the finished ones, some of them twice."""
    tiny = tiny_setup(str(tmp_path))
    out = str(tmp_path / "run")
    train_cli.main(train_args(*tiny, out, "--iterations", "1", "--max-new-tokens", "4", "--min-new-tokens", "1",
                              "--stop", "+", "=", "--drop-truncated", "--save-every", "1", "--keep", "10"))
    tokenizer = build_char_tokenizer("0123456789+=")
    stops = set(tokenizer.convert_tokens_to_ids(["+", "="])) | {tokenizer.eos_token_id}
    root = os.path.join(out, "checkpoints", "spin")
    data = read_state(os.path.join(root, sorted(os.listdir(root))[0]))["data"]
    assert len(data["generated"]) == len(data["examples"]) == 32
    assert all(len(g) >= 2 and g[-1] in stops for g in data["generated"]), data["generated"]
    assert len({tuple(e.prompt_ids) for e in data["examples"]}) < 32  # cut pairs' slots went to finished ones

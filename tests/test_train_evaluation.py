"""Evaluation that means something on chat data: by default the SFT validation loss, SPIN acc and
margin on the validation pairs and their generated length, with no greedy generation over the
held-out prompts; exact match only where asked; --eval-every iterations."""
import pytest

from trainer_cases import metric_records, tiny_setup, train_args

from spin_trainer import cli as train_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("evaluation")))


def without_test_data(args):
    at = args.index("--test-data")
    return args[:at] + args[at + 2:]


@pytest.fixture
def sampled(monkeypatch):
    """The trainer's sampling replaced by known responses (1 to 3 gold tokens, no EOS); returns the
    number of prompts of each call. Greedy exact match must never generate."""
    import spin_trainer.evaluate as evaluate
    import spin_trainer.trainer as loop
    from spin_trainer.generation.decode import Responses

    calls = []

    def known(model, examples, *args, **kwargs):
        calls.append(len(examples))
        return Responses([list(e.response_ids)[:1 + i % 3] for i, e in enumerate(examples)], [False] * len(examples))

    def no_greedy_generation(*args, **kwargs):
        raise AssertionError("exact match generated although it was not asked for")

    monkeypatch.setattr(loop, "generate", known)
    monkeypatch.setattr(evaluate, "generate", no_greedy_generation)
    return calls


def test_default_evaluation_needs_no_exact_match(tiny, tmp_path, sampled, capsys):
    out = str(tmp_path / "run")
    rows = train_cli.main(without_test_data(train_args(*tiny, out, "--iterations", "1")))
    assert [r["step"] for r in rows] == [0, 4]
    assert all("exact_match" not in r and "gen_length" not in r for r in rows)
    start, end = rows
    assert start["val_sft_loss"] > end["val_sft_loss"] > 0
    assert 0 <= end["val_spin_acc"] <= 1 and end["val_margin"] != 0
    assert end["val_gen_length"] == sum(1 + i % 3 for i in range(8)) / 8   # the 8 validation prompts' samples
    assert metric_records(out, "eval") == rows
    table = capsys.readouterr().out.split("SPIN, per iteration")[1]
    header = table.splitlines()[1].split()
    assert header[:9] == ["iter", "step", "SFT", "val", "loss", "val", "SPIN", "acc", "val"]
    assert "exact match" not in table and "no --test-data" not in table


def test_exact_match_where_asked(tiny, tmp_path, capsys):
    out = str(tmp_path / "run")
    rows = train_cli.main(without_test_data(train_args(*tiny, out, "--iterations", "1", "--exact-match")))
    assert all(0 <= r["exact_match"] <= 1 and r["gen_length"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "no --test-data given: 'test exact match' is measured on --val-data" in printed
    assert printed.split("SPIN, per iteration")[1].splitlines()[1].split()[2:5] == ["test", "exact", "match"]


def test_eval_every_n_iterations_and_the_last(tiny, tmp_path, sampled):
    out = str(tmp_path / "run")
    rows = train_cli.main(without_test_data(train_args(*tiny, out, "--iterations", "3", "--eval-every", "2")))
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert [r.get("val_sft_loss") is not None for r in rows] == [True, False, True, True]
    assert [r.get("val_spin_acc") is not None for r in rows] == [False, False, True, True]
    assert rows[1]["spin_acc_end"] is not None   # the training diagnostics are free: every iteration has them
    # The validation prompts are sampled only for an iteration whose end is evaluated.
    assert sampled == [32, 0, 32, 8, 32, 8]

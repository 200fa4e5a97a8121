"""Errors before work, naming the option: bad --out, --tp 0, non-finite numbers, a context beyond
the model's positions; and what --help says. None of these loads the model."""
import os

import pytest

from trainer_cases import tiny_setup, train_args

from spin_trainer.errors import UsageError
from spin_trainer import cli as train_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("cli")))


@pytest.mark.parametrize("extra, expected", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--lr", "inf"], "--lr must be in (0, 1), got inf"),
    (["--lr", "1e-3", "nan"], "--lr must be in (0, 1), got [0.001, nan]"),
    (["--lr", "1e38"], "--lr must be in (0, 1), got 1e+38"),
    (["--lr", "0"], "--lr must be in (0, 1), got 0.0"),
    (["--adam-eps", "inf"], "--adam-eps must be in (0, 0.01], got inf"),
    (["--adam-eps", "1e30"], "--adam-eps must be in (0, 0.01], got 1e+30"),
    (["--beta", "inf"], "--beta must be finite and > 0, got inf"),
    (["--weight-decay", "inf"], "--weight-decay must be in [0, 1], got inf"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be finite and >= 0"),
    (["--temperature", "inf"], "--temperature must be finite and > 0, got inf"),
    (["--max-length", "65"], "--max-length 65 is beyond the model's max_position_embeddings (64)"),
    (["--val-every", "-1"], "--val-every must be >= 0, got -1"),
    (["--max-prompt-length", "16"], "--max-prompt-length 16 must be less than --max-length 16"),
    (["--prompt-field", "question"], "--prompt-field and --response-field go together"),
    (["--val-split", "validation"], "has no split 'validation'; its splits: train (choose one with --val-split)"),
])
def test_bad_numbers_are_refused_before_the_model_is_loaded(tiny, tmp_path, no_model_load, extra, expected):
    with pytest.raises(UsageError) as info:
        train_cli.main(train_args(*tiny, str(tmp_path / "run"), *extra))
    assert expected in str(info.value)


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "inf"], r"--lr must be in \(0, 1\)"), (["--beta", "0"], "--beta must be finite and > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"), (["--keep", "0"], "--keep must be >= 1"),
    (["--exact-match"], r"--exact-match measures on --test-data \(or --val-data\); give one of them"),
])
def test_a_bad_setting_is_named_before_any_file_is_read(tmp_path, extra, expected):
    """Neither the model directory (no tokenizer here) nor the data file exists: the setting wins."""
    with pytest.raises(UsageError, match=expected):
        train_cli.main(["--model", str(tmp_path / "no_model"), "--train-data", str(tmp_path / "no_data.jsonl"),
                        "--out", str(tmp_path / "run"), *extra])


def test_an_out_that_cannot_be_a_directory_is_refused_first(tiny, tmp_path, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("precious", encoding="utf-8")
    with pytest.raises(UsageError, match=r"--out '.*a_file' is a file, not a directory"):
        train_cli.main(train_args(*tiny, str(a_file)))
    with pytest.raises(UsageError, match=r"--out '.*a_file/run' lies under '.*a_file', which is a file"):
        train_cli.main(train_args(*tiny, str(a_file / "run")))
    assert a_file.read_text(encoding="utf-8") == "precious"


def test_an_unwritable_out_is_refused_first(tiny, tmp_path, no_model_load):
    if os.geteuid() == 0:
        out = "/sys/spin_trainer_out"   # refused even to root (sysfs)
        if os.path.exists(out) or os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
            pytest.skip("no directory here that root cannot write")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = str(locked / "run")
    with pytest.raises(UsageError, match=r"--out '.*' is not writable \("):
        train_cli.main(train_args(*tiny, out))


def test_help_lists_every_setting(capsys):
    from spin_trainer.config import RunConfig

    with pytest.raises(SystemExit) as exit_info:
        train_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for _, field, _ in RunConfig().items():
        assert "--" + field.name.replace("_", "-") in text, field.name


def test_a_config_file_is_keyed_by_option_names_and_the_command_line_overrides_it(tmp_path):
    from spin_trainer.options import parse_config, write_config

    path = tmp_path / "run.yaml"
    path.write_text("lr: [1e-6, 5e-7]\niterations: 2\nmicro-batch-size: 4\ngreedy: true\ntemperature: 1\n",
                    encoding="utf-8")
    config = parse_config(["--config", str(path), "--micro-batch-size", "2"])
    assert config.spin.lr == (1e-6, 5e-7) and config.train.micro_batch_size == 2 and config.generation.greedy
    assert config.generation.temperature == 1.0 and isinstance(config.generation.temperature, float)
    # The resolved settings a run writes read back as the same settings.
    write_config(config, str(tmp_path / "config.yaml"))
    assert parse_config(["--config", str(tmp_path / "config.yaml")]) == config
    # An on/off setting a file turns on, the command line turns off; --resume is this command's
    # action, not the run's setting: a run's config.yaml reused for a new run does not resume.
    path.write_text("greedy: true\nresume: true\n", encoding="utf-8")
    config = parse_config(["--config", str(path), "--no-greedy"])
    assert not config.generation.greedy and config.run.resume
    assert not parse_config(["--config", str(path), "--no-resume"]).run.resume
    write_config(config, str(tmp_path / "config.yaml"))
    assert not parse_config(["--config", str(tmp_path / "config.yaml")]).run.resume
    path.write_text("learning-rate: 1e-6\n", encoding="utf-8")
    with pytest.raises(UsageError, match="unknown setting 'learning-rate'"):
        parse_config(["--config", str(path)])
    path.write_text("iterations: two\n", encoding="utf-8")
    with pytest.raises(UsageError, match="iterations: expected int, got 'two'"):
        parse_config(["--config", str(path)])
    path.write_text("beta: 0\n", encoding="utf-8")
    with pytest.raises(UsageError, match="--beta must be finite and > 0"):
        parse_config(["--config", str(path)])


def test_a_run_writes_its_resolved_settings_and_a_usage_error_prints_without_a_traceback(tiny, tmp_path, capsys,
                                                                                         monkeypatch):
    import yaml

    out = str(tmp_path / "run")
    train_cli.main(train_args(*tiny, out, "--iterations", "1", "--max-steps", "1"))
    with open(os.path.join(out, "config.yaml"), encoding="utf-8") as f:
        saved = yaml.safe_load(f)
    assert saved["max-length"] == 16 and saved["lr"] == [1e-3] and saved["iterations"] == 1
    # The tokenized train, val and test data, for a resume to read back.
    assert sorted(name.split("-")[0] for name in os.listdir(os.path.join(out, "tokenized"))) == ["test", "train", "val"]
    monkeypatch.setattr("sys.argv", ["spin-train", "--out", str(tmp_path / "other"), "--tp", "0"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.cli()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: --tp must be >= 1, got 0" and "Traceback" not in err
    monkeypatch.setattr("sys.argv", ["spin-train", "--out", str(tmp_path / "other"), "--max-lenght", "8"])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.cli()
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: unrecognized arguments: --max-lenght 8 (--help lists the options)\n"

"""Errors before work, naming the option: bad --out, --tp 0, non-finite numbers, a context beyond
the model's positions; and what --help says. None of these loads the model."""
import os

import pytest

from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("cli")))


@pytest.mark.parametrize("extra, expected", [
    (["--tp", "0"], "--tp must be >= 1, got 0"),
    (["--lr", "inf"], "--lr must be finite and >= 0, got [inf, inf]"),
    (["--lr", "1e-3", "nan"], "--lr must be finite and >= 0, got [0.001, nan]"),
    (["--beta", "inf"], "--beta must be finite and > 0, got [inf, inf]"),
    (["--weight-decay", "inf"], "--weight-decay must be finite and >= 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be finite and >= 0"),
    (["--temperature", "inf"], "--temperature must be finite and > 0, got inf"),
    (["--max-length", "65"], "--max-length 65 is beyond the model's max_position_embeddings (64)"),
    (["--val-every", "-1"], "--val-every must be >= 0, got -1"),
])
def test_bad_numbers_are_refused_before_the_model_is_loaded(tiny, tmp_path, no_model_load, extra, expected):
    with pytest.raises(ValueError) as info:
        train_cli.main(train_args(*tiny, str(tmp_path / "run"), *extra))
    assert expected in str(info.value)


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "inf"], "--lr must be finite"), (["--beta", "0"], "--beta must be finite and > 0"),
    (["--epochs", "0"], "--epochs must be >= 1"), (["--keep", "0"], "--keep must be >= 1"),
])
def test_a_bad_setting_is_named_before_any_file_is_read(tmp_path, extra, expected):
    """Neither the model directory (no tokenizer here) nor the data file exists: the setting wins."""
    with pytest.raises(ValueError, match=expected):
        train_cli.main(["--model", str(tmp_path / "no_model"), "--train-data", str(tmp_path / "no_data.jsonl"),
                        "--out", str(tmp_path / "run"), *extra])


def test_an_out_that_cannot_be_a_directory_is_refused_first(tiny, tmp_path, no_model_load):
    a_file = tmp_path / "a_file"
    a_file.write_text("precious", encoding="utf-8")
    with pytest.raises(ValueError, match=r"--out '.*a_file' is a file, not a directory"):
        train_cli.main(train_args(*tiny, str(a_file)))
    with pytest.raises(ValueError, match=r"--out '.*a_file/run' lies under '.*a_file', which is a file"):
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
    with pytest.raises(ValueError, match=r"--out '.*' is not writable \("):
        train_cli.main(train_args(*tiny, out))


def test_help_explains_save_every_zero_and_demo(capsys):
    with pytest.raises(SystemExit):
        train_cli.build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(0: at iteration ends only)" in text
    assert "takes no model, data or training options" in text
    assert "--export-dtype" in text and "--max-steps" in text and "--val-every" in text


def test_every_resume_setting_is_named_by_its_command_line_options():
    """A resume refused for another setting names the option a user types (not a field name)."""
    from spin_trainer.config import SpinConfig

    options = {o for action in train_cli.build_parser()._actions for o in action.option_strings}
    named = [name for key in SpinConfig().resume_settings() for name in key.split("/")]
    assert [name for name in named if name not in options] == []
    assert "--stop" in named and "--stop-ids" in named

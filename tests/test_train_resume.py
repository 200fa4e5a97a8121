"""SIGTERM writes a checkpoint; --resume reproduces the uninterrupted run; a corrupt latest
checkpoint is reported, moved aside and the previous one used."""
import json
import os
import re
import shutil
import signal

import pytest
import torch

from trainer_cases import tiny_setup, train_args

from spin_trainer.errors import TrainingDiverged, UsageError
from spin_trainer import cli as train_cli
from spin_trainer.checkpoint import list_checkpoints
from spin_trainer.loop_state import TrainingStopped
from spin_trainer.metrics import TIMING_KEYS

# 2 iterations x 4 steps; SIGTERM after step 3 stops mid-iteration 1, with periodic saves at 2.
EXTRA = ["--save-every", "2", "--keep", "3", "--mix-previous", "0.25", "--top-k", "8"]
STOP_AFTER_STEP = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("resume")))


@pytest.fixture(scope="module")
def uninterrupted(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    train_cli.main(train_args(*tiny, out, *EXTRA))
    return out


def outcome(out):
    """(metrics records without their wall-clock timings, final weights) of a run."""
    from safetensors.torch import load_file

    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in f]
    return records, load_file(os.path.join(out, "final", "model.safetensors"))


def assert_same_run(out, reference_out):
    records, weights = outcome(out)
    expected_records, expected_weights = outcome(reference_out)
    assert records == expected_records
    assert weights.keys() == expected_weights.keys()
    for name in weights:
        assert torch.equal(weights[name], expected_weights[name]), name


def stop_at(step):
    def on_step(record):
        if record["step"] == step:
            signal.raise_signal(signal.SIGTERM)
    return on_step


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stopped") / "run")
    with pytest.raises(TrainingStopped) as info:
        train_cli.main(train_args(*tiny, out, *EXTRA), on_step=stop_at(STOP_AFTER_STEP))
    return out, str(info.value)


def test_sigterm_writes_a_checkpoint_and_stops(stopped):
    out, path = stopped
    names = [os.path.basename(p) for p in list_checkpoints(os.path.join(out, "checkpoints", "spin"))]
    assert names == ["step-00000002", "step-00000003"]
    assert os.path.basename(path) == "step-00000003"
    assert not os.path.exists(os.path.join(out, "final"))
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f if '"train"' in line]
    assert steps == [1, 2, 3]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL   # the handler is uninstalled again


def test_resume_reproduces_the_uninterrupted_run(tiny, stopped, uninterrupted, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    train_cli.main(train_args(*tiny, out, *EXTRA, "--resume"))
    assert_same_run(out, uninterrupted)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous(tiny, stopped, uninterrupted, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    latest = os.path.join(out, "checkpoints", "spin", "step-00000003", "model", "__0_0.distcp")
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 2)
    # A half-written checkpoint (never renamed into place) is ignored as well.
    os.makedirs(os.path.join(out, "checkpoints", "spin", ".tmp-step-00000004"))
    train_cli.main(train_args(*tiny, out, *EXTRA, "--resume"))
    printed = capsys.readouterr().out
    assert "step-00000003 is corrupt or incomplete: model/__0_0.distcp has" in printed
    assert "resumed from" in printed and "step-00000002" in printed
    assert_same_run(out, uninterrupted)
    # Kept for inspection under another name, and not counted among the --keep 3 kept ones.
    names = sorted(os.listdir(os.path.join(out, "checkpoints", "spin")))
    assert names == ["step-00000003.corrupt", "step-00000006", "step-00000008", "step-00000009"]


def test_flipped_bytes_and_missing_manifest_are_detected(stopped, tmp_path):
    from spin_trainer.checkpoint import checkpoint_problem
    from spin_trainer.parallel.mesh import ParallelContext

    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    root = str(tmp_path / "ckpts")
    shutil.copytree(os.path.join(stopped[0], "checkpoints", "spin"), root)
    first, second = list_checkpoints(root)
    assert checkpoint_problem(first, ctx) is None
    loop_file = os.path.join(first, "loop.json")
    data = bytearray(open(loop_file, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(loop_file, "wb").write(bytes(data))
    assert "loop.json does not match its SHA-256" in checkpoint_problem(first, ctx)
    manifest = os.path.join(second, "manifest.json")
    for broken in ("null", "[]", '{"files": null}', '{"files": {"loop.pt": null}}', "{"):
        with open(manifest, "w", encoding="utf-8") as f:
            f.write(broken)
        assert "manifest.json is unreadable" in checkpoint_problem(second, ctx), broken
    os.remove(manifest)
    assert "manifest.json is missing" in checkpoint_problem(second, ctx)
    # A checkpoint of the layout before DCP is not corrupt: refused, not moved aside and replaced.
    old = tmp_path / "old"
    old.mkdir()
    for name in ("rank00000.pt", "shared.pt"):
        (old / name).write_bytes(b"x")
    (old / "manifest.json").write_text(json.dumps(
        {"files": {n: {"bytes": 1, "sha256": "0" * 64} for n in ("rank00000.pt", "shared.pt")}}), encoding="utf-8")
    with pytest.raises(UsageError, match="written by an older spin_trainer"):
        checkpoint_problem(str(old), ctx)


def test_max_steps_stops_at_an_iteration_end_and_resume_finishes_the_same_run(tiny, uninterrupted, tmp_path,
                                                                                capsys):
    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*tiny, out, *EXTRA, "--max-steps", "4"))
    assert [r["step"] for r in rows] == [0, 4]   # iteration 1 ended, with its evaluation
    printed = capsys.readouterr().out
    assert "stopped after 4 of 9 optimizer steps (--max-steps 4); checkpoint: " in printed
    assert "step-00000004; rerun with --resume" in printed
    assert not os.path.exists(os.path.join(out, "final"))
    # Resuming with the same limit stops again at once; without one, the run finishes.
    train_cli.main(train_args(*tiny, out, *EXTRA, "--max-steps", "4", "--resume"))
    assert "stopped after 4 of 9" in capsys.readouterr().out
    train_cli.main(train_args(*tiny, out, *EXTRA, "--resume"))
    assert_same_run(out, uninterrupted)


@pytest.mark.parametrize("extra, expected", [
    (["--reference", "swap"], "was written with --reference 'precompute', this run has --reference 'swap'"),
    (["--lr", "2e-3"], "was written with --lr [0.001], this run has --lr [0.002]"),
    (["--greedy"], "was written with --greedy False, this run has --greedy True"),
])
def test_resume_with_other_settings_is_refused_naming_the_option(tiny, stopped, tmp_path, extra, expected):
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    with pytest.raises(UsageError, match=r"--resume: the run in .* " + re.escape(expected)):
        train_cli.main(train_args(*tiny, out, *EXTRA, "--resume", *extra))


def test_resume_with_other_inputs_is_refused_naming_the_option(tiny, stopped, tmp_path):
    from spin_trainer.model import create_default_model

    model_dir, train_path, val_path, test_path = tiny
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    other_data = str(tmp_path / "train.jsonl")
    with open(train_path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(other_data, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])   # one prompt fewer: the run would end at another step
    with pytest.raises(UsageError, match=r"--resume: .*step-00000003 was written with another --train-data: "):
        train_cli.main(train_args(model_dir, other_data, val_path, test_path, out, *EXTRA, "--resume"))

    other_model = create_default_model(str(tmp_path / "other_model"), seed=1, hidden_size=32, intermediate_size=64)
    with pytest.raises(UsageError, match=r"--resume: .*step-00000003 was written from another --model: in "
                                         r"'.*other_model', model.safetensors differ\(s\)"):
        train_cli.main(train_args(other_model, train_path, val_path, test_path, out, *EXTRA, "--resume"))

    retokenized = str(tmp_path / "retokenized")
    shutil.copytree(model_dir, retokenized)
    config_path = os.path.join(retokenized, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with open(config_path, "w", encoding="utf-8") as f:
        json.dump(config, f)
    for name in os.listdir(retokenized):
        if name.endswith(".jinja"):
            os.remove(os.path.join(retokenized, name))
    with pytest.raises(UsageError, match=r"--resume: .*step-00000003 was written with another tokenizer"):
        train_cli.main(train_args(retokenized, train_path, val_path, test_path, out, *EXTRA, "--resume"))
    # A copy of the same inputs elsewhere resumes: only content counts.
    same_model = str(tmp_path / "same_model")
    shutil.copytree(model_dir, same_model)
    train_cli.main(train_args(same_model, train_path, val_path, test_path, out, *EXTRA, "--resume"))


def test_keep_1_after_a_corrupt_newest_checkpoint_keeps_the_new_ones(tiny, stopped, uninterrupted, tmp_path):
    """The corrupt checkpoint is ahead of the new ones: it is moved aside, never pruned in their
    place, and the checkpoint SIGTERM reports exists and resumes."""
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    root = os.path.join(out, "checkpoints", "spin")
    os.rename(os.path.join(root, "step-00000003"), os.path.join(root, "step-00000005"))
    os.remove(os.path.join(root, "step-00000005", "loop.json"))
    keep_1 = [*EXTRA[:EXTRA.index("--keep")], "--keep", "1", *EXTRA[EXTRA.index("--keep") + 2:]]
    args = train_args(*tiny, out, *keep_1, "--resume")
    with pytest.raises(TrainingStopped) as info:
        train_cli.main(args, on_step=stop_at(3))
    assert os.path.basename(str(info.value)) == "step-00000003" and os.path.isdir(str(info.value))
    assert sorted(os.listdir(root)) == ["step-00000003", "step-00000005.corrupt"]
    train_cli.main(args)
    assert sorted(os.listdir(root)) == ["step-00000005.corrupt", "step-00000009"]
    assert_same_run(out, uninterrupted)


def test_a_cut_short_last_metrics_line_is_dropped_with_a_warning(tiny, stopped, uninterrupted, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(stopped[0], out)
    metrics = os.path.join(out, "metrics.jsonl")
    with open(metrics, "a", encoding="utf-8") as f:
        f.write('{"kind": "train", "run": "spin", "st')   # killed while writing step 4's record
    train_cli.main(train_args(*tiny, out, *EXTRA, "--resume"))
    assert f"warning: {metrics}:" in capsys.readouterr().out
    assert_same_run(out, uninterrupted)


def test_a_non_finite_update_never_reaches_a_checkpoint(tiny, tmp_path, monkeypatch):
    import spin_trainer.trainer

    real_update = spin_trainer.trainer.apply_update

    def poisoned_at_step_2(model, *args, **kwargs):
        metrics = real_update(model, *args, **kwargs)
        if poisoned_at_step_2.calls == 1:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")   # as an update of lr = inf would
        poisoned_at_step_2.calls += 1
        return metrics

    poisoned_at_step_2.calls = 0
    monkeypatch.setattr(spin_trainer.trainer, "apply_update", poisoned_at_step_2)
    out = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=r"training diverged: after step 2 the weights hold non-finite values "
                                         r"\(NaN or inf\), so no checkpoint was written for it; the newest "
                                         r"checkpoint, .*step-00000001 \(step 1\), is intact"):
        train_cli.main(train_args(*tiny, out, "--save-every", "1"))
    assert [os.path.basename(p) for p in list_checkpoints(os.path.join(out, "checkpoints", "spin"))] == \
        ["step-00000001"]


def test_a_checkpoint_of_another_model_is_refused_naming_the_tensor(tmp_path):
    from spin_trainer.checkpoint import check_fits, save_train_state
    from spin_trainer.parallel.mesh import ParallelContext
    from spin_trainer.model import create_default_model, load_model

    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    small = dict(hidden_size=32, intermediate_size=64)
    model = load_model(create_default_model(str(tmp_path / "a"), **small))
    directory = str(tmp_path / "ckpt")
    save_train_state(directory, model, torch.optim.AdamW(model.parameters()), ctx)
    check_fits(directory, model, "model")
    other_vocab = load_model(create_default_model(str(tmp_path / "b"), vocab_multiple=12, **small))
    with pytest.raises(UsageError, match=r"model tensor model.embed_tokens.weight has shape \[16, 32\] there and "
                                         r"\[24, 32\] here \(another vocabulary"):
        check_fits(directory, other_vocab, "model")
    deeper = load_model(create_default_model(str(tmp_path / "c"), num_layers=3, **small))
    with pytest.raises(UsageError, match=r"holds another model's model weights: 9 tensor\(s\) of this model are not "
                                         r"in it \(e.g. \['model.layers.2"):
        check_fits(directory, deeper, "model")


def test_resume_with_more_iterations_extends_a_finished_run(tiny, uninterrupted, tmp_path, capsys):
    out = str(tmp_path / "run")
    same_dtype = ["--iteration-export-dtype", "auto"]   # OUT/iter-N as OUT/final: final links the last one
    train_cli.main(train_args(*tiny, out, *EXTRA, *same_dtype, "--iterations", "1"))
    assert os.path.isdir(os.path.join(out, "final"))
    capsys.readouterr()
    trained = []
    train_cli.main(train_args(*tiny, out, *EXTRA, *same_dtype, "--resume"), on_step=trained.append)   # --iterations 2
    assert "resumed from" in capsys.readouterr().out
    assert {r["iteration"] for r in trained} == {2} and trained[0]["step"] == 5   # iteration 2 only
    # From iteration 1's final weights, optimizer and reference: the uninterrupted 2-iteration run.
    assert_same_run(out, uninterrupted)
    assert os.path.samefile(os.path.join(out, "final", "model.safetensors"),
                            os.path.join(out, "iter-2", "model.safetensors"))
    with pytest.raises(UsageError, match="was written with --iterations 2, this run has --iterations 1"):
        train_cli.main(train_args(*tiny, out, *EXTRA, "--resume", "--iterations", "1"))


@pytest.mark.parametrize("lr, refused", [(["1e-3"], False), (["1e-3", "1e-3", "5e-4"], False),
                                         (["1e-3", "2e-3", "5e-4"], True)])
def test_an_extended_run_keeps_the_per_iteration_values_of_the_iterations_it_had(lr, refused):
    from spin_trainer.options import parse_config

    saved = parse_config(["--iterations", "2", "--lr", "1e-3"]).as_options(resume_only=True)
    mismatches = parse_config(["--iterations", "3", "--lr", *lr]).resume_mismatches(saved)
    assert [m[0] for m in mismatches] == (["--lr"] if refused else [])

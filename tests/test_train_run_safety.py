"""Runs that can't be lost or hijacked: one run per --out (a lock held by the worker), --resume
never starts over silently, loop state that cannot run code, a refused run leaves no --out."""
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from trainer_cases import ROOT, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError

SHORT = ["--iterations", "1", "--save-every", "1", "--keep", "1", "--max-steps", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("safety")))


@pytest.fixture(scope="module")
def short_run(tiny, tmp_path_factory):
    """A run stopped by --max-steps 2 with --keep 1: one checkpoint, step-00000002."""
    out = str(tmp_path_factory.mktemp("short") / "run")
    train_cli.main(train_args(*tiny, out, *SHORT))
    return out


def copy_of(run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(run, out)
    return out


def test_a_second_run_into_a_locked_out_is_refused_before_it_writes(tiny, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, torch\n"
         "from spin_trainer.parallel.mesh import ParallelContext\n"
         "from spin_trainer.run_dir import lock_run\n"
         "lock = lock_run(sys.argv[1], ParallelContext(0, 1, 1, 1, 0, 0, torch.device('cpu')))\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=rf"--out '.*run' is in use by another run \(pid {holder.pid} on host "):
            train_cli.main(train_args(*tiny, str(out), *SHORT))
        assert os.listdir(out) == [".lock"]   # no config.yaml, no metrics, no checkpoint of the refused run
    finally:
        holder.communicate("")
    # The holder exited (the kernel released its lock): the same command now runs.
    train_cli.main(train_args(*tiny, str(out), *SHORT))
    assert os.path.isfile(out / "metrics.jsonl")


def test_resume_without_a_usable_checkpoint_is_refused_naming_each(tiny, short_run, tmp_path):
    """--keep 1 and a corrupt newest checkpoint: nothing to resume from; nothing is started over."""
    out = copy_of(short_run, tmp_path)
    root = os.path.join(out, "checkpoints", "spin")
    shard = os.path.join(root, "step-00000002", "model", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    metrics_before = open(os.path.join(out, "metrics.jsonl"), encoding="utf-8").read()
    with pytest.raises(UsageError, match=r"--resume: no usable checkpoint under .* \(found: step-00000002: "
                                         r"model/__0_0.distcp has \d+ bytes, .*moved aside to "
                                         r"step-00000002.corrupt\)\); nothing was trained"):
        train_cli.main(train_args(*tiny, out, *SHORT, "--resume"))
    assert open(os.path.join(out, "metrics.jsonl"), encoding="utf-8").read() == metrics_before
    assert os.listdir(root) == ["step-00000002.corrupt"]
    # Asked again, the one moved aside by the earlier attempt is still named.
    with pytest.raises(UsageError, match=r"found: step-00000002.corrupt: moved aside as corrupt by an earlier run"):
        train_cli.main(train_args(*tiny, out, *SHORT, "--resume"))


def test_an_out_holding_a_users_own_files_is_refused_and_left_as_it_was(tiny, short_run, tmp_path):
    """A run writes config.yaml, metrics.jsonl, final/ ... into --out: a directory of other files
    (a project's data, another tool's model) is refused; an earlier run's is accepted."""
    from spin_trainer.run_dir import check_output_path

    theirs = tmp_path / "theirs"
    (theirs / "final").mkdir(parents=True)
    (theirs / "final" / "model.safetensors").write_bytes(b"someone's model")
    (theirs / "metrics.jsonl").write_text("not ours\n", encoding="utf-8")
    (theirs / "config.yaml").write_text("lr: 1\n", encoding="utf-8")   # a config, not a run's
    before = {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match=r"--out .*theirs' holds files that are not a run's \(config.yaml, final, "
                                         r"metrics.jsonl, \.\.\.\)"):
        train_cli.main(train_args(*tiny, str(theirs), *SHORT))
    assert {p: p.read_bytes() for p in theirs.rglob("*") if p.is_file()} == before
    refused = tmp_path / "refused"   # what a run refused before its model loaded leaves
    (refused / "tokenized").mkdir(parents=True)
    (refused / ".lock").write_text("", encoding="utf-8")
    (refused / ".write-test-12345").write_text("", encoding="utf-8")   # another rank's probe, at the same moment
    for out in (short_run, str(tmp_path / "empty"), str(refused)):
        os.makedirs(out, exist_ok=True)
        check_output_path(out)   # accepted
    shutil.rmtree(os.path.join(copy_of(short_run, tmp_path), "checkpoints"))
    check_output_path(str(tmp_path / "run"))   # a run's own config.yaml


def test_resume_into_an_empty_out_is_refused_and_leaves_no_out(tiny, tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(UsageError, match=r"--resume: no usable checkpoint under .* \(found: none\)"):
        train_cli.main(train_args(*tiny, str(out), *SHORT, "--resume"))
    assert not out.exists()
    # An --out that exists: refused before the data is tokenized (minutes on a large set).
    out.mkdir(parents=True)
    with pytest.raises(UsageError, match=r"--resume: no usable checkpoint"):
        train_cli.main(train_args(*tiny, str(out), *SHORT, "--resume"))
    assert not (out / "tokenized").exists()
    with pytest.raises(UsageError, match=r"--model is required; a resumed run takes its settings again: --config "
                                         r".*run/config.yaml --resume"):
        train_cli.main(["--out", str(out), "--resume"])


class WritesMarkerWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_pickle_in_a_checkpoint_is_never_run(tiny, short_run, tmp_path):
    """An older checkpoint's (or a crafted) loop.pt, with a manifest recomputed to match: refused
    unread."""
    out = copy_of(short_run, tmp_path)
    checkpoint = os.path.join(out, "checkpoints", "spin", "step-00000002")
    marker = tmp_path / "the pickle ran"
    payload = pickle.dumps({"position": WritesMarkerWhenUnpickled(str(marker))})
    pickle.loads(payload)          # the payload does what it says when unpickled ...
    assert marker.exists()
    marker.unlink()
    for name in ("loop.json", "loop.safetensors"):
        os.remove(os.path.join(checkpoint, name))
    with open(os.path.join(checkpoint, "loop.pt"), "wb") as f:
        f.write(payload)
    manifest_path = os.path.join(checkpoint, "manifest.json")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["files"] = {n: e for n, e in manifest["files"].items() if not n.startswith("loop.")}
    manifest["files"]["loop.pt"] = {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    with open(manifest_path, "w", encoding="utf-8") as f:
        json.dump(manifest, f)
    with pytest.raises(UsageError, match=r"keeps its loop state in loop.pt, a pickle of an older spin_trainer; "
                                         r"this version does not read pickles"):
        train_cli.main(train_args(*tiny, out, *SHORT, "--resume"))
    assert not marker.exists()     # ... and the resume never unpickled it
    assert os.path.isdir(checkpoint)   # refused, not moved aside as corrupt


def test_resume_refuses_other_held_out_data_and_another_generation_config(tiny, short_run, tmp_path):
    """Held-out data of another size would end the run with a crash after training; another EOS
    in generation_config.json ends the responses elsewhere."""
    model_dir, train_path, val_path, test_path = tiny
    out = copy_of(short_run, tmp_path)
    fewer = str(tmp_path / "fewer.jsonl")
    with open(val_path, encoding="utf-8") as f:
        lines = f.readlines()
    with open(fewer, "w", encoding="utf-8") as f:
        f.writelines(lines[:-1])
    with pytest.raises(UsageError, match=r"--resume: .*step-00000002 was written with another --val-data: "):
        train_cli.main(train_args(model_dir, train_path, fewer, test_path, out, *SHORT, "--resume"))
    with pytest.raises(UsageError, match=r"--resume: .*step-00000002 was written with another --test-data: "):
        train_cli.main(train_args(model_dir, train_path, val_path, fewer, out, *SHORT, "--resume"))
    other_eos = str(tmp_path / "other_eos")
    shutil.copytree(model_dir, other_eos)
    generation_config = os.path.join(other_eos, "generation_config.json")
    with open(generation_config, encoding="utf-8") as f:
        config = json.load(f)
    config["eos_token_id"] = [config["eos_token_id"], 5]
    with open(generation_config, "w", encoding="utf-8") as f:
        json.dump(config, f)
    with pytest.raises(UsageError, match=r"written from another --model: in '.*other_eos', generation_config.json "
                                         r"differ\(s\)"):
        train_cli.main(train_args(other_eos, train_path, val_path, test_path, out, *SHORT, "--resume"))


def test_a_full_disk_while_saving_is_one_line_and_the_previous_checkpoint_stays(tiny, tmp_path, monkeypatch, capsys):
    import errno

    from torch.distributed.checkpoint import FileSystemWriter

    from spin_trainer.checkpoint import checkpoint_problem, list_checkpoints
    from spin_trainer.parallel.mesh import ParallelContext

    original, calls = FileSystemWriter.write_data, []

    def fills_the_disk_on_the_second_save(self, plan, planner):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", fills_the_disk_on_the_second_save)
    out = str(tmp_path / "run")
    args = train_args(*tiny, out, "--iterations", "1", "--save-every", "1", "--keep", "2", "--max-steps", "3")
    monkeypatch.setattr("sys.argv", ["spin-train", *args])
    with pytest.raises(SystemExit) as exit_info:
        train_cli.cli()
    assert exit_info.value.code == 1
    root = os.path.join(out, "checkpoints", "spin")
    err = capsys.readouterr().err
    assert err.strip() == (f"error: disk full while saving checkpoint 2 to {root}/step-00000002; the previous "
                           f"checkpoint, {root}/step-00000001, is intact; free space and rerun with --resume")
    assert sorted(os.listdir(root)) == ["step-00000001"]   # the partial one removed, nothing else lost
    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    assert checkpoint_problem(list_checkpoints(root)[0], ctx) is None
    monkeypatch.setattr(FileSystemWriter, "write_data", original)
    train_cli.main(args + ["--resume"])
    assert [os.path.basename(p) for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]


def test_resume_names_the_setting_that_changed(tiny, short_run, tmp_path):
    out = copy_of(short_run, tmp_path)
    for extra, expected in ((["--max-length", "15"], "written with --max-length 16, this run has --max-length 15"),
                            (["--stop", "="], "written with --stop [], this run has --stop ['=']")):
        with pytest.raises(UsageError) as info:
            train_cli.main(train_args(*tiny, out, *SHORT, "--resume", *extra))
        assert expected in str(info.value)


def test_a_min_new_tokens_that_cannot_fit_after_the_prompts_is_refused(tiny, tmp_path, no_model_load):
    """29 of the 32 arithmetic prompts are 7 tokens (BOS included): --max-length 16 leaves 9 after them."""
    out = tmp_path / "run"
    with pytest.raises(UsageError, match=r"--min-new-tokens 10 does not fit after 29 of the 32 prompts of --train-data "
                                         r"\(--max-length 16 leaves 9 tokens after the longest\)"):
        train_cli.main(train_args(*tiny, str(out), "--min-new-tokens", "10", "--max-new-tokens", "10"))
    assert not out.exists()

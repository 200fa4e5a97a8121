"""Ctrl-C (SIGINT) stops a run as SIGTERM does: a checkpoint, one line naming the signal received,
the shell's exit status for it, no traceback; on one process and under torchrun."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from trainer_cases import ROOT, free_port, tiny_setup, train_args

TRAIN = os.path.join(ROOT, "python", "train.py")


def long_run_args(tiny, out):
    """A run far longer than the test waits (no --test-data: no greedy generation before training)."""
    args = train_args(*tiny, out, "--iterations", "40")
    at = args.index("--test-data")
    return args[:at] + args[at + 2:]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("signals")), train=8, val=2)


def interrupt_once_training(command, out, send, timeout=240):
    """Starts `command`, sends it `send` once its first optimizer step is in metrics.jsonl; returns
    (exit status, stderr)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.monotonic() + timeout
    try:
        while not (os.path.exists(metrics) and '"kind": "train"' in open(metrics, encoding="utf-8").read()):
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no training step within the time limit"
            time.sleep(0.2)
        process.send_signal(send)
        _, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    return process.returncode, stderr


def check_stopped_with_checkpoint(stderr, out, name):
    found = re.findall(rf"stopped by {name}; checkpoint written to (\S+);", stderr)
    assert len(found) == 1, stderr          # one message, not one per rank
    assert os.path.isdir(found[0]) and os.path.dirname(found[0]) == os.path.join(out, "checkpoints", "spin")
    assert "Traceback" not in stderr.split(found[0])[0], stderr


def test_sigint_on_one_process_writes_a_checkpoint(tiny, tmp_path):
    out = str(tmp_path / "run")
    status, stderr = interrupt_once_training([sys.executable, TRAIN, *long_run_args(tiny, out)],
                                             out, signal.SIGINT)
    check_stopped_with_checkpoint(stderr, out, "SIGINT")
    assert "Traceback" not in stderr and status == 128 + signal.SIGINT, stderr


def test_sigint_to_torchrun_writes_a_checkpoint_named_after_sigint(tiny, tmp_path):
    """torchrun forwards the signal it got to its workers; they checkpoint and name it. torchrun
    itself then reports the signal with a traceback of its own (after ours), which we do not control."""
    out = str(tmp_path / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()), TRAIN,
               *long_run_args(tiny, out)]
    _, stderr = interrupt_once_training(command, out, signal.SIGINT)
    check_stopped_with_checkpoint(stderr, out, "SIGINT")
    assert "SIGTERM" not in stderr.split("stopped by SIGINT")[0]


def test_ctrl_c_before_training_exits_130_without_a_traceback(monkeypatch, capsys):
    """Before the loop takes SIGINT over (loading the model, tokenizing), there is nothing to save."""
    from spin_trainer import cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "main", interrupted)
    with pytest.raises(SystemExit) as info:
        cli.cli()
    assert info.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == "stopped by SIGINT before training started; no checkpoint was written\n"

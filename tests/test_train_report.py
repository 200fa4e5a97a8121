"""What a redirected run prints as it goes (plain lines every --log-every steps and per phase), and
--report-to: TensorBoard's event files and an offline wandb run hold metrics.jsonl's numbers."""
import contextlib
import glob
import io
import json
import os
import re
import struct
import sys

import numpy as np
import pytest

from trainer_cases import metric_records, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError
from spin_trainer.metrics import ProgressLines, duration, plain_lines_wanted

STEPS = 4   # 1 iteration of 32 prompts, 8 pairs per step


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """A run reporting to TensorBoard and to wandb (offline), its stdout captured (not a terminal)."""
    root = tmp_path_factory.mktemp("report")
    tiny = tiny_setup(str(root))
    out = str(root / "run")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        train_cli.main(train_args(*tiny, out, "--iterations", "1", "--log-every", "3",
                                  "--report-to", "tensorboard", "wandb"))
    return out, stdout.getvalue()


def test_plain_lines_every_n_steps_and_per_phase(reported):
    out, stdout = reported
    train = metric_records(out, "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    step_lines = [line for line in stdout.splitlines() if re.match(r"iteration 1/1  step \d/4  ", line)]
    # Every 3 steps, and the last one.
    logged = [train[i - 1] for i in (3, 4)]
    assert [int(re.search(r"step (\d+)/", line).group(1)) for line in step_lines] == [r["step"] for r in logged]
    for line, record in zip(step_lines, logged):
        assert (f"iteration {record['iteration']}/1  step {record['step']}/4  loss {record['loss']:.4f}  "
                f"acc {record['acc']:.3f}  margin {record['margin_mean']:+.4f}  lr {record['lr']:.3e}  "
                f"tokens/s {record['tokens_per_second']:.0f}  elapsed ") in line
        assert re.search(r"elapsed [\d.hms]+  ETA [\d.hms]+$", line)
    assert line.endswith("ETA 0.0s")
    # Each phase starts and ends with its duration; the evaluation rows print as they are made.
    for phase in ("evaluation of the starting model", "iteration 1, epoch 0: generation and reference log-probs",
                  "iteration 1: evaluation", "checkpoint at step 4"):
        starts = [i for i, line in enumerate(stdout.splitlines()) if line.startswith(phase) and "started" in line]
        ends = [i for i, line in enumerate(stdout.splitlines()) if line.startswith(phase) and "done in" in line]
        assert len(starts) == len(ends) == 1 and starts[0] < ends[0], phase
    last_eval = metric_records(out, "eval")[-1]
    eval_line = next(line for line in stdout.splitlines() if line.startswith("eval at iteration 1, step 4: "))
    assert f"SFT val loss {last_eval['val_sft_loss']:.4f}" in eval_line
    # The lines come before the table printed at the end.
    assert stdout.index("iteration 1: evaluation: done") < stdout.index("SPIN, per iteration")


def test_tensorboard_events_hold_the_metrics(reported):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = reported
    events = EventAccumulator(os.path.join(out, "runs"))
    events.Reload()
    for kind, keys in (("train", ("loss", "acc", "margin_mean", "lr", "grad_norm", "tokens_per_second")),
                       ("eval", ("val_sft_loss", "val_spin_acc", "spin_acc_end"))):
        for key in keys:
            records = [r for r in metric_records(out, kind) if r.get(key) is not None]
            assert records
            logged = {e.step: e.value for e in events.Scalars(f"{kind}/{key}")}
            assert logged == {r["step"]: np.float32(r[key]) for r in records}, key


def wandb_history(run_file):
    """The history rows of an offline wandb run file (a LevelDB-style log of protobuf Records: a 7-byte
    header, then 32 KiB blocks of records, each with a 7-byte header: CRC, length, kind)."""
    from wandb.proto import wandb_internal_pb2

    with open(run_file, "rb") as f:
        data = f.read()
    block, pos, pieces, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:     # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pieces, pos = pieces + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):              # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_metrics(reported):
    out, _ = reported
    runs = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(runs) == 1
    by_step = {row["_step"]: row for row in wandb_history(runs[0])}
    assert sorted(by_step) == list(range(STEPS + 1))
    for kind in ("train", "eval"):
        for record in metric_records(out, kind):
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    assert by_step[record["step"]][f"{kind}/{key}"] == value, (kind, key)


def test_a_missing_integration_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` fails as if it were not installed
    with pytest.raises(UsageError, match=r"--report-to wandb: the 'wandb' package is not installed"):
        train_cli.main(["--model", "m", "--train-data", "t", "--out", str(tmp_path / "run"), "--report-to", "wandb"])
    with pytest.raises(SystemExit):
        train_cli.main(["--out", "x", "--report-to", "mlflow"])


def test_a_wandb_that_cannot_start_stops_the_run_before_training(tmp_path, monkeypatch):
    import wandb

    def not_logged_in(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    tiny = tiny_setup(str(tmp_path / "setup"))
    out = str(tmp_path / "run")
    with pytest.raises(UsageError, match=r"--report-to wandb: wandb could not start a run \(api_key not configured"):
        train_cli.main(train_args(*tiny, out, "--report-to", "wandb"))
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))


def test_lines_only_where_no_progress_bar_is_the_display():
    assert plain_lines_wanted(stdout_is_terminal=False, progress_bar_shown=True)
    assert plain_lines_wanted(stdout_is_terminal=True, progress_bar_shown=False)
    assert not plain_lines_wanted(stdout_is_terminal=True, progress_bar_shown=True)


def test_eta_is_the_time_per_step_of_this_process_times_the_steps_left(capsys):
    now = [100.0]
    lines = ProgressLines(enabled=True, every=1, clock=lambda: now[0])
    lines.begin(total_steps=10, iterations=1, done=4)    # resumed after step 4
    now[0] += 30.0
    lines.step({"iteration": 1, "step": 6, "loss": 0.5, "acc": 0.5, "margin_mean": 0.1, "lr": 1e-3,
                "tokens_per_second": 10.0})
    # 2 steps in 30 s, 4 left: 60 s.
    assert capsys.readouterr().out.rstrip().endswith("elapsed 30.0s  ETA 1m00s")
    assert duration(3725) == "1h02m05s"


def test_a_resumed_run_drops_tensorboard_events_past_its_checkpoint(tmp_path):
    """A crash after step 3 (checkpoint at step 2), then --resume: TensorBoard holds each step once,
    with metrics.jsonl's values, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny = tiny_setup(str(tmp_path / "setup"))
    out = str(tmp_path / "run")
    args = train_args(*tiny, out, "--iterations", "1", "--save-every", "2", "--report-to", "tensorboard")

    def crash_after_step_3(record):
        if record["step"] == 3:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_cli.main(args, on_step=crash_after_step_3)
    train_cli.main(args + ["--resume"])
    events = EventAccumulator(os.path.join(out, "runs"))
    events.Reload()
    train = metric_records(out, "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(r["step"], np.float32(r["loss"]))
                                                                         for r in train]

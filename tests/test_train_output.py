"""What a person reads: no progress bars in a log file, and curves.png with a panel for each
quantity the run logged."""
from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.plots import draw_curves


def test_a_run_logged_to_a_file_has_no_progress_bars(tmp_path, capfd):
    tiny = tiny_setup(str(tmp_path / "setup"))
    args = [a for a in train_args(*tiny, str(tmp_path / "run"), "--iterations", "1") if a != "--no-progress"]
    capfd.readouterr()   # the set-up's own output
    train_cli.main(args)   # stderr is not a terminal here
    captured = capfd.readouterr()
    assert "\r" not in captured.err and "steps" not in captured.err and "Loading" not in captured.err
    assert "SPIN, per iteration" in captured.out
    assert "no --test-data" not in captured.out


def test_a_run_without_test_data_says_where_exact_match_was_measured(tmp_path, capsys):
    tiny = tiny_setup(str(tmp_path / "setup"))
    args = train_args(*tiny, str(tmp_path / "run"), "--iterations", "1", "--exact-match")
    at = args.index("--test-data")
    train_cli.main(args[:at] + args[at + 2:])
    assert "no --test-data given: 'test exact match' is measured on --val-data" in capsys.readouterr().out


def spin_records():
    """A SPIN run of 8 steps, evaluated every 4."""
    out = [{"kind": "train", "run": "spin", "step": s, "loss": 0.69 - 0.01 * s, "acc": s / 8, "margin_mean": 0.1 * s}
           for s in range(1, 9)]
    for it, s in enumerate((0, 4, 8)):
        row = {"kind": "eval", "run": "spin", "iteration": it, "step": s, "exact_match": 0.1 + 0.05 * it,
               "val_sft_loss": 0.9 - 0.1 * it}
        if it:
            row["gen_equals_gold"] = 0.2 * it
        out.append(row)
    return out


def test_a_spin_run_gets_its_panels_with_its_values():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_curves(spin_records())
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        assert set(panels) == {"SPIN: training loss", "held-out exact match", "SPIN acc per step",
                               "reward margin per step", "generations equal to gold", "SFT validation loss"}
        (line,) = panels["held-out exact match"].lines
        assert list(line.get_xdata()) == [0, 4, 8] and list(line.get_ydata()) == [0.1 + 0.05 * it for it in range(3)]
        # gen = gold is logged at an iteration's end, but describes the samples made at its start.
        (line,) = panels["generations equal to gold"].lines
        assert list(line.get_xdata()) == [0, 4] and list(line.get_ydata()) == [0.2, 0.4]
        (line,) = panels["SPIN acc per step"].lines
        assert list(line.get_xdata()) == list(range(1, 9))
    finally:
        plt.close(fig)

"""What a person reads: no progress bars in a log file, and curves.png with SFT and SPIN losses on
their own axes, one colour per run, labelled axes, and the start in its own panel."""
from trainer_cases import tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.plots import RUN_COLOURS, draw_curves


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
    args = train_args(*tiny, str(tmp_path / "run"), "--iterations", "1")
    at = args.index("--test-data")
    train_cli.main(args[:at] + args[at + 2:])
    assert "no --test-data given: 'test exact match' is measured on --val-data" in capsys.readouterr().out


def records(seed_shift):
    """A start of 300 SFT steps, then both arms for 8 steps (evaluated every 4)."""
    out = [{"kind": "train", "run": "sft_start", "step": s, "sft_loss": 2.0 / s} for s in range(1, 301)]
    out += [{"kind": "eval", "run": "sft_start", "step": s, "val_sft_loss": 3.0 / s, "exact_match": 0.1}
            for s in (100, 200, 300)]
    for run in ("sft", "spin"):
        for s in range(1, 9):
            out.append({"kind": "train", "run": run, "step": s, "sft_loss": 0.5, "loss": 0.69 - 0.01 * s,
                        "acc": s / 8, "margin_mean": 0.1 * s} if run == "spin" else
                       {"kind": "train", "run": run, "step": s, "sft_loss": 0.5 - 0.01 * s})
        for it, s in enumerate((0, 4, 8)):
            row = {"kind": "eval", "run": run, "iteration": it, "step": s, "exact_match": 0.1 + 0.05 * it + seed_shift,
                   "val_sft_loss": 0.9 - 0.1 * it}
            if run == "spin" and it:
                row["gen_equals_gold"] = 0.2 * it
            out.append(row)
    return out


def test_curves_have_separate_loss_axes_one_colour_per_run_and_labels():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = draw_curves([records(0.0), records(0.02), records(-0.02)], ["sft_start", "sft", "spin"])
    try:
        panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
        assert {"SFT start: loss", "continued SFT: training loss", "SPIN: training loss", "held-out exact match",
                "SPIN acc per step", "reward margin per step", "generations equal to gold",
                "SFT validation loss"} == set(panels)
        for title, ax in panels.items():
            assert ax.get_xlabel() and ax.get_ylabel(), title
        from matplotlib.colors import to_rgba

        def colours(title):
            return {to_rgba(line.get_color()) for line in panels[title].lines}

        spin, sft, start = (to_rgba(RUN_COLOURS[run]) for run in ("spin", "sft", "sft_start"))
        # SFT loss and SPIN loss never share an axis; each run keeps its colour in every panel.
        assert colours("SPIN: training loss") == colours("SPIN acc per step") == {spin}
        assert colours("continued SFT: training loss") == {sft}
        assert colours("held-out exact match") == colours("SFT validation loss") == {spin, sft}
        assert colours("SFT start: loss") == {start, to_rgba("black")}
        # The 300 start steps are in their own panel; the arms' panels span the arms' 8 steps.
        for title in ("SPIN: training loss", "held-out exact match", "SFT validation loss"):
            assert panels[title].get_xlim()[1] < 20, title
        legend = [t.get_text() for t in panels["held-out exact match"].get_legend().get_texts()]
        assert legend == ["continued SFT (mean ± s.e., 3 seeds)", "SPIN (mean ± s.e., 3 seeds)"]
    finally:
        plt.close(fig)


def test_a_spin_only_run_gets_only_its_panels():
    import matplotlib.pyplot as plt

    spin_only = [r for r in records(0.0) if r["run"] == "spin"]
    fig = draw_curves([spin_only], ["spin"])
    try:
        titles = {ax.get_title() for ax in fig.axes if ax.get_visible()}
        assert "SFT start: loss" not in titles and "continued SFT: training loss" not in titles
        assert "SPIN: training loss" in titles and "generations equal to gold" in titles
    finally:
        plt.close(fig)

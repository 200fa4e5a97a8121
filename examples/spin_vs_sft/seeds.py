"""Several seeds of a comparison: their mean ± standard error, per iteration and in curves.png.

Rows averaged over seeds (`mean_rows`) carry `<key>_se`, the standard error over the seeds, which
spin_trainer.plots.format_table prints as ±. The curves draw the runs of a comparison ("sft_start",
"sft", "spin") in one colour each, every seed thin and the mean over the seeds thick.
"""
import math

from spin_trainer.plots import COLOUR, PANELS, label_panel, panel_grid, points, write_figure

RUN_COLOURS = {"sft_start": "0.45", "sft": "tab:blue", "spin": COLOUR}
RUN_LABELS = {"sft_start": "SFT start", "sft": "continued SFT", "spin": "SPIN"}

# The start's SFT run has a panel of its own, so that the SPIN-vs-SFT region is not squashed by it;
# every other panel counts optimizer steps from the start (each arm's run starts at step 0).
START_PANEL = ("SFT start: loss", "SFT step", "loss per response token")
# (title, x label, y label, kind, key, the runs it shows): continued SFT's training loss, then the
# SPIN run's panels, per-step quantities of SPIN alone and per-iteration ones of both arms.
ARM_PANELS = (("continued SFT: training loss", "optimizer step", "loss per response token", "train", "sft_loss",
               ("sft",)),
              *((*panel, ("spin",) if panel[3] == "train" else ("sft", "spin")) for panel in PANELS))


def mean_and_se(values):
    """(mean, standard error of the mean); the error is None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def mean_rows(rows_by_seed):
    """Per-iteration means over seeds of every numeric value all seeds have, with `<key>_se`."""
    lengths = {len(rows) for rows in rows_by_seed}
    assert len(lengths) == 1, f"seeds have different numbers of rows: {sorted(lengths)}"
    averaged = []
    for rows in zip(*rows_by_seed):
        row = {"iteration": rows[0]["iteration"], "step": rows[0]["step"], "seeds": len(rows)}
        for key in rows[0]:
            values = [r.get(key) for r in rows]
            if key in row or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            row[key], row[f"{key}_se"] = mean_and_se(values)
        averaged.append(row)
    return averaged


def plot_curves(record_sets, path, runs):
    """curves.png from metrics records: `record_sets` is one list of records per seed."""
    return write_figure(lambda: draw_curves(record_sets, runs), path)


def draw_curves(record_sets, runs):
    """The figure of plot_curves: the start's panel, then ARM_PANELS, each where one of `runs` has data."""
    def has_data(run, kind, key):
        return any(points(records, run, kind, key) for records in record_sets)

    panels = []
    if "sft_start" in runs and has_data("sft_start", "train", "sft_loss"):
        panels.append((*START_PANEL, "start", None, ["sft_start"]))
    for title, xlabel, ylabel, kind, key, shown in ARM_PANELS:
        chosen = [run for run in shown if run in runs and has_data(run, kind, key)]
        if chosen:
            panels.append((title, xlabel, ylabel, kind, key, chosen))
    fig, axes = panel_grid(len(panels))
    for ax, (title, xlabel, ylabel, kind, key, chosen) in zip(axes, panels):
        for run in chosen:
            colour, label = RUN_COLOURS.get(run), RUN_LABELS.get(run, run)
            if kind == "start":
                _draw_start(ax, record_sets, run, colour, label)
            elif kind == "train":
                for i, records in enumerate(record_sets):
                    found = points(records, run, kind, key)
                    if found:
                        ax.plot(*zip(*found), color=colour, linewidth=0.8, alpha=0.6, label=label if i == 0 else None)
            else:
                _draw_eval(ax, record_sets, run, key, colour, label)
        label_panel(ax, title, xlabel, ylabel)
    fig.tight_layout()
    return fig


def _draw_start(ax, record_sets, run, colour, label):
    """The start's training loss per step (thin) and its validation loss at each evaluation (dots)."""
    for i, records in enumerate(record_sets):
        train = points(records, run, "train", "sft_loss")
        val = points(records, run, "eval", "val_sft_loss")
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=0.6, alpha=0.5,
                    label=f"{label}: training" if i == 0 else None)
        if val:
            ax.plot(*zip(*val), color="black", marker=".", linestyle="none", markersize=3,
                    label=f"{label}: validation" if i == 0 else None)


def _draw_eval(ax, record_sets, run, key, colour, label):
    """Each seed thin, and the mean over the seeds thick with ± standard error bars."""
    per_seed = [dict(points(records, run, "eval", key)) for records in record_sets]
    per_seed = [found for found in per_seed if found]
    if not per_seed:
        return
    if len(per_seed) > 1:
        for found in per_seed:
            ax.plot(list(found), list(found.values()), color=colour, linewidth=0.6, alpha=0.35)
    steps = sorted(set.intersection(*(set(found) for found in per_seed)))
    stats = [mean_and_se([found[s] for found in per_seed]) for s in steps]
    means = [m for m, _ in stats]
    errors = [se or 0.0 for _, se in stats] if len(per_seed) > 1 else None
    ax.errorbar(steps, means, yerr=errors, color=colour, marker="o", markersize=3, linewidth=1.6, capsize=2,
                label=label if len(per_seed) == 1 else f"{label} (mean ± s.e., {len(per_seed)} seeds)")

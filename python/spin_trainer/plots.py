"""What a person reads of a run: the per-iteration table and curves.png.

Rows are eval records (one per iteration end; iteration 0 is the starting model). A row may carry
`<key>_se`, a standard error (of rows averaged over several runs), printed as ± after exact match.
"""
import math
import os

import matplotlib
import matplotlib.pyplot as plt

# Rows with exact match (tasks with one right answer, or where asked) lead with it; the others
# (chat data) with the SFT validation loss and SPIN acc and margin on the validation pairs.
TABLE_COLUMNS = (
    ("iteration", "iter", "{:d}"), ("step", "step", "{:d}"), ("exact_match", "test exact match", "{:.3f}"),
    ("val_sft_loss", "SFT val loss", "{:.4f}"),
    ("spin_acc_start", "SPIN acc start", "{:.2f}"), ("spin_acc_end", "SPIN acc end", "{:.2f}"),
    ("margin_start", "margin start", "{:+.3f}"), ("margin_end", "margin end", "{:+.3f}"),
    ("gen_equals_gold", "gen = gold", "{:.3f}"), ("val_spin_acc", "val SPIN acc", "{:.3f}"),
    ("gen_length", "gen length", "{:.2f}"),
)
CHAT_TABLE_COLUMNS = (
    ("iteration", "iter", "{:d}"), ("step", "step", "{:d}"), ("val_sft_loss", "SFT val loss", "{:.4f}"),
    ("val_spin_acc", "val SPIN acc", "{:.3f}"), ("val_margin", "val margin", "{:+.3f}"),
    ("val_gen_length", "val gen length", "{:.1f}"),
    ("spin_acc_start", "SPIN acc start", "{:.2f}"), ("spin_acc_end", "SPIN acc end", "{:.2f}"),
    ("margin_start", "margin start", "{:+.3f}"), ("margin_end", "margin end", "{:+.3f}"),
    ("gen_equals_gold", "gen = gold", "{:.3f}"),
)
TABLE_LEGEND = ("SPIN acc / margin start and end: training means over the first and the last quarter of the "
                "iteration's steps (margin = β·(r_actual − r_generated); at the first step the policy is the "
                "reference, so both are 0). gen = gold: fraction of the training prompts whose sampled response, "
                "made at the iteration's start, equals the gold one (such pairs give SPIN no gradient).")
CHAT_TABLE_LEGEND = (TABLE_LEGEND + " val SPIN acc / margin: of the policy on pairs of the gold validation "
                     "responses and the ones sampled at the iteration's start; val gen length: their mean length.")

COLOUR = "tab:orange"   # of a SPIN run


def format_table(rows, title):
    """Plain-text table of eval rows; missing values print as '-', `<key>_se` as ± after exact match."""
    columns = table_columns(rows)
    header = [label for _, label, _ in columns]
    body = []
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cell = "-" if value is None else fmt.format(value)
            if key == "exact_match" and row.get(f"{key}_se") is not None:
                cell += " ± " + fmt.format(row[f"{key}_se"])
            cells.append(cell)
        body.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = "  ".join(h.rjust(w) for h, w in zip(header, widths))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in body]
    return "\n".join(out)


def table_columns(rows):
    return TABLE_COLUMNS if any(row.get("exact_match") is not None for row in rows) else CHAT_TABLE_COLUMNS


def table_legend(rows):
    return TABLE_LEGEND if table_columns(rows) is TABLE_COLUMNS else CHAT_TABLE_LEGEND


def points(records, run, kind, key):
    """[(step, value)] of `key` in the `kind` records ("train", "eval") of `run`."""
    found = [(r["step"], r[key]) for r in records
             if r.get("kind") == kind and r.get("run") == run and r.get(key) is not None]
    if key == "gen_equals_gold":
        # Logged with the iteration's end; the responses were sampled at its start (the previous end).
        ends = sorted(r["step"] for r in records if r.get("kind") == "eval" and r.get("run") == run)
        found = [(max([e for e in ends if e < step], default=0), value) for step, value in found]
    return found


# The panels of a SPIN run: (title, x label, y label, kind, key). Per optimizer step ("train") or per
# iteration end ("eval").
PANELS = (
    ("SPIN: training loss", "optimizer step", "SPIN loss", "train", "loss"),
    ("held-out exact match", "optimizer step", "test exact match", "eval", "exact_match"),
    ("SPIN acc per step", "optimizer step", "acc (margin > 0)", "train", "acc"),
    ("reward margin per step", "optimizer step", "β·(r_actual − r_generated)", "train", "margin_mean"),
    ("generations equal to gold", "optimizer step (iteration start)", "fraction of train prompts", "eval",
     "gen_equals_gold"),
    ("SFT validation loss", "optimizer step", "loss per response token", "eval", "val_sft_loss"),
)


def write_figure(draw, path):
    """Writes the figure `draw()` makes (with the Agg backend, no display needed) to `path`, atomically."""
    matplotlib.use("Agg")

    fig = draw()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def panel_grid(count):
    """(figure, its first `count` axes) on a grid at most 4 panels wide; the unused cells hidden."""
    cols = max(1, min(4, count))
    rows = max(1, math.ceil(count / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:count])


def label_panel(ax, title, xlabel, ylabel):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def draw_curves(records, run="spin"):
    """The figure of plot_curves: one panel per quantity of PANELS that `run` logged."""
    panels = [panel for panel in PANELS if points(records, run, panel[3], panel[4])]
    fig, axes = panel_grid(len(panels))
    for ax, (title, xlabel, ylabel, kind, key) in zip(axes, panels):
        steps, values = zip(*points(records, run, kind, key))
        if kind == "train":
            ax.plot(steps, values, color=COLOUR, linewidth=0.8)
        else:
            ax.plot(steps, values, color=COLOUR, marker="o", markersize=3, linewidth=1.6)
        label_panel(ax, title, xlabel, ylabel)
    fig.tight_layout()
    return fig


def plot_curves(records, path, run="spin"):
    """curves.png of one run from its metrics records (spin_trainer.metrics.read_records)."""
    return write_figure(lambda: draw_curves(records, run), path)

"""What a person reads of a run: the per-iteration table and curves.png.

Rows are eval records (one per iteration end; iteration 0 is the starting model). A row may carry
`<key>_se`, a standard error (of rows averaged over several runs), printed as ± after exact match.
"""
import math
import os

import matplotlib
import matplotlib.pyplot as plt

# {key: (label, format)} of the table's columns
COLUMNS = {"iteration": ("iter", "{:d}"), "step": ("step", "{:d}"), "exact_match": ("test exact match", "{:.3f}"),
           "val_sft_loss": ("SFT val loss", "{:.4f}"), "val_spin_acc": ("val SPIN acc", "{:.3f}"),
           "val_margin": ("val margin", "{:+.3f}"), "val_gen_length": ("val gen length", "{:.1f}"),
           "spin_acc_start": ("SPIN acc start", "{:.2f}"), "spin_acc_end": ("SPIN acc end", "{:.2f}"),
           "margin_start": ("margin start", "{:+.3f}"), "margin_end": ("margin end", "{:+.3f}"),
           "gen_equals_gold": ("gen = gold", "{:.3f}"), "gen_length": ("gen length", "{:.2f}")}
# Rows with exact match (tasks with one right answer, or where asked) lead with it; the others
# (chat data) with the SFT validation loss and SPIN acc and margin on the validation pairs.
EXACT_MATCH_TABLE = ("iteration", "step", "exact_match", "val_sft_loss", "spin_acc_start", "spin_acc_end",
                     "margin_start", "margin_end", "gen_equals_gold", "val_spin_acc", "gen_length")
CHAT_TABLE = ("iteration", "step", "val_sft_loss", "val_spin_acc", "val_margin", "val_gen_length", "spin_acc_start",
              "spin_acc_end", "margin_start", "margin_end", "gen_equals_gold")
TABLE_LEGEND = ("SPIN acc / margin start and end: training means over the first and the last quarter of the "
                "iteration's steps (margin = β·(r_actual − r_generated); at the first step the policy is the "
                "reference, so both are 0). gen = gold: fraction of the training prompts whose sampled response, "
                "made at the iteration's start, equals the gold one (such pairs give SPIN no gradient).")
CHAT_TABLE_LEGEND = (TABLE_LEGEND + " val SPIN acc / margin: of the policy on pairs of the gold validation "
                     "responses and the ones sampled at the iteration's start; val gen length: their mean length.")

COLOUR = "tab:orange"   # of a SPIN run


def format_table(rows, title):
    """Plain-text table of eval rows; missing values print as '-', `<key>_se` as ± after exact match."""
    def cell(row, key, fmt):
        if row.get(key) is None:
            return "-"
        se = row.get(f"{key}_se") if key == "exact_match" else None
        return fmt.format(row[key]) + ("" if se is None else " ± " + fmt.format(se))

    columns = table_columns(rows)
    table = [[label for _, label, _ in columns]] + [[cell(row, key, fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(cells[i]) for cells in table) for i in range(len(columns))]
    header, *body = ["  ".join(c.rjust(w) for c, w in zip(cells, widths)) for cells in table]
    return "\n".join([title, header, "-" * len(header), *body])


def has_exact_match(rows):
    return any(row.get("exact_match") is not None for row in rows)


def table_columns(rows):
    """[(key, label, format)] of the table of `rows`."""
    return [(key, *COLUMNS[key]) for key in (EXACT_MATCH_TABLE if has_exact_match(rows) else CHAT_TABLE)]


def table_legend(rows):
    return TABLE_LEGEND if has_exact_match(rows) else CHAT_TABLE_LEGEND


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
        style = dict(linewidth=0.8) if kind == "train" else dict(marker="o", markersize=3, linewidth=1.6)
        ax.plot(steps, values, color=COLOUR, **style)
        label_panel(ax, title, xlabel, ylabel)
    fig.tight_layout()
    return fig


def plot_curves(records, path, run="spin"):
    """curves.png of one run from its metrics records (spin_trainer.metrics.read_records)."""
    return write_figure(lambda: draw_curves(records, run), path)

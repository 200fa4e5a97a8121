"""What a run leaves for people as it goes: the results table as each iteration ends, each iteration's
model in Hugging Face format (OUT/iter-N, N = 1.. the iterations done) and the final one (OUT/final).

The table is printed (and flushed, for a log file) before the iteration's export, so a failing export
never loses it. The final model is the last iteration's: where that was exported in the same dtype,
OUT/final holds hard links to its files instead of a second copy.
"""
import os

from .export import export_hf, link_export
from .plots import format_table


class RunOutputs:
    def __init__(self, model, tokenizer, ctx, *, out, table_title, final_dtype, iteration_dtype=None):
        """`iteration_dtype`: the OUT/iter-N exports' dtype; None exports OUT/final only."""
        self.model, self.tokenizer, self.ctx, self.out = model, tokenizer, ctx, out
        self.table_title, self.final_dtype, self.iteration_dtype = table_title, final_dtype, iteration_dtype
        self.last_export = None   # (iteration, path) of this process's newest OUT/iter-N
        self.tables_printed = 0

    def print_table(self, rows):
        if self.ctx.is_main:
            print(format_table(rows, self.table_title), flush=True)
        self.tables_printed += 1

    def iteration_end(self, iteration, rows):
        """After iteration `iteration` (1-based) and its checkpoint: the table, then its export."""
        self.print_table(rows)
        if self.iteration_dtype is None:
            return
        path = export_hf(self.model, self.tokenizer, os.path.join(self.out, f"iter-{iteration}"), self.ctx,
                         dtype=self.iteration_dtype)
        self.last_export = (iteration, path)
        if self.ctx.is_main:
            print(f"iteration {iteration} model: {path}", flush=True)

    def final(self, iterations, rows):
        """OUT/final, the model after `iterations` iterations (the table too if no iteration ended here)."""
        if not self.tables_printed:
            self.print_table(rows)
        path = os.path.join(self.out, "final")
        if self.iteration_dtype == self.final_dtype and self.last_export and self.last_export[0] == iterations:
            return link_export(self.last_export[1], path, self.ctx)
        return export_hf(self.model, self.tokenizer, path, self.ctx, dtype=self.final_dtype)

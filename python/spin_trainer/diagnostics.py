"""What a user checks to see whether SPIN had anything to learn, and when SFT has converged.

- `fraction_equal_to_gold`: how often the model's own response equals the gold one. Such a pair
  gives SPIN no gradient at all: r(actual) and r(generated) are the same function of θ, so their
  difference is 0 for every θ. A model that already answers its training prompts has nothing
  left to learn from self-play on them.
- `iteration_diagnostics`: SPIN acc and reward margin at the start and at the end of an
  iteration (means over its first and last quarter of optimizer steps). At the first step the
  policy equals the reference, so the margin is 0 and acc is 0 (acc counts margins > 0); a
  healthy iteration ends with acc near 1 and a positive margin.
- `EarlyStopping`: the `stop` hook of `run_sft` that ends SFT once the validation loss has not
  improved for `patience` evaluations, and keeps the weights of the best one.
"""
import math

from .export import full_state_dict


def fraction_equal_to_gold(examples, generated):
    """Fraction of `examples` whose generated response ids (EOS included) equal the gold ones."""
    if not examples:
        return None
    assert len(examples) == len(generated)
    return sum(list(g) == list(e.response_ids) for e, g in zip(examples, generated)) / len(examples)


def iteration_diagnostics(history):
    """{spin_acc_start, spin_acc_end, margin_start, margin_end} of an iteration's step records."""
    if not history:
        return {"spin_acc_start": None, "spin_acc_end": None, "margin_start": None, "margin_end": None}
    quarter = max(1, math.ceil(len(history) / 4))
    first, last = history[:quarter], history[-quarter:]

    def mean(records, key):
        return sum(r[key] for r in records) / len(records)

    return {"spin_acc_start": mean(first, "acc"), "spin_acc_end": mean(last, "acc"),
            "margin_start": mean(first, "margin_mean"), "margin_end": mean(last, "margin_mean")}


class EarlyStopping:
    """`stop(row) -> bool` for run_sft: True once `patience` evaluations in a row brought no new
    lowest `val_sft_loss`. The best weights are kept (`best_state`, a CPU copy) for the caller to
    load; `best_step` is the step they were taken at."""

    def __init__(self, model, patience):
        if patience < 1:
            raise ValueError(f"patience must be >= 1 evaluation, got {patience}")
        self.model, self.patience = model, patience
        self.best_loss, self.best_step, self.best_state = math.inf, None, None
        self.evaluations_since_best = 0

    def __call__(self, row):
        loss = row["val_sft_loss"]
        if loss is None:
            raise ValueError("early stopping needs validation data (val_sft_loss is None)")
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, row["step"]
            self.best_state = full_state_dict(self.model)
            self.evaluations_since_best = 0
            return False
        self.evaluations_since_best += 1
        return self.evaluations_since_best >= self.patience

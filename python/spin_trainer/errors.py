"""The two kinds of failure a user meets, and how a setting is named to them.

`UsageError`: a mistake in the settings or the inputs, found before any training step (a missing
file, a value out of range, a layout that does not divide). The entry point prints its message
alone, without a traceback, and exits with status 2. `CheckpointNotWritten` (a full disk) is
printed alone too, with status 1. Every other exception, divergence included, keeps its traceback:
it is a failure of the run, not of its command line. Under torchrun rank 0 prints (every rank
raises the same error: each check runs on every rank or its verdict is shared).
"""


class UsageError(Exception):
    """A user's mistake found before training; the message says what to change."""


class CheckpointNotWritten(RuntimeError):
    """The disk filled while a checkpoint was written; the message names the intact one. Printed
    alone, like a UsageError: a traceback would say nothing more."""


class TrainingDiverged(RuntimeError):
    """The update went non-finite; the message says which checkpoint is intact."""


def option(name, negated=False):
    """The command-line option of the setting `name` (a field of spin_trainer.config's tree): every
    setting's option is its field name with dashes, so messages can name it without spelling it.
    `negated`: the --no- form of an on/off setting."""
    return ("--no-" if negated else "--") + name.replace("_", "-")

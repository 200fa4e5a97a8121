"""Train/eval mode around a pass that must not train (generation, reference and held-out passes)."""
from contextlib import contextmanager


@contextmanager
def evaluating(model):
    """Inside, `model` is in eval mode; on the way out (also on an exception) its mode is restored."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)

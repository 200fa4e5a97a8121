"""The SPIN trainer behind python/train.py: data, model, tensor-parallel plan, generation,
the SPIN loop, checkpoints and metrics (one responsibility per module)."""

"""Parallelism and precision on PyTorch's own engine, applied in torchtitan's order (apply.py)."""

"""Parallelism and precision, in torchtitan's order, on PyTorch's own engine:

    mesh.py        the (dp, tp) DeviceMesh and ParallelContext (ranks, meshes, groups, device)
    tp_plan.py     the tensor-parallel plan of Llama-family models, as data
    recompute.py   activation recompute of the decoder layers
    apply.py       parallelize_model: TP, recompute, then fully_shard (or replicate) per decoder layer
    precision.py   bf16 compute with fp32 master weights: FSDP's MixedPrecisionPolicy in every layout
"""

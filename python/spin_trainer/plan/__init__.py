"""`spin-train --plan`: per-rank memory of a run at real scale, sized on the meta device and PyTorch's
fake process group before any GPU is rented.

    memory.py        the simulation: the trainer's own parallelize_model and optimizer on meta tensors
    activations.py   the activation formula of a Llama-family decoder (what autograd saves)
    generation.py    generation's KV cache and prefill transients, the generation batch that fits
    host.py          host memory per rank and per node (reference banks, optimizer offload, loading)
    report.py        the command line's checks and printout; the checks of a training run
"""

"""`spin-train --plan`: per-rank memory of a run at real scale, sized on the meta device and PyTorch's
fake process group before any GPU is rented.

    memory.py        the simulation: the trainer's own parallelize_model and optimizer on meta tensors
    activations.py   the activation formula of a Llama-family decoder (what autograd saves)
    report.py        the command line's checks and printout; the check of a run without FSDP
"""

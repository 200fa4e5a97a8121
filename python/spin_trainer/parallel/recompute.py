"""Activation recompute of decoder layers (`--recompute {none,elementwise,full}`).

    full         each decoder layer keeps only its input; the backward recomputes the rest
                 (~1/3 more compute, the least memory)
    elementwise  the layers keep their matmul outputs but recompute the RMSNorms (whose fp32
                 intermediates they would otherwise keep) and the SwiGLU product act(gate) * up. On
                 the 1.24 B Llama shape at 8192 tokens per step this took the peak from 22.6 to
                 18.6 GiB for 7 % more step time (benchmarks/results/e2e.md)

It wraps a module's own `forward` (an instance attribute, so parameter names, state dict and deep
copies stay the plain model's) in non-reentrant `torch.utils.checkpoint`, and runs it as it is
without grad. Applied before `fully_shard`, so FSDP's pre-backward all-gather is in place when the
backward recomputes.
"""
import types

import torch
from torch.utils.checkpoint import checkpoint

from ..config import RECOMPUTE_MODES
from ..errors import UsageError, option

NORM_NAMES = ("input_layernorm", "post_attention_layernorm")
SWIGLU_NAMES = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _recompute(function, *args, **kwargs):
    if not torch.is_grad_enabled():
        return function(*args, **kwargs)
    # Dropout is off in every trainer model (spin_trainer.model.disable_dropout), so the forward
    # draws no random numbers and the RNG state need not be saved and restored around it.
    return checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)


def _with_attention_of_now(module, function):
    """`function`, run with the attention implementation that `module`'s config names now. The
    backward's recompute runs after the forward's call has returned: a packed forward
    (packed_attention.packed_forward) switches the model's implementation for its call only, and
    a recompute with the model's own would attend across the packed segments."""
    config = next((m.config for m in module.modules() if hasattr(m, "config")), None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is None:
        return function

    def run(*args, **kwargs):
        saved = config._attn_implementation
        config._attn_implementation = implementation
        try:
            return function(*args, **kwargs)
        finally:
            config._attn_implementation = saved

    return run


def _recomputed_forward(self, *args, **kwargs):
    """The module's class forward, its activations recomputed in the backward (with the attention
    implementation of the forward)."""
    return _recompute(_with_attention_of_now(self, type(self).forward.__get__(self)), *args, **kwargs)


def _recomputed_swiglu_forward(self, x):
    """Llama MLP: gate and up are kept, act(gate) * up is recomputed (it is also down_proj's
    saved input, so act(gate) is the intermediate-sized tensor this saves)."""
    gate, up = self.gate_proj(x), self.up_proj(x)
    return self.down_proj(_recompute(lambda gate, up: self.act_fn(gate) * up, gate, up))


_PATCHES = (_recomputed_forward, _recomputed_swiglu_forward)


def _patch(module, function):
    module.forward = types.MethodType(function, module)


def _unpatch(module):
    if getattr(module.forward, "__func__", None) in _PATCHES and "forward" in module.__dict__:
        del module.forward


def apply_recompute(layers, mode):
    """Sets the recompute of every module in `layers` (decoder layers) to `mode`; idempotent, and
    `mode="none"` restores the plain forwards."""
    assert mode in RECOMPUTE_MODES, mode
    for layer in layers:
        for module in layer.modules():
            _unpatch(module)
        if mode == "full":
            _patch(layer, _recomputed_forward)
        elif mode == "elementwise":
            mlp = getattr(layer, "mlp", None)
            if not all(hasattr(layer, n) for n in NORM_NAMES) or not all(hasattr(mlp, n) for n in SWIGLU_NAMES):
                raise UsageError(f"{option('recompute')} elementwise: {type(layer).__name__} is not a Llama-family "
                                 f"layer (input/post-attention RMSNorms and a gate/up/down SwiGLU MLP); "
                                 f"use {option('recompute')} full")
            for name in NORM_NAMES:
                _patch(getattr(layer, name), _recomputed_forward)
            _patch(mlp, _recomputed_swiglu_forward)

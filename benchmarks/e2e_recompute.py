"""Activation-recompute wrappers for a Hugging Face Llama, as bench_e2e.py's memory savers."""
import torch


class Recomputed(torch.nn.Module):
    """Runs the wrapped module under activation checkpointing: its inputs are kept, everything it
    computes is recomputed in the backward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


class RecomputedSwiGLU(torch.nn.Module):
    """A Llama MLP that keeps the gate and up projections but recomputes act(gate) * up (cheap,
    elementwise) in the backward: 2 of the 4 intermediate-sized activations per token are not kept."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def _act_times_up(self, gate, up):
        return self.inner.act_fn(gate) * up

    def forward(self, x):
        gate, up = self.inner.gate_proj(x), self.inner.up_proj(x)
        hidden = torch.utils.checkpoint.checkpoint(self._act_times_up, gate, up, use_reentrant=False)
        return self.inner.down_proj(hidden)


def _unwrap(module):
    return module.inner if isinstance(module, (Recomputed, RecomputedSwiGLU)) else module


def configure_recompute(model, *, full_layers: int = 0, elementwise: bool = False) -> None:
    """Checkpoint the first `full_layers` decoder layers whole; with `elementwise`, the others
    recompute only their RMSNorms (whose fp32 intermediates they would keep) and SwiGLU products.
    `configure_recompute(model)` restores the original modules."""
    layers = model.model.layers
    for index in range(len(layers)):
        layer = _unwrap(layers[index])
        for name in ("input_layernorm", "post_attention_layernorm", "mlp"):
            setattr(layer, name, _unwrap(getattr(layer, name)))
        layers[index] = Recomputed(layer) if index < full_layers else layer
        if elementwise and index >= full_layers:
            layer.input_layernorm = Recomputed(layer.input_layernorm)
            layer.post_attention_layernorm = Recomputed(layer.post_attention_layernorm)
            layer.mlp = RecomputedSwiGLU(layer.mlp)

"""The training step's peak, phase by phase, as FSDP2 (or replicate) and autograd allocate it (for
`--plan`). Every figure is per rank; the model state (parameters, optimizer state, a resident
reference) comes on top.

With U the largest decoder layer's elements once gathered (tensor-parallel local), R the root's
(embeddings, final norm, LM head) and Hd the LM head weight's, b the compute dtype's bytes, r the
gradient reduction's (float32 in mixed precision, else the parameters' dtype), g the FSDP shard
group's size (the data-parallel size under FSDP; 1 for one process and for `replicate`):

    gathered weights   FSDP all-gathers each unit in the compute dtype (MixedPrecisionPolicy's
                       cast; on a group of one it copies the sharded parameter). The root stays
                       gathered from the forward to the end of the backward; a decoder layer from
                       its pre-forward to its post-forward and again in its backward, with the
                       next one prefetched when g > 1 (two layers: the prefetch is its all-gather
                       output until its copy-out), alone when g = 1. `replicate` keeps every
                       layer's copy from its forward to its own backward.
    gradients          all of them (the gradients of the earlier micro-batches of the step are
                       there from the second micro-batch on; a step of one micro-batch holds only
                       the layers already reduced, so then this is an upper bound)
    gradient buffers   the LM head's unsharded gradient (b·Hd, formed in the loss's backward and
                       reduced with the root's at the end of the backward) and, in a lower layer's
                       backward, the previous layer's reduce-scatter input (r·U: FSDP keeps one
                       until the next reduce) where the layers above have freed their activations;
                       `replicate` also holds each layer's reduced gradient (r·U, an all-reduce
                       buffer, to the end of the backward once gradients accumulate) and frees its
                       copy (b·U). At the layer's reduce: its input r·U and the output r·U/g (a new
                       tensor, then added into the accumulated gradient); on a group of one the
                       trainer's divide factor of 1 makes one more r·U (FSDP's `input / factor`
                       copy)
    backward working set  in a decoder layer's backward (activations.py, measured live at the
                       layer's peak): the residual stream's gradient (b·h per token) and the
                       larger of the MLP's two steps, d act(gate) and d up beside
                       d(act(gate)·up) once down_proj's input is freed (2·b·I/t per token;
                       elementwise 3) or d(act(gate)·up) with down_proj's weight gradient (under
                       FSDP that gradient, b·I·h/t, stays to the layer's reduce: it is there at
                       either step); under --recompute full the layer's activations are rebuilt
                       first (one layer's activations without recompute)

    optimizer update   torch.optim's multi-tensor (foreach) step, CUDA's default, steps one
                       parameter group at a time (make_optimizer: one per device mesh and weight-
                       decay choice) and allocates, for the group's local elements in the state's
                       dtype (the parameters'): AdamW the square root of exp_avg_sq, RMSprop that
                       of square_avg and, with weight decay, the decayed gradients beside it
                       (torch/optim/adam.py, rmsprop.py: _multi_tensor_*). With
                       --optimizer-in-backward each parameter is stepped in the backward as its
                       gradient is complete: AdamW fused (in place, nothing), RMSprop (no fused
                       kernel) one parameter's, on top of any phase of the backward (a bound)

    training peak = state + the largest of the phases
        loss backward        activations (the fused head's transients freed) + gathered weights
                             + b·Hd (formed by the loss's backward; not counted: the final norm's
                             fp32 backward, a few fp32 copies of its input, which on these models
                             stays below the layers' phases)
        layer backward       activations − the LM head's − the final norm's + working set
                             + gathered weights + b·Hd + the lower layers' largest buffers beyond
                             the top's: max(0, r·U − one layer's activations) (`replicate`: with
                             (r − b)·U more per layer above)
        layer reduce         the top layer's: activations − the LM head's − one layer's + gathered
                             weights (the layer's own freed) + b·Hd + reduce transients
        end of backward      the root gathered with its unsharded gradients (2·b·R) beside the last
                             layer's reduce input (r·U), then the root resharded and reduced (its
                             reduce transients as a layer's); `replicate` holds every layer's
                             reduced gradient (r·U each) to the end of the backward once the
                             gradients accumulate
        optimizer step       the update's temporaries (the activations and FSDP's copies are gone)

Without FSDP (float32 or --pure-low-precision on one process, or tensor parallelism alone)
autograd adds each weight's gradient into the parameter's: no gathered weights and no buffers,
and the working set holds a decoder layer's weight gradient (the largest, r bytes an element) as
it is formed, beside d(act(gate)·up); under FSDP it is formed in the unsharded gradient buffers.

tests/test_plan_training.py measures every term and phase against a real step of the trainer's
code on one process (over gloo the prefetched layer's bytes vary from run to run: not measured).
"""
from dataclasses import dataclass

from spin_kernels.dtensor import local_tensor


@dataclass(frozen=True)
class FsdpUnits:
    """This rank's FSDP units in elements once gathered, and the layout around them."""
    root: int            # R
    layer: int           # U, the largest decoder layer
    layers: int          # L
    head: int            # Hd
    group: int           # g
    replicate: bool


@dataclass(frozen=True)
class TrainingStep:
    gathered: int            # during the top layer's backward
    gathered_after_forward: int
    gradient_buffers: int    # during the top layer's backward
    reduce: int              # the top layer's reduce: its buffers (the layer's gathered weights freed)
    end_of_backward: int
    working_set: int
    head_gradient: int       # the LM head weight's gradient, from the loss's backward on
    head_gradient_formed: int = 0   # the part the loss's backward adds (--head fused forms it in the forward)
    update: int = 0          # the optimizer update's temporaries (update_bytes)
    update_in_backward: bool = False

    def phases(self, activations):
        """{phase: bytes} of the step, beside the model state (activations: an ActivationEstimate)."""
        a, in_backward = activations, self.update if self.update_in_backward else 0
        backward = {
            "loss backward": a.total - a.head_transient + self.gathered_after_forward + self.head_gradient_formed,
            "layer backward": a.total - a.head - a.final_norm + self.working_set + self.gathered + self.gradient_buffers,
            "layer reduce": a.total - a.head - a.top_layer + self.reduce,
            "end of backward": self.end_of_backward}
        return {**{name: value + in_backward for name, value in backward.items()},
                "optimizer step": 0 if self.update_in_backward else self.update}

    def peak_phase(self, activations):
        """(name, bytes) of the largest phase of the step, beside the model state."""
        return max(self.phases(activations).items(), key=lambda phase: phase[1])


def local_bytes(tensor):
    local = local_tensor(tensor)
    return local.numel() * local.element_size()


def update_bytes(optimizer, name, in_backward):
    """The largest temporaries of one multi-tensor update of `optimizer` (make_optimizer's: an
    InBackwardOptimizer's param_groups are its parameters' own), as CUDA runs it (docstring above)."""
    if in_backward and name == "adamw":
        return 0   # fused on CUDA: in place

    def group_bytes(group):
        copies = 2 if name == "rmsprop" and group["weight_decay"] else 1
        return copies * sum(local_bytes(p) for p in group["params"])

    return max(map(group_bytes, optimizer.param_groups))


def working_set(activations, weight_gradient, kept):
    """A decoder layer's backward beside its saved tensors; `weight_gradient`: the bytes of
    down_proj's weight gradient, formed in the MLP's backward before d act(gate) and d up; `kept`:
    it stays (FSDP: in the unsharded gradient, to the layer's reduce), else it is added into the
    parameter's gradient and freed."""
    a = activations
    if kept:
        return a.residual_gradient + a.rebuilt + a.mlp_gradients + weight_gradient
    return a.residual_gradient + a.rebuilt + max(a.mlp_gradients, a.mlp_product_gradient + weight_gradient)


def training_step(units, activations, *, compute_bytes, reduce_bytes, head, largest_layer_weight, fused_head=False,
                  update=0, update_in_backward=False):
    """TrainingStep of `units` (FsdpUnits; None without FSDP); `head`: the LM head weight's elements,
    `largest_layer_weight`: the largest decoder-layer weight's (without FSDP, a gradient is formed
    whole, then added); `fused_head`: the fused head's d weight is among the activations already
    (activations.py); `update`: update_bytes, stepped `update_in_backward` or after it."""
    a, b, r = activations, compute_bytes, reduce_bytes
    updates = dict(update=update, update_in_backward=update_in_backward)
    if units is None:
        return TrainingStep(gathered=0, gathered_after_forward=0, gradient_buffers=0, reduce=0, end_of_backward=0,
                            working_set=working_set(a, r * largest_layer_weight, kept=False), head_gradient=r * head,
                            head_gradient_formed=0 if fused_head else r * head, **updates)
    u = units
    kept_layers = u.layers if u.replicate else 2 if u.group > 1 else 1
    gathered = b * (u.root + kept_layers * u.layer)
    head_gradient = b * head

    def reduce_transients(n):   # the reduce of n elements (the unsharded gradients in b, then r)
        if u.group == 1:   # input, input / 1 and the output
            return max(b * n + r * n, 3 * r * n)
        return max(b * n + r * n, r * n + r * n // u.group)

    # A lower layer's backward has the last reduce's input beside it (r·U, kept to the next reduce)
    # and every layer above's activations freed; under `replicate` every layer above also holds its
    # reduced gradient (r·U, to the end of the backward) and has freed its copy (b·U).
    per_layer_above = (r - b) * u.layer - a.top_layer if u.replicate else -a.top_layer
    layers_above = u.layers - 1 if per_layer_above > 0 else 1
    lower_layer = r * u.layer + layers_above * per_layer_above if u.layers > 1 else 0
    return TrainingStep(
        gathered=gathered, gathered_after_forward=b * (u.root + (u.layers * u.layer if u.replicate else 0)),
        gradient_buffers=head_gradient + max(0, lower_layer),
        reduce=gathered - b * u.layer + head_gradient + reduce_transients(u.layer),
        end_of_backward=max(2 * b * u.root + r * u.layer, reduce_transients(u.root))
        + (u.layers * r * u.layer if u.replicate else 0),
        working_set=working_set(a, b * largest_layer_weight, kept=True),
        head_gradient=head_gradient, head_gradient_formed=0 if fused_head else head_gradient, **updates)

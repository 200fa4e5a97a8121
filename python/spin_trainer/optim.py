"""The optimizer (AdamW or RMSprop), optionally stepped inside the backward; the update of a step
(clipping by the global norm, the divergence check); the order of the examples; the learning rate.

Parameter groups follow the device meshes: under FSDP x TP the tensor-parallel weights are DTensors
on the 2-D (dp, tp) mesh, the norms and embeddings on the 1-D dp mesh (plain tensors without FSDP),
and PyTorch's multi-tensor (foreach) kernels take one mesh per call.

Learning rate: transformers' get_{constant,linear,cosine}_schedule_with_warmup step for step. Over a
span of S optimizer steps (one SPIN iteration or the whole run: --schedule-span), w warm-up steps
and k = 0 .. S-1 the step within it:

    warm-up    lr · k / w                             for k < w (the first step's rate is 0, as in HF)
    constant   lr
    linear     lr · (S − k) / (S − w)                 from lr at k = w down to lr / (S − w)
    cosine     lr · (1 + cos(π · (k − w) / (S − w))) / 2

w = ceil(warmup_ratio · S) as in Hugging Face's Trainer, or --warmup-steps when given.
"""
import math

import torch

from spin_kernels.dtensor import is_dtensor, local_tensor

from .errors import TrainingDiverged, UsageError, option
from .parallel.apply import sharded


def group_by_mesh(tensors):
    """[[tensors on one mesh], ...] in order of first appearance (plain tensors form one group).
    Meshes compare by value: FSDP builds its own 2-D mesh object per module it shards."""
    groups = {}
    for tensor in tensors:
        groups.setdefault(tensor.device_mesh if is_dtensor(tensor) else None, []).append(tensor)
    return list(groups.values())


def norm_across_meshes(tensors, norm_of_group):
    """The global 2-norm of `tensors` (local shards, replicas, DTensors on any meshes): `norm_of_group`
    of each mesh's tensors, made whole by DTensor's own reduction (`full_tensor()`, one collective
    per mesh), then the norm of those."""
    norms = [norm_of_group(group) for group in group_by_mesh(tensors)]
    return torch.linalg.vector_norm(torch.stack([(n.full_tensor() if is_dtensor(n) else n).float() for n in norms]))


def _single_optimizer(name, params, *, lr, weight_decay, betas, eps, **extra):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra)
    assert name == "rmsprop", name
    extra.pop("fused", None)   # RMSprop has no fused kernel
    # torch's defaults (alpha 0.99), which is what Hugging Face Trainer's `optim: rmsprop` and so
    # the SPIN paper's recipe use.
    return torch.optim.RMSprop(params, lr=lr, eps=eps, weight_decay=weight_decay, **extra)


NORM_LAYERS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm)


def is_norm_layer(module):
    """torch's norms, and the models' own (LlamaRMSNorm, ...), which HF names by the same word."""
    return isinstance(module, NORM_LAYERS) or "norm" in type(module).__name__.lower()


def decayed_parameters(model):
    """{parameter: whether weight decay applies}: weight matrices yes; biases, norm weights and any
    other 1-D parameter no (Hugging Face's rule). ndim is the full shape's, also for DTensor shards."""
    return {param: param.ndim >= 2 and not name.endswith("bias") and not is_norm_layer(module)
            for module in model.modules() for name, param in module.named_parameters(recurse=False)
            if param.requires_grad}


def make_optimizer(model, *, ctx, lr, name="adamw", weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                   in_backward=False):
    """The optimizer over the model's trainable parameters, one parameter group per device mesh and
    weight-decay choice (`lr`: the first step's; the scheduler sets every later one)."""
    with sharded(model):   # FSDP's parameters are the sharded ones (a forward may have left some gathered)
        decays = decayed_parameters(model)
    if in_backward:
        return InBackwardOptimizer(list(decays), lambda group: _single_optimizer(
            name, group, lr=lr, weight_decay=weight_decay if decays[group[0]] else 0.0, betas=betas, eps=eps,
            fused=ctx.device.type == "cuda"))
    groups = [{"params": group, "weight_decay": weight_decay if decays[group[0]] else 0.0}
              for decay in (True, False) for group in group_by_mesh([p for p, d in decays.items() if d == decay])]
    return _single_optimizer(name, groups, lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)


def reset_state(optimizer):
    """Forgets every moment and step count: the next step is a fresh optimizer's."""
    optimizer.state.clear()


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped as soon as that parameter's gradient is complete (a
    post-accumulate-grad hook; under FSDP2 on the sharded gradient after the reduce-scatter), which
    then frees the gradient: the full set of gradients never exists at once.

    Valid only when one backward makes the whole gradient of a step (one micro-batch per rank and
    step) and nothing needs all of it before the update (no clipping); SpinConfig refuses the rest.
    The gradient norm is still reported: `take_grad_norm()` after the backward.

    To the rest of the trainer it is one optimizer: `param_groups` are the per-parameter
    optimizers' own group dicts (a scheduler that sets `lr` here sets it where the step reads it),
    `state` is the one dict they all keep their state in, and `state_dict()`/`load_state_dict()`
    use the plain Optimizer format, one parameter per group.
    """

    in_backward = True

    def __init__(self, params, make_optimizer_of):
        """`params`: a list; `make_optimizer_of([param])`: the optimizer of one parameter."""
        super().__init__(params, {})
        self.by_param = {p: make_optimizer_of([p]) for p in params}
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.by_param.values()]
        self._share_groups_and_state()
        self.defaults = next(iter(self.by_param.values())).defaults
        self._grad_norms = []
        self.handles = [p.register_post_accumulate_grad_hook(self._step_parameter) for p in params]

    def _step_parameter(self, param):
        self._grad_norms.append(torch.linalg.vector_norm(param.grad.detach()))
        self.by_param[param].step()
        param.grad = None

    def take_grad_norm(self):
        """The global norm of the gradients the hooks consumed since the last call."""
        norms, self._grad_norms = self._grad_norms, []
        assert norms, "no gradient reached the optimizer in this backward"
        return norm_across_meshes(norms, lambda group: torch.linalg.vector_norm(torch.stack(group)))

    @torch.no_grad()
    def step(self, closure=None):
        """Steps the parameters that still hold a gradient (none after a backward: the hooks did)."""
        assert closure is None
        for param, optimizer in self.by_param.items():
            if param.grad is not None:
                optimizer.step()

    def _share_groups_and_state(self):
        """Each per-parameter optimizer's group dict is its entry of param_groups, its state this one's."""
        for optimizer, group in zip(self.by_param.values(), self.param_groups, strict=True):
            optimizer.param_groups, optimizer.state = [group], self.state

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.by_param):
            raise UsageError(f"optimizer state has {len(groups)} parameter groups, this optimizer-in-backward has "
                             f"one per parameter ({len(self.by_param)}); was it saved without "
                             f"{option('optimizer_in_backward')}?")
        super().load_state_dict(state_dict)   # new group dicts and state
        self._share_groups_and_state()

    def remove_hooks(self):
        for handle in self.handles:
            handle.remove()


# ---- the update of a step ------------------------------------------------------------------------------
def clip_gradients(parameters, max_norm):
    """The global gradient norm; scales the gradients to `max_norm` when it is larger (> 0)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    with torch.no_grad():
        norm = norm_across_meshes(grads, torch.nn.utils.get_total_norm)   # multi-tensor kernels on CUDA
        if max_norm > 0:
            scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            for grad in grads:
                local_tensor(grad).mul_(scale.to(grad.dtype))
    return norm


def apply_update(model, optimizer, scheduler, *, max_grad_norm, loss):
    """The update after a step's backwards (which summed the gradients over data-parallel ranks):
    gradients clipped, checked to be finite, applied; the schedule moves on. Returns the gradient
    norm (a 0-dim tensor). With an optimizer-in-backward the update already happened in the backward."""
    in_backward = getattr(optimizer, "in_backward", False)
    grad_norm = (optimizer.take_grad_norm() if in_backward else
                 clip_gradients([p for p in model.parameters() if p.requires_grad], max_grad_norm))
    if not torch.isfinite(grad_norm):
        applied = ("; the update was applied inside the backward (optimizer in backward), so the weights in "
                   "memory are not usable, but" if in_backward else "; no update was made and")
        # Stop before the update: a NaN step would poison every weight and every later checkpoint.
        loss = float(loss.detach()) if torch.is_tensor(loss) else loss
        raise TrainingDiverged(f"training diverged: the gradient norm is {float(grad_norm)} (this rank's loss "
                               f"{loss}){applied} the last checkpoint is intact. With float16 (no loss "
                               f"scaling) use bfloat16 or float32, or lower the learning rate")
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---- what a step sees -------------------------------------------------------------------------------------
def epoch_order(count, seed, iteration, epoch):
    """The permutation of `count` examples for (seed, iteration, epoch), the same on every rank."""
    generator = torch.Generator().manual_seed(seed * 7919 + iteration * 104_729 + epoch)
    return torch.randperm(count, generator=generator).tolist()


def warmup_steps_for(steps, *, warmup_ratio=0.0, warmup_steps=0):
    """w for a span of `steps` steps (more warm-up steps than steps, as in Hugging Face's Trainer,
    never reach the peak rate)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * steps)


def lr_factor(k, steps, warmup, shape):
    """The multiplier of the peak learning rate at step `k` of a span of `steps` steps (transformers'
    lr_lambda of the shape)."""
    if k < warmup:
        return k / warmup
    if shape == "constant" or steps <= warmup:
        return 1.0
    progress = (k - warmup) / (steps - warmup)
    if shape == "linear":
        return max(0.0, 1.0 - progress)
    assert shape == "cosine", shape
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def learning_rate_schedule(lrs, steps_per_iteration, *, shape="constant", warmup_ratio=0.0, warmup_steps=0,
                           span="iteration"):
    """global step -> lr: iteration t's peak rate `lrs[t]` times the shape's factor over the span:
    iteration t's own `steps_per_iteration[t]` steps (restarting each iteration), or the run's."""
    assert span in ("iteration", "run"), span

    def lr_at(step):
        start = 0
        for lr, steps in zip(lrs, steps_per_iteration):
            if step < start + steps:
                k, span_steps = (step, sum(steps_per_iteration)) if span == "run" else (step - start, steps)
                warmup = warmup_steps_for(span_steps, warmup_ratio=warmup_ratio, warmup_steps=warmup_steps)
                return lr * lr_factor(k, span_steps, warmup, shape)
            start += steps
        return lrs[-1]
    return lr_at


class StepScheduler:
    """Sets every parameter group's learning rate to `lr_at(k)` for optimizer step k.

    Its state is the step count alone: the parameter groups follow the device meshes, so a checkpoint
    resumed onto another process count or --tp may have another number of groups, which torch's
    LambdaLR state (one base lr per group) would refuse.
    """

    def __init__(self, optimizer, lr_at):
        self.optimizer, self.lr_at = optimizer, lr_at
        self._go_to(0)

    def _go_to(self, steps):
        self.steps = steps
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(steps)

    def step(self):
        self._go_to(self.steps + 1)

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self._go_to(int(state["steps"]))

"""The optimizer (`--optimizer {adamw,rmsprop}`), optionally stepped inside the backward, and the
global gradient norm over parameters that live on different meshes.

Parameter groups follow the device meshes: under FSDP x TP the tensor-parallel weights are
DTensors on the 2-D (dp, tp) mesh and the norms and embeddings on the 1-D dp mesh (plain tensors
without FSDP), and PyTorch's multi-tensor (foreach) kernels take one mesh per call. The learning
rate of every group is set by the schedule (spin_trainer.schedule).
"""
from collections.abc import Mapping

import torch
from spin_kernels.dtensor import is_dtensor

OPTIMIZERS = ("adamw", "rmsprop")


def mesh_of(tensor):
    return tensor.device_mesh if is_dtensor(tensor) else None


def group_by_mesh(tensors):
    """[[tensors on one mesh], ...] in order of first appearance (plain tensors form one group).
    Meshes compare by value: FSDP builds its own 2-D mesh object per module it shards."""
    groups = {}
    for tensor in tensors:
        groups.setdefault(mesh_of(tensor), []).append(tensor)
    return list(groups.values())


def _across_meshes(tensors, norm_of_group):
    """Combines per-mesh 2-norms: `norm_of_group` of each mesh's tensors, made whole by DTensor's own
    reduction (`full_tensor()` of the mesh's partial norm, one collective), then their norm."""
    per_mesh = []
    for group in group_by_mesh(tensors):
        norm = norm_of_group(group)
        per_mesh.append((norm.full_tensor() if is_dtensor(norm) else norm).float())
    return torch.linalg.vector_norm(torch.stack(per_mesh))


def global_grad_norm(grads):
    """The global 2-norm of `grads`: local shards, replicas and DTensors on any meshes (torch's
    total norm per mesh, with multi-tensor kernels on CUDA)."""
    return _across_meshes(grads, torch.nn.utils.get_total_norm)


def norm_of_norms(norms):
    """The global 2-norm of tensors given by their 2-norms (0-dim, DTensors partial over their mesh)."""
    return _across_meshes(norms, lambda group: torch.linalg.vector_norm(torch.stack(group)))


def _single_optimizer(name, params, *, weight_decay, betas, eps, **extra):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1.0, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **extra)
    if name == "rmsprop":
        extra.pop("fused", None)   # RMSprop has no fused kernel
        # torch's defaults (alpha 0.99), which is what Hugging Face Trainer's `optim: rmsprop` and so
        # the SPIN paper's recipe use.
        return torch.optim.RMSprop(params, lr=1.0, eps=eps, weight_decay=weight_decay, **extra)
    raise ValueError(f"--optimizer must be one of {OPTIMIZERS}, got {name!r}")


def make_optimizer(model, *, ctx, name="adamw", weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8,
                   in_backward=False):
    """The optimizer over the model's trainable parameters, one parameter group per device mesh."""
    from .parallelize import sharded

    with sharded(model):   # FSDP's parameters are the sharded ones (a forward may have left some gathered)
        params = [p for p in model.parameters() if p.requires_grad]
    if in_backward:
        fused = ctx.device.type == "cuda"
        return InBackwardOptimizer(params, lambda group: _single_optimizer(
            name, group, weight_decay=weight_decay, betas=betas, eps=eps, fused=fused))
    groups = [{"params": group} for group in group_by_mesh(params)]
    return _single_optimizer(name, groups, weight_decay=weight_decay, betas=betas, eps=eps)


class _StateByParameter(Mapping):
    """optimizer.state of an InBackwardOptimizer: each parameter's state lives in its own optimizer."""

    def __init__(self, optimizers):
        self.optimizers = optimizers

    def __getitem__(self, param):
        return self.optimizers[param].state[param]

    def __iter__(self):
        return (p for p, optimizer in self.optimizers.items() if p in optimizer.state)

    def __len__(self):
        return sum(1 for _ in self)


class InBackwardOptimizer(torch.optim.Optimizer):
    """One optimizer per parameter, stepped as soon as that parameter's gradient is complete (a
    post-accumulate-grad hook; under FSDP2 the hook runs on the sharded gradient after the
    reduce-scatter), which then frees the gradient: the full set of gradients never exists at once.

    Valid only when one backward makes the whole gradient of a step (one micro-batch per rank and
    step) and nothing needs all of it before the update (no clipping); SpinConfig refuses the rest.
    The gradient norm is still reported: `take_grad_norm()` after the backward.

    To the rest of the trainer it is one optimizer: `param_groups` are the per-parameter
    optimizers' own group dicts (a scheduler that sets `lr` here sets it where the step reads it),
    `state` maps each parameter to its state, and `state_dict()`/`load_state_dict()` use the plain
    Optimizer format, one parameter per group. `optimizers` lists the per-parameter optimizers (for
    torch.distributed.checkpoint's `get_state_dict(model, optimizers=...)`).
    """

    in_backward = True

    def __init__(self, params, make_optimizer_of):
        params = list(params)
        super().__init__(params, {})
        self.by_param = {p: make_optimizer_of([p]) for p in params}
        self.optimizers = list(self.by_param.values())
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.optimizers]
        self.state = _StateByParameter(self.by_param)
        self.defaults = self.optimizers[0].defaults
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
        return norm_of_norms(norms)

    @torch.no_grad()
    def step(self, closure=None):
        """Steps the parameters that still hold a gradient (none after a backward: the hooks did)."""
        assert closure is None
        for param, optimizer in self.by_param.items():
            if param.grad is not None:
                optimizer.step()

    def load_state_dict(self, state_dict):
        groups = state_dict["param_groups"]
        if len(groups) != len(self.optimizers):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer-in-backward "
                             f"has one per parameter ({len(self.optimizers)}); was it saved without "
                             f"--optimizer-in-backward?")
        for optimizer, group in zip(self.optimizers, groups):
            (index,) = group["params"]
            state = state_dict["state"].get(index)
            optimizer.load_state_dict({"state": {} if state is None else {0: state},
                                       "param_groups": [{**group, "params": [0]}]})
        # Loading replaced the per-parameter optimizers' group dicts.
        self.param_groups = [optimizer.param_groups[0] for optimizer in self.optimizers]

    def remove_hooks(self):
        for handle in self.handles:
            handle.remove()

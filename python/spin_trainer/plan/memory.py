"""The plan: the per-rank memory of a run at real scale, by simulation, before any GPU is rented.

    spin-train --plan --model configs/llama-3-70b --nproc 64 --tp 8 --max-length 8192 --recompute full

The model is built on the meta device from `--model`'s config.json alone (no weights, no
tokenizer), in the parameter dtype the run would load it in, and parallelized by the trainer's own
`parallelize_model` on PyTorch's fake process group of world size `--nproc` (one process plays
rank 0, whose shards are the largest: FSDP gives the first ranks the rounded-up rows). The
optimizer is the trainer's `make_optimizer` on that model, stepped once on zero gradients so that
it allocates its state. Parameter, gradient and optimizer-state bytes are then read off the local
shards of the DTensors (meta tensors have shapes and dtypes but no memory); nothing here re-derives
the sharding. Gradients are the parameters' local shards in the parameters' dtype, as FSDP's
reduce-scatter and autograd leave them; optimizer state counts every state tensor with at least one
dimension (the 0-dim `step` counters live on the host unless the optimizer is fused).

The rest is arithmetic on those numbers and on the model's shape, stated term by term:

    the micro-batch        plan/micro_batch.py: its token budget and LM head rows, padded or
                           packed (the layout the trainer would choose: packed_scoring.py)
    activations            plan/activations.py (formula and assumptions there)
    FSDP gathered weights, FSDP gradient buffers, backward working set, optimizer update,
                           training peak: plan/training.py (the phases of the step). In mixed
                           precision every layout casts with FSDP's MixedPrecisionPolicy (one
                           process on a data-parallel axis of one rank, --no-dp-shard through
                           replicate), as setup_parallel does; the plan builds the same context
                           on the fake group
    generation             parameters, optimizer state (unless --offload-optimizer), the full
                           weights in the compute dtype (FSDP or replicate unsharded for the whole
                           generation), and the KV cache and the prefill's transients
                           of --gen-batch-size rows (plan/generation.py)
    model loading          the local parameter shards and the slice of one weight being read
                           into them, at most the largest local shard (parallel/load.py)
    host memory            plan/host.py

    training peak    = parameters + gradients + optimizer state (+ a resident reference)
                       + the largest phase of the step: the backward's or the optimizer
                       update's (plan/training.py)
    per-rank peak    = max(model loading, training peak, generation peak)

With --optimizer-in-backward each gradient is freed by its own update, so at most one FSDP unit's
(decoder layer's or root's) gradients exist at once.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from spin_kernels.dtensor import is_dtensor

from ..errors import option
from ..lm_head import output_embedding
from ..model import disable_dropout
from ..optim import make_optimizer
from ..parallel.apply import decoder_layers, parallelize_model
from ..parallel.mesh import ParallelContext, mesh_context
from .activations import ComputeMode, DecoderShape, estimate_activations
from .generation import generation_memory
from .host import DEFAULT_GPUS_PER_NODE, host_memory
from .micro_batch import micro_batch
from .training import FsdpUnits, local_bytes, training_step, update_bytes

GIB = 2 ** 30
DEFAULT_DEVICE_MEMORY_GIB = 80.0


@contextmanager
def fake_process_group(rank, world_size):
    """PyTorch's fake process group (collectives do nothing) as the default group, for one rank of
    `world_size`; removed on the way out."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    assert not dist.is_initialized(), "the plan runs before (or instead of) the run's process group"
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tp_local_numel(param):
    """Elements of `param` on this rank once FSDP has gathered it: the whole tensor, or its tensor-
    parallel shard (the placement on the mesh's `tp` dimension)."""
    if not is_dtensor(param):
        return param.numel()
    mesh, numel = param.device_mesh, param.numel()
    for dim, (name, placement) in enumerate(zip(mesh.mesh_dim_names, param.placements)):
        if name == "tp" and placement.is_shard():
            numel //= mesh.size(dim)
    return numel


@dataclass
class Unit:
    """One FSDP unit (a decoder layer, or the root's own parameters): this rank's numbers."""
    gathered_numel: int     # elements once gathered (tensor-parallel local)
    gradient_bytes: int     # local gradient shards


@dataclass
class MemoryPlan:
    description: list            # lines describing the run
    parameter_count: int         # global, the whole model
    parameters: int              # bytes on this rank, as for every figure below
    gradients: int               # all gradients (accumulated over the micro-batches)
    gradients_held: int          # at once: all, or one unit's with --optimizer-in-backward
    optimizer_state: int
    optimizer_state_names: tuple
    reference: int               # a resident reference's local shards
    micro_batch: object          # micro_batch.MicroBatch: the largest one
    activations: object          # activations.ActivationEstimate
    step: object                 # training.TrainingStep: FSDP's gathered weights and buffers, working set
    step_units: object           # training.FsdpUnits (None without FSDP or replicate)
    recompute: str
    generation_weights: int      # full weights in the compute dtype while generating
    generation: object           # generation.GenerationMemory (per row of a generation batch)
    gen_batch_size: int
    loading: int                 # the local shards + the largest one's slice, as it is read
    host: object                 # host.HostMemory
    offload_optimizer: bool

    @property
    def kv_cache(self):
        return self.generation.kv_cache(self.gen_batch_size)

    @property
    def generation_transient(self):
        return self.generation.transient(self.gen_batch_size)

    @property
    def state(self):
        return self.parameters + self.gradients_held + self.optimizer_state + self.reference

    @property
    def fsdp(self):
        """FSDP or replicate holds the units' weights in the compute dtype."""
        return self.step_units is not None

    @property
    def fsdp_gathered(self):
        return self.step.gathered

    @property
    def fsdp_gradient_buffers(self):
        return self.step.gradient_buffers

    @property
    def backward_working_set(self):
        return self.step.working_set

    @property
    def training_peak_phase(self):
        """The phase of the training step at its peak (plan/training.py)."""
        return self.step.peak_phase(self.activations)[0]

    @property
    def optimizer_update(self):
        return self.step.update

    @property
    def training_peak(self):
        return self.state + self.step.peak_phase(self.activations)[1]

    @property
    def generation_resident(self):
        """What generation holds besides its batch's KV cache and transients."""
        optimizer = 0 if self.offload_optimizer else self.optimizer_state
        return self.parameters + optimizer + self.reference + self.generation_weights

    @property
    def generation_peak(self):
        return self.generation_resident + self.kv_cache + self.generation_transient

    def generation_rows_that_fit(self, device_bytes):
        """The largest generation batch (rows at once, per rank) whose peak fits `device_bytes`."""
        return self.generation.rows_that_fit(int(device_bytes) - self.generation_resident)

    @property
    def peak(self):
        return max(self.loading, self.training_peak, self.generation_peak)


def _context(nproc, tp, dp_shard, rank, precision):
    """The run's ParallelContext, as setup_parallel makes it: in mixed precision FSDP (or replicate)
    carries the cast on a data-parallel axis of one rank too."""
    if nproc == 1 and not precision.mixed:
        return ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    return mesh_context(rank, nproc, tp, torch.device("cpu"), dp_shard=dp_shard, fsdp_alone=precision.mixed)


def _units(model, layers):
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]

    def unit(params):
        return Unit(sum(tp_local_numel(p) for p in params), sum(local_bytes(p.grad) for p in params))

    return unit(root), [unit(list(layer.parameters())) for layer in layers]


def memory_plan(config, *, nproc, tp, precision, dp_shard=None, recompute="none", optimizer_options=None,
                micro_batch_size=1, max_length=1024, max_new_tokens=None, gen_batch_size=64, reference="precompute",
                generate_every="iteration", offload_optimizer=False, head="logits", packing=None, attention="sdpa",
                max_tokens_per_batch=0, gpus_per_node=None, rank=0, name="model"):
    """The MemoryPlan of `rank` in a run of `nproc` processes with tensor parallelism `tp` (a
    Hugging Face config; nothing is allocated); `packing`: the pair batches' layout (None: padded;
    "shared", "separate": packed_scoring.packing_layout's), `attention` the attention implementation."""
    optimizer_options = dict(optimizer_options or {})
    group = fake_process_group(rank, nproc) if nproc > 1 or precision.mixed else nullcontext()
    with group:
        ctx = _context(nproc, tp, dp_shard, rank, precision)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        architecture = type(model).__name__
        model.to(precision.param_dtype)   # the dtype the trainer loads the weights in
        disable_dropout(model)
        layers = decoder_layers(model)
        parallelize_model(model, ctx, precision, recompute=recompute)
        # lr 0: the plan steps once on zero gradients only to make the optimizer allocate its state.
        optimizer = make_optimizer(model, ctx=ctx, lr=0.0, **optimizer_options)
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()   # allocates the state (on the meta device: shapes only)
        optimizer_name = optimizer_options.get("name", "adamw")
        in_backward = optimizer_options.get("in_backward", False)
        update = update_bytes(optimizer, optimizer_name, in_backward)   # as CUDA steps it
        if getattr(optimizer, "in_backward", False):
            optimizer.remove_hooks()
        states = [optimizer.state.get(p, {}) for p in params]
        optimizer_state = sum(local_bytes(v) for s in states for v in s.values()
                              if isinstance(v, torch.Tensor) and v.dim() > 0)
        state_names = tuple(sorted({k for s in states for k, v in s.items()
                                    if isinstance(v, torch.Tensor) and v.dim() > 0}))
        largest_layer_weight = max(tp_local_numel(p) for layer in layers for p in layer.parameters())
        root, layers = _units(model, layers)
        head_numel = tp_local_numel(output_embedding(model).weight)
        fsdp, group = ctx.dp_mesh is not None, ctx.dp_size if ctx.dp_shard else 1
        parameters = sum(local_bytes(p) for p in model.parameters())
        largest_shard = max(local_bytes(p) for p in model.parameters())
        gradients = sum(local_bytes(p.grad) for p in params)
        parameter_count = sum(p.numel() for p in model.parameters())
        dp_shard, dp_size = ctx.dp_shard, ctx.dp_size

    b = precision.compute_dtype.itemsize
    mode = ComputeMode(compute_bytes=b, tp=tp)
    shape = DecoderShape.of(config)
    new_tokens = max_new_tokens or max(1, max_length // 2)
    batch = micro_batch(packing, pairs=micro_batch_size, max_length=max_length, max_new_tokens=new_tokens,
                        token_bound=max_tokens_per_batch)
    activations = estimate_activations(shape, mode, recompute, batch, head=head,
                                       segmented=packing == "shared" and attention == "sdpa")
    largest = max(layers, key=lambda u: u.gathered_numel)
    units = FsdpUnits(root=root.gathered_numel, layer=largest.gathered_numel, layers=len(layers), head=head_numel,
                      group=group, replicate=not dp_shard) if fsdp else None
    # gradients are reduced in float32 in mixed precision (MixedPrecisionPolicy), else in their own dtype
    step = training_step(units, activations, compute_bytes=b, reduce_bytes=precision.param_dtype.itemsize,
                         head=head_numel, largest_layer_weight=largest_layer_weight, fused_head=head == "fused",
                         update=update, update_in_backward=in_backward)
    # generation (full_weights): every unit gathered in the compute dtype
    generation_weights = b * (root.gathered_numel + sum(u.gathered_numel for u in layers)) if fsdp else 0
    generation = generation_memory(shape, mode, max_length=max_length,
                                   max_new_tokens=new_tokens)
    host = host_memory(parameters=parameters, largest_shard=largest_shard, optimizer_state=optimizer_state,
                       reference=reference, generate_every=generate_every, offload_optimizer=offload_optimizer,
                       ranks_per_node=min(nproc, gpus_per_node or DEFAULT_GPUS_PER_NODE))
    description = [
        f"memory plan: {name} ({architecture}, {parameter_count / 1e9:.2f} B parameters), {nproc} "
        f"process{'es' if nproc > 1 else ''} = {dp_size} data-parallel x {tp} tensor-parallel; rank {rank}"
        f"{' (the largest shards)' if rank == 0 else ''}",
        f"  {'FSDP on the data-parallel axis' if dp_shard else 'no FSDP (a full replica per data-parallel rank)'}; "
        f"{_precision_words(precision, dp_shard)}; {optimizer_name}"
        f"{' stepped in the backward' if in_backward else ''}; {option('recompute')} {recompute}; "
        f"{option('reference')} {reference}; {option('head')} {head}",
    ]
    return MemoryPlan(
        description=description, parameter_count=parameter_count, parameters=parameters, gradients=gradients,
        gradients_held=max(u.gradient_bytes for u in [root, *layers]) if in_backward else gradients,
        optimizer_state=optimizer_state, optimizer_state_names=state_names,
        reference=parameters if reference == "resident" else 0, micro_batch=batch, activations=activations,
        step=step, step_units=units, recompute=recompute, generation_weights=generation_weights, generation=generation, gen_batch_size=gen_batch_size,
        loading=parameters + largest_shard, host=host, offload_optimizer=offload_optimizer)


def _precision_words(precision, dp_shard):
    if not precision.mixed:
        return f"{precision.dtype} parameters, gradients and optimizer state"
    cast = "fully_shard" if dp_shard else "replicate"
    return (f"{precision.dtype} compute ({cast}'s MixedPrecisionPolicy) with float32 master weights, gradients "
            f"and optimizer state")

"""The command line of the memory plan: `spin-train --plan ...` (its checks and its printout), and
the checks of a training run by the plan: replicas that cannot fit, the generation batch that fits."""
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import AutoConfig

from ..errors import UsageError, option
from ..logprobs import default_head
from ..model import check_config_values, check_context_length, check_shipped_code, choose_attention
from ..packed_scoring import choose_layout
from ..parallel.mesh import check_layout
from ..parallel.precision import Precision
from ..parallel.tp_plan import LLAMA_FAMILY, check_tensor_parallel
from .host import DEFAULT_HOST_MEMORY_GIB
from .memory import DEFAULT_DEVICE_MEMORY_GIB, GIB, memory_plan


def _gib(value):
    return f"{value / GIB:8.2f} GiB"


def plan_of(run, config, nproc, device_type):
    """memory_plan of the run the settings `run` describe (a RunConfig), on `nproc` processes of
    `device_type` (whose default head it takes: the fused head on GPUs), its pair batches packed
    where the trainer would pack them (--pack-pairs, the model type, the attention --attn chooses
    on that device, --reference)."""
    t = run.train
    precision = Precision(run.model.dtype, pure=run.model.pure_low_precision)
    attention = run.model.attn
    if attention == "auto":   # flash_attention_2 where this machine can run it on `device_type`, else sdpa
        attention = choose_attention(attention, torch.device(device_type), precision.compute_dtype)
    packing, _ = choose_layout(config.model_type, attention, run.spin.reference, t.pack_pairs)
    return memory_plan(
        config, nproc=nproc, tp=run.parallel.tp, precision=precision,
        dp_shard=run.parallel.dp_shard, recompute=run.parallel.recompute,
        optimizer_options=dict(name=t.optimizer, weight_decay=t.weight_decay, betas=t.adam_betas, eps=t.adam_eps,
                               in_backward=t.optimizer_in_backward),
        micro_batch_size=t.micro_batch_size, max_length=run.data.max_length, max_new_tokens=run.max_new_tokens,
        gen_batch_size=run.generation.gen_batch_size, reference=run.spin.reference,
        generate_every=run.spin.generate_every, offload_optimizer=t.offload_optimizer,
        head=run.model.head or default_head(device_type), packing=packing, attention=attention,
        max_tokens_per_batch=t.max_tokens_per_batch, gpus_per_node=run.plan.gpus_per_node, name=run.model.model)


def format_plan(plan, *, max_length, gen_batch_size, device_memory_gib,
                host_memory_gib=DEFAULT_HOST_MEMORY_GIB):
    """The printout; its last line is `per-rank peak estimate: X GiB`."""
    a = plan.activations
    per_token_layer = a.layer_per_token
    held = ("" if plan.gradients_held == plan.gradients else
            f" (optimizer in backward: at most one unit's {plan.gradients_held / GIB:.2f} GiB at once)")
    lines = list(plan.description) + [
        f"  {plan.micro_batch.describe(max_length)}",
        "per rank:",
        f"  parameters              {_gib(plan.parameters)}",
        f"  gradients               {_gib(plan.gradients_held)}{held}",
        f"  optimizer state         {_gib(plan.optimizer_state)}  ({', '.join(plan.optimizer_state_names) or 'none'})",
    ]
    if plan.reference:
        lines.append(f"  resident reference      {_gib(plan.reference)}")
    lines += [
        f"  activations             {_gib(a.total)}  per micro-batch: decoder {a.decoder / GIB:.2f} GiB "
        f"({per_token_layer} B per token and layer), LM head and loss {a.head / GIB:.2f} GiB",
        f"  backward working set    {_gib(plan.backward_working_set)}  (a decoder layer's MLP gradients"
        + (", its activations rebuilt" if plan.recompute == "full" else "") + ")",
    ]
    if plan.fsdp:
        kept = ("every decoder layer, kept from its forward to its backward (replicate)" if plan.step_units.replicate
                else "2 decoder layers (one prefetched)" if plan.step_units.group > 1 else "1 decoder layer")
        lines += [f"  FSDP gathered weights   {_gib(plan.fsdp_gathered)}  (root + {kept})",
                  f"  FSDP gradient buffers   {_gib(plan.fsdp_gradient_buffers)}  (the LM head's unsharded gradient, "
                  f"a layer's reduce input)"]
    lines.append(f"  optimizer update        {_gib(plan.optimizer_update)}  ("
                 + ("in the backward, a parameter at a time" if plan.step.update_in_backward
                    else "multi-tensor temporaries, a parameter group at a time") + ")")
    g = plan.generation
    decoder = "static-cache decoder" if g.static_decoder else "Hugging Face's decoder (tensor parallel)"
    device = device_memory_gib * GIB
    fitting = int(plan.generation_rows_that_fit(device))
    lines += [
        f"  KV cache                {_gib(plan.kv_cache)}  ({gen_batch_size} rows x {g.cache_length} slots, "
        f"{decoder})",
        f"  generation transients   {_gib(plan.generation_transient)}  (prefill of {gen_batch_size} prompts of "
        f"{max_length - 1} tokens: RMSNorm's fp32 upcast, attention, MLP)",
        f"training step peak:       {_gib(plan.training_peak)}  (its largest phase: {plan.training_peak_phase})",
        f"generation peak:          {_gib(plan.generation_peak)}  ("
        + (f"full weights {plan.generation_weights / GIB:.2f} GiB, " if plan.generation_weights else "")
        + f"{option('gen_batch_size')} {gen_batch_size}"
        + (", optimizer state offloaded" if plan.offload_optimizer else "") + ")",
        f"  largest generation batch that fits: {fitting} rows"
        + (f" (a run uses at most that many; {option('gen_batch_size')} {gen_batch_size} is larger)"
           if fitting < gen_batch_size else ""),
        f"model loading:            {_gib(plan.loading)}  (the local shards and the slice of one weight being "
        f"read)",
    ]
    verdict = "fits" if plan.peak <= device else "does NOT fit"
    lines += _host_lines(plan.host, host_memory_gib)
    lines += [f"device memory: {device_memory_gib:g} GiB; the estimate {verdict}",
              f"per-rank peak estimate: {plan.peak / GIB:.2f} GiB"]
    return "\n".join(lines)


def _host_lines(host, host_memory_gib):
    verdict = "fits" if host.per_node <= host_memory_gib * GIB else "does NOT fit"
    return [
        "host memory per rank:",
        f"  reference bank          {_gib(host.reference_bank)}  ({option('reference')}: θ_t and the stash, pinned)",
        f"  optimizer offload       {_gib(host.optimizer_offload)}  ({option('offload_optimizer')})",
        f"  model loading           {_gib(host.loading)}  (a weight's local slice at a time, before the banks)",
        f"  allowance               {_gib(host.allowance)}  (CUDA context, libraries, Python heap, data)",
        f"host memory per node:     {_gib(host.per_node)}  ({host.ranks_per_node} ranks x "
        f"{host.per_rank / GIB:.2f} GiB); {host_memory_gib:g} GiB per node: the estimate {verdict}",
    ]


def _read_config(model_dir, trust_remote_code):
    path = os.path.join(model_dir, "config.json")
    where = f"{option('plan')} {option('model')} {model_dir!r}"
    if not os.path.isfile(path):
        raise UsageError(f"{where}: no config.json there (the plan reads the model's config.json alone; e.g. "
                         f"{option('model')} configs/llama-2-7b)")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        check_config_values(raw, f"{where}: config.json")
        check_shipped_code(raw, where, trust_remote_code)
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"{where}: config.json could not be read ({exc})") from exc


def _check_options(run, config, nproc):
    """The training run's own refusals (layout, context, batch sizes, optimizer-in-backward), and a
    model the activation formula describes."""
    if config.model_type not in LLAMA_FAMILY:
        raise UsageError(f"{option('plan')} {option('model')} {run.model.model!r}: model type "
                         f"{config.model_type!r}; the plan's activation formula is for Llama-family decoders "
                         f"({', '.join(LLAMA_FAMILY)})")
    tp = run.parallel.tp
    check_layout(nproc, tp)
    check_context_length(run.data.max_length, config)
    check_tensor_parallel(config, tp)
    dp = nproc // tp
    run.check_layout(dp, dp > 1 and run.parallel.dp_shard is not False, run.train.global_batch_size)


def run_plan(run):
    """The plan of rank 0 for the run's number of processes, printed; returns the MemoryPlan."""
    if not run.model.model:
        raise UsageError(f"{option('plan')} needs {option('model')} DIR (a directory with the model's config.json; "
                         f"no weights needed)")
    config = _read_config(run.model.model, run.model.trust_remote_code)
    nproc = run.plan.nproc
    if nproc is None:
        raise UsageError(f"{option('plan')} needs {option('nproc')} N, the number of processes (GPUs) of the run "
                         f"to plan")
    _check_options(run, config, nproc)
    memory = DEFAULT_DEVICE_MEMORY_GIB if run.plan.device_memory_gib is None else run.plan.device_memory_gib
    host = DEFAULT_HOST_MEMORY_GIB if run.plan.host_memory_gib is None else run.plan.host_memory_gib
    plan = plan_of(run, config, nproc, "cuda")   # a plan sizes GPUs
    print(format_plan(plan, max_length=run.data.max_length,
                      gen_batch_size=run.generation.gen_batch_size, device_memory_gib=memory, host_memory_gib=host))
    return plan


def device_memory_bytes(run, device_type):
    """Memory of one device of this run: the visible GPU's, else the device memory setting (None: unknown)."""
    if device_type == "cuda":
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    gib = run.plan.device_memory_gib
    return None if gib is None else gib * GIB


def check_memory(run, config, device_type):
    """Before any model is loaded and before the process group exists, by the plan: refuses replicas
    (FSDP off) whose model state alone exceeds a device and warns when their peak estimate does;
    lowers --gen-batch-size to the largest generation batch that fits (at least 1), with a note."""
    memory = device_memory_bytes(run, device_type)
    if memory is None or config.model_type not in LLAMA_FAMILY:
        return   # a CPU run without --device-memory-gib, or a model the plan's formulas do not describe
    if dist.is_initialized():
        # The caller set up the process group itself (train() called from its own script): the
        # fake group of the simulation cannot be the default one too. `spin-train --plan` still can.
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, run.parallel.tp)
    plan = plan_of(run, config, world, device_type)
    where = f"{memory / GIB:.1f} GiB per device"
    main = int(os.environ.get("RANK", "0")) == 0
    if run.parallel.dp_shard is False:
        _check_replicas(plan, where, memory, main)
    fitting = max(1, plan.generation_rows_that_fit(memory))
    if fitting < run.generation.gen_batch_size:
        if main:
            print(f"note: {option('gen_batch_size')} {run.generation.gen_batch_size} lowered to {fitting}: the largest "
                  f"generation batch whose KV cache and prefill fit {where} by the plan's estimate (spin-train "
                  f"{option('plan')} prints the terms)", file=sys.stderr)
        run.generation.gen_batch_size = fitting


def _check_replicas(plan, where, memory, main):
    if plan.state > memory:
        raise UsageError(
            f"{option('dp_shard', negated=True)}: every data-parallel rank would hold a full replica of the model state: parameters "
            f"{plan.parameters / GIB:.1f} GiB + gradients {plan.gradients_held / GIB:.1f} GiB + optimizer state "
            f"{plan.optimizer_state / GIB:.1f} GiB = {plan.state / GIB:.1f} GiB per rank (by --plan), against "
            f"{where}; drop {option('dp_shard', negated=True)} (FSDP shards the state over the data-parallel ranks) or raise "
            f"{option('tp')}")
    if plan.peak > memory and main:
        print(f"warning: {option('dp_shard', negated=True)}: the per-rank peak estimate is {plan.peak / GIB:.1f} GiB (model state "
              f"{plan.state / GIB:.1f} GiB, activations {plan.activations.total / GIB:.1f} GiB per micro-batch; "
              f"spin-train --plan prints the terms) against {where}; the run may run out of memory",
              file=sys.stderr)

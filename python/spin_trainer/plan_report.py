"""The command line of the memory plan: `spin-train --plan ...` (its checks and its printout), and
the check that refuses a `--no-dp-shard` run whose replicas cannot fit (spin_trainer.plan)."""
import json
import os
import sys
from types import SimpleNamespace

from .distributed import choose_head
from .plan import DEFAULT_DEVICE_MEMORY_GIB, GIB, memory_plan
from .precision import Precision


def _gib(value):
    return f"{value / GIB:8.2f} GiB"


def plan_from_args(args, config, nproc, device_type):
    """memory_plan of the run the command line `args` describes, on `nproc` processes of
    `device_type` (whose default --head it takes: the fused head on GPUs)."""
    from .cli import spin_config

    return memory_plan(
        config, nproc=nproc, tp=args.tp, precision=Precision(args.dtype, pure=args.pure_low_precision),
        dp_shard=args.dp_shard, recompute=args.recompute, optimizer_options=spin_config(args).optimizer_options(),
        micro_batch_size=args.micro_batch_size, max_length=args.max_length, gen_batch_size=args.gen_batch_size,
        reference=args.reference, offload_optimizer=args.offload_optimizer, head=choose_head(args.head, device_type),
        name=args.model)


def format_plan(plan, *, micro_batch_size, max_length, gen_batch_size, device_memory_gib):
    """The printout; its last line is `per-rank peak estimate: X GiB`."""
    a = plan.activations
    per_token_layer = a.layer_per_token
    held = ("" if plan.gradients_held == plan.gradients else
            f" (optimizer in backward: at most one unit's {plan.gradients_held / GIB:.2f} GiB at once)")
    lines = list(plan.description) + [
        f"  micro-batch: {micro_batch_size} pair(s) = {2 * micro_batch_size} rows x {max_length} tokens = {a.tokens} "
        f"tokens, all taken as labelled (an upper bound)",
        "per rank:",
        f"  parameters              {_gib(plan.parameters)}",
        f"  gradients               {_gib(plan.gradients_held)}{held}",
        f"  optimizer state         {_gib(plan.optimizer_state)}  ({', '.join(plan.optimizer_state_names) or 'none'})",
    ]
    if plan.reference:
        lines.append(f"  resident reference      {_gib(plan.reference)}")
    lines += [
        f"  activations             {_gib(a.total)}  per micro-batch: decoder {a.decoder / GIB:.2f} GiB "
        f"({per_token_layer} B per token and layer), LM head and loss {a.head / GIB:.2f} GiB"
        + (f", autocast weight copies {a.weight_copies / GIB:.2f} GiB" if a.weight_copies else ""),
        f"  backward working set    {_gib(a.backward_working_set)}",
    ]
    if plan.fsdp_gathered:
        lines += [f"  FSDP gathered weights   {_gib(plan.fsdp_gathered)}  (root + 2 decoder layers)",
                  f"  FSDP gradient buffers   {_gib(plan.fsdp_gradient_buffers)}  (one decoder layer)"]
    lines += [
        f"training step peak:       {_gib(plan.training_peak)}",
        f"generation peak:          {_gib(plan.generation_peak)}  ("
        + (f"full weights {plan.generation_weights / GIB:.2f} GiB, " if plan.generation_weights else "")
        + f"KV cache {plan.kv_cache / GIB:.2f} GiB for {gen_batch_size} x {max_length} tokens"
        + (", optimizer state offloaded" if plan.offload_optimizer else "") + ")",
    ]
    verdict = "fits" if plan.peak <= device_memory_gib * GIB else "does NOT fit"
    lines += [f"device memory: {device_memory_gib:g} GiB; the estimate {verdict}",
              f"per-rank peak estimate: {plan.peak / GIB:.2f} GiB"]
    return "\n".join(lines)


def _read_config(model_dir, option):
    from transformers import AutoConfig

    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{option} --model {model_dir!r}: no config.json there (the plan reads the model's "
                         f"config.json alone; e.g. --model configs/llama-2-7b)")
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
        return AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{option} --model {model_dir!r}: config.json could not be read ({exc})") from exc


def _check_options(args, config, nproc):
    """The training run's own refusals (layout, context, batch sizes, optimizer-in-backward), and a
    model the activation formula describes."""
    from .cli import check_context_length, spin_config
    from .distributed import check_layout
    from .tp_plan import LLAMA_FAMILY, check_tensor_parallel

    if config.model_type not in LLAMA_FAMILY:
        raise ValueError(f"--plan --model {args.model!r}: model type {config.model_type!r}; the plan's activation "
                         f"formula is for Llama-family decoders ({', '.join(LLAMA_FAMILY)})")
    check_layout(nproc, args.tp)
    check_context_length(args.max_length, config)
    check_tensor_parallel(config, args.tp)
    Precision(args.dtype, pure=args.pure_low_precision)
    dp = nproc // args.tp
    run = spin_config(args)
    run.validate(run.global_batch_size, SimpleNamespace(dp_size=dp, dp_shard=dp > 1 and args.dp_shard is not False))


def run_plan(args):
    """`--plan`: prints the plan of rank 0 for `--nproc` processes; returns the MemoryPlan."""
    if not args.model:
        raise ValueError("--plan needs --model DIR (a directory with the model's config.json; no weights needed)")
    config = _read_config(args.model, "--plan")
    if args.nproc is None:
        raise ValueError("--plan needs --nproc N, the number of processes (GPUs) of the run to plan")
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    _check_options(args, config, args.nproc)
    memory = DEFAULT_DEVICE_MEMORY_GIB if args.device_memory_gib is None else args.device_memory_gib
    if memory <= 0:
        raise ValueError(f"--device-memory-gib must be > 0, got {memory}")
    plan = plan_from_args(args, config, args.nproc, "cuda")   # a plan sizes GPUs
    print(format_plan(plan, micro_batch_size=args.micro_batch_size, max_length=args.max_length,
                      gen_batch_size=args.gen_batch_size, device_memory_gib=memory))
    return plan


def device_memory_bytes(args, device_type):
    """Memory of one device of this run: the visible GPU's, else --device-memory-gib (None: unknown)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    return None if args.device_memory_gib is None else args.device_memory_gib * GIB


def check_replicas_fit(args, config, device_type):
    """--no-dp-shard: ValueError when the plan's model state (parameters, gradients, optimizer
    state) alone exceeds a device; a warning naming the estimate when its peak does. Runs before
    any model is loaded and before the process group exists."""
    import torch.distributed as dist

    memory = device_memory_bytes(args, device_type)
    if memory is None:
        return   # a CPU run without --device-memory-gib: host memory is not planned
    if dist.is_initialized():
        # The caller set up the process group itself (train() called from its own script): the
        # fake group of the simulation cannot be the default one too. `spin-train --plan` still can.
        return
    from .distributed import check_layout

    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_layout(world, args.tp)
    plan = plan_from_args(args, config, world, device_type)
    where = f"{memory / GIB:.1f} GiB per device"
    if plan.state > memory:
        raise ValueError(
            f"--no-dp-shard: every data-parallel rank would hold a full replica of the model state: parameters "
            f"{plan.parameters / GIB:.1f} GiB + gradients {plan.gradients_held / GIB:.1f} GiB + optimizer state "
            f"{plan.optimizer_state / GIB:.1f} GiB = {plan.state / GIB:.1f} GiB per rank (by --plan), against "
            f"{where}; drop --no-dp-shard (FSDP shards the state over the data-parallel ranks) or raise --tp")
    if plan.peak > memory and int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: --no-dp-shard: the per-rank peak estimate is {plan.peak / GIB:.1f} GiB (model state "
              f"{plan.state / GIB:.1f} GiB, activations {plan.activations.total / GIB:.1f} GiB per micro-batch; "
              f"spin-train --plan prints the terms) against {where}; the run may run out of memory",
              file=sys.stderr)

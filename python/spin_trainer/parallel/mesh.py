"""Process groups of one run: a 2-D (dp, tp) DeviceMesh under torchrun (NCCL on GPUs, gloo on CPUs);
alone, none, or under mixed precision a 1-rank group whose dp axis carries FSDP, so that one process
casts exactly as FSDP does on many (precision.py).
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from ..errors import UsageError, option


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    tp_size: int
    dp_size: int
    tp_rank: int
    dp_rank: int
    device: torch.device
    tp_mesh: object = None    # 1-D DeviceMesh of this rank's tensor-parallel group (None when tp == 1)
    tp_group: object = None   # ProcessGroup handed to spin_loss(process_group=...)
    dp_group: object = None
    dp_mesh: object = None    # 1-D DeviceMesh of the data-parallel axis when it carries FSDP (or replicas)
    dp_shard: bool = False    # FSDP2 on the dp axis (else replicas)

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def choose_device(requested):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option('device')} cuda: no CUDA device is available")
    return requested


def check_layout(world_size, tp):
    """UsageError naming --tp when the processes cannot be split into (dp, tp)."""
    if world_size % tp != 0:
        raise UsageError(f"{option('tp')} {tp} does not divide the number of processes ({world_size}); "
                         f"run a multiple of {option('tp')} processes")


def setup_parallel(tp, device_type, *, dp_shard=None, fsdp_alone=False):
    """Initialises the process group (under torchrun; alone, an in-memory one for `fsdp_alone`) and
    the (dp, tp) mesh of mesh_context, on `device_type` "cuda" or "cpu" (choose_device's)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    check_layout(world_size, tp)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size == 1 and not fsdp_alone:
        return ParallelContext(0, 1, 1, 1, 0, 0, device)
    if not dist.is_initialized():
        alone = {"store": dist.HashStore(), "rank": 0, "world_size": 1} if world_size == 1 else {}
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", **alone)
    return mesh_context(rank, world_size, tp, device, dp_shard=dp_shard, fsdp_alone=fsdp_alone)


def mesh_context(rank, world_size, tp, device, *, dp_shard=None, fsdp_alone=False):
    """The context of `rank` on a (world_size / tp, tp) mesh of an initialised process group (`--plan`:
    PyTorch's fake one). The dp axis carries FSDP (`dp_shard` False: replicas) when it has more than
    one rank, or with `fsdp_alone`, for the mixed-precision policy. Its callers have checked the layout
    (check_layout)."""
    dp = world_size // tp
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))
    if dp > 1 and tp > 1:
        # A reduction over both axes (the gradient norm of FSDP x TP weights) then takes one
        # collective on the flattened group instead of one per axis.
        mesh[("dp", "tp")]._flatten("dp_tp")
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    fsdp = dp > 1 or fsdp_alone
    return ParallelContext(rank, world_size, tp, dp, tp_mesh.get_local_rank(), dp_mesh.get_local_rank(), device,
                           tp_mesh=tp_mesh if tp > 1 else None, tp_group=tp_mesh.get_group() if tp > 1 else None,
                           dp_group=dp_mesh.get_group() if dp > 1 else None, dp_mesh=dp_mesh if fsdp else None,
                           dp_shard=fsdp and dp_shard is not False)


def teardown_parallel(ctx):
    if (ctx.world_size > 1 or ctx.dp_mesh is not None) and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, group):
    """Sum over `group` in place (no-op without one); returns the tensor."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor, world_size):
    """Maximum over every process in place (no-op alone); returns the tensor."""
    if world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(items, group, group_size):
    """Concatenation, in rank order, of each rank's list of picklable items over `group`."""
    if group is None or group_size == 1:
        return list(items)
    gathered = [None] * group_size
    dist.all_gather_object(gathered, list(items), group=group)
    return [item for part in gathered for item in part]


def shard_range(count, rank, size):
    """Contiguous [start, end) of `count` items for `rank` of `size` (sizes differ by at most one)."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)



"""Process groups of one run: a 2-D (dp, tp) device mesh under torchrun, nothing when alone.

NCCL on GPUs, gloo on CPUs. The data-parallel axis gets its gradients summed by hand (one
all-reduce per parameter after accumulation), which keeps the tensor-parallel DTensors untouched.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()


def choose_device(requested):
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda, got {requested!r}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return requested


def setup_parallel(tp, device_type="auto"):
    """Initialises the process group (under torchrun) and the (dp, tp) mesh."""
    device_type = choose_device(device_type)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if tp < 1:
        raise ValueError(f"--tp must be >= 1, got {tp}")
    if world_size % tp != 0:
        raise ValueError(f"--tp {tp} does not divide the number of processes ({world_size}); "
                         f"launch with torchrun --nproc_per_node a multiple of --tp")
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size == 1:
        return ParallelContext(0, 1, 1, 1, 0, 0, device)

    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    dp = world_size // tp
    mesh = init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))
    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    return ParallelContext(
        rank=rank, world_size=world_size, tp_size=tp, dp_size=dp,
        tp_rank=tp_mesh.get_local_rank(), dp_rank=dp_mesh.get_local_rank(), device=device,
        tp_mesh=tp_mesh if tp > 1 else None, tp_group=tp_mesh.get_group() if tp > 1 else None,
        dp_group=dp_mesh.get_group() if dp > 1 else None)


def teardown_parallel(ctx):
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor, group):
    """Sum over `group` in place (no-op without one); returns the tensor."""
    if group is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
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



"""Host memory of a run (for `--plan`): per rank, from the plan's own byte counts, and per node.

    reference bank       --reference swap (or precompute with --generate-every epoch, which
                         samples from θ_t): θ_t's local shards in the parameter dtype, plus the
                         stash that keeps the policy's own while θ_t is swapped in: 2x the local
                         parameter bytes (ref_policy.py); --reference streamed: the bank alone, 1x
    optimizer offload    --offload-optimizer: the optimizer state's local shards
    model loading        each rank reads from the safetensors files only the slices its shards
                         hold, one weight at a time, straight into its shards on the device
                         (parallel/load.py): a transient at the start, when no bank exists yet, of
                         the largest local parameter shard, counted in the parameter dtype (a file
                         in bf16 under fp32 master weights: half that); the files themselves are
                         mapped (page cache)
    allowance            per rank, what no formula here counts: the CUDA context and libraries,
                         the Python heap, the tokenizer and the tokenized data

The banks are exact-size pinned arenas with the spin_kernels extension (without it, torch's pinned
allocator rounds each one up to a power of two: spin_kernels/swap/engine.py host_footprint).
Per node: ranks per node x (the larger of loading and the run's pinned memory + the allowance).
"""
from dataclasses import dataclass

GIB = 2 ** 30
ALLOWANCE_PER_RANK = 8 * GIB
DEFAULT_HOST_MEMORY_GIB = 2048.0   # an 8-GPU H100/H200 node (DGX H100: 2 TB)
DEFAULT_GPUS_PER_NODE = 8


def reference_bank_copies(reference, generate_every):
    """Copies of the local parameter bytes a reference mode keeps in host memory."""
    if reference == "swap" or (reference == "precompute" and generate_every == "epoch"):
        return 2
    return 1 if reference == "streamed" else 0


@dataclass(frozen=True)
class HostMemory:
    ranks_per_node: int
    reference_bank: int      # bytes per rank
    optimizer_offload: int
    loading: int
    allowance: int = ALLOWANCE_PER_RANK

    @property
    def pinned(self):
        return self.reference_bank + self.optimizer_offload

    @property
    def per_rank(self):
        return max(self.loading, self.pinned) + self.allowance

    @property
    def per_node(self):
        return self.ranks_per_node * self.per_rank


def host_memory(*, parameters, largest_shard, optimizer_state, reference, generate_every, offload_optimizer,
                ranks_per_node):
    """HostMemory of a rank whose local parameter bytes are `parameters` (its largest parameter
    shard's: `largest_shard`, both in the parameter dtype)."""
    return HostMemory(ranks_per_node=ranks_per_node,
                      reference_bank=reference_bank_copies(reference, generate_every) * parameters,
                      optimizer_offload=optimizer_state if offload_optimizer else 0, loading=largest_shard)

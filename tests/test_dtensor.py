"""spin_kernels.dtensor: the one DTensor test that the swap code and the trainer share."""
import torch
from torch import nn

from spin_kernels.dtensor import is_dtensor, local_tensor


def test_plain_tensors_and_non_tensors_are_not_dtensors():
    plain = torch.arange(6.0)
    assert not is_dtensor(plain) and not is_dtensor(nn.Parameter(plain)) and not is_dtensor(None)
    assert local_tensor(plain) is plain


def test_a_dtensor_parameter_gives_its_local_shard_in_place(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor

    weight = nn.Parameter(distribute_tensor(torch.arange(12.0).view(4, 3), one_rank_mesh, [Shard(0)]))
    assert is_dtensor(weight) and is_dtensor(weight.detach())
    local = local_tensor(weight)
    assert not is_dtensor(local) and not local.requires_grad
    with torch.no_grad():
        local.mul_(2)  # an in-place write to the shard reaches the DTensor
    assert torch.equal(weight.full_tensor(), 2 * torch.arange(12.0).view(4, 3))

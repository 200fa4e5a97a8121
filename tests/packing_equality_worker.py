"""One rank of test_packing_equality.py's dp2 x tp2 launch (4 gloo processes under torchrun; not a
test, a script): every case of packing_cases.CASES on the (dp, tp) mesh, each data-parallel rank
with pairs of its own, then the trainer's command line with the arguments given after the output
folder (a --pack-pairs run); writes this rank's results and how often the trainer packed to
`<out>/rank<r>.pt`.

    python -m torch.distributed.run --nproc_per_node 4 packing_equality_worker.py OUT [TRAINER ARGS...]
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # packing_cases, beside this file

from packing_cases import CASES, measure, random_pairs  # noqa: E402

import spin_trainer.packed_scoring as packed_scoring  # noqa: E402
from spin_trainer import cli as train_cli  # noqa: E402
from spin_trainer.parallel.mesh import setup_parallel  # noqa: E402

TP = 2


def main(out_dir, trainer_args):
    torch.set_num_threads(1)
    results = {}
    for family, dtype, head in CASES:
        ctx = setup_parallel(TP, "cpu")   # FSDP on the dp axis, with its MixedPrecisionPolicy in bf16
        pairs = random_pairs(10 + ctx.dp_rank)
        results[(family, dtype, head)] = {"pairs": pairs, **measure(family, dtype, head, ctx, pairs)}
    packed_calls, pack = [], packed_scoring.pack_pairs
    packed_scoring.pack_pairs = lambda *args, **kwargs: packed_calls.append(1) or pack(*args, **kwargs)
    train_cli.main(trainer_args)   # last: the trainer tears the process group down when it is done
    torch.save({"rank": ctx.rank, "dp_rank": ctx.dp_rank, "tp_rank": ctx.tp_rank, "results": results,
                "trainer_packed_calls": len(packed_calls)}, os.path.join(out_dir, f"rank{ctx.rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

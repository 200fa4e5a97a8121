"""Issue 17's equality targets: the per-sequence log-prob sums of packed pair batches (packing.py,
scored by the trainer's Scorer) equal the padded layout's, and so do the SPIN loss and rewards
computed from them, for tiny Llama, Mistral (sliding window) and Qwen2 (q/k/v bias, a windowed
layer) models, with either LM head, in fp32 and bf16, on one process and on dp2 x tp2 (4 gloo
processes under one torchrun launch, packing_equality_worker.py). Both packed layouts: the prompt
shared by its two responses, and flash-attn's prompt per response ("separate"). The same launch
runs the trainer with --pack-pairs on dp2 x tp2 against a padded run of one process.

The bounds, per sequence (`allowed`):
- fp32: 1e-5 relative to the padded sum.
- bf16, the trainer's precision (fp32 master weights, FSDP's MixedPrecisionPolicy casting to bf16
  compute, on a 1-rank mesh in one process: parallel/precision.py): "within bf16's own noise",
  taken as 2 x noise, where noise is the padded bf16 run's own error, the largest |padded bf16 −
  float64| over the batch's sequences, the float64 value a plain Hugging Face forward of the same
  weights (packing_cases.exact_logps). Why 2: packed and padded are two bf16 evaluations of one
  function that round in different orders (other matmul shapes, attention per segment); if packing
  adds no error of its own, each is within about `noise` of the exact value, so they are within
  2·noise of each other (triangle inequality). A packing fault (a token that sees the wrong
  context, a shifted position) moves a sum by far more. Measured (largest over families, heads and
  layouts): packed minus padded at most 1.28·noise on one process and 0.83·noise on dp2 x tp2 (fp32:
  at most 1.9e-7 relative); letting the generated tokens see the gold ones moves the worst sum of
  every bf16 case by 15-47x the allowance on one process, shifting the generated tokens' position
  ids by one by 3-12x on either layout, and both fail every case.
- rewards β·(π − ref), one ref for both layouts: β·allowed; the loss, mean −log σ(β·margin), is
  β-Lipschitz in each margin, and a margin moves by at most two sums' bounds: 2β·max(allowed).
- fp32 gradients (each rank's own shards): within 1e-5 of the largest element of each.
"""
import os
import subprocess
import sys

import pytest
import torch

from packing_cases import BETA, CASES, PAIRS, VOCAB, measure, random_pairs
from trainer_cases import assert_runs_match, free_port, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "packing_equality_worker.py")
NOISE_FACTOR = 2
PACKED_LAYOUTS = ("packed", "separate")
TRAINER_ARGS = ("--greedy", "--iterations", "1", "--reference", "swap", "--head", "fused")


@pytest.fixture(scope="module")
def one_process():
    """{case: results} of packing_cases.measure on one process, in the trainer's layout for the
    dtype (bf16: FSDP on its own 1-rank mesh)."""
    results = {}
    for family, dtype, head in CASES:
        ctx = setup_parallel(1, "cpu", fsdp_alone=Precision(dtype).mixed)
        try:
            pairs = random_pairs(10)
            results[(family, dtype, head)] = {"pairs": pairs, **measure(family, dtype, head, ctx, pairs)}
        finally:
            teardown_parallel(ctx)
    return results


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("packing_equality")), train=8, val=4, test=4)


@pytest.fixture(scope="module")
def dp2_tp2(tiny, tmp_path_factory):
    """The 4 ranks' results ([rank] -> the worker's dict) and the trainer run's output folder."""
    out = tmp_path_factory.mktemp("dp2_tp2")
    run = str(out / "run")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
               str(free_port()), WORKER, str(out), *train_args(*tiny, run, *TRAINER_ARGS, "--tp", "2", "--pack-pairs")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(4)], run


def allowed(result, dtype):
    """[2B] how far each sequence's packed sum may lie from its padded one (module docstring)."""
    padded, exact = result["padded"]["logps"].double(), result["exact"]
    noise = (padded - exact).abs().max()
    if dtype == "float32":
        assert noise < 1e-6 * padded.abs().min(), "fp32 compute"
        return 1e-5 * padded.abs()
    assert noise > 1e-4 * padded.abs().min(), "bf16 compute"
    return torch.full_like(padded, NOISE_FACTOR * noise)


def assert_packed_equals_padded(result, dtype):
    bound, padded = allowed(result, dtype), result["padded"]
    for layout in PACKED_LAYOUTS:
        got = result[layout]
        for name in ("logps", "policy_logps"):
            difference = (got[name].double() - padded[name].double()).abs()
            assert (difference <= bound).all(), (layout, name, difference.tolist(), bound.tolist())
        difference = (got["rewards"].double() - padded["rewards"].double()).abs()
        assert (difference <= BETA * bound).all(), (layout, "rewards", difference.tolist(), bound.tolist())
        difference = (got["loss"].double() - padded["loss"].double()).abs()
        assert difference <= 2 * BETA * bound.max(), (layout, "loss", difference.item(), bound.max().item())
        if dtype == "float32":
            for name, want in padded["grads"].items():
                scale = want.abs().max()
                torch.testing.assert_close(got["grads"][name], want, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{layout} {name}: {m}")
    assert padded["rewards"].abs().min() > 0.1   # a reference away from the policy: the rewards have teeth


@pytest.mark.parametrize("family,dtype,head", CASES)
def test_packed_equals_padded_on_one_process(one_process, family, dtype, head):
    result = one_process[(family, dtype, head)]
    assert result["head_rows"] == VOCAB and result["padded"]["logps"].shape == (2 * PAIRS,)
    assert_packed_equals_padded(result, dtype)


@pytest.mark.parametrize("family,dtype,head", CASES)
def test_packed_equals_padded_on_dp2_tp2(dp2_tp2, family, dtype, head):
    ranks, _ = dp2_tp2
    for rank in ranks:
        result = rank["results"][(family, dtype, head)]
        # Each rank holds a quarter of the LM head's rows: tp splits the vocabulary, FSDP the shard again.
        assert result["head_rows"] == VOCAB // 4
        assert_packed_equals_padded(result, dtype)
    # The two tp ranks of a dp rank score the same pairs to the same bits; the dp ranks other pairs.
    for first, second in ((ranks[0], ranks[1]), (ranks[2], ranks[3])):
        assert first["dp_rank"] == second["dp_rank"] and first["tp_rank"] != second["tp_rank"]
        for layout in ("padded",) + PACKED_LAYOUTS:
            assert torch.equal(first["results"][(family, dtype, head)][layout]["logps"],
                               second["results"][(family, dtype, head)][layout]["logps"])
    assert ranks[0]["results"][(family, dtype, head)]["pairs"] != ranks[2]["results"][(family, dtype, head)]["pairs"]


def test_a_packed_run_on_dp2_tp2_equals_the_padded_run_of_one_process(dp2_tp2, tiny, tmp_path):
    ranks, packed = dp2_tp2
    assert all(rank["trainer_packed_calls"] > 0 for rank in ranks)   # every rank packed its pairs
    padded = str(tmp_path / "padded")
    train_cli.main(train_args(*tiny, padded, *TRAINER_ARGS))
    assert_runs_match(packed, padded, steps=[1], tolerance=1e-5)

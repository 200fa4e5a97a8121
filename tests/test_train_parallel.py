"""Sharded runs equal one process: 2 and 4 gloo processes against the 1-process run, fp32.

2 processes: tensor parallel (tp=2); FSDP (dp=2); replicated (dp=2, --no-dp-shard); FSDP with the
optimizer stepped in the backward; FSDP in bf16 mixed precision; the whole loop on FSDP with the
reference swapped in from a bank of local shards and the optimizer state offloaded while generating.
4 processes: FSDP x TP (dp=2 x tp=2) for the same steps, and the whole loop with a resident reference.
The fused LM head (--head fused: hidden states -> log-probs, the SPIN loss with its gradients formed in
the forward) under tp=2, FSDP (fp32; bf16 mixed precision, whose head weight is FSDP's bf16 unsharded
parameter; tied embeddings) and FSDP x TP equals the logits head of one process; the 4-process loop
runs it.

Steps: log-probs, loss and metrics (rewards_all_std from the global sums included) within 1e-5,
updated parameters within 1e-5 (fp32: sums in another order differ by a few ulps, which AdamW's
first steps, ~lr·sign(g), do not amplify), and a checkpoint round trip of the sharded state.
Loops: per-step losses within 1e-4, evaluation rows within 1e-5, final weights within 1e-5
(trainer_cases.assert_runs_match).
Mixed precision is one numerical model in every layout (FSDP's cast, on a 1-rank mesh in one
process): FSDP's bf16 log-probs equal one process's bit for bit, and its steps are held to the fp32
bounds above against one process's bf16 steps; its fused head equals its logits head within 1e-3.
At an iteration's first step (numerics_cases.first_step: fp32 and bf16, both heads) every
sequence's β·(π − ref) is exactly 0 in one process and on 2 processes, and the log-probs and the
greedy and sampled generations of 2 processes are one process's bits. The loops run two sampled
iterations, and each iteration's first step must have a margin of exactly 0 (a reference one
iteration stale fails it, and the per-step loss bound of 1e-4).
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from numerics_cases import FIRST_STEP_CASES, first_step
from trainer_cases import assert_runs_match, metric_records, fixed_pairs, free_port, pair_items, step_trainer, tiny_setup, train_args

from spin_trainer import cli as train_cli

from spin_trainer.checkpoint import load_train_state, save_train_state
from spin_trainer.export import full_state_dict
from spin_trainer.generation.rollouts import pair_logps
from spin_trainer.logprobs import Scorer
from spin_trainer.model import create_default_model, load_model, load_tokenizer
from spin_trainer.optim import make_optimizer
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision

PAIRS = 4
BETA = 0.1
METRICS = ("loss", "acc", "margin_mean", "rewards_actual_mean", "rewards_generated_mean", "rewards_all_std",
           "grad_norm")


def spin_steps(model_dir, tp, checkpoint_dir, *, dp_shard=None, dtype="float32", in_backward=False,
               accumulate=True, head="logits", tied=False):
    """Log-probs, three optimizer steps with a torch.distributed.checkpoint round trip between the
    2nd and the 3rd; returns full (unsharded) results. One micro-batch per pair with clipping, or (`accumulate`
    False, as optimizer-in-backward needs) one per rank without clipping."""
    accumulate = accumulate and not in_backward
    if tied:
        model_dir = os.path.join(os.path.dirname(model_dir), "tied_model")
    precision = Precision(dtype)
    ctx = setup_parallel(tp, "cpu", dp_shard=dp_shard, fsdp_alone=precision.mixed)
    scorer = Scorer(ctx, precision, head)
    tokenizer = load_tokenizer(model_dir)
    model = parallelize_model(load_model(model_dir, attention="sdpa", dtype=precision.param_dtype_name,
                                         compute_dtype=dtype), ctx, precision)
    examples, generated = fixed_pairs(tokenizer, PAIRS)
    logps = pair_logps(model, examples, generated, scorer, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id)
    reference = logps - torch.linspace(-0.5, 0.5, PAIRS * 2).reshape(PAIRS, 2)   # a reference != policy
    per_rank = PAIRS // ctx.dp_size
    micro = 1 if accumulate else per_rank
    trainer = step_trainer(model, scorer, pairs=PAIRS, lr=1e-2, beta=BETA, micro_batch_size=micro, weight_decay=0.01,
                           max_grad_norm=1.0 if accumulate else 0.0, in_backward=in_backward)
    optimizer, scheduler = trainer.optimizer, trainer.scheduler

    def items():
        return pair_items(examples, generated, reference, tokenizer.pad_token_id, start=ctx.dp_rank * per_rank,
                          count=per_rank, micro=micro)

    # What the LM head's calls returned: [N, V_local] logits, or the fused head's log-probs [N] or loss [1].
    head_outputs = set()
    model.get_output_embeddings().register_forward_hook(lambda m, i, out: head_outputs.add(out.dim()))

    def step():
        return trainer.train_step(items())

    before = full_state_dict(model)
    step1 = step()
    after1 = full_state_dict(model)
    save_train_state(checkpoint_dir, model, optimizer, ctx)
    scheduler_state = scheduler.state_dict()
    step2 = step()
    after2 = full_state_dict(model)
    load_train_state(checkpoint_dir, model, optimizer, ctx)
    scheduler.load_state_dict(scheduler_state)
    step()
    head = model.get_output_embeddings().weight
    if ctx.world_size == 1:
        teardown_parallel(ctx)   # its own 1-rank group (mixed precision)
    return {"lm_head_local": tuple(getattr(head, "to_local", lambda: head)().shape), "head_outputs": head_outputs,
            "param_dtypes": {str(p.dtype) for p in model.parameters()},
            "logps": logps, "before": before, "step1": step1, "step2": step2, "after1": after1, "after2": after2,
            "after2_resumed": full_state_dict(model)}


LOOP_ARGS = {2: ("--iterations", "2", "--save-every", "2", "--reference", "swap", "--offload-optimizer"),
             4: ("--iterations", "2", "--reference", "resident", "--head", "fused")}
LOOP_TP = {2: 1, 4: 2}
STEP_LAYOUTS = {2: {"tp": dict(tp=2), "dp": dict(tp=1), "dp_replicated": dict(tp=1, dp_shard=False),
                    "dp_in_backward": dict(tp=1, in_backward=True), "dp_bf16": dict(tp=1, dtype="bfloat16"),
                    "tp_fused": dict(tp=2, head="fused"), "dp_fused": dict(tp=1, head="fused"),
                    "dp_bf16_fused": dict(tp=1, dtype="bfloat16", head="fused"),
                    "dp_tied_fused": dict(tp=1, head="fused", tied=True)},
                4: {"dp2_tp2": dict(tp=2), "dp2_tp2_fused": dict(tp=2, head="fused")}}


def _worker(rank, world_size, port, model_dir, out_path, setup, loop_out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    scratch = os.path.dirname(out_path)
    results = {name: spin_steps(model_dir, checkpoint_dir=os.path.join(scratch, name), **kwargs)
               for name, kwargs in STEP_LAYOUTS[world_size].items()}
    if world_size == 2:
        results["first_step"] = {case: first_step(model_dir, *case) for case in FIRST_STEP_CASES}
        # Tensor parallelism alone: FSDP's cast on a data-parallel axis of one rank.
        results["first_step_tp"] = {head: first_step(model_dir, "bfloat16", head, tp=2) for head in ("logits", "fused")}
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    # Last: the trainer tears the process group down when it is done.
    train_cli.main(train_args(*setup, loop_out, *LOOP_ARGS[world_size], "--tp", str(LOOP_TP[world_size])))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    setup = tiny_setup(str(tmp_path_factory.mktemp("parallel")))
    # spin_steps(tied=True) reads it beside the untied one.
    create_default_model(os.path.join(os.path.dirname(setup[0]), "tied_model"), seed=0, hidden_size=32,
                         intermediate_size=64, tie_word_embeddings=True)
    return setup


def spawn(world_size, setup, out_dir):
    out_path, loop_out = str(out_dir / "results.pt"), str(out_dir / "loop")
    mp.spawn(_worker, args=(world_size, free_port(), setup[0], out_path, setup, loop_out), nprocs=world_size,
             join=True)
    results = torch.load(out_path, weights_only=False)
    results["loop_out"] = loop_out
    return results


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory):
    """{world size: results}; 1 is this process."""
    results = {world: spawn(world, setup, tmp_path_factory.mktemp(f"world{world}")) for world in (2, 4)}
    scratch = tmp_path_factory.mktemp("world1")
    results[1] = {name: spin_steps(setup[0], 1, str(scratch / name), **kwargs) for name, kwargs in
                  (("single", {}), ("single_one_micro", dict(accumulate=False)),
                   ("single_in_backward", dict(in_backward=True)), ("single_fused", dict(head="fused")),
                   ("single_tied", dict(tied=True)), ("single_bf16", dict(dtype="bfloat16")))}
    results[1]["first_step"] = {case: first_step(setup[0], *case) for case in FIRST_STEP_CASES}
    return results


def assert_states_close(actual, expected, tolerance=1e-5):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=tolerance, atol=tolerance, msg=name)


def assert_metrics_close(got, want, tolerance=1e-5, names=METRICS):
    for step in ("step1", "step2"):
        for name in names:
            assert abs(got[step][name] - want[step][name]) <= tolerance * (1 + abs(want[step][name])), \
                (step, name, got[step][name], want[step][name])


@pytest.mark.parametrize("world, layout", [(2, "tp"), (2, "dp"), (2, "dp_replicated"), (4, "dp2_tp2"),
                                           (1, "single_fused"), (2, "tp_fused"), (2, "dp_fused"),
                                           (4, "dp2_tp2_fused"), (2, "dp_tied_fused")])
def test_sharded_steps_equal_one_process(runs, world, layout):
    got, want = runs[world][layout], runs[1]["single_tied" if "tied" in layout else "single"]
    tp = 2 if "tp" in layout else 1
    # Under tp=2 each rank really holds half of the vocabulary rows of the LM head; under FSDP half
    # of those again.
    vocab, hidden = want["lm_head_local"]
    shards = tp * (2 if layout.startswith("dp") and layout != "dp_replicated" else 1)
    assert got["lm_head_local"] == (vocab // shards, hidden)
    # The logits head wrote [N, V_local] logits; the fused one returned log-probs [N] and the loss [1].
    assert want["head_outputs"] == {2} and got["head_outputs"] == ({1} if "fused" in layout else {2})
    torch.testing.assert_close(got["logps"], want["logps"], rtol=1e-5, atol=1e-5)
    assert_metrics_close(got, want)
    assert_states_close(got["after1"], want["after1"])
    assert_states_close(got["after2"], want["after2"])
    # The steps moved the weights well beyond the tolerance, so the comparison has teeth.
    assert (want["after2"]["lm_head.weight"] - want["after1"]["lm_head.weight"]).abs().max() > 1e-3
    if "tied" in layout:   # one parameter: the head's gradient and the embedding's summed into it
        assert torch.equal(got["after2"]["lm_head.weight"], got["after2"]["model.embed_tokens.weight"])
    # The sharded parameters and optimizer state survive a checkpoint round trip bit for bit.
    for name, tensor in got["after2"].items():
        assert torch.equal(got["after2_resumed"][name], tensor), name


def test_optimizer_in_backward_equals_the_plain_step(runs):
    want = runs[1]["single_one_micro"]
    for got in (runs[1]["single_in_backward"], runs[2]["dp_in_backward"]):
        assert_metrics_close(got, want)
        assert_states_close(got["after1"], want["after1"])
        assert_states_close(got["after2"], want["after2"])
        for name, tensor in got["after2"].items():
            assert torch.equal(got["after2_resumed"][name], tensor), name


def test_fused_head_under_fsdp_mixed_precision_equals_the_logits_head(runs):
    # Both compute the head in bf16 from FSDP's bf16 unsharded weight and reduce the gradients in fp32.
    got, want = runs[2]["dp_bf16_fused"], runs[2]["dp_bf16"]
    assert got["param_dtypes"] == {"torch.float32"} and got["head_outputs"] == {1}
    torch.testing.assert_close(got["logps"], want["logps"], rtol=1e-3, atol=1e-3)
    assert_metrics_close(got, want, tolerance=1e-3, names=("loss", "acc", "rewards_all_std"))
    for name in want["before"]:
        delta_got = (got["after2"][name] - got["before"][name]).flatten()
        delta_want = (want["after2"][name] - want["before"][name]).flatten()
        assert torch.nn.functional.cosine_similarity(delta_got, delta_want, dim=0) > 0.99, name


def test_fsdp_mixed_precision_is_the_one_process_model_and_keeps_fp32_master_weights(runs):
    got, want = runs[2]["dp_bf16"], runs[1]["single_bf16"]
    assert got["param_dtypes"] == want["param_dtypes"] == {"torch.float32"}
    # One cast rule in both layouts: the same bits, and steps that differ only in fp32 sum order.
    assert torch.equal(got["logps"], want["logps"])
    assert (got["logps"] - runs[1]["single"]["logps"]).abs().max() > 1e-4   # and it is bf16 compute
    assert_metrics_close(got, want)
    assert_states_close(got["after1"], want["after1"])
    assert_states_close(got["after2"], want["after2"])


@pytest.mark.parametrize("dtype, head", FIRST_STEP_CASES)
def test_first_step_margins_are_zero_and_layouts_agree_bit_for_bit(runs, dtype, head):
    alone, fsdp = runs[1]["first_step"][(dtype, head)], runs[2]["first_step"][(dtype, head)]
    for got in (alone, fsdp):   # π − ref exactly 0 for every sequence, though the shapes differ
        assert got["rewards"].shape == (PAIRS, 2) and torch.equal(got["rewards"], torch.zeros(PAIRS, 2))
    assert torch.equal(fsdp["logps"], alone["logps"])
    assert fsdp["greedy"] == alone["greedy"] and fsdp["sampled"] == alone["sampled"]
    assert alone["sampled"] != alone["greedy"]


@pytest.mark.parametrize("head", ["logits", "fused"])
def test_tensor_parallel_bf16_casts_as_fsdp_and_starts_with_a_margin_of_exactly_zero(runs, head):
    got, alone = runs[2]["first_step_tp"][head], runs[1]["first_step"][("bfloat16", head)]
    assert torch.equal(got["rewards"], torch.zeros(PAIRS, 2))
    # bf16 compute with FSDP's cast (the vocab-parallel head and row-parallel sums round in
    # another order than one process: bf16's precision, not bits), not fp32 compute.
    torch.testing.assert_close(got["logps"], alone["logps"], rtol=0, atol=1e-2)
    fp32 = runs[1]["first_step"][("float32", head)]["logps"]
    assert (got["logps"] - fp32).abs().max() > (alone["logps"] - fp32).abs().max() / 4


@pytest.mark.parametrize("world", [2, 4])
def test_whole_loop_matches_one_process(runs, setup, world, tmp_path):
    single = str(tmp_path / "single")
    train_cli.main(train_args(*setup, single, *LOOP_ARGS[world]))
    assert_runs_match(runs[world]["loop_out"], single, steps=list(range(1, 9)))
    for out in (runs[world]["loop_out"], single):   # θ_t is each iteration's own start
        first = [r for r in metric_records(out, "train") if r["step"] in (1, 5)]
        assert [(r["iteration"], r["margin_mean"], r["rewards_all_std"]) for r in first] == [(1, 0.0, 0.0),
                                                                                                (2, 0.0, 0.0)]


def test_parallelize_runs_on_the_meta_device_with_a_fake_process_group():
    """What `--plan` builds on: the same FSDP x TP application on a model that has no memory, for a
    64-rank layout, in this one process."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from transformers import AutoModelForCausalLM, LlamaConfig

    from spin_trainer.parallel.mesh import mesh_context

    if dist.is_initialized():
        pytest.skip("another test left a default process group in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=5, world_size=64)
    try:
        ctx = mesh_context(5, 64, 8, torch.device("cpu"))
        config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=8, vocab_size=1024, tie_word_embeddings=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        parallelize_model(model, ctx, Precision("bfloat16"), recompute="full")
        optimizer = make_optimizer(model, ctx=ctx, lr=1e-3)
        params = dict(model.named_parameters())
        # One group per mesh and weight-decay choice: the TP weights (2-D mesh), the embeddings (dp
        # mesh), the norms (dp mesh, no decay).
        assert all(p.is_meta for p in params.values()) and len(optimizer.param_groups) == 3
        # The q projection is split 8 ways by TP and 8 ways by FSDP; the norms only by FSDP.
        assert params["model.layers.0.self_attn.q_proj.weight"].to_local().shape == (256 // 64, 256)
        assert params["model.norm.weight"].to_local().shape == (256 // 8,)
        assert params["model.norm.weight"].device_mesh.mesh_dim_names == ("dp",)
    finally:
        dist.destroy_process_group()


def test_decoder_layers_are_found_after_fully_shard_renames_their_class(one_rank_mesh):
    from spin_trainer.model import build_tiny_llama
    from spin_trainer.parallel.apply import decoder_layers
    from torch.distributed.fsdp import fully_shard

    model = build_tiny_llama(16, hidden_size=8, intermediate_size=16, num_layers=2, num_heads=2, num_kv_heads=1)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=one_rank_mesh)
    assert [type(layer).__name__ for layer in layers] == ["FSDPLlamaDecoderLayer"] * 2
    assert decoder_layers(model) == layers


def test_generating_with_the_resident_copy_leaves_its_root_resharding(one_rank_mesh):
    """--reference resident --generate-every epoch generates with the frozen copy: afterwards its
    forwards must still free the gathered embeddings and LM head, as frozen_copy set them up."""
    from torch.distributed.tensor import DTensor

    from spin_trainer.parallel.mesh import ParallelContext
    from spin_trainer.model import build_tiny_llama
    from spin_trainer.parallel.apply import apply_fsdp, frozen_copy, full_weights

    ctx = ParallelContext(rank=0, world_size=1, tp_size=1, dp_size=1, tp_rank=0, dp_rank=0,
                          device=torch.device("cpu"), dp_mesh=one_rank_mesh, dp_shard=True)
    precision = Precision()
    policy = apply_fsdp(build_tiny_llama(16, hidden_size=8, intermediate_size=16, num_heads=2, num_kv_heads=1), ctx,
                        precision)
    twin = frozen_copy(policy, ctx, precision)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        with full_weights(twin):
            twin(ids)
        twin(ids)
    assert isinstance(twin.lm_head.weight, DTensor) and isinstance(twin.model.embed_tokens.weight, DTensor)

"""`--plan` (spin_trainer.plan): the simulated per-rank bytes equal a real run's, the activation
formula equals what autograd saves, the shipped configs plan at their published sizes, and bad
input is refused by option name before any model is loaded.

The real run: 4 gloo processes, one SPIN optimizer step through the trainer's own
`optimizer_step` in three layouts (FSDP x TP in bf16 mixed precision with AdamW; FSDP over 4
ranks in fp32 with RMSprop on a model whose vocabulary, 17, and widths do not divide by 4, so
FSDP's shards differ between ranks; replicas with --no-dp-shard x TP in pure bf16). On every rank
the local parameter bytes, the gradient bytes the optimizer steps on, and the optimizer state's
bytes after the step equal the plan of that rank exactly (no tolerance: the plan reads the same
shards off the meta model).
"""
import os
import re
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer_cases import ROOT, fixed_pairs, free_port, saved_activation_bytes, tiny_setup, train_args

from spin_trainer.errors import UsageError
from spin_trainer import cli as train_cli
from spin_trainer.plan.activations import ComputeMode, DecoderShape, decoder_bytes
from spin_trainer.plan.memory import GIB, memory_plan
from spin_trainer.parallel.precision import Precision

CONFIGS = os.path.join(ROOT, "configs")
WORLD = 4
LAYOUTS = {
    "fsdp_tp_bf16_adamw": dict(model="tiny", tp=2, dtype="bfloat16", optimizer="adamw"),
    "fsdp_uneven_fp32_rmsprop": dict(model="odd", tp=1, dtype="float32", optimizer="rmsprop"),
    "replicas_tp_pure_bf16": dict(model="tiny", tp=2, dtype="bfloat16", pure=True, dp_shard=False, optimizer="adamw"),
}


def nbytes(tensor):
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def measured_step(model_dir, *, tp, dtype, optimizer, pure=False, dp_shard=None, model=None):
    """This rank's parameter, gradient and optimizer-state bytes around one real optimizer step."""
    from trainer_cases import step_trainer

    from spin_trainer.data import collate_pairs
    from spin_trainer.logprobs import Scorer
    from spin_trainer.model import load_model, load_tokenizer
    from spin_trainer.parallel.apply import parallelize_model, sharded
    from spin_trainer.parallel.mesh import setup_parallel

    precision = Precision(dtype, pure=pure)
    ctx = setup_parallel(tp, "cpu", dp_shard=dp_shard)
    tokenizer = load_tokenizer(model_dir)
    net = parallelize_model(load_model(model_dir, attention="sdpa", dtype=precision.param_dtype_name,
                                       compute_dtype=dtype), ctx, precision)
    per_rank = WORLD // ctx.dp_size
    trainer = step_trainer(net, Scorer(ctx, precision), pairs=WORLD, lr=1e-3, micro_batch_size=per_rank,
                           optimizer=optimizer)
    opt = trainer.optimizer
    seen = {}

    def before_update(optimizer, args, kwargs):
        seen["gradients"] = sum(nbytes(p.grad) for p in net.parameters() if p.grad is not None)

    opt.register_step_pre_hook(before_update)
    examples, generated = fixed_pairs(tokenizer, WORLD)
    start = ctx.dp_rank * per_rank
    batch = collate_pairs(examples[start:start + per_rank], generated[start:start + per_rank], tokenizer.pad_token_id)
    trainer.train_step([(batch, torch.zeros(2 * per_rank), 0)])
    with sharded(net):
        parameters = sum(nbytes(p) for p in net.parameters())
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"parameters": parameters, "gradients": seen["gradients"], "optimizer_state": state}


def _worker(rank, port, model_dirs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    results = {name: measured_step(model_dirs[layout["model"]], **layout) for name, layout in LAYOUTS.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from spin_trainer.model import create_default_model

    root = tmp_path_factory.mktemp("plan")
    odd = str(root / "odd_model")
    # vocab 13 symbols + 4 specials = 17 rows, hidden 24, MLP 50: no dimension divides by 4.
    create_default_model(odd, alphabet="0123456789+=-", vocab_multiple=1, hidden_size=24, intermediate_size=50)
    return {"tiny": tiny_setup(str(root))[0], "odd": odd}


@pytest.fixture(scope="module")
def measured(model_dirs, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("measured"))
    mp.spawn(_worker, args=(free_port(), model_dirs, out_dir), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{rank}.pt")) for rank in range(WORLD)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plan_equals_the_bytes_of_a_real_4_process_step(measured, model_dirs, layout):
    from transformers import AutoConfig

    spec = LAYOUTS[layout]
    config = AutoConfig.from_pretrained(model_dirs[spec["model"]])
    sizes = set()
    for rank in range(WORLD):
        plan = memory_plan(config, nproc=WORLD, tp=spec["tp"], precision=Precision(spec["dtype"], pure=spec.get("pure", False)),
                           dp_shard=spec.get("dp_shard"), optimizer_options={"name": spec["optimizer"]}, rank=rank)
        got = {"parameters": plan.parameters, "gradients": plan.gradients, "optimizer_state": plan.optimizer_state}
        assert got == measured[rank][layout], (layout, rank)
        sizes.add(plan.parameters)
    if spec["model"] == "odd":
        assert len(sizes) > 1   # FSDP's shards differ between ranks, and the plan follows them


# ---- the activation formula against what autograd saves --------------------------------------

def saved_bytes(model, input_ids):
    """Bytes autograd saves in the backbone's forward (parameters excluded)."""
    return saved_activation_bytes(model, lambda: model.model(input_ids=input_ids, use_cache=False))


@pytest.mark.parametrize("recompute", ["none", "elementwise", "full"])
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_activation_formula_equals_what_autograd_saves(recompute, precision):
    """bfloat16 is also mixed precision's activations: FSDP's cast makes every weight, the embeddings
    included, bf16 (tests/test_plan_training.py measures them under FSDP)."""
    from spin_trainer.model import build_tiny_llama
    from spin_trainer.parallel.apply import decoder_layers
    from spin_trainer.parallel.recompute import apply_recompute

    rows, length = 2, 32
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
    model = build_tiny_llama(96, hidden_size=64, intermediate_size=160, num_layers=3, num_heads=4, num_kv_heads=2,
                             attn_implementation="sdpa").to(dtype)
    apply_recompute(decoder_layers(model), recompute)
    input_ids = torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(0))
    mode = ComputeMode(compute_bytes=2 if precision != "float32" else 4)
    expected = decoder_bytes(DecoderShape.of(model.config), mode, recompute, tokens=rows * length, positions=length)
    assert saved_bytes(model, input_ids) == expected


# ---- the shipped configs ------------------------------------------------------------------------

# name: (published parameter count, --nproc, --tp, parameters outside tensor parallelism: the
# embeddings and the RMSNorm weights, which FSDP alone shards)
SHIPPED = {
    "llama-2-7b": (6_738_415_616, 8, 1, 32000 * 4096 + (2 * 32 + 1) * 4096),
    "llama-3-8b": (8_030_261_248, 8, 2, 128256 * 4096 + (2 * 32 + 1) * 4096),
    "llama-3-70b": (70_553_706_496, 64, 8, 128256 * 8192 + (2 * 80 + 1) * 8192),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_plan_at_their_published_sizes(name, capsys):
    count, nproc, tp, replicated = SHIPPED[name]
    plan = train_cli.main(["--plan", "--model", os.path.join(CONFIGS, name), "--nproc", str(nproc), "--tp", str(tp),
                           "--dtype", "bfloat16", "--recompute", "full", "--global-batch-size", "64"])
    assert plan.parameter_count == count
    # fp32 master weights: the tensor-parallel weights split over all ranks, the rest over dp only
    # (every dimension divides here, so rank 0 holds exactly its share).
    dp = nproc // tp
    assert plan.parameters == 4 * ((count - replicated) // nproc + replicated // dp)
    assert plan.gradients == plan.parameters and plan.optimizer_state == 2 * plan.parameters   # AdamW
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"per-rank peak estimate: \d+\.\d\d GiB", last)
    assert float(last.split()[-2]) == pytest.approx(plan.peak / GIB, abs=0.005)


def test_plan_terms_follow_the_options():
    """Optimizer-in-backward holds one unit's gradients, RMSprop one state tensor, pure bf16 half
    the bytes, --no-dp-shard a replica (whose bf16 copy of every unit replicate keeps from its
    forward to its backward), a resident reference one more copy."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.join(CONFIGS, "llama-3-8b"))
    bf16 = Precision("bfloat16")

    def plan(**kwargs):
        options = dict(nproc=8, tp=1, precision=bf16, max_length=2048)
        options.update(kwargs)
        return memory_plan(config, **options)

    base = plan()
    assert base.gradients_held == base.gradients == base.parameters
    in_backward = plan(optimizer_options={"in_backward": True})
    # the largest FSDP unit is the root: embeddings and LM head (128256 x 4096 each) and the final norm
    assert in_backward.gradients_held == 4 * (2 * 128256 * 4096 + 4096) // 8
    assert in_backward.optimizer_state == base.optimizer_state
    assert plan(optimizer_options={"name": "rmsprop"}).optimizer_state == base.parameters
    pure = plan(precision=Precision("bfloat16", pure=True))
    assert 2 * pure.parameters == base.parameters and 2 * pure.optimizer_state == base.optimizer_state
    replicas = plan(dp_shard=False)
    assert replicas.parameters == 4 * base.parameter_count
    assert replicas.fsdp_gathered == 2 * base.parameter_count == replicas.generation_weights
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert base.fsdp_gathered == 2 * (2 * 128256 * 4096 + 4096 + 2 * layer)   # FSDP: the root + 2 layers
    assert base.activations.total == replicas.activations.total
    assert plan(reference="resident").reference == base.parameters
    full = plan(recompute="full")
    assert full.activations.decoder < plan(recompute="elementwise").activations.decoder < base.activations.decoder
    # --head fused: no [N, V] logits; the compacted rows and their gradient, one chunk of logits,
    # d weight's fp32 accumulator and d weight (bf16) instead. Its fixed 6·V·h bytes pay off once the
    # logits would be larger than that and a chunk: here from about 17k labelled tokens.
    vocab, hidden = 128256, 4096
    for micro_batch_size, fused_is_smaller in ((1, False), (8, True)):
        logits = plan(micro_batch_size=micro_batch_size).activations
        fused = plan(micro_batch_size=micro_batch_size, head="fused").activations
        tokens = logits.tokens
        assert logits.head == tokens * (2 * hidden + 2 * vocab + 32)
        assert fused.head == tokens * (2 * 2 * hidden + 32) + min(1 << 30, tokens * 2 * vocab) + 6 * vocab * hidden
        assert (fused.head < logits.head) == fused_is_smaller


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--nproc", "8"], "--model"),
    (["--model", ROOT, "--nproc", "8"], "no config.json"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b")], "--nproc"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "6", "--tp", "4"],
     "--tp 4 does not divide the number of processes (6); run a multiple of --tp processes"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--tp", "3"], "--tp 3"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--max-length", "8192"], "--max-length"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--device-memory-gib", "0"],
     "--device-memory-gib"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--host-memory-gib", "0"], "--host-memory-gib"),
    (["--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--gpus-per-node", "0"], "--gpus-per-node"),
])
def test_plan_refuses_bad_input_by_option(argv, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        train_cli.main(["--plan", *argv])


def test_plan_refuses_a_model_outside_the_llama_family(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4}')
    with pytest.raises(UsageError, match=r"--plan --model .*'gpt2'.*Llama-family"):
        train_cli.main(["--plan", "--model", str(tmp_path), "--nproc", "2"])


def _train_argv(tmp_path, *extra):
    data = tiny_setup(str(tmp_path))
    return train_args(os.path.join(CONFIGS, "llama-2-7b"), *data[1:], str(tmp_path / "out"), "--max-length", "1024",
                      "--no-dp-shard", *extra)


def test_no_dp_shard_refuses_a_replica_that_cannot_fit(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # 6.74 B parameters x 16 bytes (fp32 weights, gradients, AdamW state) = 100.4 GiB per replica.
    with pytest.raises(UsageError, match=r"--no-dp-shard: .* = 100\.4 GiB per rank .* 80\.0 GiB per device"):
        train_cli.main(_train_argv(tmp_path, "--device-memory-gib", "80"))


def test_no_dp_shard_warns_when_the_peak_estimate_exceeds_the_device(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    # The state fits in 120 GiB, its activations do not; the run goes on (and stops at the
    # tokenizer, which configs/ does not ship: proof that the check ran before any loading).
    with pytest.raises(UsageError, match="tokenizer"):
        train_cli.main(_train_argv(tmp_path, "--device-memory-gib", "120"))
    assert re.search(r"warning: --no-dp-shard: the per-rank peak estimate is \d+\.\d GiB", capsys.readouterr().err)


@pytest.mark.parametrize("extra, layout", [([], "shared"), (["--no-pack-pairs"], None),
                                           (["--reference", "streamed", "--pure-low-precision"], None), (["--attn", "flash_attention_2"], "separate")])
def test_plan_packs_pair_batches_where_the_trainer_would(extra, layout, capsys):
    """Packed by default (Llama on SDPA: this machine has no flash-attn), not with --no-pack-pairs or
    where the trainer falls back to padded rows; the micro-batch line gives the token budget."""
    plan = train_cli.main(["--plan", "--model", os.path.join(CONFIGS, "llama-2-7b"), "--nproc", "8", "--max-length", "1024",
                           "--micro-batch-size", "2", "--global-batch-size", "16", "--dtype", "bfloat16", *extra])
    assert plan.micro_batch.layout == layout
    budget = 2 * 2 * 1024 if layout in (None, "separate") else 2 * (1024 + 512)
    assert plan.activations.tokens == budget
    assert f"a token budget of {budget} tokens" in capsys.readouterr().out

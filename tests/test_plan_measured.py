"""`--plan`'s generation and host-memory terms against measured CPU runs, within 10%: the peak of
the bytes the CPU allocator hands out while the trainer's own generate_responses runs (both
decoders; fp32, bf16 mixed precision as the trainer runs it, inside full_weights of a model under
FSDP's MixedPrecisionPolicy on a data-parallel axis of one rank, and pure bf16), and the RSS that
the trainer's own reference bank and optimizer offload add. The static decoder's KV cache is in the compute dtype whatever casts the
weights; a training run lowers --gen-batch-size to the largest generation batch the plan fits."""
import ctypes
import os
import re
from contextlib import nullcontext

import pytest
import torch

from live_bytes import LiveTensorBytes, allocated_peak
from trainer_cases import ROOT, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.options import parse_config
from spin_trainer.generation.decode import SamplingConfig, generate_responses
from spin_trainer.generation.static_decoder import StaticKVDecoder
from spin_trainer.model import build_tiny_llama
from spin_trainer.parallel.apply import full_weights, parallelize_model
from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision
from spin_trainer.plan.activations import ComputeMode, DecoderShape
from spin_trainer.plan.generation import generation_memory
from spin_trainer.plan.memory import GIB, memory_plan

CONFIGS = os.path.join(ROOT, "configs")
# hidden, MLP, heads, KV heads, rows, --max-length (head dim 32 but in b, 16): MLP-bound (a), the masks' [P, P] terms dominate
# (b), RMSNorm's fp32 upcast dominates (c: narrow heads of 32 and a narrow MLP, as 70B's per rank at tp 8)
SHAPES = {"a": (256, 704, 8, 2, 4, 129), "b": (64, 160, 4, 2, 2, 513), "c": (256, 64, 2, 1, 4, 65)}
NEW_TOKENS = 40


def model_of(shape, precision, seed=0):
    hidden, mlp, heads, kv_heads, _, _ = SHAPES[shape]
    model = build_tiny_llama(128 if shape == "c" else 512, hidden_size=hidden, intermediate_size=mlp, num_layers=2, num_heads=heads,
                             num_kv_heads=kv_heads, head_dim=16 if shape == "b" else 32, max_position_embeddings=1024,
                             attn_implementation="sdpa", initializer_range=0.3, seed=seed).eval()
    return model.to(torch.bfloat16) if precision == "bf16" else model


def worst_batch(rows, max_length):
    """The batch the plan sizes: prompts at the longest, one short enough to take every new token."""
    return [[3 + i] * (max_length - 1) for i in range(rows - 1)] + [[5]]


def generate(model, prompts, backend, max_length):
    return generate_responses(model, prompts, SamplingConfig(max_new_tokens=NEW_TOKENS, do_sample=False),
                              eos_token_id=-1, pad_token_id=0, max_length=max_length, batch_size=len(prompts),
                              progress=False, backend=backend)


def measured_generation(model, precision, backend, rows, max_length):
    """Peak bytes of the trainer's generation: in mixed precision FSDP (one rank, as cli.py sets it up)
    holds the full weights in bf16 for it (full_weights), which the measurement counts."""
    def run():
        with full_weights(model) if mixed else nullcontext():
            generate(model, worst_batch(rows, max_length), backend, max_length)

    mixed = precision == "mixed"
    ctx = setup_parallel(1, "cpu", fsdp_alone=mixed)
    try:
        if mixed:
            parallelize_model(model, ctx, Precision("bfloat16"))
        return allocated_peak(model, run)
    finally:
        teardown_parallel(ctx)


@pytest.mark.parametrize("shape, precision, backend", [
    ("a", "fp32", "static"), ("a", "mixed", "static"), ("a", "mixed", "hf"), ("a", "bf16", "hf"),
    ("b", "fp32", "hf"), ("b", "mixed", "static"), ("b", "bf16", "static"),
    ("c", "mixed", "static"), ("c", "bf16", "static"), ("c", "mixed", "hf"),
])
def test_generation_terms_equal_a_measured_cpu_run(shape, precision, backend):
    torch.set_num_threads(1)
    model = model_of(shape, precision)
    rows, max_length = SHAPES[shape][4:]
    dtype = "float32" if precision == "fp32" else "bfloat16"
    plan = memory_plan(model.config, nproc=1, tp=1, precision=Precision(dtype, pure=precision == "bf16"),
                       max_length=max_length, max_new_tokens=NEW_TOKENS, gen_batch_size=rows)
    measured = measured_generation(model, precision, backend, rows, max_length)
    mode = ComputeMode(compute_bytes=4 if precision == "fp32" else 2)
    # the plan's decoder choice (static on one tensor-parallel rank) is set here to measure Hugging
    # Face's too
    generation = generation_memory(DecoderShape.of(model.config), mode, max_length=max_length,
                                   max_new_tokens=NEW_TOKENS, static_decoder=backend == "static")
    if backend == "static":
        assert generation.kv_cache(rows) == plan.kv_cache
    expected = plan.generation_weights + generation.total(rows)   # FSDP's gathered bf16 weights
    assert expected == pytest.approx(measured, rel=0.1), (measured, expected)


def test_static_cache_is_in_the_compute_dtype_whatever_casts_the_weights():
    """Under autocast RoPE's fp32 tables promote k to fp32; the cache stays bf16 and its bytes are the
    plan's. Greedy tokens equal Hugging Face's generate() under the same autocast, and in fp32 the
    decoder is unchanged (tests/test_generation.py)."""
    model = model_of("a", "fp32", seed=1)
    rows, max_length = SHAPES["a"][4:]
    decoder = StaticKVDecoder(model, use_cuda_graph=False)
    prompts = worst_batch(rows, max_length)
    ids = torch.tensor([[0] * (max_length - 1 - len(p)) + p for p in prompts])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        decoder.start(ids, (ids != 0).long(), NEW_TOKENS)
    cache = decoder.keys + decoder.values
    assert {t.dtype for t in cache} == {torch.bfloat16}
    plan = memory_plan(model.config, nproc=1, tp=1, precision=Precision("bfloat16"), max_length=max_length,
                       max_new_tokens=NEW_TOKENS, gen_batch_size=rows)
    assert sum(t.numel() * t.element_size() for t in cache) == plan.kv_cache

    short = [[7, 8, 9, 10], [11, 12], [13, 14, 15, 16, 17, 18]]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = generate(model, short, "static", 64)
        want = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
                for p in short]
    assert got == want


def rss():
    """Resident bytes of this process, after glibc has handed its free pages back to the system (so
    that memory freed by earlier tests is not reused unseen)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_host_terms_equal_the_measured_rss():
    """--reference swap's bank and stash, and --offload-optimizer's arena, through the trainer's own
    SwappedReference and ParkedOptimizer, against the plan's host terms of the same model."""
    from spin_trainer.generation.rollouts import ParkedOptimizer
    from spin_trainer.optim import make_optimizer
    from spin_trainer.parallel.mesh import ParallelContext
    from spin_trainer.ref_policy import SwappedReference

    torch.set_num_threads(1)
    model = build_tiny_llama(4096, hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8,
                             num_kv_heads=4)   # 40 MB of fp32 weights
    plan = memory_plan(model.config, nproc=1, tp=1, precision=Precision("float32"), reference="swap",
                       offload_optimizer=True)
    reference = SwappedReference(model, scorer=None)
    before = rss()
    reference.begin_iteration()
    with reference.weights():   # θ_t swapped in: the policy's weights wait in the stash
        bank = rss() - before
    assert bank == pytest.approx(plan.host.reference_bank, rel=0.1)

    optimizer = make_optimizer(model, ctx=ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu")), lr=1e-3)
    before = rss()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for p in model.parameters():
        p.grad = None
    with ParkedOptimizer(optimizer).parked():   # the state now lives in the host arena alone
        offloaded = rss() - before
    assert offloaded == pytest.approx(plan.host.optimizer_offload, rel=0.1)


def test_loading_term_equals_the_measured_allocations(tmp_path):
    """Loading allocates the local shards and, one weight at a time, the slice read from the files:
    beside the shards, at most the largest one (the plan's loading term), not the whole model."""
    from spin_trainer.parallel.load import load_parallel_model
    from spin_trainer.parallel.mesh import ParallelContext

    build_tiny_llama(4096, hidden_size=512, intermediate_size=1376, num_layers=2, num_heads=8,
                     num_kv_heads=4).save_pretrained(tmp_path)
    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    with LiveTensorBytes([]) as live:
        model = load_parallel_model(str(tmp_path), ctx, Precision("float32"), attention="sdpa")
    plan = memory_plan(model.config, nproc=1, tp=1, precision=Precision("float32"))
    assert live.peak - plan.parameters == pytest.approx(plan.host.loading, rel=0.1)
    assert plan.host.loading < plan.parameters / 4
    assert plan.loading == plan.parameters + plan.host.loading   # on the device: the shards, then the slice


def test_plan_prints_per_node_host_memory(capsys):
    """70B at tp 8: --reference swap pins 2x the local fp32 weights, 72.6 GiB per 8-GPU node, and
    --offload-optimizer 36 GiB more; the node holds the larger of that and loading the model."""
    plan = train_cli.main(["--plan", "--model", os.path.join(CONFIGS, "llama-3-70b"), "--nproc", "64", "--tp", "8",
                           "--dtype", "bfloat16", "--reference", "swap", "--offload-optimizer",
                           "--host-memory-gib", "4096"])
    host = plan.host
    assert host.ranks_per_node == 8
    assert 8 * host.reference_bank / GIB == pytest.approx(72.6, abs=0.05)
    assert 8 * host.optimizer_offload / GIB == pytest.approx(72.6, abs=0.05)   # AdamW: 2 x 4 bytes / 64 ranks
    assert host.loading == 4 * 128256 * 8192 // 8   # the embeddings' FSDP shard (dp 8), fp32
    assert host.per_node == 8 * (max(host.loading, host.reference_bank + host.optimizer_offload) + host.allowance)
    out = capsys.readouterr().out
    match = re.search(r"host memory per node: +(\d+\.\d\d) GiB .* 4096 GiB per node: the estimate fits", out)
    assert match and float(match.group(1)) == pytest.approx(host.per_node / GIB, abs=0.005)
    rows = int(re.search(r"largest generation batch that fits: (\d+) rows", out).group(1))
    assert rows == plan.generation_rows_that_fit(80 * GIB)
    free = 80 * GIB - plan.generation_resident
    assert plan.generation.total(rows) <= free < plan.generation.total(rows + 1)


def test_a_training_run_lowers_the_generation_batch_to_what_fits(tmp_path, monkeypatch, capsys):
    """The plan's largest generation batch caps --gen-batch-size before any model is loaded (the run
    stops at the tokenizer, which configs/ does not ship)."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    data = tiny_setup(str(tmp_path))
    argv = train_args(os.path.join(CONFIGS, "llama-2-7b"), *data[1:], str(tmp_path / "out"), "--max-length", "1024",
                      "--device-memory-gib", "120", "--gen-batch-size", "64")
    config = parse_config(argv)
    with pytest.raises(Exception, match="tokenizer"):
        train_cli.train(config)
    fitting = int(re.search(r"--gen-batch-size 64 lowered to (\d+)", capsys.readouterr().err).group(1))
    assert config.generation.gen_batch_size == fitting   # what the rollouts and held-out evaluation read
    from transformers import AutoConfig
    plan = memory_plan(AutoConfig.from_pretrained(os.path.join(CONFIGS, "llama-2-7b")), nproc=1, tp=1,
                       precision=Precision("float32"), max_length=1024, max_new_tokens=5, gen_batch_size=64)
    assert 1 <= fitting == plan.generation_rows_that_fit(120 * GIB) < 64

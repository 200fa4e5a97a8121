"""Loading straight into the parallel layout (parallel/load.py) equals loading the whole model and
parallelizing it: every rank's local shards of parameters and buffers, bit for bit, on 2 gloo
processes (FSDP, replicas, tp=2, a bf16 checkpoint into fp32 master weights, a tied Qwen2 with
biases; and the first optimizer step's loss) and on 4 (dp=2 x tp=2: FSDP's strided shards of
tensor-parallel shards), and in one process without FSDP. Each rank reads from the files exactly
the bytes of its own shards: no rank holds the whole model."""
import os
from datetime import timedelta

import pytest
import safetensors
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors import safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM

from trainer_cases import fixed_pairs, free_port, pair_items, step_trainer

from spin_kernels.dtensor import local_tensor
from spin_trainer.errors import UsageError
from spin_trainer.generation.rollouts import pair_logps
from spin_trainer.logprobs import Scorer
from spin_trainer.model import build_char_tokenizer, create_default_model, load_model, load_tokenizer
from spin_trainer.parallel import load as loading
from spin_trainer.parallel.apply import parallelize_model
from spin_trainer.parallel.load import load_parallel_model
from spin_trainer.parallel.mesh import ParallelContext, setup_parallel, teardown_parallel
from spin_trainer.parallel.precision import Precision

PAIRS = 4
SMALL = dict(hidden_size=32, intermediate_size=64)
# (model, tp, dtype, dp_shard) per world size.
CASES = {2: [("llama", 1, "float32", None), ("llama", 2, "float32", None),
             ("llama", 1, "float32", False), ("llama_bf16_files", 1, "float32", None),
             ("qwen2_tied", 1, "float32", None)],
         4: [("llama", 2, "float32", None)]}


def save_tied_qwen2(path):
    tokenizer = build_char_tokenizer("0123456789+=")
    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    dirs = {name: str(root / name) for name in ("llama", "llama_bf16_files", "qwen2_tied")}
    create_default_model(dirs["llama"], **SMALL)
    create_default_model(dirs["llama_bf16_files"], dtype=torch.bfloat16, seed=1, **SMALL)
    save_tied_qwen2(dirs["qwen2_tied"])
    # The same weights in several files (model.safetensors.index.json), and pickled (.bin) alone.
    model = load_model(dirs["llama"])
    dirs["llama_shards"] = str(root / "llama_shards")
    model.save_pretrained(dirs["llama_shards"], max_shard_size="20KB")
    assert len(set(loading.weight_locations(dirs["llama_shards"])[k][0] for k in model.state_dict())) > 1
    dirs["llama_bin"] = str(root / "llama_bin")
    model.config.save_pretrained(dirs["llama_bin"])
    torch.save(model.state_dict(), os.path.join(dirs["llama_bin"], "pytorch_model.bin"))
    return dirs


class CountingReads:
    """safe_open whose slices and tensors add the bytes they return to `self.bytes`."""

    def __init__(self, opener):
        self.opener, self.bytes = opener, 0

    def __call__(self, *args, **kwargs):
        counter = self

        class Weight:
            def __init__(self, weight):
                self.weight = weight

            def __getitem__(self, index):
                piece = self.weight[index]
                counter.bytes += piece.numel() * piece.element_size()
                return piece

            def get_shape(self):
                return self.weight.get_shape()

            def get_dtype(self):
                return self.weight.get_dtype()

        class Handle:
            def __init__(self, handle):
                self.handle = handle

            def __enter__(self):
                self.inner = self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def metadata(self):
                return self.inner.metadata()

            def get_slice(self, key):
                return Weight(self.inner.get_slice(key))

            def get_tensor(self, key):
                tensor = self.inner.get_tensor(key)
                counter.bytes += tensor.numel() * tensor.element_size()
                return tensor

        return Handle(self.opener(*args, **kwargs))


def tensors(model):
    return list(model.named_parameters()) + list(model.named_buffers())


def first_loss(model, model_dir, ctx, precision):
    tokenizer = load_tokenizer(model_dir)
    examples, generated = fixed_pairs(tokenizer, PAIRS)
    scorer = Scorer(ctx, precision, "logits")
    logps = pair_logps(model, examples, generated, scorer, micro_batch_size=2, pad_token_id=tokenizer.pad_token_id)
    reference = logps - torch.linspace(-0.5, 0.5, PAIRS * 2).reshape(PAIRS, 2)
    per_rank = PAIRS // ctx.dp_size
    trainer = step_trainer(model, scorer, pairs=PAIRS, micro_batch_size=1)
    items = pair_items(examples, generated, reference, tokenizer.pad_token_id, start=ctx.dp_rank * per_rank,
                       count=per_rank, micro=1)
    return trainer.train_step(items)["loss"]


def compare(name, tp, dtype, dp_shard, model_dir, with_step):
    precision = Precision(dtype)
    ctx = setup_parallel(tp, "cpu", dp_shard=dp_shard, fsdp_alone=precision.mixed)
    plain = parallelize_model(load_model(model_dir, attention="sdpa", dtype=precision.param_dtype_name,
                                         compute_dtype=dtype), ctx, precision)
    reads = CountingReads(safetensors.safe_open)   # DCP's reader opens the files through the package's name
    safetensors.safe_open = reads
    try:
        streamed = load_parallel_model(model_dir, ctx, precision, attention="sdpa", compute_dtype=dtype)
    finally:
        safetensors.safe_open = reads.opener
    differing = [n for (n, a), (m, b) in zip(tensors(plain), tensors(streamed), strict=True)
                 if n != m or a.dtype != b.dtype or getattr(a, "placements", None) != getattr(b, "placements", None)
                 or not torch.equal(local_tensor(a), local_tensor(b))]
    # What the rank's shards of the weights in the files take in the files' dtype.
    files = loading.weight_locations(model_dir)
    file_element = {}
    for key, (file, _) in files.items():
        with safe_open(file, framework="pt") as f:
            file_element[key] = {"F32": 4, "BF16": 2}[f.get_slice(key).get_dtype()]
    local_bytes = sum(local_tensor(p).numel() * file_element[n] for n, p in streamed.named_parameters())
    full_bytes = sum(torch.Size(shape).numel() * file_element[key] for key, (_, shape) in files.items())
    tied = streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    return {"differing": differing, "tied": tied, "training": (plain.training, streamed.training),
            "read": reads.bytes, "local": local_bytes, "full": full_bytes,
            "loss": (first_loss(plain, model_dir, ctx, precision), first_loss(streamed, model_dir, ctx, precision))
            if with_step else (0.0, 0.0)}


def _worker(rank, world_size, port, dirs, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=180))
    # The first step on 2 processes; 4 check the shards alone (the whole loop on dp2 x tp2 runs in
    # test_train_parallel.py through the trainer's loader).
    results = {case: compare(*case, dirs[case[0]], with_step=world_size == 2) for case in CASES[world_size]}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_loading_into_the_layout_equals_loading_then_parallelizing(model_dirs, tmp_path, world_size):
    mp.spawn(_worker, args=(world_size, free_port(), model_dirs, str(tmp_path)), nprocs=world_size, join=True)
    for rank in range(world_size):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for case, got in results.items():
            assert got["differing"] == [], (rank, case)
            assert got["tied"] == case[0].endswith("tied"), (rank, case)
            assert got["training"] == (False, False)
            plain_loss, streamed_loss = got["loss"]
            assert torch.equal(torch.as_tensor(plain_loss), torch.as_tensor(streamed_loss)), (rank, case)
            # Each rank reads its shards and nothing else; sharded layouts read about 1/n of the model.
            assert got["read"] == got["local"], (rank, case)
            replicated = case[1] == 1 and case[3] is False
            assert got["read"] == got["full"] if replicated else got["read"] < 0.6 * got["full"], (rank, case)


@pytest.mark.parametrize("name", ["llama_bf16_files", "qwen2_tied", "llama_shards", "llama_bin"])
def test_one_process_without_fsdp_loads_the_same_model_with_tied_weights_shared(model_dirs, name):
    """No FSDP (one process, fp32): to_empty gives each name of a tied weight its own tensor; the
    loader ties them again. Weights in several files are found; pickled ones load the old way."""
    ctx = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))
    plain = load_model(model_dirs[name], attention="sdpa")
    streamed = load_parallel_model(model_dirs[name], ctx, Precision("float32"), attention="sdpa")
    assert [(n, a.dtype) for n, a in tensors(plain)] == [(n, b.dtype) for n, b in tensors(streamed)]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(tensors(plain), tensors(streamed)))
    tied = streamed.get_output_embeddings().weight is streamed.get_input_embeddings().weight
    assert tied == name.endswith("tied") and not streamed.training


def test_weights_that_do_not_match_the_architecture_are_refused_before_loading(model_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    precision = Precision("float32")
    ctx = setup_parallel(1, "cpu")
    weights = load_file(os.path.join(model_dirs["llama"], "model.safetensors"))
    cases = {"missing": {k: v for k, v in weights.items() if k != "model.norm.weight"},
             "unexpected": {**weights, "model.extra.weight": torch.zeros(2)},
             "mismatched": {**weights, "model.norm.weight": torch.zeros(3)}}
    for case, changed in cases.items():
        broken = tmp_path / case
        create_default_model(str(broken), **SMALL)
        save_file(changed, str(broken / "model.safetensors"), metadata={"format": "pt"})
        with pytest.raises(UsageError, match=r"weight\(s\)"):
            load_parallel_model(str(broken), ctx, precision)
    teardown_parallel(ctx)

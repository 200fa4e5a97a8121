"""The Hugging Face export: written through DCP's HF writer and consolidated on one rank, in the
chosen dtype, split into files of bounded size; what transformers loads back is the model."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from spin_trainer import cli as train_cli
from spin_trainer.checkpoint import save_checkpoint
from spin_trainer.errors import UsageError
from spin_trainer.options import parse_config

from spin_trainer.parallel.mesh import ParallelContext
from spin_trainer.export import export_hf, resolve_export_dtype
from spin_trainer.model import create_default_model, load_model, load_tokenizer

CTX = ParallelContext(0, 1, 1, 1, 0, 0, torch.device("cpu"))


def test_auto_export_dtype_is_the_input_models():
    assert resolve_export_dtype("auto", SimpleNamespace(dtype=torch.bfloat16)) is torch.bfloat16
    assert resolve_export_dtype("auto", SimpleNamespace(dtype="float16")) is torch.float16
    assert resolve_export_dtype("auto", SimpleNamespace(dtype=None, torch_dtype="bfloat16")) is torch.bfloat16
    assert resolve_export_dtype("auto", SimpleNamespace()) is torch.float32
    assert resolve_export_dtype("float16", SimpleNamespace(dtype=torch.bfloat16)) is torch.float16
    with pytest.raises(UsageError, match="--export-dtype auto: the input model's config.torch_dtype is torch.float64"):
        resolve_export_dtype("auto", SimpleNamespace(dtype=torch.float64))
    with pytest.raises(SystemExit):   # the command line offers only the dtypes there are
        parse_config(["--export-dtype", "int8"])


@pytest.mark.parametrize("tied", [False, True])
def test_export_in_bfloat16_split_into_files_loads_back(tmp_path, tied):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = create_default_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=tied)
    model = load_model(model_dir, attention="eager")
    with torch.no_grad():
        model.lm_head.weight.add_(0.01)   # a trained model differs from the input one
    out = str(tmp_path / "final")
    # ~4 files for this ~60 KB (bfloat16) model
    export_hf(model, load_tokenizer(model_dir), out, CTX, dtype=torch.bfloat16, max_file_bytes=16 * 1024)
    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        files = set(json.load(f)["weight_map"].values())
    assert len(files) > 1 and all(os.path.isfile(os.path.join(out, name)) for name in files)
    assert not os.path.exists(os.path.join(out, "sharded"))
    assert AutoConfig.from_pretrained(out).dtype == torch.bfloat16
    assert model.config.dtype == torch.float32   # the live model's config is left as it was
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.config.tie_word_embeddings == tied
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, expected[name].to(torch.bfloat16)), name
    assert not any(name.startswith(".tmp-export") for name in os.listdir(tmp_path))


def reload_and_generate(out, tied, expected):
    """The exported directory as transformers loads it: the weights of `expected` (full names, in the
    export's dtype), the tie kept, and a generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert loaded.config.tie_word_embeddings == tied
    head, embedding = loaded.lm_head.weight, loaded.model.embed_tokens.weight
    assert (head is embedding) == tied
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, expected[name].to(tensor.dtype), rtol=0, atol=0, msg=name)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("12+34=", return_tensors="pt")
    generated = loaded.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    return loaded


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("weights, export", [("float32", "float32"), ("float32", "bfloat16"),
                                             ("bfloat16", "bfloat16")])
def test_tied_and_untied_models_export_in_every_dtype_and_reload_generating(tmp_path, tied, weights, export):
    model_dir = create_default_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=tied)
    model = load_model(model_dir, attention="eager", dtype=weights)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.01)   # trained: differs from the input model (and, tied, the head)
    out = str(tmp_path / "final")
    export_hf(model, load_tokenizer(model_dir), out, CTX, dtype=getattr(torch, export))
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)   # a tied weight is written once, as transformers does
    loaded = reload_and_generate(out, tied, model.state_dict())
    assert loaded.dtype == getattr(torch, export)


def _export_under_fsdp(rank, world_size, port, model_dir, outs, checkpoints, run_args):
    import torch.distributed as dist
    from datetime import timedelta

    from spin_trainer.parallel.apply import parallelize_model
    from spin_trainer.parallel.mesh import setup_parallel, teardown_parallel
    from spin_trainer.parallel.precision import Precision

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    ctx = setup_parallel(1, "cpu")
    model = parallelize_model(load_model(model_dir, attention="eager"), ctx, Precision("float32"))
    with torch.no_grad():
        for parameter in model.parameters():   # each rank moves its own shard: the export must gather them
            parameter.add_(0.01)
    for dtype, out in outs.items():
        export_hf(model, load_tokenizer(model_dir), out, ctx, dtype=getattr(torch, dtype))
    # The same weights as a checkpoint of a 2-process run, for `spin-train export` on one process.
    save_checkpoint(checkpoints, 1, model=model, optimizer=torch.optim.SGD(model.parameters()), reference=None,
                    loop_state={}, ctx=ctx, keep=1)
    # Last, as it tears the process group down: a whole 2-process run of the tied model.
    train_cli.main(run_args)


def test_a_tied_model_sharded_by_fsdp_on_2_ranks_exports_and_reloads(tmp_path):
    """Also: its 2-process checkpoint converted by `spin-train export` on this one process, and a
    whole 2-process run of the tied model (its generations gathered, its exports reloading tied)."""
    import torch.multiprocessing as mp
    from trainer_cases import free_port, tiny_setup, train_args

    model_dir = create_default_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64,
                                     tie_word_embeddings=True)
    outs = {dtype: str(tmp_path / dtype) for dtype in ("float32", "bfloat16")}
    checkpoints = str(tmp_path / "checkpoints")
    run = str(tmp_path / "run")
    run_args = train_args(model_dir, *tiny_setup(str(tmp_path / "data"))[1:], run, "--iterations", "1")
    mp.spawn(_export_under_fsdp, args=(2, free_port(), model_dir, outs, checkpoints, run_args), nprocs=2, join=True)
    expected = {name: tensor + 0.01 for name, tensor in load_model(model_dir).state_dict().items()}
    for dtype, out in outs.items():
        loaded = reload_and_generate(out, True, expected)
        assert loaded.dtype == getattr(torch, dtype)
    step = os.path.join(checkpoints, "step-00000001")
    converted = {"float32": str(tmp_path / "converted32"), "bfloat16": str(tmp_path / "converted16")}
    train_cli.main(["export", step, converted["float32"], "--model", model_dir])   # auto: the model's float32
    train_cli.main(["export", step, converted["bfloat16"], "--model", model_dir, "--dtype", "bfloat16"])
    for dtype, out in converted.items():
        loaded = reload_and_generate(out, True, expected)
        assert loaded.dtype == getattr(torch, dtype)
    with pytest.raises(UsageError, match="pass --model"):   # no run's config.yaml above this checkpoint
        train_cli.main(["export", step, str(tmp_path / "x")])
    with pytest.raises(UsageError, match="not a checkpoint directory"):
        train_cli.main(["export", checkpoints, str(tmp_path / "x"), "--model", model_dir])
    other_vocab = create_default_model(str(tmp_path / "other"), hidden_size=32, intermediate_size=64,
                                       vocab_multiple=12, tie_word_embeddings=True)
    with pytest.raises(UsageError, match=r"tensor lm_head.weight has shape \[16, 32\] there and \[24, 32\] in that"):
        train_cli.main(["export", step, str(tmp_path / "y"), "--model", other_vocab])
    assert not os.path.exists(tmp_path / "y")
    for taken in (run, converted["float32"]):   # a run's OUT, an earlier export: never replaced
        before = sorted(os.listdir(taken))
        with pytest.raises(UsageError, match="already exists and is not empty"):
            train_cli.main(["export", step, taken, "--model", model_dir])
        assert sorted(os.listdir(taken)) == before

    with open(os.path.join(run, "generations", "iter-1.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["index"] for line in f] == list(range(32))   # both ranks' prompts, once
    last = sorted(os.listdir(os.path.join(run, "checkpoints", "spin")))[-1]
    converted = train_cli.main(["export", os.path.join(run, "checkpoints", "spin", last), str(tmp_path / "c")])
    final = reload_and_generate(os.path.join(run, "final"), True, load_model(converted).state_dict())
    assert final.dtype == torch.float32
    reload_and_generate(os.path.join(run, "iter-1"), True, final.state_dict())   # in bfloat16


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tied_models_of_other_families_export_and_reload_tied(tmp_path, family):
    """Qwen2 and GPT-2 tie their heads under other names (GPT-2: transformer.wte.weight)."""
    from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

    tokenizer = load_tokenizer(create_default_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64))
    config = (Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
              if family == "qwen2" else GPT2Config(vocab_size=16, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    out = export_hf(model, tokenizer, str(tmp_path / "final"), CTX, dtype=torch.float32)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    assert loaded.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=0).shape[1] > 3

"""The Hugging Face export: written through DCP's HF writer and consolidated on one rank, in the
chosen dtype, split into files of bounded size; what transformers loads back is the model."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

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

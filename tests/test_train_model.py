"""Attention selection (flash_attention_2 when usable on CUDA, else SDPA), the tiny default model,
and the trainer on a GPU (marked `cuda`)."""
import collections
import importlib.util
import json
import os

import pytest
import torch

from trainer_cases import tiny_setup, train_args

from spin_trainer.options import parse_config
from spin_trainer.errors import UsageError
from spin_trainer import cli as train_cli
from spin_trainer.model import choose_attention, create_default_model, load_model, load_tokenizer


@pytest.fixture
def attention_calls(monkeypatch):
    """Counts, by implementation, the attention calls Llama layers actually make: the functions of
    transformers' attention registry, and the modeling file's own eager attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama import modeling_llama

    calls = collections.Counter()

    def spy(name, original):
        def counted(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return counted

    for name in ("sdpa", "flash_attention_2"):
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, name, spy(name, ALL_ATTENTION_FUNCTIONS[name]))
    monkeypatch.setattr(modeling_llama, "eager_attention_forward",
                        spy("eager", modeling_llama.eager_attention_forward))
    return calls


def test_attention_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_attention("auto", cpu) == "sdpa"
    assert choose_attention("eager", cpu) == "eager"
    with pytest.raises(UsageError, match="--attn flash_attention_2 needs a CUDA device"):
        choose_attention("flash_attention_2", cpu)
    with pytest.raises(SystemExit):   # the command line offers only the kernels there are
        parse_config(["--attn", "flash"])
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attention("auto", cuda) == "flash_attention_2"
    assert choose_attention("auto", cuda, torch.float32) == "sdpa"     # flash-attn has no fp32 kernels
    with pytest.raises(UsageError, match="--dtype bfloat16 or float16"):
        choose_attention("flash_attention_2", cuda, torch.float32)
    assert choose_attention("sdpa", cuda) == "sdpa"
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attention("auto", cuda) == "sdpa"


def test_tiny_default_loads_with_the_chosen_attention_and_round_trips_text(tmp_path, attention_calls):
    from transformers import AutoTokenizer

    model_dir = create_default_model(str(tmp_path / "m"), hidden_size=32, intermediate_size=64)
    eager = load_model(model_dir, attention="eager")
    sdpa = load_model(model_dir, attention="auto")
    ids = torch.tensor([[1, 6, 7, 4, 8, 9, 15]])
    layers = eager.config.num_hidden_layers
    with torch.no_grad():
        eager_logits = eager(ids).logits
        assert dict(attention_calls) == {"eager": layers}  # what the forward ran, not what the config says
        attention_calls.clear()
        sdpa_logits = sdpa(ids).logits
        assert dict(attention_calls) == {"sdpa": layers}
    torch.testing.assert_close(eager_logits, sdpa_logits, rtol=1e-5, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert tokenizer.decode(tokenizer("98+7=105", add_special_tokens=False)["input_ids"]) == "98+7=105"
    assert load_tokenizer(model_dir).eos_token_id == eager.config.eos_token_id
    assert eager.config.vocab_size % 4 == 0 and eager.config.vocab_size >= len(tokenizer)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_runs_on_cuda_in_bf16(tmp_path, attention_calls):
    setup = tiny_setup(str(tmp_path))
    out = str(tmp_path / "run")
    rows = train_cli.main(train_args(*setup, out, "--device", "cuda", "--dtype", "bfloat16",
                                     "--reference", "swap", "--offload-optimizer"))
    assert [r["step"] for r in rows] == [0, 4, 8]
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["kind"] == "train"]
    assert len(losses) == 8 and all(0 < loss < 10 for loss in losses)
    # Every attention call of the run's forwards (training, reference log-probs, evaluation) went to
    # the implementation --attn auto picks (generation's static decoder has its own).
    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert set(attention_calls) == {expected} and attention_calls[expected] > 0, attention_calls

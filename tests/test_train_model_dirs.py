"""Model directories that must not train: broken config.json, truncated weights, weights of another
architecture, a model that is not a causal LM, and code shipped with a model (never run unless
--trust-remote-code). A Hub id is fetched through the Hugging Face cache, with a clear error offline."""
import json
import os
import shutil

import pytest

from trainer_cases import ROOT, tiny_setup, train_args

from spin_trainer import cli as train_cli
from spin_trainer.errors import UsageError
from spin_trainer.model import load_model, load_tokenizer, local_model_dir

QUICK = ["--iterations", "1", "--max-steps", "1"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("model_dirs")))


def broken_copy(model_dir, tmp_path, edit):
    path = str(tmp_path / "model")
    shutil.copytree(model_dir, path)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    edit(path, config)
    return path


def write_config(path, config):
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)


def truncate_weights(path, config):
    weights = os.path.join(path, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)


GPT2_OVER_LLAMA = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 16, "n_positions": 64}


@pytest.mark.parametrize("edit, expected", [
    (lambda p, c: write_config(p, None), "config.json holds NoneType, not a mapping of settings"),
    (lambda p, c: write_config(p, {**c, "hidden_size": -32}), "config.json: hidden_size must be a positive integer, "
                                                             "got -32"),
    (lambda p, c: write_config(p, {**c, "num_hidden_layers": 100_000}), "num_hidden_layers 100000 is more layers"),
    (truncate_weights, "could not load a causal LM (SafetensorError: "),
    (lambda p, c: write_config(p, {"model_type": "t5", "d_model": 32, "vocab_size": 16}),
     "model type 't5' is not a causal language model"),
    (lambda p, c: write_config(p, GPT2_OVER_LLAMA), "27 weight(s) of GPT2LMHeadModel are not in the weight files"),
])
def test_a_broken_model_directory_is_refused_before_training(tiny, tmp_path, edit, expected):
    model_dir = broken_copy(tiny[0], tmp_path, edit)
    out = tmp_path / "run"
    with pytest.raises(UsageError) as info:
        train_cli.main(train_args(model_dir, *tiny[1:], str(out), *QUICK))
    assert expected in str(info.value)
    assert not out.exists()   # refused before anything was written: no --out left behind


def test_code_shipped_with_a_model_never_runs_without_trust_remote_code(tiny, tmp_path, monkeypatch):
    marker = tmp_path / "the model's code ran"

    def ship_code(path, config):
        write_config(path, {**config, "model_type": "shipped", "auto_map": {
            "AutoConfig": "shipped.ShippedConfig", "AutoModelForCausalLM": "shipped.ShippedModel"}})
        with open(os.path.join(path, "shipped.py"), "w", encoding="utf-8") as f:
            f.write(f"open({str(marker)!r}, 'w').close()\n"
                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                    "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n"
                    "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n")

    model_dir = broken_copy(tiny[0], tmp_path, ship_code)
    monkeypatch.setattr("sys.stdin", open(os.devnull))   # nobody can answer a prompt with 'yes'
    message = r"model type 'shipped' exists only in Python code shipped with the model .* --trust-remote-code"
    with pytest.raises(UsageError, match=message):
        train_cli.main(train_args(model_dir, *tiny[1:], str(tmp_path / "run"), *QUICK))
    with pytest.raises(UsageError, match=message):
        train_cli.main(["--plan", "--model", model_dir, "--nproc", "8"])
    assert not marker.exists()


def test_a_known_model_type_with_shipped_code_loads_the_built_in_class(tiny, tmp_path):
    """transformers prefers a model's own code for a type it knows only when trusted."""
    marker = tmp_path / "the model's code ran"

    def ship_code(path, config):
        write_config(path, {**config, "auto_map": {"AutoConfig": "shipped.ShippedConfig",
                                                    "AutoModelForCausalLM": "shipped.ShippedModel"}})
        with open(os.path.join(path, "shipped.py"), "w", encoding="utf-8") as f:
            f.write(f"open({str(marker)!r}, 'w').close()\n"
                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                    "class ShippedConfig(LlamaConfig):\n    pass\n"
                    "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n")

    model_dir = broken_copy(tiny[0], tmp_path, ship_code)
    assert type(load_model(model_dir)).__name__ == "LlamaForCausalLM"
    load_tokenizer(model_dir)
    assert not marker.exists()


def test_a_hub_id_is_fetched_into_the_cache_and_offline_is_a_clear_error(tiny, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    asked = []

    def cached(repo_id, allow_patterns):
        asked.append((repo_id, allow_patterns))
        return tiny[0]

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    assert local_model_dir("org/tiny-model") == tiny[0]
    assert asked[0][0] == "org/tiny-model" and "*.py" not in asked[0][1] and "*.bin" not in asked[0][1]

    def offline(repo_id, allow_patterns):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UsageError, match=r"--model 'org/tiny-model': no such local directory, and the Hugging Face "
                                         r"Hub could not provide it \(LocalEntryNotFoundError: Cannot find"):
        local_model_dir("org/tiny-model")
    # A path that cannot be a Hub id is only a missing directory.
    with pytest.raises(UsageError, match=r"--model '/no/such/model': no such directory"):
        local_model_dir("/no/such/model")


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_plan_refuses_device_memory_that_is_not_a_positive_number(value):
    with pytest.raises(UsageError, match=r"--device-memory-gib must be finite and > 0"):
        train_cli.main(["--plan", "--model", os.path.join(ROOT, "configs", "llama-2-7b"), "--nproc", "8",
                        "--device-memory-gib", value])


def test_plan_refuses_a_config_with_absurd_sizes_at_once(tmp_path):
    """100,000 layers would keep the plan's meta-device build busy for minutes."""
    with open(os.path.join(ROOT, "configs", "llama-2-7b", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for name, value, expected in (("num_hidden_layers", 100_000, "num_hidden_layers 100000 is more layers"),
                                  ("hidden_size", -1, "hidden_size must be a positive integer, got -1")):
        write_config(str(tmp_path), {**config, name: value})
        with pytest.raises(UsageError, match=expected):
            train_cli.main(["--plan", "--model", str(tmp_path), "--nproc", "8"])

"""Data as users hold it: every record format and source gives the same examples; splits, field
options, a BOM, records that fit two formats, and a Hub name offline."""
import json
import os

import pytest

from tokenizer_families import qwen2_style
from trainer_cases import write_jsonl

from spin_trainer.config import RunConfig
from spin_trainer.data import load_data
from spin_trainer.errors import UsageError

CHATS = [("What is 7 + 7?", "It is 14."), ("Write a poem about the sea.", "The sea is wide,\nthe sea is deep."),
         ("Café?", " Oui, un café.")]


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


FORMATS = {
    "ultrachat messages": [{"prompt": p, "prompt_id": str(i), "messages": user(p) + assistant(r)}
                           for i, (p, r) in enumerate(CHATS)],
    "trl conversational": [{"prompt": user(p), "completion": assistant(r)} for p, r in CHATS],
    "spin real/generated": [{"real": user(p) + assistant(r), "generated": user(p) + assistant("no")} for p, r in CHATS],
    "prompt list + response": [{"prompt": user(p), "response": r} for p, r in CHATS],
}


@pytest.fixture(scope="module")
def tokenizer():
    return qwen2_style()


def examples_of(path, tokenizer, **settings):
    return load_data(str(path), tokenizer, max_length=128, **settings)[0]


def test_every_chat_format_gives_the_same_examples(tokenizer, tmp_path):
    want = examples_of(write_jsonl(tmp_path / "want.jsonl", FORMATS["ultrachat messages"]), tokenizer)
    assert len(want) == len(CHATS)
    for name, records in FORMATS.items():
        assert examples_of(write_jsonl(tmp_path / "d.jsonl", records), tokenizer) == want, name
    custom = [{"question": user(p), "answer": r, "id": 3} for p, r in CHATS]
    fields = ("question", "answer", None)
    assert examples_of(write_jsonl(tmp_path / "c.jsonl", custom), tokenizer, fields=fields) == want
    conversations = [{"chat": user(p) + assistant(r), "prompt": p, "response": "not this"} for p, r in CHATS]
    assert examples_of(write_jsonl(tmp_path / "m.jsonl", conversations), tokenizer,
                       fields=(None, None, "chat")) == want


def test_plain_prompt_completion_is_prompt_response(tokenizer, tmp_path):
    plain = [{"prompt": p, "completion": r} for p, r in CHATS]
    same = [{"prompt": p, "response": r} for p, r in CHATS]
    got = examples_of(write_jsonl(tmp_path / "a.jsonl", plain), tokenizer)
    assert got == examples_of(write_jsonl(tmp_path / "b.jsonl", same), tokenizer)
    assert tokenizer.decode(got[0].prompt_ids) == "What is 7 + 7?"   # no chat template on plain text (as TRL)


def test_every_source_gives_the_same_examples(tokenizer, tmp_path):
    import datasets

    records = FORMATS["trl conversational"]
    want = examples_of(write_jsonl(tmp_path / "d.jsonl", records), tokenizer)
    (tmp_path / "d.json").write_text(json.dumps(records), encoding="utf-8")
    assert examples_of(tmp_path / "d.json", tokenizer) == want
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "d.parquet"))
    assert examples_of(tmp_path / "d.parquet", tokenizer) == want
    table.save_to_disk(str(tmp_path / "one"))
    assert examples_of(tmp_path / "one", tokenizer) == want
    other = datasets.Dataset.from_list(FORMATS["trl conversational"][:1])
    datasets.DatasetDict({"train_sft": table, "test_sft": other}).save_to_disk(str(tmp_path / "two"))
    assert examples_of(tmp_path / "two", tokenizer, split="train_sft") == want
    assert examples_of(tmp_path / "two", tokenizer, split="test_sft") == want[:1]
    with pytest.raises(UsageError, match="has no split 'train'; its splits: train_sft, test_sft"):
        examples_of(tmp_path / "two", tokenizer)


def test_a_leading_bom_is_read(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", FORMATS["trl conversational"])
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert examples_of(bom, tokenizer) == examples_of(path, tokenizer)


@pytest.mark.parametrize("record, expected", [
    ({"prompt": "a", "response": "b", "completion": "c"}, "fits two formats (prompt/response and prompt/completion)"),
    ({"real": user("a") + assistant("b"), "messages": user("a") + assistant("b")},
     "fits two formats (messages and real/generated)"),
    ({"prompt": user("a"), "completion": user("b")}, "'completion' as a list must hold exactly one message"),
    ({"prompt": 3, "completion": "b"}, "field 'prompt' must be a string or a list of messages, got int"),
])
def test_records_that_do_not_read_one_way_are_refused(tokenizer, tmp_path, record, expected):
    with pytest.raises(UsageError) as info:
        examples_of(write_jsonl(tmp_path / "d.jsonl", [record]), tokenizer)
    assert "record 1: " in str(info.value) and expected in str(info.value), str(info.value)


def test_field_options_are_checked(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "r": "b"}])
    with pytest.raises(UsageError, match="no 'answer' field"):
        examples_of(path, tokenizer, fields=("q", "answer", None))
    config = RunConfig()
    config.data.prompt_field = "q"
    with pytest.raises(UsageError, match="--prompt-field and --response-field go together"):
        config.check()
    config.data.response_field, config.data.messages_field = "r", "m"
    with pytest.raises(UsageError, match="not both"):
        config.check()


def test_a_hub_name_offline_is_a_clear_error(tokenizer, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"--train-data 'someone/ultrachat-like': could not be read \(a Hub dataset "
                                         r"name: is it spelled right, and is the Hub reachable\?\)"):
        load_data("someone/ultrachat-like", tokenizer, max_length=64, source="--train-data")


def test_a_data_directory_is_fingerprinted_by_content(tmp_path):
    """--resume compares --train-data's fingerprint: a save_to_disk directory by its files' contents."""
    import shutil

    import datasets

    from spin_trainer.fingerprint import data_fingerprint

    datasets.Dataset.from_list(FORMATS["trl conversational"]).save_to_disk(str(tmp_path / "a"))
    datasets.Dataset.from_list(FORMATS["trl conversational"][:2]).save_to_disk(str(tmp_path / "c"))
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    a = data_fingerprint(str(tmp_path / "a"))
    assert any(name.endswith(".arrow") for name in a) and data_fingerprint(str(tmp_path / "copy")) == a
    assert data_fingerprint(str(tmp_path / "c")) != a
    assert data_fingerprint("someone/ultrachat-like") == "hub dataset someone/ultrachat-like"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_run_on_chat_data_in_each_format(family, tmp_path):
    """spin-train on UltraChat-style data (messages, TRL conversational, SPIN real/generated, in JSONL,
    Parquet and a save_to_disk directory) with a model of the family's tokenizer: one SPIN step."""
    import datasets

    from tokenizer_families import FAMILIES
    from trainer_cases import train_args

    from spin_trainer import cli
    from spin_trainer.model import build_tiny_llama

    tokenizer = FAMILIES[family]()
    model_dir = str(tmp_path / "model")
    build_tiny_llama(len(tokenizer), hidden_size=32, intermediate_size=64, max_position_embeddings=128,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                     bos_token_id=tokenizer.bos_token_id).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    train = write_jsonl(tmp_path / "train.jsonl", FORMATS["ultrachat messages"] * 3)
    datasets.Dataset.from_list(FORMATS["trl conversational"] * 2).to_parquet(str(tmp_path / "val.parquet"))
    datasets.Dataset.from_list(FORMATS["spin real/generated"]).save_to_disk(str(tmp_path / "test"))
    args = train_args(model_dir, str(train), str(tmp_path / "val.parquet"), str(tmp_path / "test"),
                      str(tmp_path / "run"), "--iterations", "1", "--max-steps", "1", "--global-batch-size", "4",
                      "--micro-batch-size", "2")
    args[args.index("--max-length") + 1] = "96"
    cli.main(args)
    assert len(os.listdir(tmp_path / "run" / "tokenized")) == 3

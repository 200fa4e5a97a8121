"""Prompt/response masks (exact: EOS counts, no prompt token does), chat rendering, bad data files."""
import os

import pytest
import torch

from trainer_cases import tiny_setup, write_jsonl

from spin_trainer.errors import UsageError
from spin_trainer.data import IGNORE_INDEX, collate_pairs, collate_sft, load_examples
from spin_trainer.model import load_model, load_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_setup(str(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return load_tokenizer(tiny[0])


def test_mask_covers_exactly_the_response_and_its_eos(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "12+34=", "response": "46"},
                                              {"prompt": "5+5=", "response": "10"}])
    examples = load_examples(str(path), tokenizer, max_length=16)
    first = examples[0]
    # BOS + 6 prompt characters; "46" + EOS
    assert first.prompt_ids[0] == tokenizer.bos_token_id and len(first.prompt_ids) == 7
    assert list(first.response_ids) == tokenizer("46", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    batch = collate_sft(examples, tokenizer.pad_token_id)
    for row, example in enumerate(examples):
        scored = batch.labels[row][batch.loss_mask[row] == 1].tolist()
        assert scored == list(example.response_ids)          # every response token, EOS last
        assert batch.loss_mask[row].sum() == len(example.response_ids)
        first_scored = int(torch.nonzero(batch.loss_mask[row])[0])
        # Position t scores token t + 1: the first scored position is the last prompt token's.
        assert first_scored == len(example.prompt_ids) - 1
        assert batch.input_ids[row, first_scored] == example.prompt_ids[-1]
    assert (batch.labels[batch.loss_mask == 0] == IGNORE_INDEX).all()


def test_masked_logps_equal_manual_sum_over_response_tokens(tiny, tokenizer, tmp_path):
    from spin_kernels.loss import sequence_logprobs

    model = load_model(tiny[0])
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "3+4=", "response": "7"},
                                              {"prompt": "10+20=", "response": "30"}])
    examples = load_examples(str(path), tokenizer, max_length=16)
    generated = [[tokenizer.eos_token_id], tokenizer("999", add_special_tokens=False)["input_ids"]]
    batch = collate_pairs(examples, generated, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
        ours = sequence_logprobs(logits.float(), batch.labels, batch.loss_mask)
        responses = [e.response_ids for e in examples] + [tuple(g) for g in generated]
        prompts = [e.prompt_ids for e in examples] * 2
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            logp = torch.log_softmax(logits[row], dim=-1)
            manual = sum(float(logp[len(prompt) - 1 + k, token]) for k, token in enumerate(response))
            assert abs(float(ours[row]) - manual) < 1e-4


def test_chat_records_use_the_chat_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "1+2="},
                                                               {"role": "assistant", "content": "3"}]}])
    (example,) = load_examples(str(path), tokenizer, max_length=16)
    assert tokenizer.decode(example.prompt_ids) == "<s>1+2="
    assert tokenizer.decode(example.response_ids) == "3</s>"


def test_prompt_template_is_shared(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2", "response": "3"}])
    (example,) = load_examples(str(path), tokenizer, max_length=16, template="{prompt}=")
    assert tokenizer.decode(example.prompt_ids) == "<s>1+2="


def test_long_response_is_cut_to_the_context(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+1=", "response": "2222222222"}])
    (example,) = load_examples(str(path), tokenizer, max_length=8)
    assert len(example.prompt_ids) + len(example.response_ids) == 8


@pytest.mark.parametrize("content, expected", [
    (None, "no such file"),
    ("", "has no records"),
    ('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+2=", \n', ":2: not valid JSON"),
    ('[1, 2]\n', ":1: expected a JSON object"),
    ('{"prompt": "1+1="}\n', "record 1: no known format in fields ['prompt']"),
    ('{"prompt": "1+1=", "response": 2}\n', "record 1: field 'response' must be a string"),
    ('{"prompt": "1+1=", "response": "2"}\n{"prompt": "1+1=", "response": "  "}\n', "record 2: empty response"),
    ('{"messages": [{"role": "user", "content": "1+1="}]}\n', "record 1: the last message of 'messages' must have "
                                                            "role 'assistant'"),
    ('{"messages": [{"role": "assistant", "content": "2"}]}\n', "at least one message before"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "2"}]}\n', "messages[0] must be an object"),
    ('{"prompt": "1+1=", "response": "2", "messages": [{"role": "user", "content": "1+1="}, '
     '{"role": "assistant", "content": "2"}]}\n', "record 1: the record fits two formats (messages and prompt/response)"),
])
def test_bad_data_names_the_file_record_and_problem(tokenizer, tmp_path, content, expected):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_examples(str(path), tokenizer, max_length=16, source="--train-data")
    message = str(info.value)
    assert message.startswith("--train-data") and str(path) in message and expected in message, message


def test_invalid_utf8_names_the_file_and_line(tokenizer, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"prompt": "1+1=", "response": "2"}\n{"prompt": "caf\u00e9 1+1=", "response": "2"}\n'
                     .encode("latin-1"))
    with pytest.raises(UsageError) as info:
        load_examples(str(path), tokenizer, max_length=16, source="--train-data")
    assert str(info.value) == f"--train-data {path}:2: not valid UTF-8 (byte 0xe9 at column 16)"


def test_bad_prompt_template(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "1+2", "response": "3"}])
    for template in ("Q: {question}", "{prompt} {question}", "{prompt} {"):
        with pytest.raises(UsageError, match="--prompt-template"):
            load_examples(str(path), tokenizer, max_length=16, template=template)


def test_unknown_model_directory(tmp_path):
    with pytest.raises(UsageError, match="--model .*no such directory"):
        load_tokenizer(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(UsageError, match="config.json not found"):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UsageError, match="config.json is not valid JSON"):
        load_tokenizer(str(tmp_path / "broken"))

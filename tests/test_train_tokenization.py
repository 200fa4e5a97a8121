"""Tokenization as the model saw it in SFT, on locally built tokenizers of three families: the gold
response is the tail of the whole conversation's ids, the prompt its head (as the generation prompt
tokenizes), one BOS; special-token text in the data, long prompts, and the cache."""
import numpy as np
import pytest

from tokenizer_families import FAMILIES, llama_style, qwen2_style
from trainer_cases import write_jsonl

from spin_trainer import tokenization
from spin_trainer.data import load_data
from spin_trainer.errors import UsageError

CHATS = [
    [("user", "What is 7 + 7?"), ("assistant", "It is 14.")],
    [("system", "Be brief."), ("user", "Write a poem about the sea."), ("assistant", "The sea is wide,\nand deep.")],
    [("user", "Hi"), ("assistant", "Hello!"), ("user", "Café? 東京?"), ("assistant", " Oui 🙂 café\n")],
]
PLAIN = [("What is 7 + 7? ", "It is 14."), ("Question: sea\nAnswer:", " The sea is wide."), ("a", "b\n")]


def messages(chat):
    return [{"role": role, "content": text} for role, text in chat]


def sft_ids(tokenizer, text):
    """What SFT trains on (TRL, alignment handbook): the rendered text with the tokenizer's own specials."""
    return tokenizer(text)["input_ids"]


def family_cases(name):
    """(records, [(prompt text, whole conversation text, response ends with the template's own end)])."""
    tokenizer = FAMILIES[name]()
    records = [{"prompt": p, "response": r} for p, r in PLAIN]
    texts = [(p, p + r, False) for p, r in PLAIN]
    if tokenizer.chat_template:
        for chat in CHATS:
            records.append({"messages": messages(chat)})
            texts.append((tokenizer.apply_chat_template(messages(chat[:-1]), tokenize=False, add_generation_prompt=True),
                          tokenizer.apply_chat_template(messages(chat), tokenize=False), True))
    return tokenizer, records, texts


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_response_is_the_tail_of_the_whole_conversation(family, tmp_path):
    tokenizer, records, texts = family_cases(family)
    examples, summary = load_data(str(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer, max_length=256)
    assert len(examples) == len(records)
    eos, moved = tokenizer.eos_token_id, 0
    for example, (prompt_text, full_text, templated) in zip(examples, texts):
        prompt, response = list(example.prompt_ids), list(example.response_ids)
        full, alone = sft_ids(tokenizer, full_text), sft_ids(tokenizer, prompt_text)
        # The prompt is the head of the conversation: all of the generation prompt's own ids, or (when
        # its last token merges with the response's first, as "? " + "It" into "?" + "▁It") all but
        # the merged one, which then begins the response as it does in the conversation.
        assert prompt == full[:len(prompt)]
        assert prompt == alone or (prompt == alone[:-1] and full[len(prompt)] != alone[-1])
        moved += prompt != alone
        if templated:   # the template's end of turn is the response's last token; ChatML's "\n" after it is not
            end = full.index(response[-1], len(prompt)) + 1
            assert response == full[len(prompt):end] and not tokenizer.decode(full[end:]).strip()
        else:           # plain text: the tail, then EOS
            assert response == full[len(prompt):] + [eos]
        assert response[-1] in tokenizer.all_special_ids and not set(response[:-1]) & set(tokenizer.all_special_ids)
        if tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:
            assert prompt[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in prompt[1:]   # one BOS
        else:
            assert tokenizer.bos_token_id is None or prompt[0] != tokenizer.bos_token_id               # none added
    # "What is 7 + 7? " + "It is 14." merges in every family; the toy Llama BPE also merges "\nThe".
    assert moved >= 1 and summary == f"{moved} split before a token that spans the prompt's end (first: data " \
                                     f"{tmp_path / 'd.jsonl'} record 1)"


def test_llama_style_response_does_not_start_with_a_token_of_its_own():
    """The issue's case: the response alone starts with '▁It'; inside the conversation it is 'It'."""
    tokenizer = llama_style()
    encoder = tokenization.Encoder(tokenizer, max_length=64)
    chat = messages(CHATS[0])
    from spin_trainer.records import Conversation
    (example,) = encoder.encode([Conversation(chat[:-1], chat[-1]["content"], True, "r")])
    alone = tokenizer.convert_ids_to_tokens(tokenizer("It is 14.", add_special_tokens=False)["input_ids"])
    assert alone[0] == "▁It"
    assert tokenizer.convert_ids_to_tokens(list(example.response_ids))[0] == "It"


def test_bos_once_when_the_template_writes_it(tmp_path):
    tokenizer = llama_style()
    tokenizer.chat_template = "{{ bos_token }}" + tokenizer.chat_template
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(CHATS[0])}, {"prompt": "a", "response": "b"}])
    for example in load_data(str(path), tokenizer, max_length=64)[0]:
        assert example.prompt_ids[0] == tokenizer.bos_token_id and tokenizer.bos_token_id not in example.prompt_ids[1:]


@pytest.mark.parametrize("make, text", [(llama_style, "</s>"), (qwen2_style, "<|im_end|>"), (qwen2_style, "<|im_start|>")])
def test_special_token_text_in_the_data_never_becomes_a_special_token(make, text, tmp_path, capsys):
    tokenizer = make()
    records = [{"messages": messages(CHATS[0])},
               {"messages": [{"role": "user", "content": "Say it"}, {"role": "assistant", "content": f"It is {text} ok"}]},
               {"prompt": f"Q {text}", "response": "A"}]
    examples, summary = load_data(str(write_jsonl(tmp_path / "d.jsonl", records)), tokenizer, max_length=64)
    assert len(examples) == 1
    assert summary.startswith("2 record(s) skipped: their text holds a special token's text") and "record 2" in summary
    specials = set(tokenizer.all_special_ids)
    assert not set(examples[0].response_ids[:-1]) & specials


def test_a_template_that_renders_the_prompt_otherwise_is_refused(tmp_path):
    tokenizer = qwen2_style()
    tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(CHATS[0])}])
    with pytest.raises(UsageError, match="record 1: the chat template renders the prompt differently"):
        load_data(str(path), tokenizer, max_length=64)


def long_records():
    return [{"prompt": "What is 7 + 7? " * 12, "response": "It is 14."}, {"prompt": "Hi", "response": "Hello"}]


def test_long_prompts_are_cut_from_the_left_by_default(tmp_path):
    tokenizer = llama_style()
    path = str(write_jsonl(tmp_path / "d.jsonl", long_records()))
    whole, _ = load_data(path, tokenizer, max_length=256)
    cut, summary = load_data(path, tokenizer, max_length=256, max_prompt_length=10)
    assert len(whole[0].prompt_ids) > 10
    assert list(cut[0].prompt_ids) == [tokenizer.bos_token_id] + list(whole[0].prompt_ids[-9:])
    assert cut[0].response_ids == whole[0].response_ids and cut[1] == whole[1]
    assert summary.startswith("1 prompt(s) over 10 tokens cut from the left (first: data ") and "record 1" in summary
    # Without --max-prompt-length, the context bounds the prompt (one token left for the response).
    short, _ = load_data(path, tokenizer, max_length=8)
    assert len(short[0].prompt_ids) == 7 and len(short[0].response_ids) == 1


def test_long_prompts_skip_or_error(tmp_path):
    tokenizer = llama_style()
    path = str(write_jsonl(tmp_path / "d.jsonl", long_records()))
    kept, summary = load_data(path, tokenizer, max_length=256, max_prompt_length=10, long_prompts="skip")
    assert kept == load_data(path, tokenizer, max_length=256)[0][1:]
    assert summary.startswith("1 record(s) skipped: prompt over 10 tokens")
    with pytest.raises(UsageError, match=r"record 1: the prompt has \d+ tokens, more than the 10 that "
                                         r"--max-prompt-length and --max-length 256 leave"):
        load_data(path, tokenizer, max_length=256, max_prompt_length=10, long_prompts="error")


def test_the_cache_is_read_back_and_keyed_by_data_and_settings(tmp_path, monkeypatch):
    tokenizer = qwen2_style()
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(chat)} for chat in CHATS])
    cache = str(tmp_path / "cache")
    first = load_data(str(path), tokenizer, max_length=64, cache_dir=cache)
    calls = []
    real_encode = tokenization.Encoder.encode
    monkeypatch.setattr(tokenization.Encoder, "encode", lambda self, c: calls.append(1) or real_encode(self, c))
    assert load_data(str(path), tokenizer, max_length=64, cache_dir=cache) == first and not calls
    assert load_data(str(path), tokenizer, max_length=32, cache_dir=cache)[0] != first[0] and len(calls) == 1
    write_jsonl(path, [{"messages": messages(chat)} for chat in CHATS[:2]])
    assert len(load_data(str(path), tokenizer, max_length=64, cache_dir=cache)[0]) == 2 and len(calls) == 2
    for name in (tmp_path / "cache").iterdir():   # a damaged cache is tokenized again
        name.write_bytes(b"not a cache")
    assert load_data(str(path), tokenizer, max_length=64, cache_dir=cache)[0][0].prompt_ids and len(calls) == 3
    newest = max((tmp_path / "cache").iterdir(), key=lambda f: f.stat().st_mtime_ns)
    assert np.load(newest)["lengths"].shape == (2, 2)


def test_under_torchrun_the_other_processes_wait_for_the_first_ones_cache(tmp_path, monkeypatch):
    import os
    import threading

    tokenizer = qwen2_style()
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"messages": messages(chat)} for chat in CHATS]))
    first = load_data(path, tokenizer, max_length=64, cache_dir=str(tmp_path / "written"))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(tokenization.Encoder, "encode", lambda self, c: pytest.fail("a second process tokenized"))
    # The first process's cache appears (atomically) while this one waits for it.
    threading.Timer(0.5, os.rename, (str(tmp_path / "written"), str(tmp_path / "cache"))).start()
    assert load_data(path, tokenizer, max_length=64, cache_dir=str(tmp_path / "cache")) == first

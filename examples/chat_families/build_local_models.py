"""Builds tiny local models in the shapes of three real families, and UltraChat-style data in
JSONL, Parquet and `save_to_disk` form, for an end-to-end SPIN run without network access.

    python examples/chat_families/build_local_models.py OUT_DIR

- zephyr: a Llama with a Metaspace ("▁"-prepending) BPE tokenizer that adds BOS, zephyr's chat
  template (no bos_token in it), untied head;
- qwen2: ChatML template, byte-level BPE, no BOS, tied embeddings;
- gpt2: byte-level BPE, tied embeddings, no chat template of its own (a simple one is set).
"""
import json
import os
import random
import string
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM)

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + eos_token + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    "{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ 'Question: ' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Answer: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Answer: ' }}{% endif %}")

WORDS = ("the a of to and in is it that for on with as was be by this are or an from at have "
         "what how why when which number sum add two three four five six seven eight nine ten answer "
         "question explain write list give me please tell story short long model data train").split()


def sentences(rng, count):
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 30))) + rng.choice([".", "?", "!"])
            for _ in range(count)]


def train_tokenizer(kind, corpus, special):
    if kind == "metaspace":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet() if kind != "metaspace" else list(string.printable))
    tok.train_from_iterator(corpus, trainer)
    return tok


def build(out):
    rng = random.Random(0)
    corpus = sentences(rng, 3000) + ["<|user|> <|assistant|> <|system|> Question: Answer:"] * 50
    # zephyr-style
    tok = train_tokenizer("metaspace", corpus, ["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    zephyr = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token="</s>", chat_template=ZEPHYR_TEMPLATE)
    cfg = LlamaConfig(vocab_size=len(zephyr), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=zephyr.bos_token_id, eos_token_id=zephyr.eos_token_id, tie_word_embeddings=False)
    save(LlamaForCausalLM(cfg), zephyr, os.path.join(out, "zephyr"))
    # qwen2-style
    tok = train_tokenizer("bytelevel", corpus, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    qwen = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHATML_TEMPLATE)
    cfg = Qwen2Config(vocab_size=len(qwen), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=qwen.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    save(Qwen2ForCausalLM(cfg), qwen, os.path.join(out, "qwen2"))
    # gpt2-style
    tok = train_tokenizer("bytelevel", corpus, ["<|endoftext|>"])
    gpt2 = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   chat_template=PLAIN_TEMPLATE)
    cfg = GPT2Config(vocab_size=len(gpt2), n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                     bos_token_id=gpt2.bos_token_id, eos_token_id=gpt2.eos_token_id)
    save(GPT2LMHeadModel(cfg), gpt2, os.path.join(out, "gpt2"))
    write_data(rng, os.path.join(out, "data"))


def save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    print("model", path, type(model).__name__, "tied" if model.config.tie_word_embeddings else "untied")


def write_data(rng, path):
    import datasets
    os.makedirs(path, exist_ok=True)
    for split, count in (("train", 48), ("test", 8)):
        rows = []
        for i in range(count):
            prompt = sentences(rng, 1)[0]
            answer = " ".join(sentences(rng, rng.randint(1, 2)))
            rows.append({"prompt": prompt, "prompt_id": f"{split}-{i}",
                         "messages": [{"role": "user", "content": prompt},
                                      {"role": "assistant", "content": answer}]})
        with open(os.path.join(path, f"{split}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(os.path.join(path, f"{split}.parquet"))
        ds.save_to_disk(os.path.join(path, f"{split}_disk"))
    print("data", path)


if __name__ == "__main__":
    build(sys.argv[1])

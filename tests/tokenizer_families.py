"""Small fast tokenizers built locally (no download) in the shapes of the three families the data
tests and benchmarks/bench_tokenize.py use (no tests here):

    llama   zephyr/Mistral style: BPE over a Metaspace ("▁") pre-tokenizer that prepends "▁" to the
            text, BOS added by the tokenizer, zephyr's chat template (no bos_token in it)
    qwen2   ChatML: byte-level BPE, no BOS, EOS <|im_end|>, Qwen2's chat template
    gpt2    byte-level BPE, BOS = EOS = <|endoftext|> and never added, no chat template
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + "
    "eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "What is 7 + 7? It is 14. The answer is fourteen.",
    "Write a short poem about the sea.\nThe sea is wide, the sea is deep, and in its waves the sailors sleep.",
    "Explain why the sky is blue. Sunlight scatters off the molecules of the air, blue light the most.",
    "List three fruits: apples, bananas and cherries. Café, naïve, 東京 and emoji 🙂 are text too.",
    "def add(a, b):\n    return a + b\n# a function that adds two numbers",
] * 4


def _trained(model, trainer, pre_tokenizer, decoder, corpus=CORPUS):
    backend = Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoder
    backend.train_from_iterator(corpus, trainer=trainer)
    return backend


def llama_style(vocab_size=400, corpus=CORPUS):
    specials = ["<unk>", "<s>", "</s>"]
    backend = _trained(models.BPE(unk_token="<unk>", byte_fallback=True),
                       trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                       pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
                       decoders.Metaspace(replacement="▁", prepend_scheme="first"), corpus)
    backend.add_tokens([f"<0x{b:02X}>" for b in range(256)])  # byte fallback for characters it never saw
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", backend.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ZEPHYR_TEMPLATE
    return tokenizer


def _byte_level(specials):
    return _trained(models.BPE(), trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
                    pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


def qwen2_style():
    backend = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def gpt2_style():
    backend = _byte_level(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


FAMILIES = {"llama": llama_style, "qwen2": qwen2_style, "gpt2": gpt2_style}

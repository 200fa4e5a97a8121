"""Data: JSONL reading and validation, one prompt template, exact masks, padded batches.

Token alignment (the one every log-prob in the trainer uses): a sequence is
`prompt_ids + response_ids`, where `response_ids` ends with EOS. Position t of `labels` /
`loss_mask` holds token t + 1 of the sequence (the one logits[t] scores), so the mask is 1
exactly on the response tokens, EOS included, and 0 on every prompt token and on padding. The
last position has no next token: its label is IGNORE_INDEX, which lets the full [S, T, V] logits
go to spin_kernels.loss as they are (no `logits[:, :-1]` slice, hence no strided copy).
(NeMo-Aligner's mask is shifted by one: it drops the EOS and counts the last prompt token.)
"""
import json
import os
from dataclasses import dataclass

import torch

from .errors import UsageError, option

IGNORE_INDEX = -100
DEFAULT_PROMPT_TEMPLATE = "{prompt}"


@dataclass(frozen=True)
class Example:
    """One tokenized record: the prompt and the gold response (EOS included when it fits)."""
    prompt_ids: tuple
    response_ids: tuple


@dataclass
class Batch:
    input_ids: torch.Tensor       # [S, T] right-padded
    attention_mask: torch.Tensor  # [S, T] 1 on real tokens
    labels: torch.Tensor          # [S, T] input_ids shifted left by one, IGNORE_INDEX where loss_mask is 0
    loss_mask: torch.Tensor       # [S, T] 1 on response tokens (EOS included); last column 0

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.loss_mask)))


def read_jsonl(path, source):
    """Records of a JSONL file; errors name the source, the file and the line."""
    if not os.path.isfile(path):
        raise UsageError(f"{source} {path!r}: no such file")
    records = []
    with open(path, "rb") as f:  # bytes, decoded line by line, so that a decoding error has a line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{source} {path}:{line_no}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                 f"at column {exc.start + 1})") from exc
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{source} {path}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise UsageError(f"{source} {path}:{line_no}: expected a JSON object, got {type(record).__name__}")
            records.append((line_no, record))
    if not records:
        raise UsageError(f"{source} {path!r}: the file has no records")
    return records


def _split_chat(messages, where):
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message must have role 'assistant' (the response), "
                         f"got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise UsageError(f"{where}: 'messages' needs at least one message before the assistant's response")
    return messages[:-1], messages[-1]["content"]


def render_prompt(record, tokenizer, template, where):
    """(prompt text, response text, prompt already has special tokens) of one record."""
    if "messages" in record:
        context, response = _split_chat(record["messages"], where)
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{where}: chat records need a tokenizer with a chat template; "
                             f"this one has none (use {{'prompt', 'response'}} records instead)")
        prompt = tokenizer.apply_chat_template(context, tokenize=False, add_generation_prompt=True)
        return prompt, response, True
    missing = [key for key in ("prompt", "response") if key not in record]
    if missing:
        raise UsageError(f"{where}: missing field(s) {missing}; each record needs 'prompt' and 'response' "
                         f"strings, or 'messages'")
    for key in ("prompt", "response"):
        if not isinstance(record[key], str):
            raise UsageError(f"{where}: field {key!r} must be a string, got {type(record[key]).__name__}")
    try:
        prompt = template.format(prompt=record["prompt"])
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"{option('prompt_template')} {template!r}: must contain {{prompt}} and no other field ({exc})") from exc
    return prompt, record["response"], False


def encode_prompt(tokenizer, prompt_text, has_special_tokens):
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if not has_special_tokens and bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def tokenize_records(records, tokenizer, *, max_length, template=DEFAULT_PROMPT_TEMPLATE, source, path):
    """Examples of validated records. Responses that overflow the context are cut (EOS lost)."""
    if "{prompt}" not in template:
        raise UsageError(f"{option('prompt_template')} {template!r}: must contain {{prompt}}")
    eos = tokenizer.eos_token_id
    examples, truncated = [], 0
    for line_no, record in records:
        where = f"{source} {path}:{line_no}"
        prompt_text, response_text, has_special = render_prompt(record, tokenizer, template, where)
        if not response_text.strip():
            raise UsageError(f"{where}: empty response")
        prompt_ids = encode_prompt(tokenizer, prompt_text, has_special)
        if len(prompt_ids) >= max_length:
            raise UsageError(f"{where}: the prompt has {len(prompt_ids)} tokens, which leaves no room for a "
                             f"response within {option('max_length')} {max_length}")
        response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"] + [eos]
        room = max_length - len(prompt_ids)
        if len(response_ids) > room:
            response_ids, truncated = response_ids[:room], truncated + 1
        examples.append(Example(tuple(prompt_ids), tuple(response_ids)))
    return examples, truncated


def load_examples(path, tokenizer, *, max_length, template=DEFAULT_PROMPT_TEMPLATE, source="data"):
    examples, truncated = tokenize_records(read_jsonl(path, source), tokenizer, max_length=max_length,
                                           template=template, source=source, path=path)
    if truncated:
        print(f"warning: {source} {path}: {truncated} response(s) cut to fit {option('max_length')} {max_length}")
    return examples


def response_mask(prompt_length, response_length, padded_length):
    """[padded_length] mask over shifted positions: 1 exactly where the label is a response token."""
    mask = torch.zeros(padded_length, dtype=torch.float32)
    mask[prompt_length - 1:prompt_length - 1 + response_length] = 1.0
    return mask


def collate(sequences, pad_token_id):
    """A right-padded Batch of (prompt_ids, response_ids) pairs."""
    assert sequences, "collate needs at least one sequence"
    length = max(len(p) + len(r) for p, r in sequences)
    assert length >= 2, "a sequence needs a prompt token and a response token"
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), length), dtype=torch.float32)
    for row, (prompt, response) in enumerate(sequences):
        assert len(prompt) >= 1, "a prompt needs at least one token (the response is scored from it)"
        n = len(prompt) + len(response)
        input_ids[row, :n] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row] = response_mask(len(prompt), len(response), length)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    labels[loss_mask == 0] = IGNORE_INDEX
    return Batch(input_ids, attention_mask, labels, loss_mask)


def collate_pairs(examples, generated, pad_token_id):
    """[2B] batch: rows [0, B) the gold responses, rows [B, 2B) the generated ones, same prompts."""
    assert len(examples) == len(generated)
    actual = [(e.prompt_ids, e.response_ids) for e in examples]
    fake = [(e.prompt_ids, tuple(g)) for e, g in zip(examples, generated)]
    return collate(actual + fake, pad_token_id)


def collate_sft(examples, pad_token_id):
    return collate([(e.prompt_ids, e.response_ids) for e in examples], pad_token_id)

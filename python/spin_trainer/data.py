"""Data: records (records.py) to tokenized Examples (tokenization.py), exact masks, padded batches.

The Examples are cached in the run's directory, keyed by the data's content, the split and fields,
the tokenizer and the length settings, so that a resume reads them back instead of tokenizing
again, and so that under torchrun only each node's first process tokenizes.

Token alignment (the one every log-prob in the trainer uses): a sequence is
`prompt_ids + response_ids`, where `response_ids` ends with EOS. Position t of `labels` /
`loss_mask` holds token t + 1 of the sequence (the one logits[t] scores), so the mask is 1
exactly on the response tokens, EOS included, and 0 on every prompt token and on padding. The
last position has no next token: its label is IGNORE_INDEX, which lets the full [S, T, V] logits
go to spin_kernels.loss as they are (no `logits[:, :-1]` slice, hence no strided copy).
(NeMo-Aligner's mask is shifted by one: it drops the EOS and counts the last prompt token.)
"""
import hashlib
import json
import os
import time
import zipfile
from array import array
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError
from .fingerprint import data_fingerprint, tokenizer_fingerprint
from .manifest import replaced_atomically
from .records import is_local, load_table, read_conversations
from .tokenization import Encoder, Example  # noqa: F401  (Example is part of this module's interface)

IGNORE_INDEX = -100
CACHE_VERSION = 1  # bump when tokenization changes what it produces


@dataclass
class Batch:
    input_ids: torch.Tensor       # [S, T] right-padded
    attention_mask: torch.Tensor  # [S, T] 1 on real tokens
    labels: torch.Tensor          # [S, T] input_ids shifted left by one, IGNORE_INDEX where loss_mask is 0
    loss_mask: torch.Tensor       # [S, T] 1 on response tokens (EOS included); last column 0

    def to(self, device):
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels, self.loss_mask)))


def token_buffers(examples):
    """([n, 2] prompt and response lengths, the flat int32 ids) of `examples`: what the cache and
    checkpoints store (not a Python int per token)."""
    lengths = np.array([(len(e.prompt_ids), len(e.response_ids)) for e in examples], dtype=np.int64).reshape(-1, 2)
    flat = array("i")
    for e in examples:
        flat += e.prompt_ids
        flat += e.response_ids
    return lengths, np.frombuffer(flat, dtype=np.int32)


def examples_from_buffers(lengths, ids):
    """The Examples of token_buffers' (lengths, ids)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    ends = np.cumsum(lengths.reshape(-1)).tolist()   # prompt 0, response 0, prompt 1, ...
    pieces = [array("i", ids[start:end].tobytes()) for start, end in zip([0] + ends, ends)]
    return [Example(prompt, response) for prompt, response in zip(pieces[0::2], pieces[1::2])]


def load_data(spec, tokenizer, *, max_length, template="{prompt}", source="data", split=None,
              fields=(None, None, None), max_prompt_length=None, long_prompts="truncate", cache_dir=None):
    """(Examples, one line of what was cut or skipped) of a data source; from `cache_dir` when it
    holds them for the same data, tokenizer and settings."""
    table = None if is_local(spec) else load_table(spec, split, source)
    data = data_fingerprint(spec) if table is None else f"hub dataset {spec} {table._fingerprint}"
    key = json.dumps(dict(version=CACHE_VERSION, data=data, tokenizer=tokenizer_fingerprint(tokenizer), split=split,
                          fields=fields, template=template, max_length=max_length, max_prompt_length=max_prompt_length,
                          long_prompts=long_prompts), sort_keys=True, default=str)
    key = hashlib.sha256(key.encode()).hexdigest()[:24]
    path = cache_dir and os.path.join(cache_dir, f"{source.lstrip('-')}-{key}.npz")
    if path and int(os.environ.get("LOCAL_RANK", "0")) != 0:
        # Under torchrun the node's first process tokenizes, with every core, and the others read
        # its cache (8 processes tokenizing at once would each get an eighth of the CPUs). If it
        # fails, torchrun stops the others.
        while not os.path.isfile(path):
            time.sleep(0.2)
    if path and os.path.isfile(path):
        try:
            with np.load(path) as cache:
                return examples_from_buffers(cache["lengths"], cache["ids"]), str(cache["summary"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache is only a cost: tokenize again and rewrite it
    table = table if table is not None else load_table(spec, split, source)
    encoder = Encoder(tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, policy=long_prompts,
                      template=template)
    examples = encoder.encode(read_conversations(table, spec, source, fields))
    if not examples:
        raise UsageError(f"{source} {spec!r}: no record is left to train on ({encoder.summary()})")
    if path:
        lengths, ids = token_buffers(examples)
        with replaced_atomically(path, "wb") as f:   # a killed run never leaves half a cache
            np.savez(f, lengths=lengths, ids=ids, summary=np.array(encoder.summary()))
    return examples, encoder.summary()


def load_examples(spec, tokenizer, *, max_length, source="data", **settings):
    """The Examples of `spec` (see load_data); what was cut or skipped is printed in one line (rank 0)."""
    examples, summary = load_data(spec, tokenizer, max_length=max_length, source=source, **settings)
    if summary and os.environ.get("RANK", "0") == "0":
        print(f"{source} {spec}: {len(examples)} examples; {summary}")
    return examples


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
        loss_mask[row, len(prompt) - 1:n - 1] = 1.0   # shifted: the positions whose label is a response token
    # Token t + 1 where the mask counts it (never in the last column, which the roll wraps around).
    labels = input_ids.roll(-1, dims=1).masked_fill(loss_mask == 0, IGNORE_INDEX)
    return Batch(input_ids, attention_mask, labels, loss_mask)


def collate_pairs(examples, generated, pad_token_id):
    """[2B] batch: rows [0, B) the gold responses, rows [B, 2B) the generated ones, same prompts."""
    assert len(examples) == len(generated)
    return collate([(e.prompt_ids, e.response_ids) for e in examples]
                   + [(e.prompt_ids, g) for e, g in zip(examples, generated)], pad_token_id)


def collate_sft(examples, pad_token_id):
    return collate([(e.prompt_ids, e.response_ids) for e in examples], pad_token_id)

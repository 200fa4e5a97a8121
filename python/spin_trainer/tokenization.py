"""Conversations to token ids as the model saw them in SFT, in batched fast-tokenizer calls.

SPIN learns whatever tells real rows from generated ones, so the gold response must be the very
tokens the model would produce after the prompt. As TRL and the alignment handbook do, each record's
whole conversation (prompt + gold response) is rendered (chat template, or `--prompt-template` +
response) and tokenized once, then split at the prompt's end:

- The split: the prompt is the conversation's tokens that lie within the rendered prompt's text
  (the generation prompt); a token that spans the prompt's end (e.g. "? " + "It" tokenized as "?",
  "▁It") goes to the response, as the conversation has it. Prompt + response = the conversation's
  ids, always.
- BOS, one rule for every format: the tokens the tokenizer itself adds in front of a text
  (`tokenizer(text)` against `add_special_tokens=False`: BOS for Llama, nothing for Qwen2 and GPT-2)
  are added unless the rendered text already begins with them (a template holding `bos_token`).
- The response's end: the conversation's ids after the last special token of the response (the
  template's end of turn, e.g. `</s>` or `<|im_end|>`) are dropped when they are only whitespace
  (ChatML's "\n"), since a generation stops at that token; a response without one gets EOS.
- A record whose text holds a special token's text (e.g. "</s>" in a response) is skipped and
  counted: tokenized as the template's own tokens are, it would put a real EOS or end of turn
  in the middle of a response.
- Lengths: the prompt at most `max_prompt_length` (and leaving one response token within
  `max_length`); a longer one is cut from the left (BOS kept), skipped, or an error, by `policy`.
  A response longer than what the context leaves is cut (its EOS lost) and counted.
"""
import re
from array import array
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache

from .errors import UsageError, option

BATCH = 4096  # records per batched tokenizer call: large enough for the Rust side's threads, bounded memory


@dataclass(frozen=True)
class Example:
    """One tokenized record: the prompt and the gold response (EOS included when it fits), each an
    array of int32 token ids (any sequence of ints given is converted). 4 bytes a token, where a
    tuple of Python ints takes 36: UltraChat's 152M tokens are 0.6 GB per process instead of 5.5 GB."""
    prompt_ids: array
    response_ids: array

    __hash__ = None   # arrays are mutable: an Example is not a dict key

    def __post_init__(self):
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(self, name)
            if not (isinstance(ids, array) and ids.typecode == "i"):
                object.__setattr__(self, name, array("i", ids))


def leading_special_ids(tokenizer):
    """The ids the tokenizer adds in front of any text (e.g. [BOS]), or []."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    added = tokenizer("a")["input_ids"]
    cut = len(added) - len(plain)
    return list(added[:cut]) if cut > 0 and list(added[cut:]) == list(plain) else []


def special_text_pattern(tokenizer):
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    specials.discard("")
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))) if specials else None


def first_token_from(encoding, position, text_chars):
    """The first token holding a character at or after `position` (the count of tokens if none)."""
    for char in range(position, text_chars):
        token = encoding.char_to_token(char)
        if token is not None:   # None: a character no token covers (dropped by the pre-tokenizer)
            return token
    return len(encoding)


class Encoder:
    """Conversations -> Examples, with counts of what was cut or skipped (see the module's docstring)."""

    def __init__(self, tokenizer, *, max_length, max_prompt_length=None, policy="truncate", template="{prompt}"):
        if "{prompt}" not in template:
            raise UsageError(f"{option('prompt_template')} {template!r}: must contain {{prompt}}")
        if not getattr(tokenizer, "is_fast", False):
            raise UsageError(f"the tokenizer of {option('model')} is not a fast (Rust `tokenizers`) one, which "
                             f"tokenizing whole conversations in batches needs; save the model with its tokenizer.json")
        self.tokenizer, self.max_length, self.policy, self.template = tokenizer, max_length, policy, template
        self.prompt_limit = min(max_prompt_length or max_length - 1, max_length - 1)
        self.lead = leading_special_ids(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self.special_text = special_text_pattern(tokenizer)
        self.is_blank = cache(lambda token: not tokenizer.decode([token]).strip())   # token id -> whitespace only?
        self.counts = Counter()
        self.first = {}   # count name -> the first record it counted

    def note(self, what, conversation):
        self.counts[what] += 1
        self.first.setdefault(what, conversation.where)

    def encode(self, conversations):
        """Examples of `conversations`, in order. The tokenizer (Rust, its own threads, GIL released)
        encodes one batch while this thread splits the previous one and renders the next."""
        examples, pending = [], None
        with ThreadPoolExecutor(max_workers=1) as pool:
            for start in range(0, len(conversations) + BATCH, BATCH):
                ready = self.prepare(conversations[start:start + BATCH])
                encoding = ready and pool.submit(self.tokenizer.backend_tokenizer.encode_batch,
                                                 [full for _, _, full in ready], add_special_tokens=False)
                if pending:
                    examples += self.finish(*pending)
                pending = ready and (ready, encoding)
        return examples

    def prepare(self, batch):
        """[(conversation, prompt text, whole text)] of a batch's records that can be tokenized faithfully."""
        ready = []
        for c in batch:
            if not c.response.strip():
                raise UsageError(f"{c.where}: empty response")
            texts = [m["content"] for m in c.prompt] if c.chat else [c.prompt]
            if self.special_text and any(self.special_text.search(text) for text in texts + [c.response]):
                self.note("special_text", c)
            else:
                ready.append((c, *self.render(c)))
        return ready

    def render(self, c):
        """(prompt text, whole conversation text) of a Conversation."""
        if not c.chat:
            try:
                prompt = self.template.format(prompt=c.prompt)
            except (KeyError, IndexError, ValueError) as exc:
                raise UsageError(f"{option('prompt_template')} {self.template!r}: must contain {{prompt}} and no "
                                 f"other field ({exc!r})") from exc
            return prompt, prompt + c.response
        if not getattr(self.tokenizer, "chat_template", None):
            raise UsageError(f"{c.where}: chat records need a tokenizer with a chat template; this one has none "
                             f"(use prompt/response records with {option('prompt_template')})")
        prompt = self.tokenizer.apply_chat_template(c.prompt, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template(c.prompt + [{"role": "assistant", "content": c.response}],
                                                  tokenize=False)
        if not full.startswith(prompt):
            raise UsageError(f"{c.where}: the chat template renders the prompt differently inside the whole "
                             f"conversation ({prompt[-40:]!r} is not where {full[len(prompt) - 40:len(prompt)]!r} "
                             f"is), so the prompt's boundary cannot be found")
        return prompt, full

    def finish(self, ready, encoding):
        split = (self.split(c, e, len(prompt), len(full)) for (c, prompt, full), e in zip(ready, encoding.result()))
        return [example for example in split if example is not None]

    def response_end(self, response):
        """`response` up to its last special token if only whitespace follows it, else + [EOS]."""
        end = len(response)
        while end and response[end - 1] not in self.special_ids and self.is_blank(response[end - 1]):
            end -= 1
        if end and response[end - 1] in self.special_ids:
            return response[:end]
        return response + [self.tokenizer.eos_token_id]

    def split(self, c, encoding, prompt_chars, text_chars):
        """The Example of one conversation's Encoding whose first `prompt_chars` characters are the prompt."""
        full_ids = encoding.ids
        cut = first_token_from(encoding, prompt_chars, text_chars)
        if cut < len(full_ids) and encoding.token_to_chars(cut)[0] < prompt_chars:
            self.note("boundary_token", c)
        lead = self.lead if full_ids[:len(self.lead)] != self.lead else []
        full_ids, cut = lead + full_ids, cut + len(lead)
        if cut == 0:
            raise UsageError(f"{c.where}: the prompt has no token of its own (its first token merges with the "
                             f"response's); give the record a prompt")
        prompt, response = full_ids[:cut], self.response_end(full_ids[cut:])
        if cut > self.prompt_limit:
            if self.policy == "error":
                raise UsageError(f"{c.where}: the prompt has {cut} tokens, more than the {self.prompt_limit} that "
                                 f"{option('max_prompt_length')} and {option('max_length')} {self.max_length} leave "
                                 f"(or choose {option('long_prompts')} truncate or skip)")
            self.note("prompt_" + self.policy, c)
            if self.policy == "skip":
                return None
            keep = len(self.lead) if prompt[:len(self.lead)] == self.lead else 0
            prompt = prompt[:keep] + prompt[cut - (self.prompt_limit - keep):]
        room = self.max_length - len(prompt)
        if len(response) > room:
            response = response[:room]
            self.note("response_cut", c)
        return Example(prompt, response)

    def summary(self):
        """One line of what was cut or skipped, or '' when nothing was."""
        limit = f"{self.prompt_limit} tokens"
        words = {"prompt_truncate": f"prompt(s) over {limit} cut from the left",
                 "prompt_skip": f"record(s) skipped: prompt over {limit}",
                 "response_cut": f"response(s) cut to fit {option('max_length')} {self.max_length} (no EOS)",
                 "special_text": "record(s) skipped: their text holds a special token's text (e.g. '</s>')",
                 "boundary_token": "split before a token that spans the prompt's end"}
        return "; ".join(f"{self.counts[k]} {text} (first: {self.first[k]})"
                         for k, text in words.items() if self.counts[k])

"""Records as users hold them, read through Hugging Face `datasets`, as (prompt, gold response) pairs.

Sources: a JSONL, JSON or Parquet file, a `save_to_disk` directory, a directory of such files, or a
Hub dataset name. Formats, told apart by which fields a record fills (a null field is absent):

    prompt + response      strings (the prompt template applies), or a prompt list of messages
    prompt + completion    TRL's: strings, or conversational (lists of messages)
    messages               a conversation; the last message is the assistant's response
    real (+ generated)     the SPIN repository's: `real` is the conversation, `generated` is ignored
                           (SPIN generates its own)

A record that fills two formats (e.g. `messages` and `prompt` + `response`) is an error, not a
silent choice. `prompt` + `messages` (UltraChat) is `messages`: a prompt alone is no format.
`--prompt-field`/`--response-field` or `--messages-field` name the fields of any other layout.
"""
import json
import os
from dataclasses import dataclass

from .errors import UsageError, option

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
FORMATS = {"messages": ("messages",), "real/generated": ("real",), "prompt/response": ("prompt", "response"),
           "prompt/completion": ("prompt", "completion")}   # each format's fields a record must fill


@dataclass(frozen=True)
class Conversation:
    """A record's prompt (a string, or a list of {role, content} messages when `chat`) and gold response."""
    prompt: object
    response: str
    chat: bool
    where: str


# ---- sources -------------------------------------------------------------------------------------
def is_local(spec):
    return os.path.exists(spec) or spec.startswith((".", "/", "~")) or spec.endswith(tuple(BUILDERS))


def pick_split(splits, split, spec, source):
    """The split named `split`; by default the only one, or 'train'."""
    if split is None and len(splits) == 1:
        return next(iter(splits.values()))
    split = "train" if split is None else split
    if split not in splits:
        split_option = source.replace("-data", "-split") if source.startswith("--") else "the split option"
        raise UsageError(f"{source} {spec!r} has no split {split!r}; its splits: {', '.join(splits)} "
                         f"(choose one with {split_option})")
    return splits[split]


def load_table(spec, split, source):
    """The `datasets.Dataset` of one source and split; errors name the source."""
    import datasets
    datasets.disable_progress_bars()
    if is_local(spec) and not os.path.exists(spec):
        raise UsageError(f"{source} {spec!r}: no such file or directory")
    builder = BUILDERS.get(os.path.splitext(spec)[1].lower())
    if os.path.isfile(spec) and builder is None:
        raise UsageError(f"{source} {spec!r}: unknown file type; use .jsonl, .json or .parquet")
    try:
        if os.path.isdir(spec) and any(os.path.exists(os.path.join(spec, n))
                                       for n in ("dataset_info.json", "dataset_dict.json", "state.json")):
            loaded = datasets.load_from_disk(spec)
        elif os.path.isfile(spec):
            loaded = datasets.load_dataset(builder, data_files=spec)
        else:
            loaded = datasets.load_dataset(spec)
    except Exception as exc:  # datasets raises many kinds (network, builder, arrow, file not found)
        diagnose_jsonl(spec, source)
        where = "" if is_local(spec) else " (a Hub dataset name: is it spelled right, and is the Hub reachable?)"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""   # datasets wraps the reader's own message
        raise UsageError(f"{source} {spec!r}: could not be read{where}: {type(exc).__name__}: {exc}{cause}") from exc
    # load_dataset returns a DatasetDict; load_from_disk a Dataset or a DatasetDict.
    return pick_split(loaded, split, spec, source) if isinstance(loaded, datasets.DatasetDict) else loaded


def diagnose_jsonl(spec, source):
    """When `spec` is a JSONL file, raises a UsageError naming its first line that is not a JSON object (if any)."""
    if not (os.path.isfile(spec) and spec.lower().endswith(".jsonl")):
        return
    seen = False
    with open(spec, "rb") as f:  # bytes, decoded line by line, so that a decoding error has a line
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{source} {spec}:{line_no}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} "
                                 f"at column {exc.start + 1})") from exc
            if not line.strip():
                continue
            seen = True
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{source} {spec}:{line_no}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise UsageError(f"{source} {spec}:{line_no}: expected a JSON object, got {type(record).__name__}")
    if not seen:
        raise UsageError(f"{source} {spec!r}: the data has no records")


# ---- formats -------------------------------------------------------------------------------------
def check_messages(messages, where, name):
    """The messages without null keys (Arrow fills the union of all records' keys with nulls)."""
    if not isinstance(messages, list) or not messages:
        raise UsageError(f"{where}: {name!r} must be a non-empty list of {{'role', 'content'}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise UsageError(f"{where}: {name}[{i}] must be an object with string 'role' and 'content'")
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def from_messages(messages, where, name):
    """The Conversation of a list of messages whose last one is the assistant's response."""
    messages = check_messages(messages, where, name)
    if messages[-1]["role"] != "assistant":
        raise UsageError(f"{where}: the last message of {name!r} must have role 'assistant' (the response), "
                         f"got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise UsageError(f"{where}: {name!r} needs at least one message before the assistant's response")
    return Conversation(messages[:-1], messages[-1]["content"], True, where)


def from_prompt_and_response(record, where, p, r):
    """The Conversation of a prompt field `p` (string or messages) and a response field `r` (string, or
    one assistant message in a list, as TRL's conversational completions)."""
    prompt, response = record[p], record[r]
    if isinstance(response, list):
        messages = check_messages(response, where, r)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise UsageError(f"{where}: {r!r} as a list must hold exactly one message, the assistant's")
        response = messages[0]["content"]
    if not isinstance(response, str):
        raise UsageError(f"{where}: field {r!r} must be a string or a list of messages, got {type(response).__name__}")
    if isinstance(prompt, list):
        return Conversation(check_messages(prompt, where, p), response, True, where)
    if not isinstance(prompt, str):
        raise UsageError(f"{where}: field {p!r} must be a string or a list of messages, got {type(prompt).__name__}")
    return Conversation(prompt, response, False, where)


def to_conversation(record, where, fields):
    """The Conversation of one record, by `fields` (prompt, response, messages names) or its format."""
    prompt_field, response_field, messages_field = fields
    named = f"{option('prompt_field')}/{option('response_field')}"
    if messages_field or prompt_field:
        names = (messages_field,) if messages_field else (prompt_field, response_field)
        by = option('messages_field') if messages_field else named
        for name in names:
            if record.get(name) is None:
                raise UsageError(f"{where}: no {name!r} field (named by {by})")
    else:
        filled = {key for key, value in record.items() if value is not None}
        found = [name for name, keys in FORMATS.items() if set(keys) <= filled]
        if len(found) > 1:
            raise UsageError(f"{where}: the record fits two formats ({' and '.join(found)}); leave one out, or "
                             f"name the fields to read with {option('messages_field')} or {named}")
        if not found:
            raise UsageError(f"{where}: no known format in fields {sorted(filled)}; each record needs 'prompt' and "
                             f"'response', 'prompt' and 'completion', 'messages', or 'real' (or name its fields "
                             f"with {named} or {option('messages_field')})")
        names = FORMATS[found[0]]
    if len(names) == 1:
        return from_messages(record[names[0]], where, names[0])
    return from_prompt_and_response(record, where, *names)


def check_fields(prompt_field, response_field, messages_field):
    if bool(prompt_field) != bool(response_field):
        raise UsageError(f"{option('prompt_field')} and {option('response_field')} go together; give both or neither")
    if prompt_field and messages_field:
        raise UsageError(f"give {option('messages_field')} or {option('prompt_field')}/{option('response_field')}, "
                         f"not both")


def read_conversations(table, spec, source, fields=(None, None, None)):
    """[Conversation] of every record of `table` (loaded from `spec`), in order; `fields` as
    check_fields (config.py) allows."""
    try:
        if len(table) == 0:
            raise UsageError(f"{source} {spec!r}: the data has no records")
        return [to_conversation(record, f"{source} {spec} record {i}", fields)
                for i, record in enumerate(table.to_list(), start=1)]
    except (UsageError, UnicodeDecodeError) as exc:
        diagnose_jsonl(spec, source)   # a line that is not a JSON object reads as a record of no format: name it
        if isinstance(exc, UnicodeDecodeError):
            raise UsageError(f"{source} {spec!r}: not valid UTF-8 ({exc})") from exc
        raise

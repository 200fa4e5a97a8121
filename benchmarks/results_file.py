"""How every benchmark here writes its results: <prefix>.json (the raw numbers) and <prefix>.md (the
tables as printed), each atomically, so that a benchmark killed mid-write (the GPU machine's time
limit) leaves the previous results whole rather than a cut-short file."""
from __future__ import annotations

import json
import os


def write_results(prefix, results: dict, markdown: str, *, compact: bool = False) -> None:
    """`compact`: the JSON on one line with sorted keys (a large raw file, read by programs only)."""
    prefix = os.fspath(prefix)
    raw = (json.dumps(results, sort_keys=True, separators=(",", ":")) if compact else
           json.dumps(results, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for suffix, text in ((".json", raw + "\n"), (".md", markdown.rstrip("\n") + "\n")):
        temporary = f"{prefix}{suffix}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, prefix + suffix)

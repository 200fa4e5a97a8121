"""How every benchmark here writes its results: <prefix>.json (the raw numbers) and <prefix>.md (the
tables as printed), each atomically, so that a benchmark killed mid-write (the GPU machine's time
limit) leaves the previous results whole rather than a cut-short file."""
from __future__ import annotations

import json
import os


def write_results(prefix, results: dict, markdown: str) -> None:
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    for suffix, text in ((".json", json.dumps(results, indent=2) + "\n"), (".md", markdown.rstrip("\n") + "\n")):
        temporary = f"{prefix}{suffix}.tmp"
        with open(temporary, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(temporary, prefix + suffix)

"""Writes a task's train/val/test splits as JSONL (used by the task generators beside it)."""
import json
import os


def write_splits(out, records, train, val):
    """records[:train] to train.jsonl, the next `val` to val.jsonl, the rest to test.jsonl; each
    file written whole or not at all."""
    os.makedirs(out, exist_ok=True)
    splits = {"train": records[:train], "val": records[train:train + val], "test": records[train + val:]}
    for name, subset in splits.items():
        path = os.path.join(out, f"{name}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for record in subset:
                f.write(json.dumps(record) + "\n")
        os.replace(path + ".tmp", path)
        print(f"wrote {len(subset)} records to {path}")

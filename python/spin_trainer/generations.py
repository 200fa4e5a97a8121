"""Each iteration's generations as text: OUT/generations/iter-N.jsonl.

One line per training prompt, in the data's order: the prompt, the gold response, θ_t's sampled
response (N = t + 1: iteration N's pairs), whether the sample was cut at the length cap rather than
ended, and the reference log-prob sums of both responses under θ_t. Token ids are decoded with their
special tokens (BOS, chat markers, EOS), as the model saw them. The pairs mixed in from the previous
iteration (--mix-previous) are that iteration's lines. Rank 0 writes the file, atomically.
"""
import json
import os

from .manifest import replaced_atomically


def generations_path(out_dir, iteration, epoch=0, run="spin"):
    """OUT/generations/iter-N.jsonl of 0-based `iteration`; regenerations (--generate-every epoch) add
    -epoch-E. Runs other than the command line's "spin" (the examples' arms sharing an OUT) write
    OUT/generations/RUN/."""
    suffix = f"-epoch-{epoch}" if epoch else ""
    directory = os.path.join(out_dir, "generations", *([] if run == "spin" else [run]))
    return os.path.join(directory, f"iter-{iteration + 1}{suffix}.jsonl")


def generation_rows(examples, samples, ref_logps, tokenizer):
    """The file's records: one per (example, sample); `samples`: Responses (with their `truncated`
    flags); `ref_logps` [P, 2] (real, generated)."""
    def text(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=False)

    return [{"index": i, "prompt": text(example.prompt_ids), "real": text(example.response_ids),
             "generated": text(sample), "truncated": bool(cut), "ref_logp_real": float(logps[0]),
             "ref_logp_generated": float(logps[1])}
            for i, (example, sample, cut, logps)
            in enumerate(zip(examples, samples, samples.truncated, ref_logps.tolist(), strict=True))]


def write_generations(path, rows):
    """`rows` as JSONL at `path`, atomically."""
    with replaced_atomically(path) as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path

"""Loads every exported model of the runs given (OUT/iter-N, OUT/final) with transformers, checks that a
tied model comes back tied, and generates a few tokens from a chat prompt; counts the generations rows.
Exits with 1 if any check fails."""
import glob
import json
import os
import sys

from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = [{"role": "user", "content": "what is two and three?"}]


def check_export(path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    config = json.load(open(os.path.join(path, "config.json"), encoding="utf-8"))
    tied_in_memory = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    new = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    ok = bool(config.get("tie_word_embeddings")) == tied_in_memory and len(new) > 0
    print(f"{path}: {type(model).__name__}, {config.get('dtype')}, tie_word_embeddings "
          f"{config.get('tie_word_embeddings')}, tied after reload {tied_in_memory}, generated {len(new)} tokens"
          f"{'' if ok else '  <-- FAILED'}")
    return ok


def main(runs):
    ok = True
    for out in runs:
        for path in sorted(glob.glob(os.path.join(out, "iter-*"))) + [os.path.join(out, "final")]:
            ok &= check_export(path)
        files = sorted(glob.glob(os.path.join(out, "generations", "*.jsonl")))
        rows = [json.loads(line) for f in files for line in open(f, encoding="utf-8")]
        print(f"{out}: {[os.path.basename(f) for f in files]}, {len(rows)} rows with keys {sorted(rows[0])}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

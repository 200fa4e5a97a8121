#!/usr/bin/env bash
# The paper recipe's shape on three local model families (zephyr-style Llama, Qwen2 with tied
# embeddings, GPT-2) with UltraChat-style records in three formats (JSONL, Parquet, save_to_disk):
# one iteration, then `--resume --iterations 2` extends the run; stdout goes to a log file, as in a
# batch job. No network. Usage, from the repository root after `make test` or `make demo`:
#   bash examples/chat_families/run.sh [OUT]        (default OUT: runs/chat_families)
set -u
cd "$(dirname "$0")/../.."
OUT=${1:-runs/chat_families}; PY=${PYTHON:-.venv/bin/python}
rm -rf "$OUT"; mkdir -p "$OUT"
$PY examples/chat_families/build_local_models.py "$OUT/models" > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
D=$OUT/models/data
SMALL="--config configs/recipes/spin-paper.yaml --global-batch-size 8 --micro-batch-size 4 --max-length 192
       --max-prompt-length 96 --max-new-tokens 48 --log-every 4"
declare -A DATA=([zephyr]="$D/train.jsonl $D/test.jsonl" [qwen2]="$D/train.parquet $D/test.parquet"
                 [gpt2]="$D/train_disk $D/test_disk")
status=0
for family in zephyr qwen2 gpt2; do
  set -- ${DATA[$family]}
  for iterations in 1 2; do
    resume=""; [ "$iterations" = 2 ] && resume="--resume"
    start=$SECONDS
    $PY python/train.py --model "$OUT/models/$family" --train-data "$1" --val-data "$2" --out "$OUT/$family" \
        $SMALL --iterations $iterations $resume > "$OUT/$family.iterations-$iterations.log" 2>&1
    rc=$?; [ $rc = 0 ] || status=1
    echo "$family, --iterations $iterations $resume: exit $rc in $((SECONDS - start)) s (log: $OUT/$family.iterations-$iterations.log)"
  done
done
$PY examples/chat_families/check_exports.py "$OUT/zephyr" "$OUT/qwen2" "$OUT/gpt2" 2>/dev/null | grep -v "Loading weights" || status=1
exit $status

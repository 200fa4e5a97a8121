#!/usr/bin/env bash
# Downloads the peers that benchmarks/bench_head.py (and bench_loss.py) compare against into .whl/,
# for a GPU machine with no network whose python3 already has torch 2.11, triton 3.6 and
# transformers 5.17 (and accelerate, pandas, pyarrow, huggingface_hub, xxhash, fsspec). Run it where
# pip can reach PyPI, then carry .whl/ (git-ignored, ~2.7 MB); gpu_check.sh installs whatever
# .whl/ holds with --no-deps.
#   bash benchmarks/fetch_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=(
  liger-kernel==0.8.5        # LigerFusedLinearDPOLoss; needs torch, triton
  cut-cross-entropy==25.1.1  # linear_cross_entropy; needs torch, triton
  trl==1.16.0                # trl.kernels.ChunkedLogProbFunction; its backward imports trl.trainer.utils,
  datasets==4.7.0            # which imports datasets (>= 4.7, for trl), which imports
  dill==0.4.0                #   dill (< 0.4.1)
  multiprocess==0.70.18      #   and multiprocess (< 0.70.19), missing on the GPU machine
)
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${PEERS[@]}"
du -sh .whl

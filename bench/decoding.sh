#!/usr/bin/env bash
# Adaptive exit and self-speculative decoding, measured on one GPU: train a char-level Parcae with μ_rec 8 on
# Python's standard library (d 384, prelude/core/coda 1/2/1, 800 steps of 16 × 512 characters, 1.0e15
# FLOPs, about 2 minutes on one H200), then run bench/loops.py --adaptive and --speculative on it. Writes
# adaptive.{json,md,png} and speculative.{json,md} to $OUT (default bench/results) and the run to out/decoding_mu8.
#
#     bash bench/decoding.sh                  # OUT=/some/folder bash bench/decoding.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
RUN=out/decoding_mu8
mkdir -p "$OUT"
[ -f data/stdlib/meta.json ] || python prepare.py
[ -f $RUN/ckpt.pt ] || python train.py --out_dir=$RUN --n_embd=384 --n_head=3 --block_size=512 --n_prelude=1 \
    --n_core=2 --n_coda=1 --mean_loops=8 --backprop_loops=4 --batch_size=16 --lr=8e-3 --max_iters=800 \
    --eval_interval=800 --eval_iters=8 --eval_loops='[8]' --log_interval=100
python bench/loops.py --adaptive --data_dir data/stdlib --checkpoints $RUN --batches 8 --decode_batches 1 \
    --thresholds 0.3 0.25 0.2 0.15 0.1 0.05 0.03 0.02 0.01 0.003 --results_dir "$OUT"
python bench/loops.py --speculative --data_dir data/stdlib --checkpoints $RUN --draft_loops 1 2 4 \
    --draft_tokens 4 6 8 --results_dir "$OUT"

#!/usr/bin/env bash
# End-to-end SynthCaps run: compact encoders on `pretrain`, index over `test` audio, refiners on
# `adapt`, then the eval table for text->audio and video->audio; results go to BENCHMARKS.md.
#
#   bench/synthcaps.sh SYNTHCAPS_DIR [WORK_DIR]
#
# SYNTHCAPS_DIR is generated first if it has no captions.csv (needs ../shared/bench/synthcaps.py or
# SYNTHCAPS_PY). Knobs: ENC_MINUTES (encoder training budget, default 25), REFINER_ITERS (6000),
# ENC_SPLITS (splits the encoders train on: "pretrain", the protocol, or e.g. "pretrain,adapt").
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="$(realpath -m "${1:?usage: bench/synthcaps.sh SYNTHCAPS_DIR [WORK_DIR]}")"
work="$(realpath -m "${2:-$here/runs/synthcaps}")"
py="${PYTHON:-$here/.venv/bin/python}"
enc_minutes="${ENC_MINUTES:-25}"
iters="${REFINER_ITERS:-6000}"
enc_splits="${ENC_SPLITS:-pretrain}"
mkdir -p "$work"
start=$(date +%s)

if [ ! -f "$data/captions.csv" ]; then
  gen="${SYNTHCAPS_PY:-$here/../shared/bench/synthcaps.py}"
  "$py" "$gen" --out "$data" --seed 0
fi
cli=("$py" -m indexer.cli -q)
if [ ! -f "$work/encoders/config.json" ]; then
  "${cli[@]}" encoders train --pairs "$data/captions.csv" --split "$enc_splits" --out "$work/encoders" \
    --epochs 40 --max-minutes "$enc_minutes"
fi
enc="compact:$work/encoders"
"${cli[@]}" build --manifest "$data/captions.csv" --split test -o "$work/index" --encoder "$enc" -j 2
for modality in text video; do
  "${cli[@]}" refiner eval --pairs "$data/captions.csv" --split adapt --test-split test --index "$work/index" \
    --modality "$modality" --video-encoder "$enc" --iterations "$iters" --steps 5,20,50 \
    --json "$work/eval-$modality.json" | tee "$work/eval-$modality.md"
done
elapsed=$(( $(date +%s) - start ))
"$py" "$here/bench/write_benchmarks.py" --work "$work" --elapsed "$elapsed" --out "$here/BENCHMARKS.md" \
  --label "encoders trained on: $enc_splits"

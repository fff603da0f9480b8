#!/usr/bin/env bash
# End-to-end SynthCaps run, twice over one data set:
#   protocol:  compact encoders on `pretrain` only (frozen encoders that do not know the target domain)
#   in-domain: compact encoders on `pretrain` + `adapt` (what retraining the encoders on the domain gives)
# Each gets an index over the `test` audio and the eval table (refiners and mapper trained on `adapt`)
# for text->audio and video->audio; the protocol tables are scored against the in-domain index's
# direct search as the upper bound, so they carry a recovery column (issue 18). Results go to
# BENCHMARKS.md.
#
#   bench/synthcaps.sh SYNTHCAPS_DIR [WORK_DIR]
#
# SYNTHCAPS_DIR is generated first if it has no captions.csv (needs ../shared/bench/synthcaps.py or
# SYNTHCAPS_PY; SEED picks the seed, default 0). Knobs: ENC_MINUTES (encoder training budget per
# run, default 25) or ENC_STEPS (a fixed number of encoder steps instead: the same compute for both
# runs whatever else the machine is doing), REFINER_ITERS (6000), STEPS (DDIM step counts scored,
# default 1), THREADS (torch threads per command; default what diffgap/resources.py finds free),
# RUNS (default "in-domain protocol"; the protocol's recovery column needs the in-domain index),
# MODALITIES (default "text video"), ENC_ARGS (more `encoders train` options: run 19's text towers were
# ENC_ARGS="--no-video --prior minilm-l6 --prior-mode beside" ENC_STEPS=750 MODALITIES=text),
# EVAL_ARGS (more `refiner eval` options, e.g. --no-ablations),
# BENCH_OUT (the markdown file the tables go into, default BENCHMARKS.md: give each of two runs side by
# side its own file).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
data="$(realpath -m "${1:?usage: bench/synthcaps.sh SYNTHCAPS_DIR [WORK_DIR]}")"
work="$(realpath -m "${2:-$here/runs/synthcaps}")"
py="${PYTHON:-$here/.venv/bin/python}"
enc_minutes="${ENC_MINUTES:-25}"
iters="${REFINER_ITERS:-6000}"
steps="${STEPS:-1}"
seed="${SEED:-0}"
runs="${RUNS:-in-domain protocol}"
bench_out="$(realpath -m "${BENCH_OUT:-$here/BENCHMARKS.md}")"
budget=(--epochs 40 --max-minutes "$enc_minutes")
[ -n "${ENC_STEPS:-}" ] && budget=(--max-steps "$ENC_STEPS")
mkdir -p "$work"

if [ ! -f "$data/captions.csv" ]; then
  gen="${SYNTHCAPS_PY:-$here/../shared/bench/synthcaps.py}"
  "$py" "$gen" --out "$data" --seed "$seed"
fi
cli=("$py" -m indexer.cli -q)
[ -n "${THREADS:-}" ] && cli+=(--threads "$THREADS")

for run in $runs; do
  start=$(date +%s)
  case "$run" in
    protocol) splits=pretrain; upper=(--upper-index "$work/in-domain/index") ;;
    in-domain) splits=pretrain,adapt; upper=() ;;
    *) echo "unknown run $run (protocol or in-domain)" >&2; exit 2 ;;
  esac
  dir="$work/$run"
  mkdir -p "$dir"
  if [ ! -f "$dir/encoders/config.json" ]; then
    "${cli[@]}" encoders train --pairs "$data/captions.csv" --split "$splits" --out "$dir/encoders" "${budget[@]}" ${ENC_ARGS:-}
  fi
  enc="compact:$dir/encoders"
  "${cli[@]}" build --manifest "$data/captions.csv" --split test -o "$dir/index" --encoder "$enc" -j 2
  for modality in ${MODALITIES:-text video}; do
    "${cli[@]}" refiner eval --pairs "$data/captions.csv" --split adapt --test-split test --index "$dir/index" \
      --modality "$modality" --video-encoder "$enc" --iterations "$iters" --steps "$steps" "${upper[@]}" ${EVAL_ARGS:-} \
      --json "$dir/eval-$modality.json" | tee "$dir/eval-$modality.md"
  done
  elapsed=$(( $(date +%s) - start ))
  "$py" "$here/bench/write_benchmarks.py" --work "$dir" --elapsed "$elapsed" --out "$bench_out" \
    --label "seed $seed, $run: encoders trained on $splits"
done

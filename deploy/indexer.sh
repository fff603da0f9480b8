#!/bin/sh
# One-shot indexer job of deploy/docker-compose.yml (runs inside the image).
#
# With files under $DIFFGAP_CORPUS (mounted read-only): build the index on the first run, then
# `update` it (new, changed and removed files) on every later run; DIFFGAP_ENCODER is required.
# With an empty corpus mount: the self-contained demo (generated corpus, compact encoders, index,
# refiners), resumable, so a rerun only does what is missing.
set -eu
corpus="${DIFFGAP_CORPUS:-/corpus}"
index="${DIFFGAP_INDEX_DIR:-/data/index}"
jobs="${DIFFGAP_NUM_JOBS:-2}"

if [ -d "$corpus" ] && [ -n "$(ls "$corpus" 2>/dev/null)" ]; then  # dotfiles (.gitkeep) do not count
  if [ -z "${DIFFGAP_ENCODER:-}" ]; then
    echo "diffgap indexer: DIFFGAP_ENCODER is required when a corpus is mounted" \
         "(e.g. clap:laion/clap-htsat-unfused with weights in the model cache, or compact:/models/my-encoders)" >&2
    exit 2
  fi
  if [ -f "$index/manifest.json" ]; then
    exec diffgap-index update "$index" "$corpus" -j "$jobs"
  fi
  exec diffgap-index build "$corpus" -o "$index" --encoder "$DIFFGAP_ENCODER" -j "$jobs"
fi

workdir="$(dirname "$index")"
if [ "$(basename "$index")" != index ]; then
  echo "diffgap indexer: the demo writes <workdir>/index; set DIFFGAP_INDEX_DIR to a path ending in /index" >&2
  exit 2
fi
exec diffgap-index demo --workdir "$workdir" -j "$jobs" ${DIFFGAP_DEMO_ARGS:-}

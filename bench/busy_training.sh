#!/usr/bin/env bash
# `refiner train` at default settings (threads from the CPUs other work leaves free): alone, beside one
# busy process, and beside a torch job spinning 2 threads; prints the wall time of each.
#   bash bench/busy_training.sh [INDEX]   (default runs/reallib/index, from bench/reallib.py)
set -euo pipefail
cd "$(dirname "$0")/.."
IDX=${1:-runs/reallib/index}
run() {
  rm -rf /tmp/busy-refiner
  /usr/bin/time -f "%e" .venv/bin/python -m indexer.cli -q refiner train --from-index --index "$IDX" \
    --out /tmp/busy-refiner --iterations 3000 2>&1 >/dev/null | tail -1
}
echo "alone: $(run) s"
.venv/bin/python -c "import time; t = time.time()
while time.time() - t < 900: pass" &
HOG=$!
sleep 5  # the other job is up and spinning
echo "beside one busy process: $(run) s"
kill $HOG
.venv/bin/python -c "import time, torch; torch.set_num_threads(2); a = torch.randn(1500, 1500); t = time.time()
while time.time() - t < 900: a @ a" &
HOG=$!
sleep 5
echo "beside a 2-thread torch job: $(run) s"
kill $HOG

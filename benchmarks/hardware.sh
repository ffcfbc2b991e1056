#!/usr/bin/env bash
# README's hardware tables: edgetl's INT8 models beside Optimum's and OpenVINO's defaults on this machine,
# at 1 and at 2 threads (standing in for two machines), the 2-thread run repeated to check that p50s
# repeat, and the merged table.
#
#   benchmarks/hardware.sh [RUN] [OUT]        (default: runs/sst-int8 benchmarks/results/hardware)
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/sst-int8}
OUT=${2:-benchmarks/results/hardware}
EDGETL=${EDGETL:-.venv/bin/edgetl}
PYTHON=${PYTHON:-.venv/bin/python}
for run in threads-1:1 threads-2:2 threads-2-repeat:2; do
    name=${run%%:*} threads=${run##*:}
    "$EDGETL" bench "$RUN" --threads "$threads" --label "$name" --out "$OUT/$name"
done
"$PYTHON" benchmarks/repeatability.py "$OUT/threads-2/results.json" "$OUT/threads-2-repeat/results.json" \
    --out "$OUT/repeatability.md"
"$EDGETL" bench merge "$OUT/threads-1/results.json" "$OUT/threads-2/results.json" --out "$OUT/merged"
"$PYTHON" benchmarks/peers_table.py "$OUT/threads-2/results.json" > "$OUT/peers.md"
cat "$OUT/peers.md"

#!/usr/bin/env bash
# For a machine with a GPU: time the GPU backends (PyTorch CUDA FP16, ONNX Runtime CUDA and TensorRT
# execution providers, OpenVINO GPU) on existing runs or bundles, each target within a fixed time, and
# write results.json per target. Installs nothing. Without a GPU (or without onnxruntime-gpu) each backend
# is skipped with a note in results.json and the script still succeeds.
#
#   benchmarks/gpu.sh [TARGET ...]     (default: runs/sst-int8 and runs/sst-tiny where present)
#   OUT=benchmarks/results/gpu  PYTHON=.venv/bin/python (else python3)  LIMIT=280 seconds per target
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUT=${OUT:-benchmarks/results/gpu}
LIMIT=${LIMIT:-280}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    for run in runs/sst-int8 runs/sst-tiny; do [ -d "$run" ] && targets+=("$run"); done
fi
[ ${#targets[@]} -gt 0 ] || { echo "gpu.sh: no runs found; pass run, artifact or bundle folders" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "gpu.sh: no nvidia-smi here; GPU backends will be skipped with a note"
for target in "${targets[@]}"; do
    name=$(basename "$target")
    PYTHONPATH=. timeout "$LIMIT" "$PYTHON" -m edgetl bench "$target" --only-gpu --batch-sizes 1,8,32 \
        --seq-lengths own,128 --rounds 3 --max-calls 200 --label "gpu: $name" --out "$OUT/$name"
    "$PYTHON" -c "import json,sys; r=json.load(open(sys.argv[1])); print(len(r['rows']), 'rows;', *r['notes'], sep='\n  ')" \
        "$OUT/$name/results.json"
done

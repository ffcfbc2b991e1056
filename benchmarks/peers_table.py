"""README's edgetl-vs-defaults table from one `edgetl bench` result: INT8 models beside the FP32 references.

    .venv/bin/python benchmarks/peers_table.py benchmarks/results/hardware/threads-2/results.json

Batch-1 latency over the evaluation texts at their own length, throughput at the largest batch at their own
length, accuracy on the whole evaluation split, model file size, and the speed-up against PyTorch FP32 eager
of the same run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BACKENDS = {"pytorch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}


def main() -> int:
    result = json.loads(Path(sys.argv[1]).read_text())
    own = [r for r in result["rows"] if r["seq"] == "own" and r["device"] == "cpu"]
    threads = max(r["threads"] for r in own)
    own = [r for r in own if r["threads"] == threads]
    largest = max(r["batch"] for r in own)
    single = {r["target"]: r for r in own if r["batch"] == 1}
    batched = {r["target"]: r for r in own if r["batch"] == largest}
    reference = next(r for r in single.values() if r["backend"] == "pytorch" and r["precision"] == "fp32")
    print(f"| model | backend | precision | accuracy | p50 ms | p99 ms | batch-{largest} /s | size MB | "
          f"speed-up vs PyTorch FP32 |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for row in sorted(single.values(), key=lambda r: (r["precision"] != "int8", r["backend"], r["peer"] or "")):
        name = row["peer"] or (row["artifact"] if "PT2E" in row["artifact"] else f"edgetl {row['artifact']}")
        noisy = " (noisy)" if row["noisy"] or batched[row["target"]]["noisy"] else ""
        accuracy = "–" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        print(f"| {name} | {BACKENDS[row['backend']]} | {row['precision'].upper()} | {accuracy} | "
              f"{row['p50_ms']:.2f}{noisy} | {row['p99_ms']:.2f} | {batched[row['target']]['items_per_s']:.0f} | "
              f"{row['model_mb']:.1f} | {reference['p50_ms'] / row['p50_ms']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

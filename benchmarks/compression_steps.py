"""What each step of a compression run bought: parameters, GFLOPs per text, model size and dev accuracy.

    python benchmarks/compression_steps.py runs/sst-tiny

Reads the stage manifests and the run's benchmark results (nothing is measured here) and prints a Markdown
table, one row per model artifact and backend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    run = parser.parse_args().run
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted(run.glob("[0-9][0-9]-*/manifest.json"))}
    bench = next(run.glob("[0-9][0-9]-benchmark/results.json"))
    rows = {r["target"]: r for r in json.loads(bench.read_text())["rows"]}
    shape = {}  # parameters and FLOPs travel from the PyTorch model to its exports
    print("| step | backend | precision | parameters (M) | GFLOPs / text | size MB | accuracy | p50 ms |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, manifest in manifests.items():
        metrics = manifest.get("metrics", {})
        if "parameters" in metrics:
            shape = {"parameters": metrics["parameters"], "gflops": metrics["gflops_per_text"]}
        for backend, model in manifest.get("models", {}).items():
            row = rows.get(f"{backend}-{model['precision']} ({name})")
            if row is None:
                continue
            print(f"| {name} | {backend} | {model['precision']} | {shape['parameters'] / 1e6:.2f} | {shape['gflops']:.3f} "
                  f"| {row['model_mb']:.1f} | {100 * row['accuracy']:.2f} % | {row['p50_ms']:.2f} |")


if __name__ == "__main__":
    main()

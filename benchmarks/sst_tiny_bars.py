"""Where one `sst-tiny` run stands against its bars (issue 24), from the run's own files (nothing is measured here).

    python benchmarks/sst_tiny_bars.py runs/sst-tiny [--out benchmarks/results/sst-tiny/run1/bars.json]

- ONNX Runtime INT8 dev accuracy (one text per call, as the evaluate stage scores a dynamic-INT8 model)
  within 1.5 points of the FP32 teacher (``01-finetune`` in PyTorch);
- its batch-1 p50 at least 15x faster than the teacher in PyTorch eager and at least 2x faster than the
  ``sst-int8`` bundle's ONNX Runtime model, both in the run's benchmark;
- the bundle at most 10 % of the teacher's FP32 ONNX file (``sst-int8``'s export, beside the run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def bars(run: Path) -> dict:
    evaluation = json.loads(next(run.glob("[0-9][0-9]-evaluate/evaluation.json")).read_text())
    bench = json.loads(next(run.glob("[0-9][0-9]-benchmark/results.json")).read_text())
    quantized = next(run.glob("[0-9][0-9]-quantize")).name
    key = f"onnx-int8 ({quantized})"
    scored = {r["target"]: r for r in evaluation}
    timed = {r["target"]: r for r in bench["rows"]}
    teacher = "pytorch-fp32 (01-finetune)"
    compared = next(k for k in timed if k.startswith("onnx-int8 (sst-int8/"))
    teacher_onnx = run.parent / "sst-int8" / "02-export" / "raw" / "model.onnx"
    bundle = next(run.glob("[0-9][0-9]-bundle"))
    figures = {
        "teacher_fp32_accuracy": scored[teacher]["accuracy"],
        "int8_accuracy": scored[key]["accuracy"],
        "int8_batch_size": scored[key]["batch_size"],
        "accuracy_drop_points": round(100 * (scored[teacher]["accuracy"] - scored[key]["accuracy"]), 2),
        "int8_p50_ms": timed[key]["p50_ms"],
        "speedup_vs_teacher_pytorch": round(timed[teacher]["p50_ms"] / timed[key]["p50_ms"], 2),
        "speedup_vs_sst_int8_bundle": round(timed[compared]["p50_ms"] / timed[key]["p50_ms"], 2),
        "bundle_bytes": folder_bytes(bundle) - (bundle / "manifest.json").stat().st_size,
        "teacher_onnx_bytes": teacher_onnx.stat().st_size,
    }
    figures["bundle_share_of_teacher_onnx"] = round(figures["bundle_bytes"] / figures["teacher_onnx_bytes"], 4)
    figures["passes"] = {
        "accuracy_drop_at_most_1.5": figures["accuracy_drop_points"] <= 1.5,
        "at_least_15x_over_teacher": figures["speedup_vs_teacher_pytorch"] >= 15,
        "at_least_2x_over_sst_int8_bundle": figures["speedup_vs_sst_int8_bundle"] >= 2,
        "bundle_at_most_10_percent": figures["bundle_share_of_teacher_onnx"] <= 0.10,
    }
    figures["machine"] = bench["machine"]["cpu"]
    figures["commit"] = bench["machine"]["versions"].get("edgetl_commit")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    figures = bars(args.run)
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

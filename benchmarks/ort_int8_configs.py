"""Compare ONNX Runtime INT8 settings by fidelity to the FP32 model, without touching dev.

Fidelity = share of held-out *training* sentences (not used for calibration) on which the INT8 model
predicts the same label as the FP32 model, plus the mean absolute logit error. This is how the defaults
of `quantize.onnx_*` were chosen; dev accuracy is reported by the recipe, never used here.

    .venv/bin/python benchmarks/ort_int8_configs.py runs/sst-int8/02-export [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgetl.artifact import Artifact
from edgetl.bench.machine import describe, machine_info
from edgetl.data import load_labelled
from edgetl.recipe import DataConfig
from edgetl.runtime.engines import open_engine
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.stages._quantize_ort import quantize_onnx

# name -> (method, quantize_onnx options)
CONFIGS = {
    "static minmax": ("static", {"calibration": "minmax"}),
    "static minmax, FFN down-projections dynamic": ("static", {"calibration": "minmax", "dynamic_ffn_down": True}),
    "static percentile, FFN down-projections dynamic": ("static", {"calibration": "percentile", "dynamic_ffn_down": True}),
    "dynamic": ("dynamic", {}),
}
# SST-2's training set is mostly phrases (median 7 words); apps classify full sentences (dev median: 19),
# and that is where INT8 errors show. Held-out texts: >= 15 words.
MIN_WORDS = 15


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("export_dir")
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    exported = Artifact.load(args.export_dir)
    unfused = exported.path / exported.manifest["unfused_onnx"]
    tokenizer = load_tokenizer(exported.model_path("onnx").parent, 128)
    train, _ = load_labelled(DataConfig())
    shuffled = train.shuffle(seed=1)["text"]
    calib = [encode(tokenizer, [t]) for t in shuffled[: args.calibration]]
    held_pool = shuffled[len(shuffled) // 2 :]
    held = [t for t in held_pool if len(t.split()) >= MIN_WORDS][: args.held_out]
    feeds = [encode(tokenizer, held[i : i + 32]) for i in range(0, len(held), 32)]
    reference = np.concatenate([open_engine("onnx", unfused).run(f) for f in feeds])
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (method, options) in CONFIGS.items():
            target = Path(scratch) / f"{len(results)}.onnx"
            quantize_onnx(unfused, target, method, calib, per_channel=True, **options)
            logits = np.concatenate([open_engine("onnx", target).run(f) for f in feeds])
            results[name] = {
                "megabytes": round(target.stat().st_size / 1e6, 1),
                "agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).mean()), 4),
                "mean_abs_logit_error": round(float(np.abs(logits - reference).mean()), 4),
            }
            print(name, results[name], flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        record = {"export": str(exported.path), "held_out_texts": len(held), "calibration_texts": len(calib),
                  "machine": describe(machine_info()), "configs": results}
        (Path(args.out) / "ort_int8_configs.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Compare ONNX Runtime INT8 settings by fidelity to the FP32 model, without touching dev.

Fidelity = share of held-out texts (not used for calibration) on which the INT8 model predicts the same
label as the FP32 model, plus the mean absolute logit error, one text per call as the runtime runs them.
The texts and their cut come from the export's recipe (its manifest's data section), drawn as the quantize
stage draws calibration texts: SST-2 *training* sentences, or for a recipe with data.target the unlabelled
training reviews of that domain (what a domain-adapted model serves). This is how the defaults of
`quantize.onnx_*` and `quantize.smooth_alpha` were chosen; dev accuracy is reported by the recipe, never used here.

    .venv/bin/python benchmarks/ort_int8_configs.py runs/sst-int8/02-export [--only dynamic] [--out benchmarks/results]
    .venv/bin/python benchmarks/ort_int8_configs.py RUN/04-export --only dynamic --out benchmarks/results
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
from edgetl.recipe import DataConfig
from edgetl.runtime.engines import open_engine
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.quantization import quantize_onnx
from edgetl.stages.quantize import calibration_pool

# name -> (method, quantize_onnx options)
CONFIGS = {
    "static minmax": ("static", {"calibration": "minmax"}),
    "static minmax, FFN down-projections dynamic": ("static", {"calibration": "minmax", "dynamic_ffn_down": True}),
    "static percentile, FFN down-projections dynamic": ("static", {"calibration": "percentile", "dynamic_ffn_down": True}),
    "dynamic": ("dynamic", {}),
    **{f"dynamic, smoothed alpha={a}": ("dynamic", {"smooth_alpha": a}) for a in (0.5, 0.75, 0.85, 0.95)},
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
    parser.add_argument("--only", default=None, help="run only the settings whose name starts with this, e.g. dynamic")
    args = parser.parse_args()
    exported = Artifact.load(args.export_dir)
    unfused = exported.path / exported.manifest["unfused_onnx"]
    data = DataConfig(**exported.manifest["data"])
    tokenizer = load_tokenizer(exported.model_path("onnx").parent, data.max_length, data.truncation, data.head_tokens)
    pool = calibration_pool(data)
    calib_texts = pool[: args.calibration]
    if data.target:
        held = pool[args.calibration :][: args.held_out]
    else:
        held = [t for t in pool[len(pool) // 2 :] if len(t.split()) >= MIN_WORDS][: args.held_out]
    calib = [encode(tokenizer, [t]) for t in calib_texts]
    feeds = [encode(tokenizer, [t]) for t in held]
    reference = np.concatenate([open_engine("onnx", unfused).run(f) for f in feeds])
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (method, options) in CONFIGS.items():
            if args.only and not name.startswith(args.only):
                continue
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
        record = {"export": str(exported.path), "texts": f"{data.target} reviews" if data.target else "SST-2 train",
                  "held_out_texts": len(held), "calibration_texts": len(calib),
                  "machine": describe(machine_info()), "configs": results}
        name = "ort_int8_configs" + "".join(f"-{part}" for part in (data.target, args.only) if part) + ".json"
        (Path(args.out) / name).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What each MatMul role costs a classifier in ONNX Runtime dynamic INT8: the run's export quantized as its quantize
stage does, then again with one role (every layer's query projection, ...) left out of INT8 at a time, kept in FP32
or with its 4 outlier input channels split off in FP32 (``ONNX_FALLBACKS``), each scored on the whole evaluation split,
one text per call, through the runtime's ONNX Runtime engine.

    .venv/bin/python benchmarks/int8_role_costs.py RUN_DIR [--out OUT.json]

Leaving out a query, key or value projection means quantizing the unfused graph (ORT's fused QAttention absorbs
them), so those variants also lose the fused attention. Picking the best of these variants by the same dev accuracy
that scores them is selection on dev: the winner's figure is optimistic.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a run folder with export and quantize stages (ONNX Runtime, dynamic)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from edgetl.artifact import Artifact
    from edgetl.data import label_names, load_evaluation
    from edgetl.quantization import matmul_roles
    from edgetl.recipe import load_recipe
    from edgetl.runtime.engines import OnnxRuntimeEngine
    from edgetl.runtime.text import load_tokenizer, predict_outputs
    from edgetl.stages.quantize import _onnxruntime_int8, calibration_feeds
    from edgetl.tasks import task_for

    recipe = load_recipe(str(args.run / "recipe.resolved.yaml"))
    cfg = next(s for s in recipe.stages if s.stage == "quantize")
    if cfg.onnx_method != "dynamic":
        sys.exit(f"{args.run}: its quantize stage is {cfg.onnx_method} INT8; this measures dynamic INT8")
    source = Artifact.load(next(args.run.glob("[0-9][0-9]-export")))
    data, task = recipe.data, task_for(recipe.task)
    folder = source.model_path("onnx").parent
    feeds = calibration_feeds(SimpleNamespace(recipe=recipe), folder, cfg.calibration_samples)
    dev = load_evaluation(data, task)
    columns, labels = dev[:], label_names(data, task)
    tokenizer = load_tokenizer(folder, data.max_length, data.truncation, data.head_tokens)

    def score(model: Path) -> float:  # as the evaluate stage scores a dynamic-INT8 model: one text per call
        outputs, encodings = predict_outputs(OnnxRuntimeEngine(model), tokenizer, task.examples(columns), 1)
        return round(task.score(outputs, encodings, columns, labels)[task.metric] * task.metric_scale, 3)

    roles = matmul_roles(source.path / source.manifest["unfused_onnx"])
    report = {"run": str(args.run), "metric": task.metric, "fp32": score(source.model_path("onnx")), "variants": []}
    with tempfile.TemporaryDirectory() as scratch:
        plans = [("none", [], "fp32")] + [(role, nodes, fallback) for role, nodes in roles.items()
                                          for fallback in ("outlier-split", "fp32")]
        for index, (role, nodes, fallback) in enumerate(plans):
            variant = Path(scratch) / str(index)
            variant.mkdir()
            made = _onnxruntime_int8(cfg, source, variant, feeds, nodes, fallback)
            row = {"left_out": role, "as": fallback if nodes else None, "fused_attention": made["fused"],
                   task.metric: score(variant / "model.onnx")}
            report["variants"].append(row)
            print(json.dumps(row), flush=True)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

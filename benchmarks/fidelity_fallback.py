"""What fidelity control's fallback costs on ONNX Runtime: the MatMuls it leaves out of dynamic INT8 kept in FP32,
against stored in block-wise INT8 (``edgetl.quantization.blockwise_int8``) at several block sizes, against dynamic INT8
with their outlier input channels split off in FP32 (``edgetl.quantization.outlier_split``) for several channel
counts, beside the fully dynamic INT8 model and the FP32 export, in fidelity and batch-1 latency, on one machine in
one run.

    python benchmarks/fidelity_fallback.py runs/stsb-embed-int8 --out benchmarks/results/stsb-embed-int8/COMMIT-fallback

The nodes are those the run's quantize stage left out of dynamic INT8 (its manifest's ``ONNX_FALLBACKS`` key); each
variant is quantized afresh from the run's export as the stage does (fused graph, the recipe's settings; the outlier
channels measured on its calibration texts). Fidelity against the FP32 export on the held-out training sentences the
stage judges on (the ``fidelity_samples`` after the ``calibration_samples``) and on the dev sentences, plus dev
Spearman. Latency: the
first ``--texts`` dev texts at their own length, one per call; every variant in its own process once per round, in
an order that reverses every other round; the median of the rounds' p50s, with their spread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from ort_int8_graph import time_in_process  # a model's batch-1 p50 in a fresh process, as the runtime opens it

BLOCK_SIZES = (32, 128, 256)
OUTLIER_CHANNELS = (2, 4, 8)


def build_variants(run: Path, export, scratch: Path, feeds: list[dict]) -> tuple[dict[str, Path], list[str]]:
    """The fully dynamic model, the left-out nodes in FP32, in block-wise INT8 at each of BLOCK_SIZES, and split at
    each of OUTLIER_CHANNELS (measured on ``feeds``)."""
    from edgetl.quantization import blockwise_int8, quantize_onnx
    from edgetl.recipe import load_recipe
    from edgetl.stages.quantize import ONNX_FALLBACKS, _fused_graph, _onnxruntime_int8

    recipe = load_recipe(str(run / "recipe.resolved.yaml"))
    cfg = next(s for s in recipe.stages if s.stage == "quantize")
    if cfg.onnx_method != "dynamic" or cfg.smooth_alpha is not None:
        raise SystemExit(f"{run}: this compares dynamic INT8 without smoothing; the recipe says {cfg.onnx_method}, "
                         f"smooth_alpha {cfg.smooth_alpha}")
    made = json.loads((next(run.glob("[0-9][0-9]-quantize")) / "manifest.json").read_text())["models"]["onnx"]
    nodes = next((made[key] for key in ONNX_FALLBACKS.values() if made.get(key)), None)
    if not nodes:
        raise SystemExit(f"{run}: its quantize stage left no node out of dynamic INT8; nothing to compare")
    variants = {"FP32 export": export.model_path("onnx")}
    for name, exclude in (("dynamic INT8", []), (f"dynamic INT8, {len(nodes)} nodes FP32", nodes)):
        folder = scratch / str(len(variants))
        folder.mkdir()
        variants[name] = folder / Path(_onnxruntime_int8(cfg, export, folder, [], exclude)["path"]).name
    for block in BLOCK_SIZES:
        target = scratch / f"blockwise-{block}.onnx"
        shutil.copy(variants[f"dynamic INT8, {len(nodes)} nodes FP32"], target)
        blockwise_int8(target, nodes, block)
        variants[f"dynamic INT8, {len(nodes)} nodes block-wise INT8 (blocks of {block})"] = target
    graph = _fused_graph(cfg, export, scratch) or export.path / export.manifest["unfused_onnx"]
    for channels in OUTLIER_CHANNELS:
        target = scratch / f"split-{channels}-int8.onnx"
        quantize_onnx(graph, target, "dynamic", feeds, cfg.per_channel, embedding_bits=cfg.onnx_embedding_bits,
                      outlier_nodes=nodes, outlier_channels=channels)
        variants[f"dynamic INT8, {len(nodes)} nodes' {channels} outlier channels split off in FP32"] = target
    return variants, nodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a sentence-embedding run with export and quantize stages")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--texts", type=int, default=300, help="dev texts timed per round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from edgetl.artifact import Artifact, model_file_bytes
    from edgetl.bench.machine import describe, machine_info
    from edgetl.data import load_evaluation
    from edgetl.recipe import load_recipe
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import encode, load_tokenizer, predict_outputs
    from edgetl.stages.quantize import calibration_pool
    from edgetl.tasks import task_for

    recipe = load_recipe(str(args.run / "recipe.resolved.yaml"))
    cfg = next(s for s in recipe.stages if s.stage == "quantize")
    task, data = task_for(recipe.task), recipe.data
    if task.fidelity is None:
        raise SystemExit(f"{args.run}: task {recipe.task} has no fidelity measure")
    export = Artifact.load(next(args.run.glob("[0-9][0-9]-export")))
    tokenizer = load_tokenizer(export.model_path("onnx").parent, data.max_length, data.truncation, data.head_tokens)
    held_out = calibration_pool(data, task)[cfg.calibration_samples:cfg.calibration_samples + cfg.fidelity_samples]
    columns = load_evaluation(data, task)[:]
    dev = task.examples(columns)
    feeds = [encode(tokenizer, [t], task.pretokenized) for t in dev[:args.texts]]

    def outputs(path: Path) -> dict:
        engine = open_engine("onnx", path)
        return {name: predict_outputs(engine, tokenizer, texts, 1)[0] for name, texts in (("held_out", held_out), ("dev", dev))}

    calibration = [encode(tokenizer, [t], task.pretokenized)
                   for t in calibration_pool(data, task)[:cfg.calibration_samples]]
    with tempfile.TemporaryDirectory() as scratch:
        variants, nodes = build_variants(args.run, export, Path(scratch), calibration)
        reference = outputs(variants["FP32 export"])
        rows = {}
        for name, path in variants.items():
            got = outputs(path)
            row = {"mb": round(model_file_bytes(path) / 1e6, 2)}
            for split, texts in (("held_out", held_out), ("dev", dev)):
                row |= {f"{split} {k}": round(v, 5) for k, v in task.fidelity(got[split], reference[split], texts).items()}
            row["dev spearman"] = round(task.score(got["dev"], [], columns, None)["spearman"], 3)
            rows[name] = row
            print(name, json.dumps(row), flush=True)
        p50s = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name in (list(variants) if round_ % 2 == 0 else list(variants)[::-1]):
                p50s[name].append(time_in_process(variants[name], feeds, False, 1))
                print(f"round {round_ + 1}: {name}: {p50s[name][-1]:.4f} ms", flush=True)
    for name, values in p50s.items():
        median = float(np.median(values))
        rows[name] |= {"p50_ms": round(median, 4), "round_p50s_ms": values,
                       "spread": round((max(values) - min(values)) / median, 3),
                       "speed_up_vs_fp32": round(float(np.median(p50s["FP32 export"])) / median, 2)}
    record = {"run": str(args.run), "nodes": nodes, "held_out_texts": len(held_out), "dev_texts": len(dev),
              "timed_texts": len(feeds), "rounds": args.rounds, "machine": describe(machine_info()), "variants": rows}
    print(json.dumps(record, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "fidelity_fallback.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

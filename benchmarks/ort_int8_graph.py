"""Batch-1 latency of the dynamic-INT8 ONNX Runtime graph as the quantize stage built it before and after it quantized
ORT's fused graph, and of the two kernels that decided it, side by side in one run on this machine.

Model variants, built from a run's export stage (dynamic INT8 with the run's embedding bits and smooth_alpha):
  unfused, INT4 table, SkipLayerNorm   the graph of 7d75ecc (4-bit tables only): ORT's unfused graph, each MatMul
                                       dynamic INT8, the 4-bit table typed INT4, ORT fusing residual adds into
                                       SkipLayerNormalization when it loads the model
  unfused, SkipLayerNorm               the same with a 4-bit table's nibbles stored as UINT8 (same values); for an
                                       8-bit table, the graph before 259e65b
  fused, SkipLayerNorm                 QAttention per layer (the graph fused before smoothing and quantization)
  fused                                what the quantize stage and runtime now make: no SkipLayerNormalization
Kernels: SkipLayerNormalization against Add + LayerNormalization, GatherBlockQuantized over an INT4 table against
the same values in a UINT8 one (27 rows, a dev sentence's length), and DynamicQuantizeMatMul (the INT8 matrix product
of every dynamic-INT8 MatMul) at the FFN's shape for 27 tokens against a large product, in multiply-adds per second.

Every variant runs in its own process, once per round, in an order that reverses every other round; the p50 of each
round is kept and their median reported, with their spread. The texts are the run's evaluation texts at their own
length, one per call, as the benchmark stage times them.

    .venv/bin/python benchmarks/ort_int8_graph.py runs/sst-tiny --rounds 4 --out benchmarks/results/ort-int8-graph/COMMIT
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SESSION_FUSION = "SkipLayerNormFusion"
MODEL_VARIANTS = ["unfused, INT4 table, SkipLayerNorm", "unfused, SkipLayerNorm", "fused, SkipLayerNorm", "fused"]
HIDDEN = 384
KERNEL_SHAPES = [(1, 27, HIDDEN), (1, 128, HIDDEN), (32, 64, HIDDEN)]
GEMM_SHAPES = [(27, HIDDEN, 2 * HIDDEN), (2048, 1024, 1024)]  # (M, K, N): a sentence's FFN input; a large product


def build_models(run: Path, scratch: Path) -> dict[str, Path]:
    """The graphs of MODEL_VARIANTS (the first only for a 4-bit table) from ``run``'s export stage, quantized as its
    quantize stage says."""
    from edgetl.artifact import Artifact
    from edgetl.quantization import quantize_onnx
    from edgetl.recipe import QuantizeStage
    from edgetl.stages.quantize import _onnxruntime_int8

    export = Artifact.load(next(run.glob("[0-9][0-9]-export")))
    made = json.loads((next(run.glob("[0-9][0-9]-quantize")) / "manifest.json").read_text())["models"]["onnx"]
    cfg = QuantizeStage(stage="quantize", onnx_method="dynamic", onnx_embedding_bits=made["embedding_bits"],
                        smooth_alpha=made["smooth_alpha"])
    feeds = calibration_feeds(run, export) if cfg.smooth_alpha is not None else []
    unfused = scratch / "unfused.onnx"
    exclude = made.get("fp32_nodes", [])  # what fidelity control left in FP32
    quantize_onnx(export.path / export.manifest["unfused_onnx"], unfused, "dynamic", feeds, cfg.per_channel,
                  smooth_alpha=cfg.smooth_alpha, exclude=exclude, embedding_bits=cfg.onnx_embedding_bits)
    folder = scratch / "fused"
    folder.mkdir()
    if not _onnxruntime_int8(cfg, export, folder, feeds, exclude)["fused"]:
        raise SystemExit(f"{run}: the quantize stage does not fuse this model's INT8 graph; nothing to compare")
    models = {MODEL_VARIANTS[1]: unfused, MODEL_VARIANTS[2]: folder / "model.onnx", MODEL_VARIANTS[3]: folder / "model.onnx"}
    if cfg.onnx_embedding_bits == 4:
        _retype_int4(unfused, scratch / "unfused-int4.onnx")
        models = {MODEL_VARIANTS[0]: scratch / "unfused-int4.onnx", **models}
    return models


def calibration_feeds(run: Path, export) -> list[dict]:
    """What the run's quantize stage measured SmoothQuant's activation peaks on (``edgetl.stages.quantize``)."""
    from types import SimpleNamespace

    from edgetl.recipe import load_recipe
    from edgetl.stages.quantize import calibration_feeds as stage_feeds

    recipe = load_recipe(str(run / "recipe.resolved.yaml"))
    samples = next(s.calibration_samples for s in recipe.stages if s.stage == "quantize")
    return stage_feeds(SimpleNamespace(recipe=recipe), export.model_path("onnx").parent, samples)


def _retype_int4(source: Path, target: Path) -> None:
    """The 4-bit table as INT4 (its layout before this change): unpack the UINT8 nibbles, subtract the zero point 8."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for node in (n for n in model.graph.node if n.op_type == "GatherBlockQuantized"):
        table = next(i for i in model.graph.initializer if i.name == node.input[0])
        packed = numpy_helper.to_array(table)
        values = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(packed), -1).astype(np.int8) - 8
        table.CopyFrom(onnx.helper.make_tensor(table.name, onnx.TensorProto.INT4, values.shape, values.flatten()))
    onnx.save(model, str(target))


def kernel_models(scratch: Path) -> dict[str, tuple[Path, list[dict]]]:
    """One-op graphs, each with its feed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def save(name, nodes, inputs, initializers):
        graph = helper.make_graph(nodes, name, inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
                                  initializer=initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        path = scratch / f"kernel-{name}.onnx"
        onnx.save(model, str(path))
        return path

    rng = np.random.default_rng(0)
    norm = [numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
            numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta")]
    pair = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None, HIDDEN]) for n in ("x", "skip")]
    skip = save("skip", [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta"], ["logits"],
                                          domain="com.microsoft", epsilon=1e-12)], pair, norm)
    add = save("add", [helper.make_node("Add", ["x", "skip"], ["sum"]),
                       helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["logits"], axis=-1,
                                        epsilon=1e-12)], pair, norm)
    models = {}
    for shape in KERNEL_SHAPES:
        feed = {n: rng.standard_normal(shape, dtype=np.float32) for n in ("x", "skip")}
        models[f"SkipLayerNormalization {list(shape)}"] = (skip, [feed])
        models[f"Add + LayerNormalization {list(shape)}"] = (add, [feed])
    rows, values = 17465, rng.integers(-8, 8, size=(17465, HIDDEN), dtype=np.int8)
    scales = numpy_helper.from_array(np.full((rows, HIDDEN // 32), 0.01, np.float32), "scales")
    ids = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])]
    attrs = dict(block_size=32, bits=4, quantize_axis=1, gather_axis=0)
    tables = {"INT4": helper.make_tensor("table", TensorProto.INT4, values.shape, values.flatten()),
              "UINT8": numpy_helper.from_array(((values[:, 0::2] + 8) | ((values[:, 1::2] + 8) << 4)).astype(np.uint8),
                                               "table")}
    feed = {"input_ids": rng.integers(0, rows, size=(1, 27))}
    for kind, table in tables.items():
        path = save(kind, [helper.make_node("GatherBlockQuantized", ["table", "input_ids", "scales"], ["logits"],
                                            domain="com.microsoft", **attrs)], ids, [table, scales])
        models[f"GatherBlockQuantized, {kind} table, 27 rows"] = (path, [feed])
    for m, k, n in GEMM_SHAPES:
        weights = rng.integers(-127, 128, size=(k, n), dtype=np.int8)
        path = save(f"gemm-{m}", [helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["logits"],
                                                   domain="com.microsoft")],
                    [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                    [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "s")])
        models[f"DynamicQuantizeMatMul [{m}, {k}] x [{k}, {n}]"] = (path, [{"x": rng.standard_normal((m, k), dtype=np.float32)}])
    return models


class Session:
    """ONNX Runtime on the CPU, with or without ORT's SkipLayerNormalization fusion at load."""

    def __init__(self, path: str, skip_layer_norm: bool):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=None if skip_layer_norm else [SESSION_FUSION])
        self.names = [i.name for i in self.session.get_inputs()]

    def run(self, feed: dict) -> np.ndarray:
        return self.session.run(["logits"], {k: feed[k] for k in self.names})[0]


def child(spec_path: str, out_path: str) -> None:
    from edgetl.bench.measure import latency_summary, timed_calls

    spec = json.loads(Path(spec_path).read_text())
    feeds = [{k: np.asarray(v, dtype=np.float32 if k in ("x", "skip") else np.int64) for k, v in f.items()}
             for f in spec["feeds"]]
    engine = Session(spec["path"], spec["skip_layer_norm"])
    times = timed_calls(engine, feeds * spec["repeat"], warmup=min(20, len(feeds) * spec["repeat"]))
    Path(out_path).write_text(json.dumps(latency_summary(times)))


def time_in_process(path: Path, feeds: list[dict], skip_layer_norm: bool, repeat: int) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        spec, out = Path(scratch) / "spec.json", Path(scratch) / "out.json"
        spec.write_text(json.dumps({"path": str(path), "skip_layer_norm": skip_layer_norm, "repeat": repeat,
                                    "feeds": [{k: v.tolist() for k, v in f.items()} for f in feeds]}))
        subprocess.run([sys.executable, __file__, "--child", str(spec), str(out)], check=True)
        return json.loads(out.read_text())["p50_ms"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run", nargs="?", help="a run folder with export and quantize stages (e.g. runs/sst-tiny)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--texts", type=int, default=300, help="evaluation texts per call sequence")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from edgetl.artifact import Artifact
    from edgetl.bench.machine import describe, machine_info
    from edgetl.data import load_evaluation
    from edgetl.recipe import load_recipe
    from edgetl.runtime.text import encode, load_tokenizer
    from edgetl.tasks import task_for

    run = Path(args.run)
    export = Artifact.load(next(run.glob("[0-9][0-9]-export")))
    recipe = load_recipe(str(run / "recipe.resolved.yaml"))
    data, task = recipe.data, task_for(recipe.task)
    tokenizer = load_tokenizer(export.model_path("onnx").parent, data.max_length, data.truncation, data.head_tokens)
    texts = task.examples(load_evaluation(data, task)[:])[: args.texts]  # as the benchmark stage draws them
    feeds = [encode(tokenizer, [t], task.pretokenized) for t in texts]
    with tempfile.TemporaryDirectory() as scratch:
        cells = {name: (path, feeds, name != MODEL_VARIANTS[3], 1)
                 for name, path in build_models(run, Path(scratch)).items()}
        cells |= {name: (path, feed, True, 50 if name.endswith("[1024, 1024]") else 300)
                  for name, (path, feed) in kernel_models(Path(scratch)).items()}
        p50s = {name: [] for name in cells}
        for round_ in range(args.rounds):
            for name in (list(cells) if round_ % 2 == 0 else list(cells)[::-1]):
                p50s[name].append(time_in_process(*cells[name]))
                print(f"round {round_ + 1}: {name}: {p50s[name][-1]:.4f} ms", flush=True)
    summary = {name: {"p50_ms": round(float(np.median(v)), 4), "round_p50s_ms": v,
                      "spread": round(float((max(v) - min(v)) / np.median(v)), 3)} for name, v in p50s.items()}
    for m, k, n in GEMM_SHAPES:
        cell = summary[f"DynamicQuantizeMatMul [{m}, {k}] x [{k}, {n}]"]
        cell["multiply_adds_per_s"] = round(m * k * n / (cell["p50_ms"] / 1e3), -6)
    models = [name for name in MODEL_VARIANTS if name in summary]
    for name in models:
        summary[name]["speed_up_vs_first"] = round(summary[models[0]]["p50_ms"] / summary[name]["p50_ms"], 2)
    record = {"run": str(run), "texts": len(feeds), "rounds": args.rounds, "machine": describe(machine_info()),
              "variants": summary}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / f"ort_int8_graph-{run.name}.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

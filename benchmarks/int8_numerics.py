"""How far a model's answers move between correct executions of the same file: ONNX Runtime with its graph
optimizations (what the Python runtime runs), ONNX Runtime without them, and onnxruntime-web's WebAssembly build
(the one an `edgetl export-web` page ships, run here in Node.js on one thread).

    .venv/bin/python benchmarks/int8_numerics.py BUNDLE PAGE_DIR [--model NAME=FILE ...] [--texts FILE] [--out OUT.json]

Every text of --texts (default: SST-2 dev) is cut into token ids once, by the bundle's tokenizer as the Python runtime
cuts it; each model (the bundle's own, and each --model, e.g. its FP32 export or a static-INT8 one) answers them in
the three executions, and each pair of executions is compared: the largest difference of a label's probability, how
many texts differ by more than 1e-3, how many labels differ. For the bundle's model it then traces the text whose
answers differ most between ONNX Runtime without optimizations and WebAssembly: every node's output in both (the
model with each node output made a graph output), listing the first nodes whose outputs differ, so the first
difference and what it grows into can be read off. Needs Node.js (`node`) and a folder `edgetl export-web` wrote.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TOLERANCE = 1e-3
DEV = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "dev.tsv"

# Reads feeds (token ids per text) and writes each text's outputs, from the page's own onnxruntime-web build.
NODE_RUNNER = """
import * as ort from "%(ort)s";
import fs from "fs";
const [model, feedsFile, out, all] = process.argv.slice(2);
ort.env.wasm.numThreads = 1;
const session = await ort.InferenceSession.create(fs.readFileSync(model), { executionProviders: ["wasm"] });
const results = [];
for (const ids of JSON.parse(fs.readFileSync(feedsFile))) {
  const dims = [1, ids.length];
  const tensor = (values) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
  const feeds = { input_ids: tensor(ids), attention_mask: tensor(ids.map(() => 1)), token_type_ids: tensor(ids.map(() => 0)) };
  for (const name of Object.keys(feeds)) if (!session.inputNames.includes(name)) delete feeds[name];
  const outputs = await session.run(feeds);
  const names = all ? session.outputNames : [session.outputNames[0]];
  results.push(Object.fromEntries(names.map((name) => [name, Array.from(outputs[name].data, Number)])));
}
fs.writeFileSync(out, JSON.stringify(results));
"""


def onnxruntime_outputs(model: Path, ids: list[list[int]], optimized: bool, all_outputs: bool = False) -> list[dict]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()][: None if all_outputs else 1]
    results = []
    for row in ids:
        x = np.array([row], dtype=np.int64)
        feeds = {"input_ids": x, "attention_mask": np.ones_like(x), "token_type_ids": np.zeros_like(x)}
        values = session.run(names, {k: v for k, v in feeds.items() if k in inputs})
        results.append({n: v.ravel().astype(np.float64) for n, v in zip(names, values, strict=True)})
    return results


def webassembly_outputs(model: Path, ids: list[list[int]], page: Path, all_outputs: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        runner, feeds, out = (Path(scratch) / n for n in ("run.mjs", "feeds.json", "out.json"))
        runner.write_text(NODE_RUNNER % {"ort": (page / "vendor" / "ort.wasm.min.mjs").resolve().as_uri()})
        feeds.write_text(json.dumps(ids))
        done = subprocess.run(["node", str(runner), str(model), str(feeds), str(out), "all" if all_outputs else ""],
                              capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"int8_numerics: onnxruntime-web failed on {model}: {done.stderr[-2000:]}")
        return [{n: np.array(v, dtype=np.float64) for n, v in row.items()} for row in json.loads(out.read_text())]


def probabilities(outputs: list[dict]) -> np.ndarray:
    from edgetl.runtime.text import softmax

    return softmax(np.stack([next(iter(row.values())) for row in outputs]))


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    gap = np.abs(a - b).max(1)
    return {"largest": float(gap.max()), "beyond_tolerance": int((gap > TOLERANCE).sum()),
            "labels_differ": int((a.argmax(1) != b.argmax(1)).sum())}


def every_output(model: Path, target: Path) -> None:
    """``model`` with each node's output a graph output too (types from shape inference, else from the op)."""
    import onnx
    from onnx import TensorProto, helper

    graph_model = onnx.shape_inference.infer_shapes(onnx.load(model))
    graph = graph_model.graph
    known = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.output, *graph.input]}
    exposed = {o.name for o in graph.output}
    for node in graph.node:
        for index, name in enumerate(node.output):
            if not name or name in exposed:
                continue
            elem = known.get(name)
            if elem is None:
                if node.op_type == "DynamicQuantizeLinear":
                    elem = [TensorProto.UINT8, TensorProto.FLOAT, TensorProto.UINT8][index]
                elif node.op_type.endswith("EmbedLayerNormalization") and index == 1:
                    elem = TensorProto.INT32  # the mask index
                elif node.op_type == "MatMulInteger":
                    elem = TensorProto.INT32
                elif node.op_type == "Cast":
                    elem = next(a.i for a in node.attribute if a.name == "to")
                else:
                    elem = TensorProto.FLOAT
            graph.output.append(helper.make_tensor_value_info(name, elem, None))
            exposed.add(name)
    onnx.save(graph_model, target)


def trace(model: Path, ids: list[int], page: Path, first: int = 12) -> list[dict]:
    """The first ``first`` nodes whose outputs differ between ONNX Runtime (no graph optimizations, so every node
    runs as written) and WebAssembly, on one text."""
    import onnx

    with tempfile.TemporaryDirectory() as scratch:
        debug = Path(scratch) / "every-output.onnx"
        every_output(model, debug)
        native = onnxruntime_outputs(debug, [ids], optimized=False, all_outputs=True)[0]
        web = webassembly_outputs(debug, [ids], page, all_outputs=True)[0]
        nodes = onnx.load(debug, load_external_data=False).graph.node
    rows = []
    for node in nodes:
        for name in node.output:
            if name in native and name in web and native[name].size:
                gap = np.abs(native[name] - web[name])
                if gap.max() > 0:
                    rows.append({"op": node.op_type, "output": name, "largest_difference": float(gap.max()),
                                 "values_differ": int((gap > 0).sum()), "values": int(gap.size),
                                 "largest_value": float(np.abs(native[name]).max())})
    return rows[:first]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("page", type=Path, help="a folder edgetl export-web wrote (its vendor/ onnxruntime-web build)")
    parser.add_argument("--model", action="append", default=[], metavar="NAME=FILE",
                        help="another ONNX model that reads the same token ids (repeatable)")
    parser.add_argument("--texts", type=Path, default=DEV)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from web_page import read_texts

    from edgetl.runtime import load

    runtime = load(args.bundle, backend="onnxruntime")
    texts, _ = read_texts(args.texts)
    ids = [e.ids for e in runtime.tokenizer.encode_batch(texts)]
    bundle_model = runtime.folder / runtime.manifest["models"][runtime.backend]["path"]
    models = {"bundle": bundle_model, **dict(item.split("=", 1) for item in args.model)}
    report = {"bundle": str(args.bundle), "texts": len(texts), "texts_file": str(args.texts),
              "packages": json.loads((args.page / "vendor" / "packages.json").read_text()), "models": {}}
    worst = None
    for name, model in models.items():
        answers = {"onnxruntime": probabilities(onnxruntime_outputs(Path(model), ids, optimized=True)),
                   "onnxruntime_unoptimized": probabilities(onnxruntime_outputs(Path(model), ids, optimized=False)),
                   "webassembly": probabilities(webassembly_outputs(Path(model), ids, args.page))}
        report["models"][name] = {"file": str(model), **{f"{a}_vs_{b}": compare(answers[a], answers[b])
                                                         for a, b in itertools.combinations(answers, 2)}}
        if name == "bundle":
            worst = int(np.abs(answers["onnxruntime_unoptimized"] - answers["webassembly"]).max(1).argmax())
    report["trace"] = {"text": texts[worst], "nodes": trace(bundle_model, ids[worst], args.page)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

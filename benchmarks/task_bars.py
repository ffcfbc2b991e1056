"""Where a `conll-ner-int8`, `stsb-cross-int8` or `stsb-embed-int8` run stands against issue 16's and 17's bars, and
whether its bundle answers as its evaluation did (the bundle is loaded and run here; everything else is read from the
run's files).

    python benchmarks/task_bars.py runs/conll-ner-int8 [--out benchmarks/results/conll-ner-int8/bars.json]

- FP32 dev metric (PyTorch, the run's first model) at least 90.0 entity F1, 85.0 Spearman x100 (issue 16's tasks;
  issue 17's embedding bar is a reference computation: ``benchmarks/embedding_reference.py``);
- ONNX Runtime INT8 and OpenVINO INT8 each lose at most 0.5 of it (points on the 0-100 scale);
- ONNX Runtime INT8 batch-1 p50 at least 4x faster than PyTorch FP32 eager, in the run's benchmark;
- the bundle, through ``edgetl.runtime.load`` on each of its backends, gives every dev input the same answer as
  the evaluate stage's saved outputs of the model it holds: for token classification the same word tags and the
  same entities (``entities_from_words`` on the evaluation's logits), for a score the same value.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgetl.data import load_evaluation
from edgetl.recipe import load_recipe
from edgetl.runtime import load
from edgetl.runtime.entities import entities_from_words, word_labels
from edgetl.tasks import task_for
from edgetl.tasks.sentence_embedding import cosines as task_module_cosines

MIN_FP32 = {"token-classification": 90.0, "text-regression": 85.0}
FIDELITY_BARS = {"cosine_mean": 0.99, "cosine_p1": 0.97, "recall_at_10": 0.95}


def evaluated_outputs(run: Path, artifact: str, backend: str, encodings: list) -> list[np.ndarray]:
    """The evaluate stage's saved outputs of one target, one array per input (rows per token split back)."""
    saved = np.load(next(run.glob("[0-9][0-9]-evaluate")) / f"logits-{artifact}-{backend}.npy")
    if saved.shape[0] == len(encodings):  # one row per input
        return list(saved)
    ends = np.cumsum([len(e.ids) for e in encodings])
    return np.split(saved, ends[:-1])


def bundle_parity(run: Path, recipe, task) -> dict:
    """Per backend of the bundle: inputs whose answer differs from the evaluation's, of how many."""
    bundle_dir = next(run.glob("[0-9][0-9]-bundle"))
    manifest = json.loads((bundle_dir / "edgetl.json").read_text())
    source = manifest["provenance"]["source_artifact"]
    dev = load_evaluation(recipe.data, task)[:]
    inputs = task.examples(dev)
    found = {}
    for backend in manifest["models"]:
        runtime = load(bundle_dir, backend="onnxruntime" if backend == "onnx" else backend)
        encodings = runtime.tokenizer.encode_batch(inputs, is_pretokenized=task.pretokenized)
        expected = evaluated_outputs(run, source, backend, encodings)
        if task.pretokenized:
            tags = runtime.tags_words(inputs)
            entities = runtime.predict_words(inputs)
            want_tags = [word_labels(o, e.word_ids, runtime.labels, num_words=len(w))
                         for o, e, w in zip(expected, encodings, inputs, strict=True)]
            want_entities = [entities_from_words(o, e.word_ids, w, runtime.labels)
                             for o, e, w in zip(expected, encodings, inputs, strict=True)]
            differ = sum(a != b or c != d for a, b, c, d in zip(tags, want_tags, entities, want_entities, strict=True))
            found[backend] = {"inputs": len(inputs), "differ": differ,
                              "entities": sum(len(e) for e in entities)}
        elif task.fidelity is not None:
            vectors = runtime.embed(inputs)
            cosines = task_module_cosines(vectors, np.stack(expected))
            found[backend] = {"inputs": len(inputs), "differ": int((cosines < 0.9999).sum()),
                              "min_cosine": round(float(cosines.min()), 6)}
        else:
            scores = runtime.predict(inputs)
            differ = sum(abs(a - float(o[0])) > 1e-6 for a, o in zip(scores, expected, strict=True))
            found[backend] = {"inputs": len(inputs), "differ": int(differ)}
    return found


def bars(run: Path) -> dict:
    recipe = load_recipe(str(run / "recipe.resolved.yaml"))
    task = task_for(recipe.task)
    metric, scale = task.metric, task.metric_scale
    rows = {r["target"]: r for r in json.loads(next(run.glob("[0-9][0-9]-evaluate/evaluation.json")).read_text())}
    scored = {target: r[metric] * scale for target, r in rows.items()}
    timed = {r["target"]: r for r in json.loads(next(run.glob("[0-9][0-9]-benchmark/results.json")).read_text())["rows"]}
    quantized = next(run.glob("[0-9][0-9]-quantize")).name
    first = next(target for target in rows if target.startswith("pytorch-fp32"))
    fp32 = scored[first]
    int8 = {b: f"{b}-{json.loads((run / quantized / 'manifest.json').read_text())['models'][b]['precision']} ({quantized})"
            for b in ("onnx", "openvino")}
    drops = {b: round(fp32 - scored[target], 3) for b, target in int8.items()}
    speedup = timed[first]["p50_ms"] / timed[int8["onnx"]]["p50_ms"]
    parity = bundle_parity(run, recipe, task)
    result = {
        "run": str(run), "task": task.name, "metric": metric, "fp32": round(fp32, 3),
        "int8_drop": drops, "int8_drop_bar": 0.5, "int8_met": all(d <= 0.5 for d in drops.values()),
        "onnx_int8_speedup_vs_pytorch_fp32": round(speedup, 2), "speedup_bar": 4.0, "speedup_met": speedup >= 4.0,
        "bundle_parity": parity, "bundle_parity_met": all(p["differ"] == 0 for p in parity.values()),
    }
    if task.name in MIN_FP32:
        result |= {"fp32_bar": MIN_FP32[task.name], "fp32_met": fp32 >= MIN_FP32[task.name]}
    if task.fidelity is not None:
        fidelity = {b: {k: rows[target][k] for k in FIDELITY_BARS} for b, target in int8.items()}
        result |= {"int8_precision": {b: target.split(" ")[0] for b, target in int8.items()},
                   "fidelity": fidelity, "fidelity_bars": FIDELITY_BARS,
                   "fidelity_met": all(f[k] >= bar for f in fidelity.values() for k, bar in FIDELITY_BARS.items())}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = json.dumps(bars(args.run), indent=1)
    print(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    main()

"""Which INT8 keeps an embedding model's vectors: every ONNX Runtime and OpenVINO setting of the quantize stage,
scored by fidelity to the FP32 export (mean / 1st-percentile cosine, recall@10 agreement) on held-out training
sentences (what a choice may be made on) and on the dev sentences, plus dev Spearman.

    python benchmarks/embedding_int8.py runs/stsb-embed-int8 --out benchmarks/results/stsb-embed-int8/int8-settings.json

Reads the run's export stage (unfused ONNX graph, OpenVINO IR) and quantizes afresh for each setting, calibrating on
the first 300 training inputs as the quantize stage does; the held-out sentences are the 3,000 after them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from edgetl.artifact import Artifact, model_file_bytes
from edgetl.data import load_evaluation
from edgetl.recipe import load_recipe
from edgetl.runtime.engines import open_engine
from edgetl.runtime.text import load_tokenizer, predict_outputs
from edgetl.stages.quantize import calibration_pool, encode_texts
from edgetl.tasks import task_for

ONNX_SETTINGS = {
    "dynamic": {"method": "dynamic", "per_channel": True},
    "dynamic, per tensor": {"method": "dynamic", "per_channel": False},
    "static (FFN down dynamic)": {"method": "static", "per_channel": True, "dynamic_ffn_down": True},
    "static (FFN down dynamic), SmoothQuant 0.5": {"method": "static", "per_channel": True, "dynamic_ffn_down": True,
                                                   "smooth_alpha": 0.5},
    "dynamic, SmoothQuant 0.5": {"method": "dynamic", "per_channel": True, "smooth_alpha": 0.5},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--calibration", type=int, default=300)
    parser.add_argument("--held-out", type=int, default=3000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from edgetl.quantization import quantize_onnx, quantize_openvino

    recipe = load_recipe(args.run_dir / "recipe.resolved.yaml")
    task, data = task_for(recipe.task), recipe.data
    export = Artifact.load(next(args.run_dir.glob("[0-9][0-9]-export")))
    pool = calibration_pool(data, task)
    calibration, held_out = pool[:args.calibration], pool[args.calibration:args.calibration + args.held_out]
    columns = load_evaluation(data, task)[:]
    dev = task.examples(columns)
    tokenizer = load_tokenizer(export.model_path("onnx").parent, data.max_length, data.truncation, data.head_tokens)
    feeds = encode_texts(data, calibration, export.model_path("onnx").parent)

    def vectors(backend: str, path: Path) -> dict:
        engine = open_engine(backend, path)
        return {name: predict_outputs(engine, tokenizer, texts, 1)[0] for name, texts in (("held_out", held_out), ("dev", dev))}

    reference = {b: vectors(b, export.model_path(b)) for b in ("onnx", "openvino")}
    rows = []

    def score(backend: str, setting: str, path: Path) -> None:
        got = vectors(backend, path)
        row = {"backend": backend, "setting": setting, "mb": round(model_file_bytes(path) / 1e6, 2)}
        for name in ("held_out", "dev"):
            texts = held_out if name == "held_out" else dev
            fidelity = task.fidelity(got[name], reference[backend][name], texts)
            row |= {f"{name} {k}": round(v, 5) for k, v in fidelity.items()}
        row["dev spearman"] = round(task.score(got["dev"], [], columns, None)["spearman"], 3)
        rows.append(row)
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory() as scratch:
        unfused = export.path / export.manifest["unfused_onnx"]
        for setting, kwargs in ONNX_SETTINGS.items():
            target = Path(scratch) / f"onnx-{len(rows)}.onnx"
            kwargs = dict(kwargs)
            quantize_onnx(unfused, target, kwargs.pop("method"), feeds, kwargs.pop("per_channel"), **kwargs)
            score("onnx", setting, target)
        target = Path(scratch) / "openvino.xml"
        quantize_openvino(export.model_path("openvino"), target, feeds)
        score("openvino", "nncf.quantize, transformer preset", target)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"run": str(args.run_dir), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

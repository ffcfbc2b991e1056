"""The app-ready bundle: INT8 model(s), tokenizer, task, labels, max length, metrics and checksums in ``edgetl.json``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgetl import __version__
from edgetl.architectures import adapter_for
from edgetl.artifact import StageOutput, file_table
from edgetl.backends import Target
from edgetl.bench.machine import describe
from edgetl.data import label_names
from edgetl.errors import StageError
from edgetl.recipe import BundleStage
from edgetl.tasks import task_for

BUNDLE_FORMAT = "edgetl-bundle"
BUNDLE_VERSION = 1


def _benchmark_rows(ctx) -> tuple[dict[str, dict], dict | None]:
    bench = ctx.latest("benchmark")
    if bench is None:
        return {}, None
    result = json.loads((bench.path / "results.json").read_text())
    return {r["target"]: r for r in result["rows"]}, result["machine"]


def run(cfg: BundleStage, ctx, out_dir: Path) -> StageOutput:
    source = ctx.latest("quantized", "exported")
    if source is None:
        raise StageError("bundle: no exported or quantized model to bundle")
    missing = [b for b in cfg.backends if b not in source.models]
    if missing:
        raise StageError(f"bundle: {source.name} has no {missing} model; backends there: {list(source.models)}")
    recipe, task = ctx.recipe, task_for(ctx.recipe.task)
    evaluation = ctx.latest("evaluation")
    scores = evaluation.metrics if evaluation else {}
    rows, machine = _benchmark_rows(ctx)
    models, metrics = {}, {}
    for backend in cfg.backends:
        folder = source.model_path(backend).parent
        shutil.copytree(folder, out_dir / backend)
        model_file = f"{backend}/{source.model_path(backend).name}"
        key = f"{backend}-{source.models[backend]['precision']} ({source.name})"
        models[backend] = {"path": model_file, "precision": source.models[backend]["precision"],
                           "batch_invariant": Target(source, backend).batch_invariant}
        metrics[backend] = {task.metric: scores.get(key), "p50_ms": rows.get(key, {}).get("p50_ms"),
                            "throughput_per_s": rows.get(key, {}).get("throughput_per_s"),
                            "model_mb": rows.get(key, {}).get("model_mb")}
    shutil.copy2(out_dir / cfg.backends[0] / "tokenizer.json", out_dir / "tokenizer.json")
    config = json.loads((out_dir / cfg.backends[0] / "config.json").read_text())
    labels = label_names(recipe.data, task) or []  # none for a score
    if labels and labels != [config["id2label"][str(i)] for i in range(len(config["id2label"]))]:
        raise StageError(f"bundle: the model's labels {config['id2label']} are not the recipe's {labels}")
    manifest = {
        "format": BUNDLE_FORMAT,
        "format_version": BUNDLE_VERSION,
        "edgetl_version": __version__,
        "task": recipe.task,
        "labels": labels,
        "text_pair": recipe.data.text_pair_field is not None and task.reads_pairs,
        "max_length": recipe.data.max_length,
        "truncation": recipe.data.truncation,
        "head_tokens": recipe.data.head_tokens,
        "input_names": list(adapter_for(config["model_type"]).input_names),
        "models": models,
        "metrics": {"metric": task.metric, "per_backend": metrics, "accuracy_split": "eval", "measured_on": describe(machine) if machine else None},
        "provenance": {"recipe": recipe.name, "model": recipe.model, "data": recipe.data.dataset,
                       "evaluated_on": recipe.data.target or recipe.data.dataset,
                       "source_artifact": source.name},
        "files": file_table(out_dir),
    }
    if task.runtime == "Generator":  # what ends a generation, and the limits a server enforces
        context = config.get("max_position_embeddings")
        if context is not None and recipe.data.max_length + cfg.max_new_tokens > context:
            raise StageError(f"bundle: a prompt of data.max_length {recipe.data.max_length} tokens plus max_new_tokens "
                             f"{cfg.max_new_tokens} overruns the model's {context} positions; lower one of them")
        manifest["generation"] = {"eos_token_ids": _eos_ids(out_dir / cfg.backends[0]),
                                  "max_new_tokens": cfg.max_new_tokens, "context": context}
    if "cloze" in config:  # a cloze classifier: the runtime places each text in its pattern
        manifest["cloze"] = config["cloze"]
    if "sentence_pooling" in config:  # a sentence-embedding model: what its one output is
        # The width under the architecture's own key: DistilBERT's config.json says dim, not hidden_size.
        width = config[adapter_for(config["model_type"]).config_keys.hidden]
        manifest["embedding"] = {"dimension": width, "pooling": config["sentence_pooling"],
                                 "normalize": config["sentence_normalize"]}
    (out_dir / "edgetl.json").write_text(json.dumps(manifest, indent=1))
    summary = {f"{b} {task.metric}": m[task.metric] for b, m in metrics.items() if m[task.metric] is not None}
    summary["bundle_bytes"] = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    return StageOutput(kind="bundle", precision=source.manifest.get("precision"), models=models, metrics=summary)


def _eos_ids(folder: Path) -> list[int]:
    """The end-of-sequence ids a decoder's generation_config.json (else config.json) names."""
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file() and (eos := json.loads(path.read_text()).get("eos_token_id")) is not None:
            return eos if isinstance(eos, list) else [eos]
    return []

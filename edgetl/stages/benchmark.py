"""Latency, throughput, size, memory and accuracy of every model artifact x backend, side by side."""

from __future__ import annotations

import importlib
from pathlib import Path

from edgetl.artifact import MODEL_KINDS, StageOutput
from edgetl.bench.run import benchmark
from edgetl.data import load_evaluation
from edgetl.recipe import BenchmarkStage
from edgetl.tasks import task_for


def run(cfg: BenchmarkStage, ctx, out_dir: Path) -> StageOutput:
    task = task_for(ctx.recipe.task)
    # The task's model inputs at the lengths the model will meet (the target domain if set).
    inputs = task.examples(load_evaluation(ctx.recipe.data, task)[:])
    evaluation = ctx.latest("evaluation")
    scores = evaluation.metrics if evaluation else {}
    models = [a for a in ctx.inputs if a.kind in (*MODEL_KINDS, "bundle")]  # bundles: bench.compare
    if task.bench is not None:  # the task's own measures (a decoder's time to first token and tokens/s)
        module, _, function = task.bench.partition(":")
        run_benchmark = getattr(importlib.import_module(module), function)
    else:
        run_benchmark = benchmark
    result = run_benchmark(models, inputs, scores, ctx.recipe.bench, ctx.recipe.data.max_length, out_dir,
                       title=ctx.recipe.name, task=task)
    metrics = {f"{r['target']} p50_ms": r["p50_ms"] for r in result["rows"]}
    return StageOutput(kind="benchmark", metrics=metrics)

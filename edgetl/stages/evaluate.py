"""The task's metric for every model artifact on the evaluation split, each through its own runtime.

``evaluation.json`` holds one row per artifact and backend; its metric is under the task's metric name:
``accuracy`` for text classification, ``f1`` (entity-level, with ``entity_precision`` and ``entity_recall``) for
token classification, ``spearman`` (x100, with ``pearson``) for text regression and sentence embeddings,
``perplexity`` (lower is better) for text generation. A reader takes the key named by the task's ``metric``, which
is also what the manifest's metrics give per target. A task with a ``fidelity`` measure (sentence-embedding's
closeness of vectors, text-generation's greedy agreement) also gets each artifact's closeness to the first FP32
one's outputs (``fidelity_to`` names it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgetl.artifact import StageOutput
from edgetl.backends import targets_of
from edgetl.data import label_names, load_evaluation
from edgetl.recipe import EvaluateStage
from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_outputs
from edgetl.tasks import task_for

log = logging.getLogger("edgetl")


def run(cfg: EvaluateStage, ctx, out_dir: Path) -> StageOutput:
    data, task = ctx.recipe.data, task_for(ctx.recipe.task)
    dev = load_evaluation(data, task)
    columns, labels = dev[:], label_names(data, task)
    inputs = task.examples(columns)
    rows, reference = [], None
    for target in targets_of(ctx.inputs):
        tokenizer = load_tokenizer(target.folder, data.max_length, data.truncation, data.head_tokens)
        # A batch-dependent model is evaluated one text per call, as the runtime then predicts by default.
        batch_size = batch_size_for(target.batch_invariant, cfg.batch_size)
        outputs, encodings = (task.predict or predict_outputs)(target.open(task=task), tokenizer, inputs, batch_size,
                                                               task.pretokenized, desc=target.key)
        metrics = task.score(outputs, encodings, columns, labels)
        if task.fidelity is not None:
            if reference is None and target.precision == "fp32":
                reference = target.key, outputs
            if reference is not None:
                metrics |= {**task.fidelity(outputs, reference[1], inputs), "fidelity_to": reference[0]}
        metrics = {name: round(value, 5) if isinstance(value, float) else value for name, value in metrics.items()}
        rows.append({"target": target.key, "artifact": target.artifact.name, "backend": target.backend,
                     "precision": target.precision, **metrics, "samples": len(inputs), "split": data.target or "eval",
                     "batch_size": batch_size})
        # One row per text, or per token (every sentence's tokens in turn) for a model that labels tokens.
        logits = np.concatenate([np.atleast_2d(output) for output in outputs])
        np.save(out_dir / f"logits-{target.artifact.name.replace('/', '_')}-{target.backend}.npy", logits)
        log.info("evaluate: %-32s %s %.4f", target.key, task.metric, metrics[task.metric])
    (out_dir / "evaluation.json").write_text(json.dumps(rows, indent=1))
    return StageOutput(kind="evaluation", metrics={r["target"]: r[task.metric] for r in rows})

"""Accuracy of every model artifact on the evaluation split, each through its own runtime."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from edgetl.artifact import StageOutput
from edgetl.backends import targets_of
from edgetl.data import load_evaluation
from edgetl.recipe import EvaluateStage
from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_logits

log = logging.getLogger("edgetl")


def run(cfg: EvaluateStage, ctx, out_dir: Path) -> StageOutput:
    data = ctx.recipe.data
    dev = load_evaluation(data)
    texts, labels = dev["text"], np.asarray(dev["label"])
    rows = []
    for target in targets_of(ctx.inputs):
        tokenizer = load_tokenizer(target.folder, data.max_length, data.truncation, data.head_tokens)
        # A batch-dependent model is evaluated one text per call, as the runtime then predicts by default.
        batch_size = batch_size_for(target.batch_invariant, cfg.batch_size)
        logits = predict_logits(target.open(), tokenizer, texts, batch_size, desc=target.key)
        accuracy = float((logits.argmax(-1) == labels).mean())
        rows.append({"target": target.key, "artifact": target.artifact.name, "backend": target.backend,
                     "precision": target.precision, "accuracy": round(accuracy, 5), "samples": len(texts), "split": data.target or "eval",
                     "batch_size": batch_size})
        np.save(out_dir / f"logits-{target.artifact.name.replace('/', '_')}-{target.backend}.npy", logits)
        log.info("evaluate: %-32s accuracy %.4f", target.key, accuracy)
    (out_dir / "evaluation.json").write_text(json.dumps(rows, indent=1))
    return StageOutput(kind="evaluation", metrics={r["target"]: r["accuracy"] for r in rows})

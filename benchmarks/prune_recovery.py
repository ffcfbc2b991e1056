"""What structured pruning of a distilled student keeps, and how sure its teachers are: the measurements behind
issue 24 (``sst-tiny`` losing accuracy in pruning and recovery).

For a run folder with a fine-tuned teacher (``01-finetune``) and a distilled student (``02-distill``) it prints
and writes, as JSON:
- how sure each model is on the training sentences that importance is scored on and on dev (mean
  probability of the predicted label, share of texts above 0.99, mean |logit margin|, cross-entropy);
- the structure that each importance score keeps at the recipe's keep ratios (heads and FFN neurons per
  layer) and the dev accuracy of the pruned model before any recovery, in FP32.

    python benchmarks/prune_recovery.py runs/sst-tiny --out benchmarks/results/sst-tiny/prune-diagnosis.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def sureness(logits: np.ndarray, labels: np.ndarray) -> dict:
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    top = np.sort(logits, -1)
    return {"accuracy": round(float((logits.argmax(-1) == labels).mean()), 5),
            "mean_top_probability": round(float(probs.max(-1).mean()), 5),
            "share_above_0.99": round(float((probs.max(-1) > 0.99).mean()), 5),
            "mean_logit_margin": round(float((top[:, -1] - top[:, -2]).mean()), 4),
            "cross_entropy": round(float(-np.log(probs[np.arange(len(labels)), labels] + 1e-12).mean()), 5)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="run folder holding 01-finetune and 02-distill")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--samples", type=int, default=2048, help="training sentences (the prune stage's importance_samples)")
    args = parser.parse_args()

    import copy

    import yaml
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.data import load_labelled, tokenize
    from edgetl.modeling import layer_sizes, load_classifier
    from edgetl.pruning import apply_plan, fisher_importance, make_plan, taylor_importance
    from edgetl.recipe import Recipe
    from edgetl.stages.prune import importance_batches
    from edgetl.training import logits_of

    recipe = Recipe.model_validate(yaml.safe_load((args.run / "recipe.resolved.yaml").read_text()))
    prune = next(s for s in recipe.stages if s.stage == "prune")
    train, dev = load_labelled(recipe.data)
    report = {"run": str(args.run), "samples": args.samples, "models": {}, "plans": {}}
    student_dir = args.run / "02-distill"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    collator = DataCollatorWithPadding(tokenizer)
    train_tok, dev_tok = tokenize(train, tokenizer, recipe.data), tokenize(dev, tokenizer, recipe.data)
    sample = train_tok.shuffle(seed=0).select(range(min(args.samples, len(train_tok))))
    for name in ("01-finetune", "02-distill"):
        model = load_classifier(args.run / name)
        report["models"][name] = {
            split: sureness(logits_of(model, data, collator, 128), np.asarray(data["label"]))
            for split, data in (("train_sample", sample), ("dev", dev_tok))}
        print(name, json.dumps(report["models"][name]))
    student = load_classifier(student_dir)
    batches = importance_batches(train_tok, collator, args.samples)
    for method, score in (("taylor", lambda m: taylor_importance(m, batches)),
                          ("fisher", lambda m: fisher_importance(m, batches))):
        pruned = copy.deepcopy(student)
        plan = make_plan(score(pruned), prune.heads_keep, prune.ffn_keep, prune.layers_drop)
        apply_plan(pruned, plan)
        logits = logits_of(pruned, dev_tok, collator, 128)
        report["plans"][method] = {"layers": layer_sizes(pruned),
                                   "dev_accuracy_before_recovery": round(float((logits.argmax(-1) == np.asarray(dev_tok["label"])).mean()), 5)}
        print(method, json.dumps(report["plans"][method]))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()

# Experiment record: ran on commit 0542bd5 (as benchmarks/length_phase.py; output and provenance in
# benchmarks/results/sst-int8/length-phase/). It drives edgetl internals (StageContext, training helpers),
# not the public API, so it may need that commit to run.
"""Does the order of length-grouped batches show in dev accuracy? Trains a recipe's finetune stage as the recipe
would (same model, data, schedule) for a few hundred steps, evaluating dev every few steps over a window, beside
the mean length of the batches just trained on; once with HF's batch order, once with edgetl's.

    .venv/bin/python experiments/length_phase.py [--recipe sst-int8] [--start 1200] [--stop 1500] [--every 10]
        [--order hf shuffled] [--out results.json]

HF's LengthGroupedSampler yields each mega-batch of 50 batches longest first, so the batch length falls
through every 50 steps; edgetl's Trainer shuffles the batches (edgetl/training.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

MEGA_BATCH = 50  # HF's get_length_grouped_indices: batches per mega-batch


def train_window(recipe_name: str, order: str, start: int, stop: int, every: int) -> list[dict]:
    import transformers
    from transformers import DataCollatorWithPadding, TrainerCallback

    from edgetl import training
    from edgetl.modeling import new_classifier
    from edgetl.pipeline import StageContext
    from edgetl.recipe import load_recipe
    from edgetl.tasks.text_classification import accuracy

    recipe = load_recipe(recipe_name)
    cfg = next(s for s in recipe.stages if s.stage == "finetune")
    cfg = cfg.model_copy(update={"eval_steps": 10**6})  # no scheduled evaluation or checkpoint: ours below
    with tempfile.TemporaryDirectory() as tmp:
        ctx = StageContext(recipe=recipe, inputs=[], run_dir=Path(tmp), work_dir=Path(tmp))
        model, tokenizer = new_classifier(recipe.model, recipe.data.labels, cfg.pooling)
        train_tok, dev_tok = training.labelled_data(ctx, tokenizer)
        pad = DataCollatorWithPadding(tokenizer)
        tokens: list[float] = []  # mean tokens per text of each training batch, in the order the loader made them

        def collate(rows):
            batch = pad(rows)
            if len(rows) == cfg.batch_size and "labels" in batch:
                tokens.append(float(batch["attention_mask"].sum()) / len(rows))
            return batch

        class Window(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                control.should_evaluate = start <= state.global_step <= stop and state.global_step % every == 0
                control.should_training_stop = state.global_step >= stop

        trainer_cls = transformers.Trainer if order == "hf" else training.Trainer
        trainer = trainer_cls(model=model, args=training.training_arguments(cfg, ctx), train_dataset=train_tok,
                              eval_dataset=dev_tok, data_collator=collate, compute_metrics=accuracy,
                              processing_class=tokenizer, callbacks=[Window()])
        trainer.train()
    return [{"step": h["step"], "phase": h["step"] % MEGA_BATCH, "accuracy": h["eval_accuracy"],
             "tokens_last_10": round(statistics.mean(tokens[h["step"] - 10:h["step"]]), 1)}
            for h in trainer.state.log_history if "eval_accuracy" in h]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="sst-int8")
    parser.add_argument("--start", type=int, default=1200)
    parser.add_argument("--stop", type=int, default=1500)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--order", nargs="+", choices=["hf", "shuffled"], default=["hf", "shuffled"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = {}
    for order in args.order:
        rows = train_window(args.recipe, order, args.start, args.stop, args.every)
        by_phase: dict[int, list[float]] = {}
        for row in rows:
            by_phase.setdefault(row["phase"], []).append(row["accuracy"])
        results[order] = {"evaluations": rows,
                          "mean_by_phase": {p: round(100 * statistics.mean(a), 2) for p, a in sorted(by_phase.items())},
                          "mean": round(100 * statistics.mean(r["accuracy"] for r in rows), 2)}
        print(f"\n{order}: step, step mod {MEGA_BATCH}, mean tokens of the last 10 batches, dev accuracy")
        for row in rows:
            print(f"  {row['step']:5d} {row['phase']:3d} {row['tokens_last_10']:6.1f} {100 * row['accuracy']:6.2f}")
        print(f"  mean by step mod {MEGA_BATCH}: {results[order]['mean_by_phase']}; over the window: {results[order]['mean']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **results}, indent=1))


if __name__ == "__main__":
    main()

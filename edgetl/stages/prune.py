"""Structured pruning (heads, FFN neurons, layers) with recovery distillation, then vocabulary pruning."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import PruneStage

log = logging.getLogger("edgetl")


def importance_batches(train_tok, collator, samples: int, batch_size: int = 32):
    from torch.utils.data import DataLoader

    subset = train_tok.shuffle(seed=0).select(range(min(samples, len(train_tok))))
    return DataLoader(subset, batch_size=batch_size, collate_fn=collator)


def structured_plan(cfg: PruneStage, model, train_tok, collator, work_dir: Path):
    """Score and choose what to keep; the plan is saved first, so a resumed run rebuilds the same shapes."""
    from tqdm import tqdm

    from edgetl.pruning import PrunePlan, magnitude_importance, make_plan, taylor_importance

    saved = work_dir / "plan.json"
    if saved.is_file():
        return PrunePlan(**json.loads(saved.read_text()))
    if cfg.importance == "taylor":
        batches = importance_batches(train_tok, collator, cfg.importance_samples)
        importance = taylor_importance(model, tqdm(batches, desc="importance", leave=False))
    else:
        importance = magnitude_importance(model)
    plan = make_plan(importance, cfg.heads_keep, cfg.ffn_keep, cfg.layers_drop)
    work_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(plan.__dict__))
    return plan


def recover(cfg: PruneStage, ctx, model, teacher, tokenizer, train_tok, dev_tok, collator):
    """Distil the pruned model from the unpruned one; returns the trainer (the model holds the best weights)."""
    from edgetl.distillation import DistillationTrainer, StudentWithProjections
    from edgetl.training import accuracy_metric, train_and_resume, training_arguments

    wrapped = StudentWithProjections(model, teacher.config.hidden_size, use_hidden=bool(cfg.hidden_weight))
    trainer = DistillationTrainer(model=wrapped, args=training_arguments(cfg, ctx), train_dataset=train_tok,
                                  eval_dataset=dev_tok, data_collator=collator, compute_metrics=accuracy_metric,
                                  processing_class=tokenizer, teacher=teacher, kd=cfg)
    train_and_resume(trainer, ctx.work_dir, "prune")
    return trainer


def run(cfg: PruneStage, ctx, out_dir: Path) -> StageOutput:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.data import load_labelled, tokenize
    from edgetl.modeling import load_classifier, model_stats
    from edgetl.pruning import apply_plan
    from edgetl.training import fp32_accuracy, labelled_data, training_metrics

    source = ctx.latest("pytorch-model")
    model = load_classifier(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    metrics = {"before": {k: v for k, v in model_stats(model, dev_tok).items() if k != "layers"}}
    if cfg.structured:
        teacher = copy.deepcopy(model)
        plan = structured_plan(cfg, model, train_tok, collator, ctx.work_dir)
        apply_plan(model, plan)
        metrics["kept_heads"], metrics["dropped_layers"] = plan.heads, plan.drop_layers
        metrics["accuracy_before_recovery"] = round(fp32_accuracy(model, dev_tok, collator, cfg.eval_batch_size), 5)
        if cfg.recovery:
            trainer = recover(cfg, ctx, model, teacher, tokenizer, train_tok, dev_tok, collator)
            metrics.update(training_metrics(trainer, len(train_tok), len(dev_tok)))
            (out_dir / "eval_history.json").write_text(
                json.dumps([h for h in trainer.state.log_history if "eval_accuracy" in h], indent=1))
        del teacher
    if cfg.vocabulary:
        from edgetl.vocab import prune_vocabulary, used_token_ids

        train, dev = load_labelled(ctx.recipe.data)
        keep = used_token_ids(tokenizer, train["text"], cfg.vocab_min_count)
        metrics["vocabulary"] = prune_vocabulary(model, tokenizer, keep, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        dev_tok = tokenize(dev, tokenizer, ctx.recipe.data.max_length)
        collator = DataCollatorWithPadding(tokenizer)
    else:
        tokenizer.save_pretrained(str(out_dir))
    accuracy = fp32_accuracy(model, dev_tok, collator, cfg.eval_batch_size)
    if ctx.rank == 0:
        model.save_pretrained(str(out_dir))
    metrics = {"accuracy": round(accuracy, 5), **model_stats(model, dev_tok), **metrics}
    log.info("prune: %d -> %d parameters", metrics["before"]["parameters"], metrics["parameters"])
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)

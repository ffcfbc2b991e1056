"""Full fine-tuning with HF Trainer: evaluate often, keep the best dev checkpoint, resume after a crash."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import FinetuneStage
from edgetl.training import (
    accuracy_metric,
    fp32_accuracy,
    labelled_data,
    save_classifier,
    train_and_resume,
    training_arguments,
    training_metrics,
)


def run(cfg: FinetuneStage, ctx, out_dir: Path) -> StageOutput:
    from transformers import DataCollatorWithPadding, Trainer

    from edgetl.modeling import model_stats, new_classifier

    model, tokenizer = new_classifier(ctx.recipe.model, ctx.recipe.data.labels, cfg.pooling)
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, ctx),
        train_dataset=train_tok,
        eval_dataset=dev_tok,
        data_collator=collator,
        compute_metrics=accuracy_metric,
        processing_class=tokenizer,
    )
    train_and_resume(trainer, ctx.work_dir, "finetune")
    accuracy = fp32_accuracy(model, dev_tok, collator, cfg.eval_batch_size)
    if ctx.rank == 0:
        save_classifier(model, tokenizer, trainer, out_dir)
    metrics = {"accuracy": round(accuracy, 5), **training_metrics(trainer, len(train_tok), len(dev_tok)),
               **model_stats(model, dev_tok)}
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)


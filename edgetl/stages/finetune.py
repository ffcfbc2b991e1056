"""Full fine-tuning with HF Trainer: evaluate often, keep the best dev checkpoint, resume after a crash."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import FinetuneStage
from edgetl.training import accuracy_metric, finish_training, labelled_data, train_and_resume, training_arguments


def run(cfg: FinetuneStage, ctx, out_dir: Path) -> StageOutput:
    from transformers import DataCollatorWithPadding, Trainer

    from edgetl.modeling import new_classifier

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
    return finish_training(trainer, model, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir)

"""The recipe's model as it was trained, with the task's pooling, saved as the run's first PyTorch model (and as a
folder that sentence-transformers loads)."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import PretrainedStage


def run(cfg: PretrainedStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.data import load_evaluation
    from edgetl.modeling import model_stats, new_embedder
    from edgetl.models import write_sentence_transformers_files
    from edgetl.tasks import task_for

    model, tokenizer = new_embedder(ctx.recipe.model, cfg.pooling, cfg.normalize)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    config = model.config
    write_sentence_transformers_files(out_dir, config.sentence_pooling, config.sentence_normalize, config.hidden_size,
                                      ctx.recipe.data.max_length)
    task = task_for(ctx.recipe.task)
    texts = task.examples(load_evaluation(ctx.recipe.data, task)[:])
    lengths = {"input_ids": tokenizer(texts, truncation=True, max_length=ctx.recipe.data.max_length)["input_ids"]}
    metrics = {"pooling": config.sentence_pooling, "normalize": config.sentence_normalize,
               "dimension": config.hidden_size, **model_stats(model, lengths)}
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)

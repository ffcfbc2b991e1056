"""The recipe's model as it was trained, saved as the run's first PyTorch model: an embedding model with the task's
pooling (and as a folder that sentence-transformers loads), or a decoder with its language-model head."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import PretrainedStage


def run(cfg: PretrainedStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.data import load_evaluation
    from edgetl.modeling import model_stats, new_embedder
    from edgetl.models import write_sentence_transformers_files
    from edgetl.tasks import task_for

    task = task_for(ctx.recipe.task)
    if task.pooling is None:  # the checkpoint's own head (a language model's)
        return _with_own_head(ctx, task, out_dir)
    model, tokenizer = new_embedder(ctx.recipe.model, cfg.pooling, cfg.normalize)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    config = model.config
    write_sentence_transformers_files(out_dir, config.sentence_pooling, config.sentence_normalize, config.hidden_size,
                                      ctx.recipe.data.max_length)
    texts = task.examples(load_evaluation(ctx.recipe.data, task)[:])
    lengths = {"input_ids": tokenizer(texts, truncation=True, max_length=ctx.recipe.data.max_length)["input_ids"]}
    metrics = {"pooling": config.sentence_pooling, "normalize": config.sentence_normalize,
               "dimension": config.hidden_size, **model_stats(model, lengths)}
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)


def _with_own_head(ctx, task, out_dir: Path) -> StageOutput:
    from transformers import AutoTokenizer

    from edgetl.modeling import load_classifier, model_folder

    source = model_folder(ctx.recipe.model)
    model, tokenizer = load_classifier(source, task), AutoTokenizer.from_pretrained(source)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(str(out_dir))
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics={"parameters": sum(p.numel() for p in model.parameters())})

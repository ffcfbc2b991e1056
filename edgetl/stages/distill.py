"""Knowledge distillation into a smaller student (a shallower copy of the teacher, or a named pretrained model)."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.errors import StageError
from edgetl.recipe import DistillStage


def teacher_folder(cfg: DistillStage, ctx) -> Path:
    if cfg.teacher:
        folder = Path(cfg.teacher).expanduser()
        if not (folder / "config.json").is_file():
            raise StageError(f"distill.teacher: {folder} is not a saved model (no config.json)")
        return folder
    source = ctx.latest("pytorch-model")
    if source is None:
        raise StageError("distill: no teacher; set teacher: or add a finetune stage before distill")
    return source.path


def make_student(cfg: DistillStage, teacher, tokenizer, labels: list[str], layers: list[int] | None = None):
    """The student: ``student``'s pretrained model, else a copy of the teacher keeping ``layers`` (given, or
    chosen for ``depth``), else every other layer."""
    from edgetl.distillation import every_other_layer, shallow_copy
    from edgetl.modeling import is_mean_pooled, new_classifier

    if cfg.student is None:
        layers = layers or cfg.layers or every_other_layer(teacher)
        try:
            return shallow_copy(teacher, layers)
        except ValueError as exc:
            raise StageError(f"distill.layers: {exc}") from None
    pooling = "mean" if is_mean_pooled(teacher) else "cls"
    student, student_tokenizer = new_classifier(cfg.student, labels, pooling)
    if student_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise StageError(f"distill.student: '{cfg.student}' tokenizes differently from the teacher; "
                         "distillation feeds both the same token ids, so pick a student with the teacher's vocabulary")
    return student


def run(cfg: DistillStage, ctx, out_dir: Path) -> StageOutput:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.data import label_names
    from edgetl.distillation import choose_layers, distil, distillation_data
    from edgetl.modeling import load_classifier
    from edgetl.tasks import task_for
    from edgetl.training import finish_training

    folder = teacher_folder(cfg, ctx)
    teacher = load_classifier(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    task = task_for(ctx.recipe.task)
    # The task's rows: labelled ones (soft targets), or unlabelled texts with held-out ones to select by (vectors).
    train_tok, dev_tok = distillation_data(ctx, tokenizer, cfg)
    collator = DataCollatorWithPadding(tokenizer)
    chosen = {}
    if cfg.depth is not None:  # on training rows only: the held-out ones select the checkpoint
        try:
            layers, scores = choose_layers(cfg, teacher, cfg.depth, train_tok, collator, task.distillation)
        except ValueError as exc:
            raise StageError(f"distill.depth: {exc}") from None
        chosen = {"chosen_layers": layers, "layer_scores": scores}
    student = make_student(cfg, teacher, tokenizer, label_names(ctx.recipe.data, task), chosen.get("chosen_layers"))
    trainer = distil(cfg, ctx, student, teacher, tokenizer, train_tok, dev_tok, collator, "distill")
    return finish_training(trainer, student, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir,
                           teacher=str(folder), **chosen)

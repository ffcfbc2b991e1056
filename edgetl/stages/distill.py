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
            raise StageError(f"distill.teacher: {folder} is not a saved classifier (no config.json)")
        return folder
    source = ctx.latest("pytorch-model")
    if source is None:
        raise StageError("distill: no teacher; set teacher: or add a finetune stage before distill")
    return source.path


def make_student(cfg: DistillStage, teacher, tokenizer, labels: list[str]):
    from edgetl.distillation import every_other_layer, shallow_copy
    from edgetl.modeling import is_mean_pooled, new_classifier

    if cfg.student is None:
        layers = cfg.layers if cfg.layers is not None else every_other_layer(teacher)
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


def unlabelled_text(path: str, ctx, tokenizer):
    """Extra text for the soft targets, tokenized, with label -100 (no task loss)."""
    import datasets

    from edgetl.data import read_texts, tokenize

    texts = read_texts(Path(path).expanduser(), ctx.recipe.data.text_field, "distill.extra_text_file")
    ds = datasets.Dataset.from_dict({"text": texts, "label": [-100] * len(texts)})
    return tokenize(ds, tokenizer, ctx.recipe.data)


def run(cfg: DistillStage, ctx, out_dir: Path) -> StageOutput:
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.data import label_names
    from edgetl.distillation import distil
    from edgetl.modeling import load_classifier
    from edgetl.training import finish_training, labelled_data

    folder = teacher_folder(cfg, ctx)
    teacher = load_classifier(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    student = make_student(cfg, teacher, tokenizer, label_names(ctx.recipe.data))
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    if cfg.extra_text_file:
        extra = unlabelled_text(cfg.extra_text_file, ctx, tokenizer).cast(train_tok.features)
        train_tok = datasets.concatenate_datasets([train_tok, extra])
    collator = DataCollatorWithPadding(tokenizer)
    trainer = distil(cfg, ctx, student, teacher, tokenizer, train_tok, dev_tok, collator, "distill")
    return finish_training(trainer, student, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir,
                           teacher=str(folder))

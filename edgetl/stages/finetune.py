"""Full fine-tuning with HF Trainer: evaluate often, keep the best dev checkpoint, resume after a crash."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

from edgetl.artifact import StageOutput
from edgetl.data import load_labelled, tokenize
from edgetl.recipe import FinetuneStage

log = logging.getLogger("edgetl")


def last_good_checkpoint(work_dir: Path) -> str | None:
    """Newest ``checkpoint-N`` that Trainer finished writing; half-written ones (killed mid-save) are removed.

    Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so its presence
    marks a complete checkpoint.
    """
    if not work_dir.is_dir():
        return None
    checkpoints = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    good = None
    for checkpoint in checkpoints:
        if (checkpoint / "trainer_state.json").is_file():
            good = checkpoint
        else:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return str(good) if good else None


def native_bf16() -> bool:
    """Whether this machine computes bf16 matrix products natively (else autocast would only slow training)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from edgetl.bench.machine import isa_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(isa_flags()))


def _accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def run(cfg: FinetuneStage, ctx, out_dir: Path) -> StageOutput:
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    from edgetl.modeling import new_classifier

    data = ctx.recipe.data
    train, dev = load_labelled(data)
    model, tokenizer = new_classifier(ctx.recipe.model, data.labels, cfg.pooling)
    train_tok, dev_tok = tokenize(train, tokenizer, data.max_length), tokenize(dev, tokenizer, data.max_length)
    # Evaluation order does not change accuracy; sorted by length, its batches carry little padding.
    dev_tok = dev_tok.map(lambda row: {"n_tokens": len(row["input_ids"])}).sort("n_tokens").remove_columns("n_tokens")
    collator = DataCollatorWithPadding(tokenizer)
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16())
    args = TrainingArguments(
        output_dir=str(ctx.work_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,  # the best checkpoint is kept on top of this limit
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        greater_is_better=True,
        group_by_length=cfg.group_by_length,
        bf16=bf16,
        seed=cfg.seed,
        logging_steps=max(1, min(50, cfg.eval_steps)),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if ctx.world_size > 1 and not torch.cuda.is_available() else None,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_tok,
        eval_dataset=dev_tok,
        data_collator=collator,
        compute_metrics=_accuracy,
        processing_class=tokenizer,
    )
    resume = last_good_checkpoint(ctx.work_dir)
    if resume:
        log.info("finetune: resuming from %s", resume)
    trainer.train(resume_from_checkpoint=resume)
    accuracy = fp32_accuracy(model, dev_tok, collator, cfg.eval_batch_size)
    if ctx.rank == 0:
        trainer.save_model(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "training_args.bin").unlink(missing_ok=True)  # a pickle; the manifest records the config
        history = [h for h in trainer.state.log_history if "eval_accuracy" in h]
        (out_dir / "eval_history.json").write_text(json.dumps(history, indent=1))
    params = sum(p.numel() for p in model.parameters())
    metrics = {
        "accuracy": round(accuracy, 5),
        # What chose the checkpoint: dev accuracy in the training precision (bf16 autocast when enabled).
        "selection_accuracy": round(trainer.state.best_metric, 5) if trainer.state.best_metric is not None else None,
        "best_step": _best_step(trainer.state),
        "steps": trainer.state.global_step,
        "train_samples": len(train_tok),
        "eval_samples": len(dev_tok),
        "parameters": params,
        "train_precision": "bf16" if bf16 else "fp32",
    }
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)


def fp32_accuracy(model, dataset, collator, batch_size: int) -> float:
    """Accuracy of the kept model in FP32, as it is exported (Trainer evaluates under bf16 autocast)."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    correct = 0
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
    return correct / len(dataset)


def _best_step(state) -> int | None:
    checkpoint = state.best_model_checkpoint
    return int(Path(checkpoint).name.split("-")[1]) if checkpoint else None

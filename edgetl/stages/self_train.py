"""Self-training on the target domain: the run's classifier labels the target's unlabelled training texts,
the texts it is surest of join the labelled data, and training goes on; ``rounds`` times.

Round k of n keeps, for every label, the ``fraction * k / n`` of the texts most likely to carry it (more as
the model adapts). With ``balance`` every label gets the same number of texts, so a source model that leans
towards one label on the new domain does not teach itself that lean. No target label is read: the
weights after the last round are kept. Each finished round is saved under the work folder, so a killed run
resumes at the next round.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgetl.artifact import StageOutput
from edgetl.errors import StageError
from edgetl.recipe import SelfTrainStage

log = logging.getLogger("edgetl")


def select_confident(probs: np.ndarray, fraction: float, balance: bool) -> tuple[np.ndarray, np.ndarray]:
    """(indices, pseudo-labels) of the texts kept, surest first.

    balance: every label keeps ``fraction * n / labels`` texts, those with the highest probability of that
    label among all texts (in effect the decision threshold moves until the pseudo-labels are balanced; a
    text is kept once). Otherwise each predicted label keeps ``fraction`` of the texts predicted as it.
    """
    n, n_labels = probs.shape
    predicted = probs.argmax(1)
    picked, labels = [], []
    taken = np.zeros(n, dtype=bool)
    for label in range(n_labels):
        candidates = np.arange(n) if balance else np.flatnonzero(predicted == label)
        quota = int(fraction * n / n_labels) if balance else int(fraction * len(candidates))
        order = candidates[np.argsort(-probs[candidates, label], kind="stable")]
        order = order[~taken[order]][:quota]
        taken[order] = True
        picked.append(order)
        labels.append(np.full(len(order), label))
    return np.concatenate(picked), np.concatenate(labels)


def run(cfg: SelfTrainStage, ctx, out_dir: Path) -> StageOutput:
    import datasets
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.data import target_tokens
    from edgetl.modeling import load_classifier
    from edgetl.runtime.text import softmax
    from edgetl.tasks.text_classification import accuracy
    from edgetl.training import (Trainer, finish_training, labelled_data, logits_of, train_and_resume,
                                 training_arguments, use_bf16)

    source = ctx.latest("pytorch-model")
    model = load_classifier(source.path)  # never prompt-tuned: the recipe check refuses that chain
    tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    collator = DataCollatorWithPadding(tokenizer)
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    target_tok = target_tokens(ctx.recipe.data, tokenizer)
    bf16 = use_bf16(cfg)
    history: list[dict] = []
    trainer = None
    for k in range(1, cfg.rounds + 1):
        done = ctx.work_dir / f"round-{k}"
        if (done / "round.json").is_file():  # finished before a crash: take its weights and go on
            model = load_classifier(done)
            history.append(json.loads((done / "round.json").read_text()))
            log.info("self_train: round %d finished before; resuming after it", k)
            continue
        probs = softmax(logits_of(model, target_tok, collator, cfg.eval_batch_size, bf16))
        picked, labels = select_confident(probs, cfg.fraction * k / cfg.rounds, cfg.balance)
        if len(picked) == 0:
            raise StageError(f"self_train.fraction: {cfg.fraction} keeps no target text of {len(target_tok)}")
        pseudo = target_tok.select(picked.tolist()).add_column("label", labels.tolist())
        n_source = min(len(train_tok), round(cfg.source_ratio * len(picked)))
        mixed = datasets.concatenate_datasets(
            [train_tok.shuffle(seed=cfg.seed + k).select(range(n_source)), pseudo.cast(train_tok.features)])
        work_dir = ctx.work_dir / f"train-{k}"
        trainer = Trainer(model=model, args=training_arguments(cfg, replace(ctx, work_dir=work_dir)),
                          train_dataset=mixed, eval_dataset=dev_tok, data_collator=collator,
                          compute_metrics=accuracy, processing_class=tokenizer)
        train_and_resume(trainer, work_dir, f"self_train round {k}")
        entry = {"round": k, "pseudo_labelled": len(picked), "source_rows": n_source,
                 "per_label": np.bincount(labels, minlength=probs.shape[1]).tolist(),
                 "mean_confidence": round(float(probs[picked, labels].mean()), 4),
                 "predicted_share": np.bincount(probs.argmax(1), minlength=probs.shape[1]).tolist(),
                 "steps": trainer.state.global_step}
        log.info("self_train round %d: %d pseudo-labelled target texts %s + %d labelled rows, %d steps",
                 k, len(picked), entry["per_label"], n_source, entry["steps"])
        if ctx.rank == 0:
            model.save_pretrained(str(done))
            (done / "round.json").write_text(json.dumps(entry))
        history.append(entry)
    if ctx.rank == 0:
        (out_dir / "self_training.json").write_text(json.dumps(history, indent=1))
    if trainer is None:  # every round was finished before: a trainer only to report what it kept
        trainer = Trainer(model=model, args=training_arguments(cfg, ctx), processing_class=tokenizer)
    return finish_training(trainer, model, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir,
                           rounds=len(history), steps=sum(h["steps"] for h in history),
                           pseudo_labelled=history[-1]["pseudo_labelled"])

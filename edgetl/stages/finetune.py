"""Fine-tuning the recipe's task with HF Trainer (full, LoRA or prompt tuning, optionally domain-adversarial, or a
cloze question through the LM head): evaluate often, keep the best dev checkpoint by the task's metric, resume after
a crash."""

from __future__ import annotations

import json
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import FinetuneStage
from edgetl.tasks import task_for
from edgetl.training import (
    Trainer,
    averaging,
    data_collator,
    finish_training,
    labelled_data,
    regularized_dropout,
    train_and_resume,
    training_arguments,
)


def run(cfg: FinetuneStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl import peft_methods
    from edgetl.data import label_names
    from edgetl.modeling import new_classifier

    task = task_for(ctx.recipe.task)
    labels = label_names(ctx.recipe.data, task)
    if cfg.method == "cloze":
        return run_cloze(cfg, ctx, out_dir, labels)
    adapted = ctx.latest("encoder")  # an adapt stage's encoder replaces the recipe's pretrained one
    model, tokenizer = new_classifier(str(adapted.path) if adapted else ctx.recipe.model, labels, cfg.pooling, task)
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    collator = data_collator(task, tokenizer)
    extra = {}
    if cfg.method != "full":
        model = peft_methods.wrap(model, cfg, task.peft_task_type)
        extra["trainable_parameters"] = peft_methods.trainable_parameters(model)
    trainer_cls, dann_kwargs = Trainer, {}
    if cfg.domain_adversarial is not None:
        from edgetl.dann import DomainAdversarialTrainer, domain_head

        model.domain_head = domain_head(model.config.hidden_size, cfg.domain_adversarial.hidden_size)
        trainer_cls = DomainAdversarialTrainer
        dann_kwargs = {"target_loader": target_loader(cfg, ctx, tokenizer, collator), "dann": cfg.domain_adversarial}
    if cfg.rdrop_alpha is not None:
        trainer_cls = regularized_dropout(trainer_cls, cfg.rdrop_alpha)
    if cfg.ema_decay is not None:
        trainer_cls = averaging(trainer_cls, cfg.ema_decay)
    trainer = trainer_cls(
        model=model,
        # A task scored outside Trainer (a language model's perplexity) keeps the checkpoint of lowest dev loss.
        args=training_arguments(cfg, ctx, task.metric if task.compute_metrics is not None else "loss"),
        train_dataset=train_tok,
        eval_dataset=dev_tok,
        data_collator=collator,
        compute_metrics=task.compute_metrics(labels) if task.compute_metrics is not None else None,
        processing_class=tokenizer,
        **dann_kwargs,
    )
    train_and_resume(trainer, ctx.work_dir, "finetune")
    if cfg.domain_adversarial is not None:
        del model.domain_head  # training-only: the classifier ships without it
        (out_dir / "domain_log.json").write_text(json.dumps(trainer.domain_log, indent=1))
        if trainer.domain_log:
            extra["final_domain_accuracy"] = trainer.domain_log[-1]["domain_accuracy"]
    if cfg.method != "full":
        model = peft_methods.unwrap(model, cfg)
    return finish_training(trainer, model, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir, **extra)


def target_loader(cfg: FinetuneStage, ctx, tokenizer, collator):
    """Endless shuffled batches of unlabelled target-domain texts for the domain loss."""
    import torch
    from torch.utils.data import DataLoader

    from edgetl.data import target_tokens

    tokens = target_tokens(ctx.recipe.data, tokenizer, cfg.domain_adversarial.target_max_length)
    generator = torch.Generator().manual_seed(cfg.seed)
    return DataLoader(tokens, batch_size=cfg.domain_adversarial.target_batch_size, shuffle=True, drop_last=True,
                      collate_fn=collator, generator=generator)


def run_cloze(cfg: FinetuneStage, ctx, out_dir: Path, labels: list[str]) -> StageOutput:
    """A cloze classifier (``edgetl.cloze``) of the adapt stage's masked LM, else the recipe's model (a masked LM for
    an encoder, a causal LM for a decoder), trained as ``cloze.train`` says (not at all for zero-shot)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from edgetl import cloze
    from edgetl.architectures import adapter_for, model_type_of
    from edgetl.modeling import model_folder
    from edgetl.runtime.cloze import ClozeTokenizer

    data, task = ctx.recipe.data, task_for(ctx.recipe.task)
    adapted = ctx.latest("encoder")
    source = str(adapted.path) if adapted else model_folder(ctx.recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    adapter = adapter_for(model_type_of(Path(source)))
    model = cloze.new_cloze(source, cfg.cloze, labels, adapter.family == "encoder", tokenizer, cfg.seed)
    fast = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: the cloze template turns its cutting off
    if cfg.cloze.verbalizer_search or cfg.cloze.trigger_tokens:
        from edgetl.data import load_labelled
        from edgetl.prompt_search import search

        train = load_labelled(data, task)[0]
        model = search(model, cfg.cloze, fast, train["text"], train["label"], labels, data, cfg.seed)
    template = ClozeTokenizer(fast, model.cloze, data.max_length, data.truncation, data.head_tokens)

    def encode(batch, *_):
        ids = [e.ids for e in template.encode_batch(batch["text"])]
        features = {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}
        return features | ({"token_type_ids": [[0] * len(i) for i in ids]} if adapter.takes_token_type_ids else {})

    train_tok, dev_tok = labelled_data(ctx, tokenizer, encode)
    collator = data_collator(task, tokenizer)
    args = training_arguments(cfg, ctx, task.metric)
    args.save_safetensors = False  # the LM's tied input and output embeddings share memory, which safetensors refuses
    trainer = Trainer(model=model, args=args, train_dataset=train_tok, eval_dataset=dev_tok, data_collator=collator,
                      compute_metrics=task.compute_metrics(labels), processing_class=tokenizer)
    if cfg.cloze.train != "none":
        train_and_resume(trainer, ctx.work_dir, "finetune")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if cfg.cloze.train != "none" else 0
    cloze.finalize(model)
    return finish_training(trainer, model, tokenizer, collator, train_tok, dev_tok, cfg, ctx, out_dir,
                           trainable_parameters=trainable)

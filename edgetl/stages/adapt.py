"""Domain- or task-adaptive pretraining: continued masked-language modelling on unlabelled in-domain text.

Long texts are cut into consecutive windows of ``data.max_length`` tokens (nothing is thrown away). The
checkpoint with the lowest MLM loss on held-out texts is kept; the artifact is a masked-LM model
(kind ``encoder``) that the finetune stage starts from and the augment stage can use for substitution.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.errors import StageError
from edgetl.recipe import AdaptStage

log = logging.getLogger("edgetl")


def adaptation_texts(cfg: AdaptStage, data) -> list[str]:
    from edgetl.data import load_labelled, read_texts, target_texts

    if cfg.text == "target":
        texts = target_texts(data)
    elif cfg.text == "train":
        texts = list(load_labelled(data)[0]["text"])
    else:
        texts = read_texts(Path(cfg.text).expanduser(), cfg.text_field, "adapt.text")
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        raise StageError(f"adapt.text: '{cfg.text}' gives {len(texts)} non-empty texts; need at least 2")
    return texts


def masked_lm(source: str):
    """The encoder with its MLM head, or with a new one tied to the word embeddings if it shipped without."""
    from transformers import AutoModelForMaskedLM

    model, info = AutoModelForMaskedLM.from_pretrained(source, output_loading_info=True)
    new_head = [k for k in info["missing_keys"] if not k.endswith("decoder.weight")]
    if new_head:
        log.info("adapt: %s ships no MLM head; initialised a new one (%d tensors) tied to the word embeddings",
                 source, len(new_head))
    model.tie_weights()
    return model, bool(new_head)


def windows(texts: list[str], tokenizer, max_length: int) -> list[dict]:
    """Each text's tokens in consecutive windows of ``max_length`` (special tokens included), with the
    character offsets of every token (whole-word masking finds word boundaries from them)."""
    body = max_length - 2
    rows = []
    encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    for ids, offsets in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        for start in range(0, max(1, len(ids)), body):
            chunk = [tokenizer.cls_token_id, *ids[start : start + body], tokenizer.sep_token_id]
            spans = [(0, 0), *[tuple(o) for o in offsets[start : start + body]], (0, 0)]
            rows.append({"input_ids": chunk, "attention_mask": [1] * len(chunk), "offset_mapping": spans})
    return rows


class MaskingCollator:
    """Pads windows and masks them for MLM; with whole-word masking, every piece of a chosen word is masked.

    transformers' collator reads word boundaries from ``offset_mapping`` but does not pad it; this does.
    """

    def __init__(self, tokenizer, mlm_probability: float, whole_word_mask: bool, seed: int):
        from transformers import DataCollatorForLanguageModeling

        self.tokenizer = tokenizer
        # transformers' whole-word masking replaces every chosen token by [MASK] (no random or kept tokens).
        replace = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
        self.masker = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                                      whole_word_mask=whole_word_mask, seed=seed, **replace)

    def __call__(self, rows: list[dict]) -> dict:
        import numpy as np

        longest = max(len(r["input_ids"]) for r in rows)
        offsets = np.zeros((len(rows), longest, 2), dtype=np.int64)
        for i, row in enumerate(rows):
            offsets[i, : len(row["offset_mapping"])] = row["offset_mapping"]
        batch = self.tokenizer.pad([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows],
                                   return_tensors="pt")
        if self.masker.seed and self.masker.generator is None:
            self.masker.create_rng()
        batch["input_ids"], batch["labels"] = self.masker.torch_mask_tokens(batch["input_ids"], offset_mapping=offsets)
        return batch


def run(cfg: AdaptStage, ctx, out_dir: Path) -> StageOutput:
    import datasets
    from transformers import AutoTokenizer

    from edgetl.models import resolve_model_source
    from edgetl.training import Trainer, train_and_resume, training_arguments

    source = resolve_model_source(ctx.recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model, new_head = masked_lm(source)
    texts = datasets.Dataset.from_dict({"text": adaptation_texts(cfg, ctx.recipe.data)}).shuffle(seed=cfg.seed)
    if cfg.max_texts:
        texts = texts.select(range(min(cfg.max_texts, len(texts))))
    held_out = max(1, round(len(texts) * cfg.eval_fraction))
    split = {"eval": texts.select(range(held_out)), "train": texts.select(range(held_out, len(texts)))}
    data = {name: datasets.Dataset.from_list(windows(list(part["text"]), tokenizer, ctx.recipe.data.max_length))
            for name, part in split.items()}
    collator = MaskingCollator(tokenizer, cfg.mlm_probability, cfg.whole_word_mask, cfg.seed)
    args = training_arguments(cfg, ctx, metric="loss")
    args.remove_unused_columns = False  # the collator reads offset_mapping, which the model does not take
    trainer = Trainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["eval"],
                      data_collator=collator, processing_class=tokenizer)
    before = trainer.evaluate()["eval_loss"]
    train_and_resume(trainer, ctx.work_dir, "adapt")
    after = trainer.evaluate()["eval_loss"]
    log.info("adapt: held-out MLM loss %.3f -> %.3f (perplexity %.1f -> %.1f)", before, after, math.exp(before),
             math.exp(after))
    if ctx.rank == 0:
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    metrics = {"mlm_loss_before": round(before, 4), "mlm_loss_after": round(after, 4),
               "perplexity_before": round(math.exp(before), 2), "perplexity_after": round(math.exp(after), 2),
               "texts": len(texts), "train_windows": len(data["train"]), "eval_windows": len(data["eval"]),
               "new_mlm_head": new_head, "steps": trainer.state.global_step}
    return StageOutput(kind="encoder", precision="fp32", metrics=metrics)

"""Data augmentation for small labelled sets: token-level edits (EDA without synonyms) and contextual
substitution by a masked language model (the run's adapted one by default).

The artifact is a dataset (``train.jsonl``: text, label, the original's index and the operation that made
each row) that the finetune stage trains on instead of the recipe's training split.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.errors import StageError
from edgetl.recipe import AugmentStage

log = logging.getLogger("edgetl")


def _count(words: list[str], rate: float) -> int:
    return max(1, round(rate * len(words)))


def swap(words: list[str], rate: float, rng: random.Random) -> list[str]:
    words = list(words)
    if len(words) < 2:
        return words
    for _ in range(_count(words, rate)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return words


def delete(words: list[str], rate: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    drop = set(rng.sample(range(len(words)), min(len(words) - 1, _count(words, rate))))
    return [w for i, w in enumerate(words) if i not in drop]


def insert(words: list[str], rate: float, rng: random.Random) -> list[str]:
    """Insert copies of words of the same text at random places (no synonym dictionary needed)."""
    words = list(words)
    if not words:
        return words
    for _ in range(_count(words, rate)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(words))
    return words


TOKEN_OPERATIONS = {"swap": swap, "delete": delete, "insert": insert}


class ContextualSubstitution:
    """Replace words by what a masked language model predicts in their place (not the word itself)."""

    def __init__(self, folder: str, max_length: int, seed: int, top_k: int = 5):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForMaskedLM.from_pretrained(folder).eval()
        self.max_length, self.top_k = max_length, top_k
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, words: list[str], rate: float, rng: random.Random) -> list[str]:
        words = list(words)
        if not words:
            return words
        for position in rng.sample(range(len(words)), min(len(words), _count(words, rate))):
            original = words[position]
            masked = words[:position] + [self.tokenizer.mask_token] + words[position + 1 :]
            enc = self.tokenizer(" ".join(masked), truncation=True, max_length=self.max_length, return_tensors="pt")
            where = (enc["input_ids"][0] == self.tokenizer.mask_token_id).nonzero()
            if len(where) == 0:  # the word lies beyond max_length: leave it
                continue
            with self.torch.inference_mode():
                logits = self.model(**enc).logits[0, where[0, 0]]
            candidates = []
            for token_id in logits.topk(self.top_k + 5).indices.tolist():
                token = self.tokenizer.convert_ids_to_tokens(token_id)
                if token.startswith("##") or token in self.tokenizer.all_special_tokens or token == original.lower():
                    continue
                candidates.append(token)
            if candidates:
                words[position] = candidates[int(self.torch.randint(min(self.top_k, len(candidates)), (1,),
                                                                     generator=self.generator))]
        return words


def plan(labels: list[int], copies: int, balance: bool) -> list[int]:
    """Indices of the originals to augment, one per new row: ``copies`` each, or as many as balancing needs."""
    if not balance:
        return [i for i in range(len(labels)) for _ in range(copies)]
    counts = Counter(labels)
    goal = max(counts.values()) * (copies + 1)
    order = []
    for label in sorted(counts):
        members = [i for i, y in enumerate(labels) if y == label]
        order += [members[k % len(members)] for k in range(goal - counts[label])]
    return order


def augment(texts: list[str], labels: list[int], cfg: AugmentStage, contextual=None) -> list[dict]:
    """The originals followed by the new rows; each row names its original and the operation."""
    rng = random.Random(cfg.seed)
    operations = {**TOKEN_OPERATIONS, "contextual": contextual}
    rows = [{"text": t, "label": y, "source": i, "operation": "original"} for i, (t, y) in enumerate(zip(texts, labels, strict=True))]
    for n, index in enumerate(plan(labels, cfg.copies, cfg.balance)):
        name = cfg.operations[n % len(cfg.operations)]
        words = operations[name](texts[index].split(), cfg.rate, rng)
        rows.append({"text": " ".join(words), "label": labels[index], "source": index, "operation": name})
    return rows


def run(cfg: AugmentStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.data import load_labelled

    train, _ = load_labelled(ctx.recipe.data)
    contextual = mlm = None
    if "contextual" in cfg.operations:
        adapted = ctx.latest("encoder")
        mlm = cfg.mlm_model or (str(adapted.path) if adapted else None)
        if mlm is None:
            raise StageError("augment.operations: 'contextual' needs an adapt stage before it or mlm_model")
        contextual = ContextualSubstitution(mlm, ctx.recipe.data.max_length, cfg.seed)
    rows = augment(list(train["text"]), list(train["label"]), cfg, contextual)
    with (out_dir / "train.jsonl").open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    labels = Counter(r["label"] for r in rows)
    metrics = {"originals": len(train), "rows": len(rows), "per_label": {str(k): v for k, v in sorted(labels.items())},
               "per_operation": dict(Counter(r["operation"] for r in rows))}
    log.info("augment: %d originals -> %d rows %s", len(train), len(rows), metrics["per_label"])
    return StageOutput(kind="dataset", metrics=metrics,
                       extra={"provenance": {"data": ctx.recipe.data.model_dump(mode="json"), "mlm_model": mlm}})

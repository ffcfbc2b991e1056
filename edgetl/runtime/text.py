"""Tokenization with the ``tokenizers`` library alone (no transformers), shared by runtime and evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_tokenizer(folder: str | Path, max_length: int):
    """The fast tokenizer saved beside a model (``tokenizer.json``), truncating to ``max_length`` tokens."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    """Encode and pad to the longest text of this batch (never to max_length)."""
    encodings = tokenizer.encode_batch(texts)
    longest = max(len(e.ids) for e in encodings)
    feeds = {name: np.zeros((len(texts), longest), dtype=np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        feeds["input_ids"][row, :n] = enc.ids
        feeds["attention_mask"][row, :n] = enc.attention_mask
        feeds["token_type_ids"][row, :n] = enc.type_ids
    return feeds


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)

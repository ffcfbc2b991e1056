"""Tokenization with the ``tokenizers`` library alone (no transformers), shared by runtime and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgetl.errors import ArtifactError
from edgetl.inputs import BATCH_SIZE, head_tail


TRUNCATIONS = ("right", "left", "head+tail")


def load_tokenizer(folder: str | Path, max_length: int, truncation: str = "right", head_tokens: int = 0,
                   cloze: dict | None = None):
    """The fast tokenizer saved beside a model (``tokenizer.json``), cutting texts to ``max_length`` tokens.

    ``truncation``: 'right' keeps the start of a long text, 'left' its end, 'head+tail' the first
    ``head_tokens`` and the end (the verdict of a long review is often in its last sentences).
    ``cloze``: a cloze model's pattern (``edgetl.runtime.cloze``); by default the ``cloze`` section of the folder's
    ``config.json``, if it has one. Each text is then placed in the pattern.
    """
    from tokenizers import Tokenizer

    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation {truncation!r}: expected one of {TRUNCATIONS}")
    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    tokenizer.no_padding()
    config = Path(folder) / "config.json"
    if cloze is None and config.is_file():
        cloze = json.loads(config.read_text()).get("cloze")
    if cloze is not None:
        from edgetl.runtime.cloze import ClozeTokenizer

        return ClozeTokenizer(tokenizer, cloze, max_length, truncation, head_tokens)
    if truncation == "head+tail":
        tokenizer.no_truncation()
        return HeadTailTokenizer(tokenizer, max_length, head_tokens)
    tokenizer.enable_truncation(max_length=max_length, direction=truncation)
    return tokenizer


class _Cut:
    __slots__ = ("ids", "attention_mask", "type_ids")

    def __init__(self, encoding, max_length: int, head_tokens: int):
        self.ids = head_tail(encoding.ids, max_length, head_tokens)
        self.attention_mask = head_tail(encoding.attention_mask, max_length, head_tokens)
        self.type_ids = head_tail(encoding.type_ids, max_length, head_tokens)


class HeadTailTokenizer:
    """A ``tokenizers.Tokenizer`` whose encodings keep the head and the tail of a long text."""

    def __init__(self, tokenizer, max_length: int, head_tokens: int):
        self.tokenizer, self.max_length, self.head_tokens = tokenizer, max_length, head_tokens

    def encode(self, text: str) -> _Cut:
        return _Cut(self.tokenizer.encode(text), self.max_length, self.head_tokens)

    def encode_batch(self, texts: list[str], is_pretokenized: bool = False) -> list[_Cut]:
        encodings = self.tokenizer.encode_batch(texts, is_pretokenized=is_pretokenized)
        return [_Cut(e, self.max_length, self.head_tokens) for e in encodings]

    def __getattr__(self, name: str):  # vocabulary lookups and the rest: the wrapped tokenizer's
        return getattr(self.tokenizer, name)


def encode(tokenizer, texts: list, is_pretokenized: bool = False) -> dict[str, np.ndarray]:
    """Encode and pad to the longest text of this batch (never to max_length); ``texts`` may also hold
    (text, text_pair) pairs, or word lists if ``is_pretokenized``."""
    return pad(tokenizer.encode_batch(texts, is_pretokenized=is_pretokenized))


def pad(encodings: list) -> dict[str, np.ndarray]:
    """Feeds of ``tokenizers`` encodings, padded to the longest one."""
    longest = max(len(e.ids) for e in encodings)
    feeds = {name: np.zeros((len(encodings), longest), dtype=np.int64)
             for name in ("input_ids", "attention_mask", "token_type_ids")}
    for row, enc in enumerate(encodings):
        n = len(enc.ids)
        feeds["input_ids"][row, :n] = enc.ids
        feeds["attention_mask"][row, :n] = enc.attention_mask
        feeds["token_type_ids"][row, :n] = enc.type_ids
    return feeds


def batch_size_for(batch_invariant: bool, batch_size: int = BATCH_SIZE) -> int:
    """One text per call for a model whose answers depend on batch-mates (dynamic INT8), else ``batch_size``."""
    return batch_size if batch_invariant else 1


def predict_logits(engine, tokenizer, texts: list[str], batch_size: int, desc: str | None = None) -> np.ndarray:
    """Logits in the order of ``texts``, computed in length-grouped batches (a progress bar if ``desc``)."""
    return np.stack(predict_outputs(engine, tokenizer, texts, batch_size, desc=desc)[0])


def predict_outputs(engine, tokenizer, inputs: list, batch_size: int, is_pretokenized: bool = False,
                    desc: str | None = None) -> tuple[list[np.ndarray], list]:
    """Each input's outputs and its encoding, in the order of ``inputs`` (texts, (text, text_pair) pairs, or word
    lists if ``is_pretokenized``), computed in length-grouped batches (a progress bar if ``desc``).

    An output is ``[labels]`` for a model with one row per text, ``[tokens, labels]`` (padding dropped) for one
    with a row per token.
    """
    encodings = tokenizer.encode_batch(inputs, is_pretokenized=is_pretokenized)
    batches = length_batches([len(e.ids) for e in encodings], batch_size)
    # A sharded model's engine runs the batches through its parts at once (run_many); any other one by one.
    run_many = getattr(engine, "run_many", lambda feeds: map(engine.run, feeds))
    results = run_many(pad([encodings[i] for i in batch]) for batch in batches)
    if desc is not None:
        from tqdm import tqdm

        results = tqdm(results, desc=desc, leave=False, total=len(batches))
    outputs = [None] * len(inputs)
    for batch, out in zip(batches, results, strict=True):
        if len(out) != len(batch):  # seen from OpenVINO's CPU plugin short of memory: an empty answer, no error
            raise ArtifactError(f"the model answered {len(out)} rows for a batch of {len(batch)} inputs "
                                "(out of memory?)")
        for row, index in enumerate(batch):
            outputs[index] = out[row, : len(encodings[index].ids)] if out.ndim == 3 else out[row]
    return outputs, encodings


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, so little compute goes to padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)

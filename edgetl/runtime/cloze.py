"""A cloze question's token ids, with the ``tokenizers`` library alone: training, evaluation and the runtime share it.

A cloze classifier (``finetune.method: cloze``) reads each text placed in a pattern such as
``"{text} All in all, it was {mask}."``. The pattern's words, the answer slot and any trained prompt vectors keep
their tokens; only the text is cut to ``max_length`` (as ``data.truncation`` says), so a long review never loses
the question. The pattern's pieces are tokenized on their own and joined; the model's special tokens go around
the whole, where its tokenizer puts them around one text.

The ``cloze`` section (``config.json`` of a cloze model, a bundle's manifest) holds ``pattern``, ``answer``
(``mask``: a masked LM fills the mask token; ``last``: a causal LM's next token after the last one),
``mask_id`` (mask only) and ``prompt_ids`` (the vocabulary ids of trained prompt vectors, for ``{prompt}``).
"""

from __future__ import annotations

import re

SLOTS = re.compile(r"(\{text\}|\{mask\}|\{prompt\})")


class Encoded:
    """One cloze question's ids, as ``tokenizers``' ``Encoding`` holds them (what ``pad`` reads)."""

    __slots__ = ("attention_mask", "ids", "type_ids")

    def __init__(self, ids: list[int]):
        self.ids, self.attention_mask, self.type_ids = ids, [1] * len(ids), [0] * len(ids)


def answer_space(pattern: str) -> str:
    """What precedes an answer word in its token: the space before ``{mask}`` if the pattern has one (' great')."""
    return " " if pattern.split("{mask}")[0][-1:].isspace() else ""


def verbalizer_ids(tokenizer, pattern: str, verbalizer: dict[str, list[str]]) -> dict[str, list[int]]:
    """Each label's word ids, a word read as the answer slot reads it (``answer_space``). ``ValueError`` naming the
    word if it is not exactly one token."""
    space = answer_space(pattern)
    out = {}
    for label, words in verbalizer.items():
        out[label] = []
        for word in words:
            ids = tokenizer.encode(space + word.strip(), add_special_tokens=False).ids
            if len(ids) != 1:
                pieces = [tokenizer.id_to_token(i) for i in ids]
                raise ValueError(f"cloze.verbalizer.{label}: '{word}' is {len(ids)} tokens {pieces} of this model's "
                                 "vocabulary; a verbaliser word must be one token: choose another word")
            out[label].append(ids[0])
    return out


class ClozeTokenizer:
    """A ``tokenizers.Tokenizer`` whose ``encode_batch`` returns each text's cloze question, at most ``max_length`` ids.

    ``truncation`` cuts the text alone: 'right' keeps its start, 'left' its end, 'head+tail' its first
    ``head_tokens`` tokens and its end.
    """

    def __init__(self, tokenizer, cloze: dict, max_length: int, truncation: str = "right", head_tokens: int = 0):
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer, self.truncation, self.head_tokens = tokenizer, truncation, head_tokens
        self.mask_id = cloze.get("mask_id")
        self.parts = self._parts(cloze)
        self.start, self.end = self._specials()
        fixed = len(self.start) + len(self.end) + sum(len(p) for p in self.parts if p is not None)
        self.budget = max_length - fixed
        if self.budget < 1:
            raise ValueError(f"cloze.pattern: the pattern alone takes {fixed} of data.max_length {max_length} tokens; "
                             "raise max_length or shorten the pattern")

    def _parts(self, cloze: dict) -> list[list[int] | None]:
        """The pattern as id lists, None where the text goes."""
        pieces = [p for p in SLOTS.split(cloze["pattern"]) if p]
        if cloze["answer"] == "last" and pieces[-1] != "{mask}" and "".join(pieces[pieces.index("{mask}") + 1:]).strip():
            raise ValueError(f"cloze.pattern: {cloze['pattern']!r}: a causal LM answers with its next token, so "
                             "{mask} must end the pattern")
        parts = []
        for index, piece in enumerate(pieces):
            if piece == "{text}":
                parts.append(None)
            elif piece == "{mask}":
                parts.append([self.mask_id] if cloze["answer"] == "mask" else [])
            elif piece == "{prompt}":
                parts.append(list(cloze["prompt_ids"]))
            else:
                # The space before the answer belongs to the answer's token (' great'), as verbalizer_ids reads it.
                text = piece.rstrip() if pieces[index + 1 : index + 2] == ["{mask}"] else piece
                parts.append(self.tokenizer.encode(text, add_special_tokens=False).ids if text.strip() else [])
        return parts

    def _specials(self) -> tuple[list[int], list[int]]:
        """The special tokens the tokenizer puts before and after one text ([CLS] and [SEP], a BOS, or none)."""
        bare = self.tokenizer.encode("x", add_special_tokens=False).ids
        full = self.tokenizer.encode("x").ids
        at = next(i for i in range(len(full) - len(bare) + 1) if full[i : i + len(bare)] == bare)
        return full[:at], full[at + len(bare):]

    def _cut(self, ids: list[int]) -> list[int]:
        if self.mask_id is not None:  # a text's own mask tokens would be read as the answer slot
            ids = [i for i in ids if i != self.mask_id]
        if len(ids) <= self.budget:
            return ids
        if self.truncation == "left":
            return ids[len(ids) - self.budget:]
        head = min(self.head_tokens, self.budget) if self.truncation == "head+tail" else self.budget
        return ids[:head] + ids[len(ids) - (self.budget - head):] if head < self.budget else ids[:head]

    def encode_batch(self, texts: list[str], is_pretokenized: bool = False) -> list[Encoded]:
        if is_pretokenized:
            raise ValueError("a cloze model reads texts, not pre-split words")
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [Encoded(self.start + [i for part in self.parts for i in (self._cut(e.ids) if part is None else part)]
                        + self.end) for e in encodings]

    def encode(self, text: str) -> Encoded:
        return self.encode_batch([text])[0]

    def __getattr__(self, name: str):  # vocabulary lookups and the rest: the wrapped tokenizer's
        return getattr(self.tokenizer, name)

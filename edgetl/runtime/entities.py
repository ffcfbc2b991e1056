r"""Named entities from a token-classification model's logits, with numpy alone (no torch, no transformers).

The entities are those of Hugging Face's ``pipeline("token-classification", aggregation_strategy="first")``:
softmax per token; a word takes the label and the probability of its first sub-token; adjacent words join
while their tags agree and the newcomer is not ``B-``; groups whose type is ignored (``O``) are dropped; the
score of an entity is the mean of its words' scores.

One difference, on purpose: words are the tokenizer's (``encoding.word_ids``), where the pipeline guesses them
from each token (a WordPiece token is a word's continuation when its length differs from its span of text).
The two agree on ordinary text, but the guess glues a word to the one before it when the tokenizer drops a
character inside it (``jo\u0301hn`` and ``jo\u00adhn`` are the token ``john`` over five characters), and for
pre-split input it cuts a caller's word such as ``U.S.`` into pieces labelled apart, where training labels
the first sub-token of each word id and seqeval scores one tag per word.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgetl.runtime.text import softmax


@dataclass(frozen=True)
class Entity:
    """One entity: ``text == source[start:end]``, where ``source`` is the string the offsets index into."""

    type: str
    score: float
    start: int
    end: int
    text: str


@dataclass(frozen=True)
class _Word:
    label: str
    score: np.float32
    start: int
    end: int


def entities_from_logits(logits: np.ndarray, offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None],
                         text: str, id2label: Mapping[int, str] | Sequence[str],
                         ignore: Sequence[str] = ("O",)) -> list[Entity]:
    """The entities of ``text``, from one sequence's logits and the ``tokenizers`` encoding of ``text``.

    Args:
        logits: ``[tokens, labels]``, one row per token of the encoding (drop the padding of a batch first).
        offsets: ``encoding.offsets``: character spans into ``text`` itself (not its normalized form), so
            entities are right however the tokenizer lowercases, strips accents or squeezes spaces.
        word_ids: ``encoding.word_ids``; ``None`` marks special and padding tokens, which are skipped.
        text: the string that was encoded.
        id2label: label names by class index (the model config's ``id2label``, or a list).
        ignore: entity types to drop, compared after the ``B-``/``I-`` prefix is removed.

    Returns:
        Entities in text order; ``start``/``end`` index into ``text``.
    """
    labels = _labels(id2label, logits)
    _check_lengths(logits, word_ids, offsets=offsets)
    words = [_Word(label, score, offsets[first][0], offsets[last][1])
             for first, last, label, score in _scored_words(logits, word_ids, labels)]
    return _group(words, text, ignore)


def entities_from_words(logits: np.ndarray, word_ids: Sequence[int | None], words: Sequence[str],
                        id2label: Mapping[int, str] | Sequence[str], ignore: Sequence[str] = ("O",)) -> list[Entity]:
    """The entities of a pre-split text (``tokenizer.encode(words, is_pretokenized=True)``).

    Offsets index into ``" ".join(words)``, as the pipeline's ``is_split_into_words=True`` does, and an entity
    covers whole words: the words it holds are those ``word_labels`` gives, so entities and the per-word tags
    a seqeval evaluation reads always agree. A word with no tokens (empty, or cut off by truncation) belongs
    to no entity and does not separate the words around it, as in the pipeline.

    Args:
        logits: ``[tokens, labels]`` for this sequence, padding dropped.
        word_ids: ``encoding.word_ids``: indices into ``words``; ``None`` for special and padding tokens.
        words: the caller's words.
        id2label: label names by class index.
        ignore: entity types to drop.
    """
    labels = _labels(id2label, logits)
    _check_lengths(logits, word_ids)
    starts = np.cumsum([0] + [len(w) + 1 for w in words]).tolist()
    spans = []
    for first, _, label, score in _scored_words(logits, word_ids, labels):
        word_id = word_ids[first]
        if not 0 <= word_id < len(words):
            raise ValueError(f"word_ids name word {word_id}, but {len(words)} words were given")
        spans.append(_Word(label, score, starts[word_id], starts[word_id] + len(words[word_id])))
    return _group(spans, " ".join(words), ignore)


def word_labels(logits: np.ndarray, word_ids: Sequence[int | None], id2label: Mapping[int, str] | Sequence[str],
                num_words: int | None = None, missing: str = "O") -> list[str]:
    """One tag per word: the most probable label of its first sub-token (seqeval's input).

    Args:
        logits: ``[tokens, labels]`` for this sequence, padding dropped.
        word_ids: ``encoding.word_ids``.
        id2label: label names by class index.
        num_words: how many words the text has; words with no token (cut by truncation, or empty) are tagged
            ``missing``. Default: up to the last word that has a token.
        missing: the tag of a word with no token.
    """
    labels = _labels(id2label, logits)
    _check_lengths(logits, word_ids)
    seen = [w for w in word_ids if w is not None]
    count = num_words if num_words is not None else max(seen, default=-1) + 1
    tags = [missing] * count
    for first, _, label, _ in _scored_words(logits, word_ids, labels):
        if word_ids[first] >= count:
            raise ValueError(f"word_ids name word {word_ids[first]}, but num_words is {count}")
        tags[word_ids[first]] = label
    return tags


def _labels(id2label: Mapping[int, str] | Sequence[str], logits: np.ndarray) -> list[str]:
    if np.ndim(logits) != 2:
        raise ValueError(f"logits have shape {np.shape(logits)}: expected [tokens, labels] for one sequence")
    count = np.shape(logits)[1]
    if isinstance(id2label, Mapping):
        absent = [i for i in range(count) if i not in id2label]
        if absent or len(id2label) != count:
            raise ValueError(f"id2label has {len(id2label)} labels (missing indices {absent}), the logits {count}")
        return [id2label[i] for i in range(count)]
    if len(id2label) != count:
        raise ValueError(f"{len(id2label)} labels given, but the logits have {count} columns")
    return list(id2label)


def _check_lengths(logits: np.ndarray, word_ids: Sequence, offsets: Sequence | None = None) -> None:
    # A padded row would pair padding logits with nothing; say so rather than guess which end was padded.
    if len(logits) != len(word_ids):
        raise ValueError(f"{len(logits)} rows of logits for {len(word_ids)} tokens: pass this sequence's rows "
                         f"only (logits[:len(word_ids)] for a right-padded batch)")
    if offsets is not None and len(offsets) != len(word_ids):
        raise ValueError(f"{len(offsets)} offsets for {len(word_ids)} tokens: both come from one encoding")


def _scored_words(logits: np.ndarray, word_ids: Sequence[int | None], labels: list[str]):
    """(first token, last token, label, score) per word, in token order; the label is the first token's."""
    # float32 as the pipeline computes it (it upcasts half-precision logits), so scores match to the bit.
    probabilities = softmax(np.asarray(logits, dtype=np.float32))
    words, previous = [], None
    for index, word_id in enumerate(word_ids):
        if word_id is not None and word_id == previous:
            words[-1][1] = index
        elif word_id is not None:
            words.append([index, index])
        previous = word_id
    for first, last in words:
        best = int(probabilities[first].argmax())
        yield first, last, labels[best], probabilities[first, best]


def _tag(label: str) -> tuple[str, str]:
    """('B' or 'I', type); a label without a B-/I- prefix continues like I-, as in the pipeline."""
    if label.startswith(("B-", "I-")):
        return label[0], label[2:]
    return "I", label


def _group(words: list[_Word], source: str, ignore: Sequence[str]) -> list[Entity]:
    groups: list[list[_Word]] = []
    for word in words:
        boundary, tag = _tag(word.label)
        if groups and boundary != "B" and tag == _tag(groups[-1][-1].label)[1]:
            groups[-1].append(word)
        else:
            groups.append([word])
    entities = []
    for group in groups:
        # The pipeline names a group by what follows the first '-' of its first label (E-PER gives PER).
        kind = group[0].label.split("-", 1)[-1]
        if kind in ignore:
            continue
        start, end = group[0].start, group[-1].end
        score = float(np.nanmean(np.array([w.score for w in group], dtype=np.float32)))
        entities.append(Entity(kind, score, start, end, source[start:end]))
    return entities

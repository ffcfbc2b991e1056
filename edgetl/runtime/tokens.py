"""``TokenClassifier``: load a token-classification bundle (named entities in IOB2 tags, ...) and find the entities
of texts or pre-split sentences with numpy, tokenizers and one runtime.

Entities are grouped as Hugging Face's token-classification pipeline groups them with
``aggregation_strategy="first"`` (see ``edgetl.runtime.entities``). A text longer than ``max_length`` tokens is cut
as in training and evaluation: words past the cut belong to no entity (``tags_words`` tags them ``O``).
"""

from __future__ import annotations

import json
from dataclasses import asdict

from edgetl.errors import ArtifactError
from edgetl.runtime.bundle import BundleRuntime, valid_unicode
from edgetl.runtime.entities import Entity, entities_from_logits, entities_from_words, word_labels


class TokenClassifier(BundleRuntime):
    """A token-classification bundle loaded for inference.

    Loaded as ``BundleRuntime`` says (folder, backend, threads, verify, public_key): ``labels`` are the tags in output order.
    """

    takes_words = True

    def _check_task(self) -> None:
        super()._check_task()
        # head+tail drops tokens from the middle, and with them the offsets and word ids entities are built from.
        if self.manifest.get("truncation", "right") == "head+tail":
            raise ArtifactError(f"{self.folder}: truncation 'head+tail' cannot tag words (it cuts tokens out of the "
                                "middle of a sentence); token classification keeps a sentence's first words")

    def _item_problem(self, item) -> str | None:
        if isinstance(item, (list, tuple)):
            return f"is {type(item).__name__}, not str: pass pre-split words to predict_words"
        return super()._item_problem(item)

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[list[Entity]]:
        """The entities of each text; ``start``/``end`` index into that text as given."""
        originals = texts if isinstance(texts, str) else list(texts)
        # One U+FFFD per lone surrogate: offsets into the cleaned text then index the caller's text too.
        inputs = self._text_inputs(originals, keep_length=True)
        if not inputs:
            return []
        outputs, encodings = self._outputs(inputs, batch_size)
        return [entities_from_logits(logits, encoding.offsets, encoding.word_ids, text, self.labels)
                for logits, encoding, text in zip(outputs, encodings, originals, strict=True)]

    def predict_one(self, text: str) -> list[Entity]:
        return self.predict([text])[0]

    def predict_words(self, sentences: list[list[str]], batch_size: int | None = None) -> list[list[Entity]]:
        """The entities of each pre-split sentence; ``start``/``end`` index into ``" ".join(words)`` and an entity
        covers whole words (those ``tags_words`` tags)."""
        sentences, inputs = self._word_inputs(sentences, "predict_words")
        if not inputs:
            return []
        outputs, encodings = self._outputs(inputs, batch_size, is_pretokenized=True)
        return [entities_from_words(logits, encoding.word_ids, words, self.labels)
                for logits, encoding, words in zip(outputs, encodings, sentences, strict=True)]

    def tags_words(self, sentences: list[list[str]], batch_size: int | None = None) -> list[list[str]]:
        """One tag per word (its first sub-token's most probable label; ``O`` for a word cut by truncation): what
        the evaluate stage scores with seqeval."""
        sentences, inputs = self._word_inputs(sentences, "tags_words")
        if not inputs:
            return []
        outputs, encodings = self._outputs(inputs, batch_size, is_pretokenized=True)
        return [word_labels(logits, encoding.word_ids, self.labels, num_words=len(words))
                for logits, encoding, words in zip(outputs, encodings, sentences, strict=True)]

    def _word_inputs(self, sentences, method: str) -> tuple[list[list[str]], list[list[str]]]:
        """The sentences as lists, and as the tokenizer takes them (valid Unicode, each word its own length)."""
        if isinstance(sentences, str) or (isinstance(sentences, (list, tuple)) and sentences
                                          and all(isinstance(w, str) for w in sentences)):
            raise TypeError(f"{method} takes a list of sentences, each a list of words; for one sentence pass [words]")
        sentences = [list(words) if isinstance(words, (list, tuple)) else words for words in sentences]
        for index, words in enumerate(sentences):
            if not isinstance(words, list):
                raise TypeError(f"sentences[{index}] is {type(words).__name__}, not a list of words")
            bad = next((i for i, word in enumerate(words) if not isinstance(word, str)), None)
            if bad is not None:
                raise TypeError(f"sentences[{index}][{bad}] is {type(words[bad]).__name__}, not str")
        return sentences, [[valid_unicode(word, keep_length=True) for word in words] for words in sentences]

    @staticmethod
    def to_json(result: list[Entity]) -> dict:
        return {"entities": [asdict(entity) for entity in result]}

    @staticmethod
    def to_text(result: list[Entity]) -> str:
        return json.dumps([asdict(entity) for entity in result], ensure_ascii=False)

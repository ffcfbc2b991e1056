"""``TextClassifier``: load an edgetl bundle and classify texts, or (text, text_pair) pairs, with numpy, tokenizers and
one runtime."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from edgetl.runtime.bundle import BundleRuntime
from edgetl.runtime.text import softmax


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


class TextClassifier(BundleRuntime):
    """A text-classification bundle loaded for inference: one label per text, or per (text, text_pair) pair when
    the bundle's ``text_pair`` is true.

    Loaded as ``BundleRuntime`` says (folder, backend, threads, verify, public_key).
    """

    def logits(self, texts: list, batch_size: int | None = None) -> np.ndarray:
        """Logits in the order of ``texts`` (texts, or (text, text_pair) pairs for a pair bundle); ``batch_size``
        defaults to ``self.batch_size``."""
        inputs = self._text_inputs(texts, "logits")
        if not inputs:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return np.stack(self._outputs(inputs, batch_size)[0])

    def predict(self, texts: list, batch_size: int | None = None) -> list[Prediction]:
        """One prediction per text, or per (text, text_pair) pair for a pair bundle; TypeError names the first
        item of the wrong kind."""
        inputs = self._text_inputs(texts)
        if not inputs:
            return []
        probabilities = softmax(self.logits(inputs, batch_size))
        return [
            Prediction(self.labels[int(p.argmax())], float(p.max()), {label: float(s) for label, s in zip(self.labels, p, strict=True)})
            for p in probabilities
        ]

    def predict_one(self, text: str, text_pair: str | None = None) -> Prediction:
        return self.predict([text if text_pair is None else (text, text_pair)])[0]

    @staticmethod
    def to_json(result: Prediction) -> dict:
        return asdict(result)

    @staticmethod
    def to_text(result: Prediction) -> str:
        return f"{result.label}\t{result.score:.4f}"

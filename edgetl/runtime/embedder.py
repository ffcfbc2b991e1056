"""``Embedder``: load a sentence-embedding bundle and turn texts into vectors with numpy, tokenizers and one runtime."""

from __future__ import annotations

import numpy as np

from edgetl.errors import ArtifactError
from edgetl.runtime.bundle import BundleRuntime


class Embedder(BundleRuntime):
    """A sentence-embedding bundle loaded for inference: one float32 vector per text, pooled (and L2-normalised) in
    the model as the bundle's ``embedding`` section says.

    Loaded as ``BundleRuntime`` says (folder, backend, threads, verify, public_key).

    Attributes:
        dimension: the length of each vector.
        normalize: whether vectors have unit length (then a dot product is their cosine).
    """

    def _check_task(self) -> None:
        super()._check_task()
        section = self.manifest.get("embedding")
        if not isinstance(section, dict) or not isinstance(section.get("dimension"), int):
            raise ArtifactError(f"{self.folder / 'edgetl.json'}: a sentence-embedding bundle needs an 'embedding' "
                                f"section with the vectors' dimension, got {section!r:.80}")
        self.dimension, self.normalize = section["dimension"], bool(section.get("normalize", False))

    def _check_outputs(self, outputs: int, config_name: str) -> None:
        """A vector has no labels: the length of the model's output is checked on the first call instead."""

    def embed(self, texts: list, batch_size: int | None = None) -> np.ndarray:
        """The vectors of ``texts``, shape (len(texts), dimension), float32, in order; ``batch_size`` defaults to
        ``self.batch_size``. TypeError names the first item that is no string."""
        inputs = self._text_inputs(texts, "embed")
        if not inputs:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = np.stack(self._outputs(inputs, batch_size)[0]).astype(np.float32, copy=False)
        if vectors.shape[1] != self.dimension:
            raise ArtifactError(f"{self.folder}: the model gives vectors of {vectors.shape[1]} values, edgetl.json says "
                                f"{self.dimension}")
        return vectors

    def predict(self, texts: list, batch_size: int | None = None) -> list[np.ndarray]:
        """One vector per text (``embed``'s rows)."""
        return list(self.embed(texts, batch_size))

    def predict_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    @staticmethod
    def to_json(result: np.ndarray) -> dict:
        return {"embedding": result.tolist()}  # float32 values as Python floats

    @staticmethod
    def to_text(result: np.ndarray) -> str:
        return " ".join(f"{x:.6g}" for x in result)

"""``TextRegressor``: load a text-regression bundle and score texts, or (text, text_pair) pairs (semantic similarity
such as STS-B), with numpy, tokenizers and one runtime."""

from __future__ import annotations

from edgetl.errors import ArtifactError
from edgetl.runtime.bundle import BundleRuntime


class TextRegressor(BundleRuntime):
    """A text-regression bundle loaded for inference: the model's one output per text, or per (text, text_pair)
    pair when the bundle's ``text_pair`` is true, as it comes (no scaling, no clipping).

    Loaded as ``BundleRuntime`` says (folder, backend, threads, verify, public_key).
    """

    def _check_outputs(self, outputs: int, config_name: str) -> None:
        if outputs != 1:
            raise ArtifactError(f"{self.folder}: a score is one output per text, but the model has {outputs} "
                                f"({config_name})")

    def predict(self, texts: list, batch_size: int | None = None) -> list[float]:
        """One score per text, or per (text, text_pair) pair for a pair bundle; TypeError names the first item of
        the wrong kind."""
        inputs = self._text_inputs(texts)
        if not inputs:
            return []
        return [float(output[0]) for output in self._outputs(inputs, batch_size)[0]]

    def predict_one(self, text: str, text_pair: str | None = None) -> float:
        return self.predict([text if text_pair is None else (text, text_pair)])[0]

    @staticmethod
    def to_json(result: float) -> dict:
        return {"score": result}

    @staticmethod
    def to_text(result: float) -> str:
        return f"{result:.4f}"

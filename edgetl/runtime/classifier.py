"""``TextClassifier``: load an edgetl bundle and classify text with numpy, tokenizers and one runtime."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.artifact import verify_files
from edgetl.errors import ArtifactError
from edgetl.runtime.engines import ENGINES, open_engine
from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_logits, softmax

SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float
    scores: dict[str, float]


def _read_manifest(folder: Path) -> dict:
    path = folder / "edgetl.json"
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an edgetl bundle (no edgetl.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable bundle manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: unreadable bundle manifest (not a JSON object)")
    if manifest.get("format") != "edgetl-bundle" or manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(f"{path}: bundle format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                            f"is not supported (this edgetl reads versions {SUPPORTED_FORMAT_VERSIONS})")
    return manifest


def _valid_unicode(text: str) -> str:
    """The text with lone surrogates (not encodable as UTF-8, refused by tokenizers) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


class TextClassifier:
    """A bundle loaded for inference.

    Args:
        folder: the bundle folder (holds ``edgetl.json``).
        backend: 'auto' (OpenVINO if installed and in the bundle, else ONNX Runtime), 'onnxruntime' or 'openvino'.
        threads: intra-op threads (default: the runtime's choice, usually all cores).
        verify: check every file against its sha256 first.
    """

    def __init__(self, folder: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder)
        if verify:
            verify_files(self.folder, self.manifest["files"], "edgetl.json")
        self.backend = self._choose(backend)
        self.labels = list(self.manifest["labels"])
        self.tokenizer = load_tokenizer(self.folder, self.manifest["max_length"], self.manifest.get("truncation", "right"),
                                        self.manifest.get("head_tokens", 0))
        model = self.manifest["models"][self.backend]
        model_file = self.folder / model["path"]
        self._check_model_config(model_file.parent / "config.json")
        self.engine = open_engine(self.backend, model_file, threads)
        # A model whose INT8 activation ranges are measured per call (dynamic INT8) gives a text different
        # logits in different batches; one text per call keeps every prediction independent of the others.
        # Otherwise the evaluate stage's default batching, so predictions repeat the evaluated ones exactly.
        self.batch_size = batch_size_for(model.get("batch_invariant", True))

    def _check_model_config(self, config_file: Path) -> None:
        """Refuse a tokenizer whose ids overrun the model's embedding, or labels the model does not have."""
        if not config_file.is_file():
            return
        config = json.loads(config_file.read_text())
        rows, top_id = config.get("vocab_size"), max(self.tokenizer.get_vocab().values())
        if rows is not None and top_id >= rows:
            raise ArtifactError(f"{self.folder}: tokenizer.json gives token ids up to {top_id}, but the model has "
                                f"{rows} embedding rows ({config_file.name}): tokenizer and model do not match")
        classes = len(config.get("id2label", {})) or None
        if classes is not None and classes != len(self.labels):
            raise ArtifactError(f"{self.folder}: edgetl.json lists {len(self.labels)} labels, the model has {classes} "
                                f"({config_file.name})")

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True) -> TextClassifier:
        return cls(path, backend, threads, verify)

    def _choose(self, backend: str) -> str:
        available = list(self.manifest["models"])
        name = {"onnxruntime": "onnx"}.get(backend, backend)
        if name == "auto":
            import importlib.util

            installed = [b for b in ("openvino", "onnx") if b in available
                         and importlib.util.find_spec("onnxruntime" if b == "onnx" else "openvino")]
            if not installed:
                raise ArtifactError(f"{self.folder}: no installed runtime for this bundle's models {available}")
            return installed[0]
        if name not in ENGINES or name not in available:
            raise ArtifactError(f"backend {backend!r} is not in this bundle (it has: {available})")
        return name

    def logits(self, texts: list[str], batch_size: int | None = None) -> np.ndarray:
        """Logits in the order of ``texts``; ``batch_size`` defaults to ``self.batch_size``."""
        if not texts:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        return predict_logits(self.engine, self.tokenizer, texts, batch_size or self.batch_size)

    def predict(self, texts: list[str], batch_size: int | None = None) -> list[Prediction]:
        if isinstance(texts, str):
            raise TypeError("predict takes a list of strings; use predict_one for a single text")
        texts = list(texts)
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            raise TypeError(f"texts[{bad[0]}] is {type(texts[bad[0]]).__name__}, not str")
        texts = [_valid_unicode(t) for t in texts]
        if not texts:
            return []
        probabilities = softmax(self.logits(texts, batch_size))
        return [
            Prediction(self.labels[int(p.argmax())], float(p.max()), {label: float(s) for label, s in zip(self.labels, p, strict=True)})
            for p in probabilities
        ]

    def predict_one(self, text: str) -> Prediction:
        return self.predict([text])[0]

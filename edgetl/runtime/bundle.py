"""What every bundle runtime shares: the manifest, its signature, paths and checksums, the backend, tokenizer and
engine, the batch size rule and the checks on what a caller passes in. ``TextClassifier``, ``TokenClassifier`` and
``TextRegressor`` add what their task's outputs mean."""

from __future__ import annotations

import importlib.util
import json
from abc import ABC, abstractmethod
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import ClassVar

from edgetl.artifact import verify_files, write_bytes_atomic
from edgetl.errors import ArtifactError, RecipeError, UsageError
from edgetl.runtime.engines import ENGINES, open_engine
from edgetl.runtime.signing import PublicKey, sign_manifest, signature_path, verify_manifest
from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_outputs
from edgetl.tasks import DEFAULT_TASK, TASKS, task_for

SUPPORTED_FORMAT_VERSIONS = (1,)


def read_manifest(folder: Path, public_key: PublicKey | None = None) -> dict:
    """``edgetl.json`` of a bundle folder, its signature checked first if a ``public_key`` is given.

    Raises:
        ArtifactError: the manifest is missing, unreadable, of an unknown version, or names a path outside the folder.
        SignatureError: (with a ``public_key``) the manifest is unsigned, or its signature does not match it or the key.
    """
    data = _manifest_bytes(folder)
    if public_key is not None:
        verify_manifest(folder / "edgetl.json", data, public_key)
    return _parse_manifest(folder, data)


def sign_bundle(folder: str | Path, private_key: str | Path) -> Path:
    """Sign a bundle with an Ed25519 private key (PEM file): the signature of ``edgetl.json``'s bytes, written
    atomically beside it (``edgetl.json.sig``). Refuses a bundle that fails the checks a runtime makes (format,
    paths, every file against its sha256): the signature vouches for every file through those sha256."""
    folder = Path(folder)
    data = _manifest_bytes(folder)
    verify_files(folder, _parse_manifest(folder, data)["files"], "edgetl.json")
    target = signature_path(folder / "edgetl.json")
    write_bytes_atomic(target, sign_manifest(data, private_key))
    return target


def _manifest_bytes(folder: Path) -> bytes:
    path = folder / "edgetl.json"
    if not path.is_file():
        raise ArtifactError(f"{folder}: not an edgetl bundle (no edgetl.json)")
    return path.read_bytes()  # read once: what is parsed is what the signature was checked on


def _parse_manifest(folder: Path, data: bytes) -> dict:
    path = folder / "edgetl.json"
    try:
        manifest = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable bundle manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: unreadable bundle manifest (not a JSON object)")
    if manifest.get("format") != "edgetl-bundle" or manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise ArtifactError(f"{path}: bundle format {manifest.get('format')!r} version {manifest.get('format_version')!r} "
                            f"is not supported (this edgetl reads versions {SUPPORTED_FORMAT_VERSIONS})")
    _check_paths(folder, manifest)
    return manifest


def _check_paths(folder: Path, manifest: dict) -> None:
    """Refuse a manifest path that leaves the bundle folder: bundles arrive over the air, and a path must not make
    the runtime hash or open a file elsewhere on the device."""
    path, models, files = folder / "edgetl.json", manifest.get("models"), manifest.get("files")
    if not isinstance(models, dict) or not all(isinstance(m, dict) for m in models.values()):
        raise ArtifactError(f"{path}: 'models' must map each backend to {{\"path\": ...}}, got {models!r:.80}")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: 'files' must map each file to its bytes and sha256, got {files!r:.80}")
    fields = {f"models.{backend}.path": model.get("path") for backend, model in models.items()}
    for backend, model in models.items():
        parts = model.get("parts", [])
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise ArtifactError(f"{path}: models.{backend}.parts must be a list of {{\"path\": ...}}, got {parts!r:.80}")
        fields.update({f"models.{backend}.parts[{i}].path": p.get("path") for i, p in enumerate(parts)})
    for field, rel in [*fields.items(), *(("files entry", rel) for rel in files)]:
        problem = path_problem(folder, rel)
        if problem:
            raise ArtifactError(f"{path}: {field} {rel!r} {problem}; a bundle's paths must stay inside its folder")


def path_problem(folder: Path, rel) -> str | None:
    """Why ``rel`` does not name a file inside ``folder`` ('..', absolute, a symlink out), or None."""
    if not isinstance(rel, str) or not rel:
        return "is not a relative path"
    as_windows = PureWindowsPath(rel)  # splits on both separators and sees drives: the strictest reading
    if as_windows.anchor:
        return "is absolute"
    if ".." in as_windows.parts:
        return "climbs out of the folder with '..'"
    root = folder.resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root):
        return f"leads out of the folder through a symlink (to {target})"
    return None


def runtime_name(manifest: dict, folder: Path) -> str:
    """The name of the ``edgetl.runtime`` class that serves the manifest's task (a bundle written before the
    manifest named its task is a text-classification one)."""
    task = manifest.get("task", DEFAULT_TASK)
    try:
        return task_for(task).runtime
    except (RecipeError, TypeError):  # TypeError: a task that is no string (a list, an object) cannot be looked up
        raise ArtifactError(f"{folder / 'edgetl.json'}: task {task!r} is not one this edgetl serves (it serves "
                            f"{', '.join(TASKS)}); a newer edgetl may") from None


def valid_unicode(text: str, keep_length: bool = False) -> str:
    """The text with lone surrogates (not encodable as UTF-8, refused by tokenizers) replaced by U+FFFD.

    ``keep_length``: one U+FFFD per surrogate code point, so that character offsets into the result index the
    caller's string too (the UTF-16 round trip would join a split surrogate pair into one character).
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if keep_length:
            return "".join("\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in text)
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text


def _is_pair(item) -> bool:
    return isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(t, str) for t in item)


class BundleRuntime(ABC):
    """A bundle loaded for inference; subclasses say what the model's outputs mean.

    Args:
        folder: the bundle folder (holds ``edgetl.json``).
        backend: 'auto' (OpenVINO if installed and in the bundle, else ONNX Runtime), 'onnxruntime' or 'openvino'.
        threads: intra-op threads (default: the runtime's choice, usually all cores).
        verify: check every file against its sha256 first.
        public_key: an Ed25519 public key (PEM file path, or the PEM bytes): refuse the bundle unless ``edgetl.json``
            carries its signature (``edgetl.json.sig``, ``edgetl sign``) and lists every file the runtime reads.
            Needs ``verify``: the signature reaches the files through their sha256.

    Attributes:
        task: the manifest's task (text-classification for a bundle that names none).
        labels: class or tag names in output order (empty for a score).
        text_pair: whether the model reads (text, text_pair) pairs rather than single texts.
        batch_size: inputs per engine call (1 for a model whose outputs depend on its batch-mates).
    """

    # Whether the runtime also reads pre-split words (``predict_words``); ``edgetl predict`` and ``edgetl serve``
    # accept word lists only then.
    takes_words: ClassVar[bool] = False

    def __init__(self, folder: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
                 public_key: PublicKey | None = None):
        self.folder = Path(folder)
        if public_key is not None and not verify:
            raise UsageError("public_key needs verify=True: the signature covers the bundle's files only through the "
                             "sha256 that verify checks")
        self.manifest = read_manifest(self.folder, public_key)
        self._check_task()
        if verify:
            verify_files(self.folder, self.manifest["files"], "edgetl.json")
        self.backend = self._choose(backend)
        self.task = self.manifest.get("task", DEFAULT_TASK)
        self.labels = list(self.manifest["labels"])
        self.text_pair = bool(self.manifest.get("text_pair", False))
        model = self.manifest["models"][self.backend]
        self._check_read_files(model["path"], signed=public_key is not None)
        self.tokenizer = load_tokenizer(self.folder, self.manifest["max_length"], self.manifest.get("truncation", "right"),
                                        self.manifest.get("head_tokens", 0), self.manifest.get("cloze"))
        model_file = self.folder / model["path"]
        self._check_model_config(model_file.parent / "config.json")
        if "parts" in model:  # a sharded model (``edgetl shard``): its parts in a pipeline of worker processes
            from edgetl.runtime.pipeline import PipelineEngine

            self.engine = PipelineEngine(self.backend, self.folder, model["parts"], model["outputs"], threads)
        else:
            self.engine = open_engine(self.backend, model_file, threads)
        # A model whose INT8 activation ranges are measured per call (dynamic INT8) gives a text different
        # outputs in different batches; one text per call keeps every prediction independent of the others.
        # Otherwise the evaluate stage's default batching, so predictions repeat the evaluated ones exactly.
        self.batch_size = batch_size_for(model.get("batch_invariant", True))

    @classmethod
    def load(cls, path: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
             public_key: PublicKey | None = None):
        """The bundle at ``path`` loaded by this runtime; ArtifactError if its task is another runtime's."""
        return cls(path, backend, threads, verify, public_key)

    def _check_task(self) -> None:
        """Refuse a bundle of a task that another runtime serves (its outputs would be misread); a runtime adds its own
        refusals of a manifest here, before any file is read."""
        name = runtime_name(self.manifest, self.folder)
        if name not in {klass.__name__ for klass in type(self).__mro__}:
            task = self.manifest.get("task", DEFAULT_TASK)
            raise ArtifactError(f"{self.folder}: a {task} bundle is served by {name}, not {type(self).__name__}: "
                                f"load it with edgetl.runtime.load, which picks the runtime")

    def _check_read_files(self, model_path: str, signed: bool) -> None:
        """Refuse a file the runtime reads but the manifest does not name (the tokenizer, a model's config.json, an
        OpenVINO model's weights) if it leads out of the folder, or, under a signature, if ``files`` does not list
        it: the signature reaches a file only through its sha256 there."""
        model = PurePosixPath(model_path)
        parts = (PurePosixPath(p["path"]) for p in self.manifest["models"][self.backend].get("parts", []))
        models = list(dict.fromkeys([model, *parts]))  # a sharded model's path is its first part
        read = ["tokenizer.json", (model.parent / "config.json").as_posix(), *(m.as_posix() for m in models),
                *(m.with_suffix(".bin").as_posix() for m in models if m.suffix == ".xml")]
        for rel in read:
            problem = path_problem(self.folder, rel)
            if problem:
                raise ArtifactError(f"{self.folder}: {rel} {problem}; a bundle's files must stay inside its folder")
            if signed and rel not in self.manifest["files"] and (self.folder / rel).exists():
                raise ArtifactError(f"{self.folder}: {rel} is not listed in the signed edgetl.json's files, so its "
                                    f"signature does not cover it; rebuild the bundle (it lists every file) and sign it")

    def _check_model_config(self, config_file: Path) -> None:
        """Refuse a tokenizer whose ids overrun the model's embedding, or outputs the runtime cannot name."""
        if not config_file.is_file():
            return
        config = json.loads(config_file.read_text())
        rows, top_id = config.get("vocab_size"), max(self.tokenizer.get_vocab().values())
        if rows is not None and top_id >= rows:
            raise ArtifactError(f"{self.folder}: tokenizer.json gives token ids up to {top_id}, but the model has "
                                f"{rows} embedding rows ({config_file.name}): tokenizer and model do not match")
        outputs = len(config.get("id2label", {})) or None
        if outputs is not None:
            self._check_outputs(outputs, config_file.name)

    def _check_outputs(self, outputs: int, config_name: str) -> None:
        """One output per label (a score's runtime overrides this)."""
        if outputs != len(self.labels):
            raise ArtifactError(f"{self.folder}: edgetl.json lists {len(self.labels)} labels, the model has {outputs} "
                                f"({config_name})")

    def _choose(self, backend: str) -> str:
        available = list(self.manifest["models"])
        name = {"onnxruntime": "onnx"}.get(backend, backend)
        if name == "auto":
            installed = [b for b in ("openvino", "onnx") if b in available
                         and importlib.util.find_spec("onnxruntime" if b == "onnx" else "openvino")]
            if not installed:
                raise ArtifactError(f"{self.folder}: no installed runtime for this bundle's models {available}")
            return installed[0]
        if name not in ENGINES or name not in available:
            raise ArtifactError(f"backend {backend!r} is not in this bundle (it has: {available})")
        return name

    def _outputs(self, inputs: list, batch_size: int | None, is_pretokenized: bool = False) -> tuple[list, list]:
        """Each input's outputs and encoding, batched as the evaluate stage batches them."""
        return predict_outputs(self.engine, self.tokenizer, inputs, batch_size or self.batch_size, is_pretokenized)

    def _text_inputs(self, items, method: str = "predict", keep_length: bool = False) -> list:
        """The items as the tokenizer takes them (texts, or (text, text_pair) tuples for a pair bundle), valid
        Unicode; TypeError naming the first item that is neither."""
        if isinstance(items, str) or (self.text_pair and _is_pair(items) and not isinstance(items, list)):
            one = "(text, text_pair) pairs" if self.text_pair else "strings"
            raise TypeError(f"{method} takes a list of {one}; use predict_one for a single text")
        items = list(items)
        for index, item in enumerate(items):
            problem = self._item_problem(item)
            if problem:
                raise TypeError(f"texts[{index}] {problem}")
        if self.text_pair:
            return [(valid_unicode(a, keep_length), valid_unicode(b, keep_length)) for a, b in items]
        return [valid_unicode(t, keep_length) for t in items]

    def _item_problem(self, item) -> str | None:
        if self.text_pair and not _is_pair(item):
            found = "a single text" if isinstance(item, str) else f"{type(item).__name__} {repr(item)[:40]}"
            return f"is {found}, but this bundle's model reads (text, text_pair) pairs: pass a tuple of two strings"
        if not self.text_pair and _is_pair(item):
            return "is a (text, text_pair) pair, but this bundle's model reads single texts"
        if not self.text_pair and not isinstance(item, str):
            return f"is {type(item).__name__}, not str"
        return None

    @abstractmethod
    def predict(self, items: list) -> list:
        """One result per input, in order."""

    @staticmethod
    @abstractmethod
    def to_json(result) -> dict:
        """A result as JSON-ready fields: what ``edgetl serve`` answers and ``edgetl predict --output`` writes."""

    @staticmethod
    @abstractmethod
    def to_text(result) -> str:
        """A result on one line (fields apart by tabs): what ``edgetl predict`` prints before the input."""

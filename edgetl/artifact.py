"""Artifacts: folders with a ``manifest.json`` and payloads in standard formats (never pickle)."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from edgetl import __version__
from edgetl.errors import ArtifactError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MODEL_KINDS = ("pytorch-model", "exported", "quantized")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
_VERSIONED = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "openvino", "nncf",
              "neural-compressor-pt", "datasets", "accelerate", "tokenizers", "numpy")


@dataclass
class StageOutput:
    """What a stage reports about the folder it wrote; the pipeline turns it into the manifest."""

    kind: str
    precision: str | None = None
    # backend -> {"path": relative path of the model file, "precision": "fp32" | "int8", ...}
    models: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


@dataclass
class Artifact:
    path: Path
    manifest: dict
    label: str | None = None  # how reports name it; another run's artifact is labelled "<run>/<NN-stage>"

    @classmethod
    def load(cls, path: str | Path) -> Artifact:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise ArtifactError(f"{path}: not a finished artifact (no {MANIFEST})")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path}: unreadable manifest ({exc})") from None
        return cls(path, manifest)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def models(self) -> dict[str, dict]:
        return self.manifest.get("models", {})

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def model_path(self, backend: str) -> Path:
        return self.path / self.models[backend]["path"]

    def verify(self) -> None:
        """Check every recorded file against its sha256."""
        verify_files(self.path, self.manifest["files"], MANIFEST)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_files(folder: Path, files: dict[str, dict], listed_in: str) -> None:
    """Raise ArtifactError unless every file of a ``file_table`` exists under ``folder`` with its sha256."""
    for rel, info in files.items():
        file = folder / rel
        if not file.is_file():
            raise ArtifactError(f"{folder}: missing file {rel}")
        if sha256_file(file) != info["sha256"]:
            raise ArtifactError(f"{folder}: {rel} does not match its sha256 in {listed_in} (corrupted or edited)")


def model_file_bytes(model_file: Path) -> int:
    """Size of a model on disk: the file itself, plus the ``.bin`` weights of an OpenVINO ``.xml``."""
    weights = model_file.with_suffix(".bin")
    extra = weights.stat().st_size if model_file.suffix == ".xml" and weights.is_file() else 0
    return model_file.stat().st_size + extra


def copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer files and ``config.json`` beside a model, copied into another model folder."""
    for name in (*TOKENIZER_FILES, "config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def file_table(folder: Path) -> dict[str, dict]:
    """Every file under ``folder`` (manifest excluded) with its size and sha256."""
    table = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        table[file.relative_to(folder).as_posix()] = {"bytes": file.stat().st_size, "sha256": sha256_file(file)}
    return table


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The git commit of the edgetl code that runs, with ``-dirty`` when its code or recipes differ from that
    commit; None outside a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        changed = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--",
                                  "edgetl", "recipes"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if changed.stdout.strip() else "")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "edgetl": __version__}
    commit = source_commit()
    if commit:
        versions["edgetl_commit"] = commit
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_bytes_atomic(path: Path, data: bytes, mode: int = 0o666) -> None:
    """Write a file so that a reader never sees half of it: temp file in the same folder (created with ``mode``,
    so a private key is never readable by others, not even for a moment), then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that a reader never sees half a file."""
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=False) + "\n").encode())


def write_manifest(folder: Path, output: StageOutput, *, stage: str, fingerprint: str, config: dict,
                   inputs: list[Artifact], started: float, data: dict | None = None) -> dict:
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "kind": output.kind,
        "stage": stage,
        "precision": output.precision,
        "fingerprint": fingerprint,
        "models": output.models,
        "metrics": output.metrics,
        "inputs": [{"path": str(a.path), "fingerprint": a.fingerprint} for a in inputs],
        "config": config,
        "data": data,
        "versions": library_versions(),
        "timings": {"started_unix": round(started, 3), "seconds": round(time.time() - started, 2)},
        "files": file_table(folder),
        **output.extra,
    }
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest

"""What an app embeds: numpy + tokenizers + ONNX Runtime or OpenVINO. Never imports torch.

``load(folder)`` returns the runtime of the bundle's task: ``TextClassifier`` (a label per text or pair),
``TokenClassifier`` (entities, or a tag per word), ``TextRegressor`` (a score per text or pair), ``Embedder`` (a
vector per text) or ``Generator`` (a decoder's continuation of a prompt).
"""

from __future__ import annotations

from pathlib import Path

from edgetl.errors import ArtifactError
from edgetl.runtime.bundle import BundleRuntime, read_manifest, runtime_name
from edgetl.runtime.classifier import Prediction, TextClassifier
from edgetl.runtime.embedder import Embedder
from edgetl.runtime.entities import Entity
from edgetl.runtime.decoding import GenerationSettings
from edgetl.runtime.generator import Generation, Generator
from edgetl.runtime.regressor import TextRegressor
from edgetl.runtime.signing import PublicKey
from edgetl.runtime.tokens import TokenClassifier

__all__ = ["BundleRuntime", "Embedder", "Entity", "Generation", "GenerationSettings", "Generator", "Prediction", "TextClassifier", "TextRegressor", "TokenClassifier", "load"]


def load(folder: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
         public_key: PublicKey | None = None) -> BundleRuntime:
    """The bundle loaded by the runtime its task declares (``edgetl.tasks``' ``Task.runtime``); the arguments are
    ``BundleRuntime``'s.

    Raises:
        ArtifactError: no bundle, an unknown format or task, a path out of the folder, a damaged file, a backend the
            bundle lacks.
        SignatureError: (with a ``public_key``) an unsigned bundle, or one whose manifest or key does not match.
    """
    folder = Path(folder)
    name = runtime_name(read_manifest(folder, public_key), folder)
    runtime = globals().get(name)
    if not (isinstance(runtime, type) and issubclass(runtime, BundleRuntime)):  # a task names a class not written yet
        raise ArtifactError(f"{folder}: its task is served by {name}, which this edgetl.runtime does not have")
    return runtime(folder, backend, threads, verify, public_key)

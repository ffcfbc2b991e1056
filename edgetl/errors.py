"""One errors module: every error edgetl raises on purpose derives from EdgetlError.

Each subclass also inherits the builtin it stands for, so callers that catch ValueError or
ImportError keep working.
"""


class EdgetlError(Exception):
    """Base class of every error edgetl raises on purpose."""

    exit_code = 1


class RecipeError(EdgetlError, ValueError):
    """A recipe (file, overrides or chain) is invalid. Raised before any work starts."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid recipe {source}:\n{lines}")


class UsageError(EdgetlError, ValueError):
    """Bad command-line usage."""

    exit_code = 2


class ModelNotFoundError(EdgetlError, FileNotFoundError):
    """A model name resolves to nothing in the catalog, on disk or on the hub."""

    exit_code = 2


class ArchitectureError(EdgetlError, ValueError):
    """A model type edgetl has no adapter for, or an operation its adapter declares unsupported."""

    exit_code = 2


class DataError(EdgetlError, ValueError):
    """A dataset file is missing or its content does not match the configured fields."""


class ArtifactError(EdgetlError, RuntimeError):
    """An artifact folder is missing, incomplete or fails its checksums."""


class SignatureError(ArtifactError):
    """A bundle loaded with a public key has no signature, or one that its manifest or that key does not match."""


class EngineError(EdgetlError, RuntimeError):
    """A model failed while running: a part of a sharded model raised, or its worker process died."""


class OutOfMemoryError(EdgetlError, MemoryError):
    """A runtime could not allocate what a model needs, to load it or to run it (under a memory cap, say)."""


class StageError(EdgetlError, RuntimeError):
    """A stage failed for a reason the user can act on."""


class MissingDependencyError(EdgetlError, ImportError):
    """An optional dependency needed for the requested work is not installed."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the '{package}' package; install it with: pip install 'edgetl[{extra}]'"
        )

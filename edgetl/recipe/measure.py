"""Stages that measure and ship: evaluate, benchmark (settings under the recipe's ``bench:``), bundle."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from edgetl.inputs import BATCH_SIZE
from edgetl.recipe.base import Backend, Declared, _Strict


class EvaluateStage(_Strict, Declared):
    """The task's metric for every model artifact so far, each through its own runtime."""

    takes: ClassVar[tuple[str, ...]] = ("models", "compared")
    reads: ClassVar[frozenset[str]] = frozenset({"data"})

    stage: Literal["evaluate"]
    batch_size: int = Field(BATCH_SIZE, ge=1, description="Texts per call when scoring (the metric does not depend on it).")


class BenchmarkStage(_Strict, Declared):
    """Latency, throughput, size, memory and accuracy of every artifact x backend (settings under ``bench``)."""

    takes: ClassVar[tuple[str, ...]] = ("models", "compared", "evaluation")
    reads: ClassVar[frozenset[str]] = frozenset({"data", "bench"})

    stage: Literal["benchmark"]


class BundleStage(_Strict, Declared):
    """An app-ready folder: the quantized model(s), tokenizer, labels, metrics and checksums."""

    takes: ClassVar[tuple[str, ...]] = ("quantized|exported", "evaluation", "benchmark")
    reads: ClassVar[frozenset[str]] = frozenset({"data"})  # labels, text pairs, max length and truncation go into edgetl.json

    stage: Literal["bundle"]
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1,
                                    description="Runtimes whose models go into the bundle (one keeps the download small).")
    max_new_tokens: int = Field(256, ge=1, description="text-generation: the most new tokens one call may ask for "
                                "(Generator and edgetl serve refuse more).")


class BenchConfig(_Strict):
    """How the benchmark measures."""

    warmup: int = Field(20, ge=0, description="Untimed calls before each timed block.")
    rounds: int = Field(2, ge=1, description="Rounds, each in a fresh process that times every target once; "
                        "target order alternates between rounds.")
    noise_threshold: float = Field(0.10, gt=0, description="A target whose per-round p50s spread by more than this "
                                   "fraction of their median is flagged noisy.")
    max_sentences: int | None = Field(None, ge=1, description="Eval sentences timed at batch 1 (default: all).")
    throughput_batch_size: int = Field(32, ge=1, description="Batch size of the throughput measurement.")
    threads: int | None = Field(None, ge=1, description="Intra-op threads for every backend (default: all cores).")
    include_pytorch: bool = Field(True, description="Also time the PyTorch FP32 models (the speed-up baseline).")
    compare: list[str] = Field(default_factory=list, description="Artifacts of other runs evaluated and timed "
                               "beside this run's: 'RECIPE:STAGE' (that recipe's run next to this one, e.g. "
                               "'sst-int8:bundle') or an artifact folder.")

"""Inference engines an app can embed: ONNX Runtime and OpenVINO. numpy in, logits out; never torch.

Each engine is the one place edgetl touches that runtime's inference API.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from edgetl.errors import MissingDependencyError, OutOfMemoryError


# ONNX Runtime execution providers by device; each falls back to the CPU for operators it lacks.
ORT_PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}


# How an allocation failure reaches Python: C++'s std::bad_alloc as the runtime's own exception type (ONNX
# Runtime), or the runtime's own message (OpenVINO's CPU plugin).
OUT_OF_MEMORY = ("bad_alloc", "Failed to allocate")


def raise_if_out_of_memory(exc: Exception, model_path: str | Path, doing: str) -> None:
    """OutOfMemoryError naming the model and this process's memory limit, if ``exc`` is an allocation failure."""
    if not isinstance(exc, MemoryError) and not any(m in str(exc) for m in OUT_OF_MEMORY):
        return
    limit = data_limit_mb()
    cap = f" within this process's limit of {limit} MB (RLIMIT_DATA; edgetl --memory-mb)" if limit else ""
    raise OutOfMemoryError(f"{model_path}: not enough memory to {doing} the model{cap}; a sharded bundle (edgetl "
                           "shard) holds one part per process") from exc


def data_limit_mb() -> int | None:
    """This process's data memory limit (RLIMIT_DATA) in MB, None where there is none (or no such limit)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return None if soft == resource.RLIM_INFINITY else soft >> 20


def _named_out_of_memory(method):
    """An engine's ``run``/``run_all``, raising OutOfMemoryError (naming its model and the cap) for an allocation
    failure."""
    @functools.wraps(method)
    def run(self, feeds):
        try:
            return method(self, feeds)
        except Exception as exc:
            raise_if_out_of_memory(exc, self.path, "run")
            raise

    return run


class OnnxRuntimeEngine:
    """One ``InferenceSession`` (CPU provider unless ``device`` says otherwise); ``run`` is thread-safe."""

    backend = "onnxruntime"

    def __init__(self, model_path: str | Path, threads: int | None = None, device: str = "cpu"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError("onnxruntime", "runtime", "the ONNX Runtime backend") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        providers = ORT_PROVIDERS[device]
        self.path = str(model_path)
        # On the CPU, ORT's SkipLayerNormalization kernel is slower than the Add and LayerNormalization it would
        # replace (2.3x at one short sentence; benchmarks/ort_int8_graph.py), so the residual adds stay apart.
        disabled = ["SkipLayerNormFusion"] if device == "cpu" else None
        self.session = ort.InferenceSession(str(model_path), options, providers=providers,
                                            disabled_optimizers=disabled)
        if self.session.get_providers()[0] != providers[0]:  # ORT falls back silently; a benchmark must not
            raise RuntimeError(f"ONNX Runtime did not start {providers[0]} (got {self.session.get_providers()})")
        self.input_names = [i.name for i in self.session.get_inputs()]
        # Each input's shape, None where it is dynamic: a decoder's KV-cache inputs fix heads and head size.
        self.input_shapes = {i.name: tuple(d if isinstance(d, int) else None for d in i.shape)
                             for i in self.session.get_inputs()}

    @_named_out_of_memory
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(["logits"], {k: feeds[k] for k in self.input_names})[0]

    @_named_out_of_memory
    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name (a decoder's logits and its KV cache)."""
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, {k: feeds[k] for k in self.input_names}), strict=True))


class OpenVinoEngine:
    """A model compiled for OpenVINO's CPU plugin. ``run`` makes a fresh request per call (thread-safe)."""

    backend = "openvino"

    def __init__(self, model_path: str | Path, threads: int | None = None, device: str = "CPU"):
        try:
            import openvino as ov
        except ImportError:
            raise MissingDependencyError("openvino", "openvino", "the OpenVINO backend") from None
        core = ov.Core()
        # On CPUs with bf16 units (AVX512-BF16, AMX) OpenVINO would otherwise run the float parts in bf16:
        # an "FP32" model would then not be FP32, and an INT8 model would not be the one evaluated.
        config = {"PERFORMANCE_HINT": "LATENCY"}
        if device == "CPU":
            config["INFERENCE_PRECISION_HINT"] = "f32"
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.path = str(model_path)
        self.compiled = core.compile_model(self.path, device, config)
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.input_shapes = {i.get_any_name(): tuple(d.get_length() if d.is_static else None for d in i.get_partial_shape())
                             for i in self.compiled.inputs}

    @_named_out_of_memory
    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        result = self.compiled.create_infer_request().infer({k: feeds[k] for k in self.input_names})
        return np.asarray(result[self.compiled.output(0)])

    @_named_out_of_memory
    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every output by name (a decoder's logits and its KV cache)."""
        result = self.compiled.create_infer_request().infer({k: feeds[k] for k in self.input_names})
        return {output.get_any_name(): np.asarray(result[output]) for output in self.compiled.outputs}


ENGINES = {"onnx": OnnxRuntimeEngine, "openvino": OpenVinoEngine}


def open_engine(backend: str, model_path: str | Path, threads: int | None = None, device: str = "cpu"):
    """An engine for a model file: backend 'onnx' (ONNX Runtime: device cpu, cuda, tensorrt) or 'openvino'
    (device cpu, gpu)."""
    try:
        if backend == "openvino":
            return OpenVinoEngine(model_path, threads, device.upper())
        return ENGINES[backend](model_path, threads, device)
    except Exception as exc:
        raise_if_out_of_memory(exc, model_path, "load")
        raise

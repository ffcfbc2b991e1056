"""Open any model artifact on any backend it holds: PyTorch (eager), ONNX Runtime or OpenVINO.

Every engine takes the same numpy feeds (from ``edgetl.runtime.text.encode``) and returns logits, so
evaluation and benchmarks treat the backends alike.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.architectures import ADAPTERS
from edgetl.artifact import Artifact, model_file_bytes
from edgetl.runtime.engines import open_engine
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

BACKEND_LABELS = {"pytorch": "PyTorch", "onnx": "ONNX Runtime", "openvino": "OpenVINO"}


class TorchEngine:
    """PyTorch eager, the head of ``task``: FP32 on the CPU, or FP16 on ``device='cuda'``."""

    backend = "pytorch"
    _default_threads: int | None = None

    def __init__(self, folder: str | Path | None, threads: int | None = None, device: str = "cpu",
                 task: Task = TASKS[DEFAULT_TASK], model=None):
        """``model``: a model already in memory (on ``device``, as it is) instead of the one saved in ``folder``."""
        import torch

        from edgetl.architectures import adapter_for
        from edgetl.modeling import load_classifier

        self._torch, self.threads, self.device = torch, threads, device
        TorchEngine._default_threads = TorchEngine._default_threads or torch.get_num_threads()
        self.activate()
        if model is None:
            model = load_classifier(folder, task)
            model = model.half().cuda() if device == "cuda" else model
        self.model = model
        # The runtime's feeds always hold token_type_ids; DistilBERT, RoBERTa-family and MPNet models take none.
        self.inputs = set(adapter_for(self.model.config.model_type).input_names)

    def activate(self) -> None:
        """Apply this engine's thread count (torch's is process-wide): call before timing it."""
        self._torch.set_num_threads(self.threads or TorchEngine._default_threads)

    def run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        with self._torch.inference_mode():
            inputs = {k: self._torch.from_numpy(v).to(self.device) for k, v in feeds.items() if k in self.inputs}
            return self.model(**inputs).logits.float().cpu().numpy()  # .cpu() waits for the GPU

    @functools.cached_property
    def input_shapes(self) -> dict[str, tuple]:
        """A decoder's inputs as its exported graph names them, the KV cache's shapes read off one step."""
        legacy = self._step({"input_ids": np.zeros((1, 1), dtype=np.int64),
                             "attention_mask": np.ones((1, 1), dtype=np.int64)}, None)[1]
        shapes = {"input_ids": (None, None), "attention_mask": (None, None), "position_ids": (None, None)}
        for layer, (key, value) in enumerate(legacy):
            shapes[f"past_key_values.{layer}.key"] = (None, key.shape[1], None, key.shape[3])
            shapes[f"past_key_values.{layer}.value"] = (None, value.shape[1], None, value.shape[3])
        return shapes

    @property
    def input_names(self) -> list[str]:
        return list(self.input_shapes)

    def run_all(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A decoder's logits and KV cache under the exported graph's names: the PyTorch reference runs the same
        decoding loop as ONNX Runtime and OpenVINO."""
        layers = sorted({int(k.split(".")[1]) for k in feeds if k.startswith("past_key_values.")})
        past = [(feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"]) for i in layers]
        logits, present = self._step(feeds, past if past and past[0][0].shape[2] else None)
        out = {"logits": logits}
        for layer, (key, value) in enumerate(present):
            out[f"present.{layer}.key"], out[f"present.{layer}.value"] = key, value
        return out

    def _step(self, feeds: dict[str, np.ndarray], past: list | None) -> tuple[np.ndarray, list]:
        from transformers import DynamicCache

        torch = self._torch
        with torch.inference_mode():
            inputs = {k: torch.from_numpy(feeds[k]).to(self.device) for k in ("input_ids", "attention_mask", "position_ids")
                      if k in feeds}
            cache = DynamicCache.from_legacy_cache(tuple((torch.from_numpy(k), torch.from_numpy(v)) for k, v in past)) \
                if past else None
            out = self.model(**inputs, past_key_values=cache, use_cache=True)
            present = [(k.float().cpu().numpy(), v.float().cpu().numpy()) for k, v in out.past_key_values.to_legacy_cache()]
            return out.logits.float().cpu().numpy(), present


@dataclass(frozen=True)
class Target:
    """One model file on one backend, named like ``onnx-int8 (03-quantize)``."""

    artifact: Artifact
    backend: str
    device: str = "cpu"  # pytorch: cpu, cuda (FP16); onnx: cpu, cuda, tensorrt; openvino: cpu, gpu

    @property
    def precision(self) -> str:
        if self.backend == "pytorch" and self.device == "cuda":
            return "fp16"
        return self.artifact.models[self.backend]["precision"]

    @property
    def key(self) -> str:
        device = "" if self.device == "cpu" else f" [{self.device}]"
        return f"{self.backend}-{self.precision}{device} ({self.artifact.name})"

    @property
    def folder(self) -> Path:
        return self.artifact.model_path(self.backend).parent if self.backend != "pytorch" else self.artifact.path

    @property
    def model_bytes(self) -> int:
        if self.backend == "pytorch":
            return sum(f.stat().st_size for f in self.folder.glob("*.safetensors"))
        return model_file_bytes(self.artifact.model_path(self.backend))

    @property
    def batch_invariant(self) -> bool:
        """False when a text's logits depend on its batch-mates: dynamic INT8 (see ``per_call_activation_scales``), or
        a decoder's classifier, which reads the last token that is not its pad id (the runtime pads with 0s)."""
        if self.backend == "onnx" and per_call_activation_scales(self.artifact.model_path("onnx")):
            return False
        config = self.folder / "config.json"
        model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
        return not (model_type in ADAPTERS and ADAPTERS[model_type].family == "decoder")

    def open(self, threads: int | None = None, task: Task = TASKS[DEFAULT_TASK]):
        """An engine of this model file; ``task`` names the head a PyTorch model is loaded with."""
        if self.backend == "pytorch":
            return TorchEngine(self.folder, threads, self.device, task)
        return open_engine(self.backend, self.artifact.model_path(self.backend), threads, self.device)


def per_call_activation_scales(model_path: Path) -> bool:
    """Whether an ONNX model quantizes activations with a range measured per call (dynamic INT8).

    ``DynamicQuantizeLinear`` takes one scale over the whole input tensor, padding and every other text of
    the batch included, so the same text can get different logits in different batches.
    """
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return any(node.op_type == "DynamicQuantizeLinear" for node in graph.node)


def targets_of(artifacts: list[Artifact], include_pytorch: bool = True) -> list[Target]:
    found = []
    for artifact in artifacts:
        for backend in artifact.models:
            if backend != "pytorch" or include_pytorch:
                found.append(Target(artifact, backend))
    return found

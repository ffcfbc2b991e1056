"""What a user gets without edgetl, built from the same FP32 export, for the benchmark to put beside edgetl's.

- Optimum default: optimum's ONNX export (the export stage's unfused graph) quantized by ``ORTQuantizer`` with
  the dynamic ``AutoQuantizationConfig`` preset for this CPU's ISA (avx512_vnni, avx512, avx2 or arm64),
  per-tensor as optimum's quantization guide shows it.
- OpenVINO default: the FP32 IR through ``nncf.quantize`` with its defaults (no model type, no ignored scope),
  calibrated on 300 training sentences.
"""

from __future__ import annotations

import platform
import shutil
from pathlib import Path

from edgetl.artifact import Artifact, copy_tokenizer
from edgetl.cpu import isa_flags
from edgetl.quantization import quantize_openvino
from edgetl.runtime.text import encode, load_tokenizer

def optimum_preset() -> str:
    """The ``AutoQuantizationConfig`` preset that fits this machine."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "arm64"
    flags = set(isa_flags())
    return "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def optimum_default(export: Artifact, out_dir: Path) -> Artifact:
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    folder = out_dir / "optimum-default"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    raw = export.path / export.manifest["unfused_onnx"]
    preset = optimum_preset()
    config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(raw.parent, file_name=raw.name).quantize(save_dir=folder, quantization_config=config)
    copy_tokenizer(export.model_path("onnx").parent, folder)
    quantized = next(folder.glob("*_quantized.onnx"))
    return Artifact(folder, {"kind": "quantized", "models": {"onnx": {"path": quantized.name, "precision": "int8",
                                                                      "method": f"optimum {preset} dynamic"}}},
                    label="Optimum default")


def openvino_default(export: Artifact, out_dir: Path, train_texts: list[str], max_length: int) -> Artifact:
    folder = out_dir / "openvino-default"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    source = export.model_path("openvino")
    tokenizer = load_tokenizer(source.parent, max_length)
    feeds = [encode(tokenizer, [text]) for text in train_texts[:300]]
    quantize_openvino(source, folder / "model.xml", feeds, transformer=False)
    copy_tokenizer(source.parent, folder)
    return Artifact(folder, {"kind": "quantized", "models": {"openvino": {"path": "model.xml", "precision": "int8",
                                                                          "method": "nncf.quantize defaults"}}},
                    label="OpenVINO default")

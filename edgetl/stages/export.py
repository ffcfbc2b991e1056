"""Export a fine-tuned PyTorch classifier to ONNX (optimum exporter + ORT transformer fusions) and OpenVINO IR."""

from __future__ import annotations

import shutil
from pathlib import Path

from edgetl.artifact import StageOutput, model_file_bytes
from edgetl.errors import StageError
from edgetl.recipe import ExportStage

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def export_onnx(model, out_dir: Path, opset: int) -> Path:
    """The optimum exporter with the text-classification ONNX config of the model's type, then validated.

    ``export`` rather than ``onnx_export_from_model``: the latter infers the library from the model's
    Python module and refuses edgetl's own heads, which are ordinary transformers models.
    """
    from optimum.exporters.onnx import export, validate_model_outputs
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=model.config.model_type, task="text-classification", library_name="transformers"
    )
    onnx_config = constructor(model.config)
    target = out_dir / "model.onnx"
    _, outputs = export(model, onnx_config, target, opset=opset)
    validate_model_outputs(onnx_config, model, target, outputs, atol=1e-4, use_subprocess=False)
    return target


def fuse_onnx(raw: Path, target: Path, config) -> None:
    """ONNX Runtime's BERT fusions (attention, skip-layernorm, bias-gelu) for faster CPU inference."""
    from onnxruntime.transformers.optimizer import optimize_model

    optimized = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads,
                               hidden_size=config.hidden_size, opt_level=1, use_gpu=False)
    optimized.save_model_to_file(str(target))


def export_openvino(onnx_path: Path, target: Path) -> None:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(target), compress_to_fp16=False)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in (*TOKENIZER_FILES, "config.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def run(cfg: ExportStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.modeling import load_classifier

    source = ctx.latest("pytorch-model")
    if source is None:
        raise StageError("export: no PyTorch model artifact to export")
    model = load_classifier(source.path)
    models = {}
    raw_dir = out_dir / "raw"
    raw_dir.mkdir()
    # The unfused graph is kept: static INT8 (QDQ) and OpenVINO start from it, not from ORT's fused ops.
    raw = export_onnx(model, raw_dir, cfg.opset)
    if "onnx" in cfg.formats:
        folder = out_dir / "onnx"
        folder.mkdir()
        target = folder / "model.onnx"
        if cfg.optimize:
            fuse_onnx(raw, target, model.config)
        else:
            shutil.copy2(raw, target)
        copy_tokenizer(source.path, folder)
        models["onnx"] = {"path": "onnx/model.onnx", "precision": "fp32", "fused": cfg.optimize}
    if "openvino" in cfg.formats:
        folder = out_dir / "openvino"
        folder.mkdir()
        # From the unfused graph: OpenVINO applies its own fusions and does not read ORT's contrib ops.
        export_openvino(raw, folder / "model.xml")
        copy_tokenizer(source.path, folder)
        models["openvino"] = {"path": "openvino/model.xml", "precision": "fp32"}
    metrics = {f"{b}_bytes": model_file_bytes(out_dir / m["path"]) for b, m in models.items()}
    return StageOutput(kind="exported", precision="fp32", models=models, metrics=metrics,
                       extra={"unfused_onnx": "raw/model.onnx"})

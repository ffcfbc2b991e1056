"""Post-training INT8 quantization of exported models, calibrated on training sentences."""

from __future__ import annotations

from pathlib import Path

from edgetl.artifact import StageOutput, model_file_bytes
from edgetl.data import load_labelled
from edgetl.errors import StageError
from edgetl.recipe import QuantizeStage
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.stages.export import copy_tokenizer


def calibration_feeds(ctx, tokenizer_dir: Path, samples: int) -> list[dict]:
    """``samples`` training sentences (shuffled, fixed seed), one per feed at its own length.

    Training text, never the evaluation split: calibrating on dev would leak it into the model.
    """
    train, _ = load_labelled(ctx.recipe.data)
    texts = train.shuffle(seed=1).select(range(min(samples, len(train))))["text"]
    tokenizer = load_tokenizer(tokenizer_dir, ctx.recipe.data.max_length)
    return [encode(tokenizer, [text]) for text in texts]


def run(cfg: QuantizeStage, ctx, out_dir: Path) -> StageOutput:
    source = ctx.latest("exported")
    if source is None:
        raise StageError("quantize: no exported model; add an export stage before quantize")
    tokenizer_dir = next(source.model_path(b).parent for b in cfg.backends)
    feeds = calibration_feeds(ctx, tokenizer_dir, cfg.calibration_samples)
    models = {}
    if "onnx" in cfg.backends:
        from edgetl.stages._quantize_ort import quantize_onnx

        folder = out_dir / "onnx"
        folder.mkdir()
        unfused = source.path / source.manifest["unfused_onnx"]
        dynamic_nodes = quantize_onnx(unfused, folder / "model.onnx", cfg.onnx_method, feeds, cfg.per_channel,
                                      cfg.onnx_calibration, cfg.onnx_dynamic_ffn_down)
        copy_tokenizer(source.model_path("onnx").parent, folder)
        models["onnx"] = {"path": "onnx/model.onnx", "precision": "int8", "method": cfg.onnx_method,
                          "dynamic_int8_nodes": dynamic_nodes}
    if "openvino" in cfg.backends:
        from edgetl.stages._quantize_openvino import quantize_openvino

        folder = out_dir / "openvino"
        folder.mkdir()
        quantize_openvino(source.model_path("openvino"), folder / "model.xml", feeds)
        copy_tokenizer(source.model_path("openvino").parent, folder)
        models["openvino"] = {"path": "openvino/model.xml", "precision": "int8", "method": "nncf.quantize"}
    metrics = {f"{b}_bytes": model_file_bytes(out_dir / m["path"]) for b, m in models.items()}
    return StageOutput(kind="quantized", precision="int8", models=models, metrics=metrics)

"""Export a fine-tuned PyTorch model to ONNX (optimum exporter for the recipe's task + ORT transformer fusions) and
OpenVINO IR."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from edgetl.artifact import StageOutput, copy_tokenizer, model_file_bytes
from edgetl.errors import StageError
from edgetl.recipe import ExportStage
from edgetl.tasks import task_for

log = logging.getLogger("edgetl")


def export_onnx(model, out_dir: Path, opset: int, atol: float = 1e-4, task: str = "text-classification") -> Path:
    """The optimum exporter with the ONNX config of the model's type for optimum's ``task``, then validated.

    ``export`` rather than ``onnx_export_from_model``: the latter infers the library from the model's
    Python module and refuses edgetl's own heads, which are ordinary transformers models.
    """
    from optimum.exporters.onnx import export, validate_model_outputs
    from optimum.exporters.tasks import TasksManager

    constructor = TasksManager.get_exporter_config_constructor(
        exporter="onnx", model_type=model.config.model_type, task=task, library_name="transformers"
    )
    # A "-with-past" task takes the KV cache as inputs too (optimum exports the first step without it otherwise).
    onnx_config = constructor(model.config, **({"use_past_in_inputs": True} if task.endswith("-with-past") else {}))
    target = out_dir / "model.onnx"
    _, outputs = export(model, onnx_config, target, opset=opset)
    validate_model_outputs(onnx_config, model, target, outputs, atol=atol, use_subprocess=False)
    return target


def fuse_onnx(raw: Path, target: Path, config, embedding: bool = True) -> bool:
    """ONNX Runtime's fusions (attention, bias-gelu, and with ``embedding`` the embedding lookups with their
    layer norm) of the architecture's kind, for faster CPU inference.

    Residual adds stay apart from their layer norms: ORT's SkipLayerNormalization CPU kernel took 2.3-4.2x the
    time of Add + LayerNormalization on the same tensors ([1, 27, 384] to [32, 64, 384], ORT 1.32;
    benchmarks/ort_int8_graph.py), so the runtime also keeps ORT from fusing them when it loads the model
    (``edgetl.runtime.engines``).
    Pruned layers have their own head counts, so the fuser reads them from each layer's graph (0 = detect).
    The fused graph is checked against the raw one; returns False if they disagree (the caller keeps the raw one).
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from edgetl.architectures import adapter_for
    from edgetl.modeling import PRUNED_LAYERS

    fusion = adapter_for(config.model_type).ort_fusion
    if fusion is None:
        log.info("export: no ONNX Runtime fusions for %s; keeping the unfused graph", config.model_type)
        return False
    options = FusionOptions(fusion)
    options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    options.enable_embed_layer_norm = embedding
    pruned = getattr(config, PRUNED_LAYERS, None) is not None
    optimized = optimize_model(str(raw), model_type=fusion, num_heads=0 if pruned else config.num_attention_heads,
                               hidden_size=0 if pruned else config.hidden_size, opt_level=1, use_gpu=False,
                               optimization_options=options)
    optimized.save_model_to_file(str(target))
    difference = _max_logit_difference(raw, target, config.vocab_size)
    if difference > 1e-3:
        log.warning("export: ORT fusions changed the logits by %.3g; keeping the unfused graph", difference)
        return False
    return True


def _max_logit_difference(first: Path, second: Path, vocab_size: int) -> float:
    """Largest logit difference between two ONNX graphs on random text of two lengths, padding included."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (first, second)]
    names = {i.name for i in sessions[0].get_inputs()}
    worst = 0.0
    for length in (7, 29):
        ids = rng.integers(0, vocab_size, size=(2, length), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[1, length // 2:] = 0
        feeds = {k: v for k, v in {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}.items()
                 if k in names}
        a, b = (s.run(None, feeds)[0] for s in sessions)
        worst = max(worst, float(np.abs(a - b).max()))
    return worst


def export_openvino(onnx_path: Path, target: Path) -> None:
    import openvino as ov

    ov_model = ov.convert_model(str(onnx_path))
    ov.save_model(ov_model, str(target), compress_to_fp16=False)


def run(cfg: ExportStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.modeling import load_classifier

    source = ctx.latest("pytorch-model")
    if source is None:
        raise StageError("export: no PyTorch model artifact to export")
    task = task_for(ctx.recipe.task)
    model = load_classifier(source.path, task)
    models = {}
    raw_dir = out_dir / "raw"
    raw_dir.mkdir()
    # The unfused graph is kept: static INT8 (QDQ) and OpenVINO start from it, not from ORT's fused ops.
    raw = export_onnx(model, raw_dir, cfg.opset, atol=task.export_atol, task=task.optimum_task)
    if "onnx" in cfg.formats:
        folder = out_dir / "onnx"
        folder.mkdir()
        target = folder / "model.onnx"
        fused = cfg.optimize and fuse_onnx(raw, target, model.config)
        if not fused:
            shutil.copy2(raw, target)
        copy_tokenizer(source.path, folder)
        models["onnx"] = {"path": "onnx/model.onnx", "precision": "fp32", "fused": fused}
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

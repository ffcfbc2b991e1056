"""NNCF INT8: fake-quantizers for quantization-aware training (QAT) of a PyTorch classifier, their export as
real INT8 graphs, and accuracy-controlled post-training INT8 of exported models.

Written against nncf 3.4, whose PyTorch backend is hook-based: ``nncf.quantize`` returns a deep copy of the
model whose ``forward`` runs the quantizers kept in a ``__nncf_hooks`` submodule, so the copy keeps its class,
its forward signature (HF Trainer reads it) and ``save_pretrained``. Every NNCF call of edgetl is in this
file, so a release that moves an API changes only here.
"""

from __future__ import annotations

import copy
import inspect
import logging
import tempfile
from pathlib import Path

from edgetl.errors import StageError

log = logging.getLogger("edgetl")

QAT_OPSET = 17  # per-channel QuantizeLinear/DequantizeLinear need opset 13 or later
ONNX_INT8_OPS = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QGemm", "QAttention", "QEmbedLayerNormalization",
})
QUANTIZABLE_OPS = frozenset({"MatMul", "Gemm", "Gather", "Conv", "Convolution"})
# Ops between a quantizer and the MatMul/Gather it feeds: layout changes, and OpenVINO's INT8 weight
# decompression (i8 Constant -> Convert -> Subtract zero point -> Multiply scale).
PASS_THROUGH = {"onnx": frozenset({"Transpose", "Reshape", "Unsqueeze", "Squeeze", "Identity"}),
                "openvino": frozenset({"Convert", "Reshape", "Transpose", "Unsqueeze", "Squeeze", "Subtract",
                                       "Multiply"})}


def _torch_feed(model, feed: dict):
    """numpy feed -> tensors on the model's device, keeping only the inputs its forward takes."""
    import torch

    accepted = inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    return {name: torch.from_numpy(array).to(device) for name, array in feed.items() if name in accepted}


def count_quantizers(model) -> int:
    """NNCF fake-quantizer modules in a PyTorch model (0 for a model ``insert_quantizers`` never saw)."""
    from nncf.torch.quantization.layers import BaseQuantizer

    return sum(isinstance(module, BaseQuantizer) for module in model.modules())


def insert_quantizers(model, feeds: list[dict]):
    """A copy of ``model`` with NNCF INT8 fake-quantizers, calibrated on ``feeds``, ready for QAT.

    ``nncf.quantize`` with the transformer preset: weights symmetric per channel, activations per tensor,
    SmoothQuant scales before the linear layers, ranges from the feeds' statistics. The copy
    trains like the original (same kwargs, ``labels`` included, ``.loss``/``.logits`` out), at any batch size
    and sequence length; the quantizers' ranges and smoothing scales are trainable parameters too.

    Args:
        model: A PyTorch classifier (edgetl's heads or a transformers ``*ForSequenceClassification``).
        feeds: Calibration inputs, dicts of int64 arrays of shape (1, seq), lengths free.
    """
    import nncf

    if not feeds:
        raise StageError("insert_quantizers: no calibration feeds; pass at least one tokenized sentence")
    dataset = nncf.Dataset(feeds, lambda feed: _torch_feed(model, feed))
    quantized = nncf.quantize(model.eval(), dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(feeds))
    _unshare_in_state_dict(quantized)
    log.info("qat: %d fake-quantizers inserted", count_quantizers(quantized))
    return quantized


def _clone_shared(module, state_dict, prefix, local_metadata) -> None:
    """state_dict post-hook: entries that share storage with an earlier one become copies.

    One SmoothQuant scale serves query, key and value, so three state_dict keys hold one tensor. Trainer
    checkpoints refuse that (``save_pretrained``: "contained shared tensors"; safetensors' ``save_file``
    for a wrapped model: "Some tensors share memory"). Copies save as three equal tensors, which load back
    into the one shared parameter.
    """
    seen = set()
    for key, tensor in state_dict.items():
        if not key.startswith(prefix) or tensor.numel() == 0:
            continue
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if where in seen:
            state_dict[key] = tensor.clone()
        seen.add(where)


def _unshare_in_state_dict(model) -> None:
    from nncf.torch.function_hook.wrapper import get_hook_storage

    storage = get_hook_storage(model)
    if _clone_shared not in storage._state_dict_hooks.values():
        storage.register_state_dict_post_hook(_clone_shared)


def export_qat(model, example_feed: dict, onnx_path: Path, openvino_path: Path, opset: int = QAT_OPSET) -> dict:
    """Export a trained QAT model as real INT8: ONNX with QuantizeLinear/DequantizeLinear, OpenVINO IR with
    FakeQuantize (executed as INT8 by the CPU plugin) and INT8 weights.

    ``nncf.strip`` (format NATIVE) swaps NNCF's quantizers for torch FakeQuantize modules, which the ONNX
    exporter writes as QDQ pairs; the IR is converted from that ONNX. Inputs input_ids, attention_mask,
    token_type_ids and output ``logits`` have dynamic batch and sequence axes. ``model`` is left as it is.

    Returns:
        ``{"onnx_int8_ops": n, "openvino_int8_ops": m}``; a graph with none raises StageError.
    """
    import nncf

    from edgetl.stages.export import export_onnx, export_openvino

    deployable = copy.deepcopy(model).cpu().eval()
    quantizers = count_quantizers(deployable)
    if quantizers:
        deployable = nncf.strip(deployable, do_copy=False, strip_format=nncf.StripFormat.NATIVE,
                                example_input=_torch_feed(deployable, example_feed))
    onnx_path, openvino_path = Path(onnx_path), Path(openvino_path)
    for folder in (onnx_path.parent, openvino_path.parent):
        folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=onnx_path.parent) as scratch:
        # ONNX Runtime and torch round a few values to the neighbouring INT8 step (observed up to 1.5e-4 on logits).
        export_onnx(deployable, Path(scratch), opset, atol=1e-3).replace(onnx_path)
    export_openvino(onnx_path, openvino_path)
    counts = {"onnx_int8_ops": count_int8_ops_onnx(onnx_path), "openvino_int8_ops": count_int8_ops_openvino(openvino_path)}
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        raise StageError(f"QAT export: {onnx_path} and {openvino_path} exported with no INT8 operations "
                         f"({', '.join(empty)} = 0; the model has {quantizers} NNCF quantizers): "
                         "build the model with insert_quantizers() before training and export that model")
    log.info("qat export: %d INT8 ops in ONNX, %d in OpenVINO", counts["onnx_int8_ops"], counts["openvino_int8_ops"])
    return counts


def count_int8_ops_onnx(path) -> int:
    """QuantizeLinear/DequantizeLinear, QLinear*, integer MatMul/Conv and ORT's quantized contrib ops."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(node.op_type in ONNX_INT8_OPS or node.op_type.startswith("QLinear") for node in graph.node)


def count_int8_ops_openvino(path) -> int:
    """FakeQuantize ops of 255 or 256 levels, plus Converts that decompress i8/u8 constants (INT8 weights)."""
    import openvino as ov

    count = 0
    for op in ov.Core().read_model(str(path)).get_ops():
        kind = op.get_type_name()
        if kind == "FakeQuantize":
            count += op.get_attributes()["levels"] in (255, 256)
        elif kind == "Convert":
            count += _is_int8_constant(op.input_value(0).get_node())
    return count


def _is_int8_constant(node) -> bool:
    import openvino as ov

    return node.get_type_name() == "Constant" and node.get_output_element_type(0) in (ov.Type.i8, ov.Type.u8)


def quantize_with_accuracy_control(backend: str, source: Path, target: Path, calib_feeds: list[dict],
                                   val_feeds: list[dict], val_labels: list[int], max_drop: float) -> dict:
    """Static INT8 of an exported model where the operations that cost most accuracy stay in FP32.

    ``nncf.quantize_with_accuracy_control`` (transformer preset, absolute drop) quantizes everything, measures
    accuracy on the validation feeds, then reverts the most harmful operations to FP32, group by group,
    until the drop is within ``max_drop`` (or nothing is left to revert: see ``drop_met``).

    SmoothQuant is off here although plain ``nncf.quantize`` uses it: reverting an operation restores its
    pre-smoothing weights but keeps the smoothing Multiply before it, so each revert breaks the operation
    (nncf 3.4: with every operation reverted, a tiny model agreed with its FP32 self on 75% of sentences).

    Args:
        backend: "openvino" (``source`` an IR .xml) or "onnx" (``source`` the unfused .onnx).
        source: The FP32 model. ``target`` gets the INT8 one (IR weights kept FP32 where not INT8).
        calib_feeds: Calibration inputs, one sentence per feed; all are used.
        val_feeds: One sentence per feed, with ``val_labels`` its class ids.
        max_drop: Accuracy **points** the INT8 model may lose (0.5 = half a point), the unit of the recipe's
            ``max_accuracy_drop``; accuracies are fractions, as everywhere in edgetl, so NNCF gets max_drop / 100.

    Returns:
        ``fallback_layers``: MatMul/Gemm/Gather operations left in FP32 (INT8 inputs in the model NNCF
        quantized first, none in the result). NNCF logs only the operations it ranked; this list also has
        the embedding Gathers whose quantizers it removed in groups of their own. ``accuracy_fp32``,
        ``accuracy_int8``: fractions on the validation feeds (the INT8 one measured on the saved file);
        ``drop_met``: whether the INT8 model is within ``max_drop``. A result with no INT8 operation left
        raises StageError.
    """
    import nncf

    if backend not in PASS_THROUGH:
        raise StageError(f"accuracy control: backend '{backend}' is not one of {sorted(PASS_THROUGH)}")
    if not calib_feeds or not val_feeds or len(val_feeds) != len(val_labels):
        raise StageError(f"accuracy control: need calibration feeds ({len(calib_feeds)}) and one label per "
                         f"validation feed ({len(val_feeds)} feeds, {len(val_labels)} labels)")
    model = _read_model(backend, source)
    names = _input_names(backend, model)
    items = [({k: feed[k] for k in names}, int(label)) for feed, label in zip(val_feeds, val_labels, strict=True)]
    accuracy = _accuracy_fn(backend)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        quantized = nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calib_feeds, lambda feed: {k: feed[k] for k in names}),
            nncf.Dataset(items, lambda item: item[0]), accuracy, max_drop=max_drop / 100,
            drop_type=nncf.DropType.ABSOLUTE, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib_feeds),
            advanced_quantization_parameters=nncf.AdvancedQuantizationParameters(
                smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1)),
            advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(intermediate_model_dir=scratch))
        # NNCF saves the fully quantized model it started from here; what lost INT8 inputs since fell back.
        first = Path(scratch) / ("intermediate_model.xml" if backend == "openvino" else "intermediate_model.onnx")
        before = _int8_inputs(backend, _read_model(backend, first))
    _save_model(backend, quantized, target)
    int8_ops = count_int8_ops_onnx(target) if backend == "onnx" else count_int8_ops_openvino(target)
    if int8_ops == 0:
        raise StageError(f"accuracy control ({backend}): every operation went back to FP32, so {target} has no INT8 "
                         f"operations; max_drop {max_drop} points is out of reach: raise it, calibrate on more "
                         "sentences, or use method qat")
    after = _int8_inputs(backend, _read_model(backend, target))
    fallback = sorted(name for name, ports in before.items() if ports - after.get(name, frozenset()))
    accuracy_fp32 = accuracy(_for_inference(backend, _read_model(backend, source)), items)[0]
    accuracy_int8 = accuracy(_for_inference(backend, _read_model(backend, target)), items)[0]
    drop_met = accuracy_fp32 - accuracy_int8 <= max_drop / 100 + 1e-9
    if not drop_met:
        log.warning("accuracy control (%s): INT8 loses %.2f points, more than max_drop %.2f, with %d operations in FP32",
                    backend, 100 * (accuracy_fp32 - accuracy_int8), max_drop, len(fallback))
    return {"fallback_layers": fallback, "accuracy_fp32": round(accuracy_fp32, 5),
            "accuracy_int8": round(accuracy_int8, 5), "drop_met": drop_met}


def _accuracy_fn(backend: str):
    """NNCF's validation_fn: (model, items) -> (accuracy, per-item 0/1), argmax of the logits vs the label.

    NNCF passes an OpenVINO CompiledModel, or an ONNX ModelProto that needs a session; it calls once per
    item when ranking, so the session of the last model is kept.
    """
    import numpy as np

    last = {"model": None, "session": None}

    def logits(model, feed):
        if backend == "openvino":
            return model(feed)[model.output(0)]
        if last["model"] is not model:
            import onnxruntime as ort

            last.update(model=model, session=ort.InferenceSession(model.SerializeToString(),
                                                                   providers=["CPUExecutionProvider"]))
        return last["session"].run(None, feed)[0]

    def accuracy(model, items):
        correct = [float(np.argmax(logits(model, feed)[0]) == label) for feed, label in items]
        return sum(correct) / len(correct), correct

    return accuracy


def _for_inference(backend: str, model):
    if backend == "onnx":
        return model
    import openvino as ov
    import openvino.properties.hint as hints

    # FP32 inference as NNCF validates, not bf16 where the CPU has it
    return ov.Core().compile_model(model, "CPU", {hints.inference_precision: ov.Type.f32})


def _read_model(backend: str, path):
    if backend == "openvino":
        import openvino as ov

        return ov.Core().read_model(str(path))
    import onnx

    return onnx.load(str(path))


def _save_model(backend: str, model, target: Path) -> None:
    if backend == "openvino":
        import openvino as ov

        ov.save_model(model, str(target), compress_to_fp16=False)
    else:
        import onnx

        onnx.save(model, str(target))


def _input_names(backend: str, model) -> list[str]:
    if backend == "openvino":
        return [i.get_any_name() for i in model.inputs]
    initializers = {i.name for i in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in initializers]


def _int8_inputs(backend: str, model) -> dict[str, frozenset[int]]:
    """Quantizable operation name -> its input ports fed by a quantizer (through layout ops)."""
    if backend == "onnx":
        producers = {out: node for node in model.graph.node for out in node.output}

        def quantized(tensor: str, depth: int = 0) -> bool:
            node = producers.get(tensor)
            if node is None or depth > 4:
                return False
            return node.op_type == "DequantizeLinear" or (
                node.op_type in PASS_THROUGH["onnx"] and quantized(node.input[0], depth + 1))

        return {node.name: frozenset(i for i, tensor in enumerate(node.input) if quantized(tensor))
                for node in model.graph.node if node.op_type in QUANTIZABLE_OPS}

    def quantized_ov(output, depth: int = 0) -> bool:
        node = output.get_node()
        if node.get_type_name() == "FakeQuantize" or _is_int8_constant(node):
            return True
        return depth < 5 and node.get_type_name() in PASS_THROUGH["openvino"] and any(
            quantized_ov(i.get_source_output(), depth + 1) for i in node.inputs())

    return {op.get_friendly_name(): frozenset(i for i, port in enumerate(op.inputs())
                                              if quantized_ov(port.get_source_output()))
            for op in model.get_ops() if op.get_type_name() in QUANTIZABLE_OPS}

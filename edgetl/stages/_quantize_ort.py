"""ONNX Runtime INT8: static QDQ with calibration (default) or dynamic."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]], input_names: list[str]):
        self._iter = iter([{k: f[k] for k in input_names} for f in feeds])

    def get_next(self):
        return next(self._iter, None)


def pad_feeds(feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Pad every feed to the longest one: ORT's histogram calibrators stack all outputs into one array."""
    longest = max(f["input_ids"].shape[1] for f in feeds)
    return [{k: np.pad(v, ((0, 0), (0, longest - v.shape[1]))) for k, v in f.items()} for f in feeds]


def down_projections(model) -> list[str]:
    """MatMul nodes whose weight maps a wider space to a narrower one (the FFN output, intermediate -> hidden).

    Their input, the GELU output, has the widest activation range in BERT-style blocks.
    """
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    names = []
    for node in model.graph.node:
        weight = shapes.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight is not None and len(weight) == 2 and weight[0] > weight[1]:
            names.append(node.name)
    return names


def quantize_onnx(source: Path, target: Path, method: str, feeds: list[dict], per_channel: bool,
                  calibration: str = "minmax", dynamic_ffn_down: bool = False) -> list[str]:
    """Quantize ``source`` into ``target``; returns the MatMul nodes quantized dynamically instead of statically.

    With ``dynamic_ffn_down`` the FFN down-projections get dynamic INT8 (activation range measured per
    call) instead of a calibrated static range: their GELU-output inputs have rare large outliers that a
    fixed range either clips or resolves coarsely.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method == "dynamic":
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel)
        return []
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[calibration]
    if calibration != "minmax":
        feeds = pad_feeds(feeds)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared), load_external_data=False)
        excluded = down_projections(model) if dynamic_ffn_down else []
        static_out = Path(scratch) / "static.onnx" if excluded else target
        quantize_static(
            prepared,
            static_out,
            _FeedReader(feeds, [i.name for i in model.graph.input]),
            quant_format=QuantFormat.QDQ,
            # MatMul carries almost all compute; the embedding Gather, half of the weights, makes the file small.
            op_types_to_quantize=["MatMul", "Gather"],
            nodes_to_exclude=excluded,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
        )
        if excluded:
            quantize_dynamic(static_out, target, nodes_to_quantize=excluded, op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, per_channel=per_channel)
    return excluded

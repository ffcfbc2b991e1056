"""INT8 of an exported graph, one function per backend: ``quantize_onnx`` for ONNX Runtime (static QDQ with
calibration, or dynamic; SmoothQuant optional) and ``quantize_openvino`` through ``nncf.quantize`` (the quantize
stage's transformer preset, or nncf's defaults for the benchmark's OpenVINO-default peer); and a decoder's
weight-only INT8/INT4, ``compress_weights_onnx`` and ``compress_weights_openvino``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np


def quantize_openvino(source: Path, target: Path, feeds: list[dict], transformer: bool = True,
                      exclude: list[str] = ()) -> None:
    """``exclude``: MatMul node names left in FP32."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source))
    names = [i.get_any_name() for i in model.inputs]
    dataset = nncf.Dataset(feeds, lambda feed: {k: feed[k] for k in names})
    preset = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    if exclude:
        preset["ignored_scope"] = nncf.IgnoredScope(names=list(exclude))
    quantized = nncf.quantize(model, dataset, subset_size=len(feeds), **preset)
    ov.save_model(quantized, str(target), compress_to_fp16=False)


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


def matmul_roles(source: Path) -> dict[str, list[str]]:
    """The graph's weight MatMul nodes grouped by their role in a layer (the node name with the layer number taken
    out: every layer's FFN output projection is one role), in graph order."""
    import re

    import onnx

    model = onnx.load(str(source), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    roles: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in weights:
            roles.setdefault(re.sub(r"\.\d+(?=[/.])", ".N", node.name), []).append(node.name)
    return roles


# Nodes that multiply their first input by a 2-D constant second input: MatMul, and the fused graph's Attention
# (its packed query, key and value weights, [hidden, 3 x hidden]).
_WEIGHT_PRODUCTS = ("MatMul", "Attention")


def _weight_matmuls(model) -> dict[str, list]:
    """MatMul (and fused Attention) nodes with a 2-D constant weight, grouped by their activation input; a weight
    that any other node also reads is left out (scaling its rows would change that node too)."""
    weights = {init.name for init in model.graph.initializer if len(init.dims) == 2}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    groups: dict[str, list] = {}
    for node in model.graph.node:
        if node.op_type in _WEIGHT_PRODUCTS and node.input[1] in weights and readers[node.input[1]] == 1:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def smooth(source: Path, target: Path, feeds: list[dict], alpha: float) -> int:
    """SmoothQuant (Xiao et al., 2023) for every constant-weight MatMul (or fused Attention): returns how many inputs
    it smoothed.

    Each input channel j of the activation X is divided by s_j = max|X_j|^alpha / max|W_j,:|^(1 - alpha)
    (activation maxima measured on ``feeds``) through an inserted Mul, and the weight rows are multiplied by
    s_j: the FP32 function is unchanged, but the few outlier channels of BERT activations (LayerNorm and
    GELU outputs), which set the per-tensor INT8 activation range, shrink, and the per-output-channel
    INT8 weights take over that difficulty. The Mul stays a separate node: most of these activations also
    feed a residual connection or leave a nonlinearity, so no earlier op can absorb the scale (about 7 %
    more ONNX Runtime latency on short sentences, README "Choosing the INT8 settings").
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    groups = _weight_matmuls(model)
    peak = _channel_peaks(model, list(groups), feeds)
    initializers = {init.name: init for init in model.graph.initializer}
    nodes = list(model.graph.node)
    for name, consumers in groups.items():
        weights = [numpy_helper.to_array(initializers[n.input[1]]) for n in consumers]
        w_peak = np.max([np.abs(w).max(1) for w in weights], axis=0)
        scale = np.clip(peak[name], 1e-5, None) ** alpha / np.clip(w_peak, 1e-5, None) ** (1 - alpha)
        scale = scale.astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(1 / scale, f"{name}_smooth_scale"))
        mul = helper.make_node("Mul", [name, f"{name}_smooth_scale"], [f"{name}_smoothed"], name=f"{name}_smooth")
        nodes.insert(min(nodes.index(n) for n in consumers), mul)  # before its first reader: order stays topological
        for node, weight in zip(consumers, weights, strict=True):
            node.input[0] = f"{name}_smoothed"
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], node.input[1]))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(target))
    return len(groups)


def _channel_peaks(model, tensors: list[str], feeds: list[dict]) -> dict[str, np.ndarray]:
    """The largest magnitude of each channel (last axis) of the FP32 ``tensors`` of ``model`` over ``feeds``."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in tensors)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the probed tensors
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    peak = {name: 0.0 for name in tensors}
    for feed in feeds:
        for name, value in zip(tensors, session.run(tensors, {k: feed[k] for k in input_names}), strict=True):
            peak[name] = np.maximum(peak[name], np.abs(value).reshape(-1, value.shape[-1]).max(0))
    return peak


# Input channels of a MatMul that ``outlier_split`` computes in FP32. On stsb-embed-int8's 12 FFN MatMuls 2 channels
# kept held-out recall@10 0.951, 4 kept 0.954 (block-wise INT8 0.955, FP32 0.960), 8 no more; the 4 cost 0.14 ms
# over fully dynamic INT8 at batch 1, block-wise INT8 0.28 ms (results/stsb-embed-int8/942675a-fallback).
OUTLIER_CHANNELS = 4


def outlier_split(source: Path, target: Path, feeds: list[dict], nodes: list[str],
                  channels: int = OUTLIER_CHANNELS) -> list[str]:
    """LLM.int8()'s decomposition (Dettmers et al., 2022) for the constant-weight MatMuls ``nodes``: the ``channels``
    input channels with the largest magnitude over ``feeds`` leave the product through a small FP32 MatMul (a
    Gather of those channels times their weight rows), and the rest of the activation, those channels zeroed by a
    Mul, goes through the node, which dynamic INT8 then quantizes with a range the outliers no longer set. The FP32
    function is unchanged. Returns the Gathers and small MatMuls so added, which INT8 must leave alone."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    by_name = {n.name: n for n in model.graph.node if n.op_type == "MatMul"}
    initializers = {init.name: init for init in model.graph.initializer}
    missing = [n for n in nodes if n not in by_name or by_name[n].input[1] not in initializers]
    if missing:
        raise ValueError(f"{source}: no constant-weight MatMul named {missing} to split")
    peak = _channel_peaks(model, sorted({by_name[n].input[0] for n in nodes}), feeds)
    graph, small = list(model.graph.node), []
    for name in nodes:
        node, prefix = by_name[name], f"{name}_outliers"
        weight = numpy_helper.to_array(initializers[node.input[1]])
        picked = np.sort(np.argsort(-peak[node.input[0]])[:channels]).astype(np.int64)
        mask = np.ones(weight.shape[0], np.float32)
        mask[picked] = 0
        rest = weight.copy()
        rest[picked] = 0  # rows the zeroed channels never meet: out of the per-channel weight ranges too
        initializers[node.input[1]].CopyFrom(numpy_helper.from_array(rest, node.input[1]))
        model.graph.initializer.extend([numpy_helper.from_array(mask, f"{prefix}_mask"),
                                        numpy_helper.from_array(picked, f"{prefix}_index"),
                                        numpy_helper.from_array(weight[picked], f"{prefix}_weight")])
        before = [helper.make_node("Mul", [node.input[0], f"{prefix}_mask"], [f"{prefix}_rest"],
                                   name=f"{prefix}_mask_mul"),
                  helper.make_node("Gather", [node.input[0], f"{prefix}_index"], [f"{prefix}_x"], axis=-1,
                                   name=f"{prefix}_gather"),
                  helper.make_node("MatMul", [f"{prefix}_x", f"{prefix}_weight"], [f"{prefix}_y"],
                                   name=f"{prefix}_matmul")]
        add = helper.make_node("Add", [f"{prefix}_sum", f"{prefix}_y"], [node.output[0]], name=f"{prefix}_add")
        node.input[0], node.output[0] = f"{prefix}_rest", f"{prefix}_sum"
        at = graph.index(node)
        graph[at:at + 1] = [*before, node, add]
        small += [f"{prefix}_gather", f"{prefix}_matmul"]
    del model.graph.node[:]
    model.graph.node.extend(graph)
    onnx.save(model, str(target))
    return small


def quantize_onnx(source: Path, target: Path, method: str, feeds: list[dict], per_channel: bool,
                  calibration: str = "minmax", dynamic_ffn_down: bool = False, smooth_alpha: float | None = None,
                  exclude: list[str] = (), embedding_bits: int = 8, outlier_nodes: list[str] = (),
                  outlier_channels: int = OUTLIER_CHANNELS) -> list[str]:
    """Quantize ``source`` into ``target``; returns the MatMul nodes quantized dynamically instead of statically.

    With ``dynamic_ffn_down`` the FFN down-projections get dynamic INT8 (activation range measured per
    call) instead of a calibrated static range: their GELU-output inputs have rare large outliers that a
    fixed range either clips or resolves coarsely. With ``smooth_alpha`` the MatMul inputs are smoothed
    first (``smooth``), measured on ``feeds``. ``exclude``: MatMul node names left in FP32. With
    ``embedding_bits`` 4 the word-embedding table is stored in 4 bits instead (``int4_embedding``).
    ``outlier_nodes``: MatMuls whose ``outlier_channels`` largest input channels are split off in FP32 first
    (``outlier_split``).
    """
    embedding = word_embedding_gather(source) if embedding_bits == 4 else None
    skipped = [*exclude, embedding] if embedding else list(exclude)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        if smooth_alpha is not None:
            smoothed = Path(scratch) / "smoothed.onnx"
            smooth(source, smoothed, feeds, smooth_alpha)
            source = smoothed
        if outlier_nodes:
            split = Path(scratch) / "split.onnx"
            skipped += outlier_split(source, split, feeds, list(outlier_nodes), outlier_channels)
            source = split
        dynamic = _quantize(source, target, method, feeds, per_channel, calibration, dynamic_ffn_down, skipped)
    if embedding:
        int4_embedding(target, embedding)
    return dynamic


# Values of a word-embedding row that share one scale in 4 bits: 12 FP32 scales per 384-wide row, which add a quarter
# to the bytes of its 4-bit weights.
EMBEDDING_BLOCK = 32


def word_embedding_gather(model_file: Path) -> str:
    """The name of the Gather that looks up the graph input ``input_ids`` in a constant table."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    tables = {init.name for init in graph.initializer}
    found = [n.name for n in graph.node if n.op_type == "Gather" and n.input[1] == "input_ids" and n.input[0] in tables]
    if len(found) != 1 or not found[0]:
        raise ValueError(f"{model_file}: no single named Gather reads input_ids from a constant table (found {found}); "
                         "4-bit embeddings need one")
    return found[0]


def int4_embedding(model_file: Path, gather: str) -> None:
    """Rewrite ``gather`` in ``model_file`` as ONNX Runtime's GatherBlockQuantized: 4-bit signed weights, symmetric,
    one FP32 scale per ``EMBEDDING_BLOCK`` values of a row, rounded to nearest (its MatMulNBits quantizer).

    The weights are stored as two unsigned nibbles per byte (value + 8, the first in the low half), the layout
    whose default zero point is 8: the same numbers, but ORT 1.32 gathers 27 rows from a UINT8 table in 14 us and
    from an INT4 one in 104 us (benchmarks/ort_int8_graph.py).
    """
    import logging

    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    config = DefaultWeightOnlyQuantConfig(block_size=EMBEDDING_BLOCK, is_symmetric=True, bits=4,
                                          op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
    model = onnx.load(str(model_file))
    others = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name != gather]  # include adds, not limits
    quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    table = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized").input[0]
    weights = next(init for init in model.graph.initializer if init.name == table)
    unsigned = (numpy_helper.to_array(weights).astype(np.int16) + 8).astype(np.uint8)  # -8..7 -> 0..15
    if unsigned.shape[1] % 2:
        unsigned = np.pad(unsigned, ((0, 0), (0, 1)), constant_values=8)  # a last high nibble of zero
    weights.CopyFrom(numpy_helper.from_array(unsigned[:, 0::2] | (unsigned[:, 1::2] << 4), table))
    onnx.save(model, str(model_file))


def _quantize(source: Path, target: Path, method: str, feeds: list[dict], per_channel: bool, calibration: str,
              dynamic_ffn_down: bool, exclude: list[str] = ()) -> list[str]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method == "dynamic":
        # The fused graph's contrib ops (Attention, BiasGelu) have no ONNX shape inference: their outputs are FP32.
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_exclude=list(exclude), extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        return []
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                        "entropy": CalibrationMethod.Entropy}[calibration]
    if calibration != "minmax":
        feeds = pad_feeds(feeds)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        model = onnx.load(str(prepared), load_external_data=False)
        excluded = [n for n in down_projections(model) if n not in exclude] if dynamic_ffn_down else []
        static_out = Path(scratch) / "static.onnx" if excluded else target
        quantize_static(
            prepared,
            static_out,
            _FeedReader(feeds, [i.name for i in model.graph.input]),
            quant_format=QuantFormat.QDQ,
            # MatMul carries almost all compute; the embedding Gather, half of the weights, makes the file small.
            op_types_to_quantize=["MatMul", "Gather"],
            nodes_to_exclude=excluded + list(exclude),
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=calibrate_method,
        )
        if excluded:
            quantize_dynamic(static_out, target, nodes_to_quantize=excluded, op_types_to_quantize=["MatMul"],
                             weight_type=QuantType.QInt8, per_channel=per_channel)
    return excluded


# MatMulNBits' accuracy level 4: activations are quantized to INT8 inside the kernel, which then runs INT8 dot
# products (AVX512-VNNI/AMX); the default level dequantizes the weights to FP32 first, which left 8-bit weights
# slower than the FP32 model on the SmolLM2 decoder here.
MATMUL_NBITS_ACCURACY_LEVEL = 4


def compress_weights_onnx(source: Path, target: Path, bits: int, group_size: int, feeds: list[dict] | None = None
                          ) -> dict:
    """Weight-only INT8/INT4 of every MatMul with a constant weight (the LM head included), one scale per
    ``group_size`` weights along the input dimension. Without ``feeds``: ONNX Runtime's MatMulNBits quantizer,
    symmetric, round to nearest. With ``feeds`` (the KV graph's inputs for calibration texts; INT4 only): NNCF's
    AWQ and scale estimation, asymmetric, then the LM head (which NNCF leaves float) as the data-free INT8."""
    import onnx

    model, settings = onnx.load(str(source)), {"bits": bits, "group_size": group_size}
    if feeds and bits != 4:
        raise ValueError(f"calibrated weight compression is INT4 only, not {bits} bits")
    if feeds:
        model = _data_aware_int4(model, group_size, feeds)
        settings.update(_data_aware_settings(feeds), lm_head="int8 sym (round to nearest)",
                        library="nncf.compress_weights (ONNX), onnxruntime MatMulNBitsQuantizer (LM head)")
    else:
        settings.update(symmetric=True, library="onnxruntime MatMulNBitsQuantizer (RTN)")
    # Round to nearest: every MatMul, or after NNCF the one it left float (the LM head), in 8 bits.
    _matmul_nbits(model, target, 8 if feeds else bits, group_size)
    return {**settings, "accuracy_level": MATMUL_NBITS_ACCURACY_LEVEL}


def _matmul_nbits(model, target: Path, bits: int, block_size: int, exclude: list[str] = ()) -> None:
    """Every constant-weight MatMul of ``model`` but ``exclude`` as ONNX Runtime's MatMulNBits (its quantizer:
    symmetric, round to nearest, one scale per ``block_size`` rows) at MATMUL_NBITS_ACCURACY_LEVEL, saved to
    ``target``."""
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                                     accuracy_level=MATMUL_NBITS_ACCURACY_LEVEL, nodes_to_exclude=list(exclude))
    quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=False)


# Rows of a weight (and columns of the activation) that share one scale in ``blockwise_int8``. Measured on
# stsb-embed-int8 with every FFN MatMul block-wise (benchmarks/fidelity_fallback.py, results/stsb-embed-int8/
# ebd69e8-fallback): blocks of 32 keep held-out recall@10 0.957 at a batch-1 p50 of 1.26 ms, 128 keep 0.955 at
# 1.06 ms, 256 keep 0.951 at 1.08 ms; the same nodes in FP32 0.960 at 1.34 ms.
BLOCKWISE_BLOCK = 128


def blockwise_int8(model_file: Path, nodes: list[str], block_size: int = BLOCKWISE_BLOCK) -> None:
    """Rewrite the constant-weight MatMuls ``nodes`` of ``model_file`` in place as ONNX Runtime's MatMulNBits with
    8-bit symmetric weights, one scale per ``block_size`` rows, at accuracy level 4: the kernel quantizes the
    activation to INT8 per block of as many columns at each call, where dynamic INT8 (MatMulInteger) takes one range
    for the whole activation, which the outlier channels of a layer's FFN input set. Slower than dynamic INT8 per
    node, faster than FP32; fidelity control's fallback for the nodes dynamic INT8 damages. Needs ONNX Runtime
    >= 1.22 (its x86 kernel for 8-bit MatMulNBits)."""
    import onnx

    model = onnx.load(str(model_file))
    missing = set(nodes) - {n.name for n in model.graph.node if n.op_type == "MatMul"}
    if missing:
        raise ValueError(f"{model_file}: no MatMul named {sorted(missing)} to store block-wise")
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    _matmul_nbits(model, model_file, 8, block_size, others)


def _data_aware_settings(feeds: list[dict]) -> dict:
    return {"symmetric": False, "awq": True, "scale_estimation": True, "calibration_texts": len(feeds)}


def _data_aware_int4(model, group_size: int, feeds: list[dict]):
    """NNCF's INT4 (asymmetric, AWQ then scale estimation) of every MatMul but the LM head and the embedding,
    which stay float (``BackupMode.NONE``: NNCF's INT8 backup for them is a DequantizeLinear of the whole matrix
    at every call), as MatMulNBits nodes at accuracy level 4."""
    import nncf
    import onnx
    from onnx import numpy_helper

    model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size, ratio=1.0,
                                  backup_mode=nncf.BackupMode.NONE, dataset=nncf.Dataset(feeds),
                                  subset_size=len(feeds), awq=True, scale_estimation=True)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        level = next((a for a in node.attribute if a.name == "accuracy_level"), None)
        if level is None:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", MATMUL_NBITS_ACCURACY_LEVEL))
        else:
            level.i = MATMUL_NBITS_ACCURACY_LEVEL
        zero_points = initializers[node.input[3]] if len(node.input) > 3 and node.input[3] else None
        if zero_points is not None and len(zero_points.dims) == 2:
            # nncf 3.4 writes one 4-bit zero point per byte, [N, blocks]; ONNX Runtime reads them packed two to a
            # byte like the weights, [N * ceil(blocks / 2)], and refuses the model otherwise.
            points = numpy_helper.to_array(zero_points)
            points = np.pad(points, ((0, 0), (0, points.shape[1] % 2)))
            packed = (points[:, 0::2] & 0xF) | ((points[:, 1::2] & 0xF) << 4)
            zero_points.CopyFrom(numpy_helper.from_array(packed.astype(np.uint8).reshape(-1), zero_points.name))
    return model


def compress_weights_openvino(source: Path, target: Path, bits: int, group_size: int,
                              feeds: list[dict] | None = None) -> dict:
    """Weight-only INT8 (asymmetric, per output channel) or INT4 (one scale per ``group_size``) of every MatMul
    and the embedding through ``nncf.compress_weights``; INT4 keeps NNCF's INT8 backup for the embedding and the
    last MatMul (its default). Without ``feeds``: symmetric, data-free; with ``feeds`` (the KV graph's inputs for
    calibration texts): asymmetric, AWQ then scale estimation."""
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(source))
    if bits == 8:
        compressed, settings = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM), {}
    elif feeds:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=group_size,
                                           ratio=1.0, dataset=nncf.Dataset(feeds), subset_size=len(feeds), awq=True,
                                           scale_estimation=True)
        settings = {"group_size": group_size, **_data_aware_settings(feeds), "backup": "int8_asym"}
    else:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size,
                                           ratio=1.0)
        settings = {"group_size": group_size, "symmetric": True, "backup": "int8_asym"}
    ov.save_model(compressed, str(target), compress_to_fp16=False)
    library = "nncf.compress_weights" + (" (AWQ, scale estimation)" if feeds else " (data-free)")
    return {"bits": bits, **settings, "library": library}

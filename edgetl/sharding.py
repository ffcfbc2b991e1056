"""Model sharding: an exported model split at layer boundaries into parts that run one after another, each a valid
model file of its own (ONNX, or OpenVINO IR), so a model too large or too slow for one process or device runs as a
pipeline of smaller ones (``edgetl.runtime.pipeline`` runs them).

A part takes the tensors the parts before it made (the hidden state and whatever else crosses the cut: the attention
mask's extended form, shapes) and hands on what later parts read. Where the cuts go is chosen by measurement: every
layer is cut out on its own and timed at batch 1 on the backend's own runtime, then the layers are grouped into the
parts with the smallest slowest part (the pipeline's throughput), each part's weights under a memory cap if one is
given. Weights that only feed one layer travel with that layer; a node that computes from weights alone (an INT8
model's DequantizeLinear of a weight) is copied into every part that reads it, never passed between parts.

Build side only (onnx, openvino); the runtime reads the parts with ``edgetl.runtime``.
"""

from __future__ import annotations

import functools
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.artifact import file_table, model_file_bytes, write_json_atomic
from edgetl.errors import ArtifactError, UsageError
from edgetl.runtime.bundle import read_manifest

# A transformer block's nodes carry their module path: /bert/encoder/layer.3/..., /model/layers.3/...,
# /transformer/h.3/..., /distilbert/transformer/layer.3/...
_LAYER = re.compile(r"(?:^|/)(?:layer|layers|h|block|blocks)\.(\d+)/")


@dataclass
class Op:
    """A node of the graph: its name, the tensors it reads and writes (opaque keys), and whether it computes from
    weights alone."""

    name: str
    inputs: list[str]
    outputs: list[str]
    constant: bool = False
    stage: int = -1  # -1: before the first layer (embeddings, mask); else the layer it belongs to or follows


def assign_stages(ops: list[Op], weights: set[str]) -> tuple[int, set[str]]:
    """Marks the ops that compute from weights alone and gives every other op its stage: its layer by name, or
    the latest stage among the ops it reads from (so the pooler and head follow the last layer). Returns the number
    of layers and every tensor computed from weights alone. ``ops`` must be in topological order."""
    constants = set(weights)
    stage_of: dict[str, int] = {}
    layers = 0
    for op in ops:
        op.constant = all(t in constants for t in op.inputs if t)
        if op.constant:
            constants.update(op.outputs)
            continue
        match = _LAYER.search(op.name) or _LAYER.search(op.outputs[0] if op.outputs else "")  # fused ops: by output
        named = int(match.group(1)) if match else -1
        layers = max(layers, named + 1)
        op.stage = max([named, *(stage_of[t] for t in op.inputs if t in stage_of)])
        stage_of.update(dict.fromkeys(op.outputs, op.stage))
    if not layers:
        raise ArtifactError("no transformer layers found in the graph (no node named like .../layer.N/...): "
                            "only exported transformer models can be sharded")
    return layers, constants


@dataclass
class Part:
    """Layers [first, last) of a partition, the ops that run them (constant ones copied in) and the tensors that
    cross its edges."""

    first: int
    last: int
    ops: list[Op]
    inputs: list[str]
    outputs: list[str]


def cut(ops: list[Op], constants: set[str], layers: int, bounds: list[int], graph_outputs: list[str]) -> list[Part]:
    """The parts of a partition of the layers: ``bounds`` are the first layer of each part after the first
    (stages before layer 0 go to the first part, after the last layer to the last). A part's inputs are what its
    ops read that it does not make and no weight gives; its outputs are what later parts, or the model's outputs,
    read from it."""
    edges = [0, *bounds, layers]
    made_by = {t: op for op in ops for t in op.outputs}
    parts = []
    for index in range(len(edges) - 1):
        own = [op for op in ops if not op.constant and sum(op.stage >= b for b in bounds) == index]
        copied, stack = set(), [t for op in own for t in op.inputs]
        while stack:  # the weight-only ops this part reads from, copied in
            op = made_by.get(stack.pop())
            if op is not None and op.constant and id(op) not in copied:
                copied.add(id(op))
                stack.extend(op.inputs)
        made = {t for op in own for t in op.outputs}
        inputs = [t for t in dict.fromkeys(t for op in own for t in op.inputs) if t and t not in made and t not in constants]
        copied.update(id(op) for op in own)
        members = [op for op in ops if id(op) in copied]
        parts.append(Part(edges[index], edges[index + 1], members, inputs, []))
    for index, part in enumerate(parts):
        later = {t for p in parts[index + 1:] for t in p.inputs} | set(graph_outputs)
        part.outputs = [t for op in part.ops if not op.constant for t in op.outputs if t in later]
    return parts


def check_parts(parts: int, layers: int) -> None:
    if not 1 < parts <= layers:
        raise UsageError(f"--parts {parts}: the model has {layers} layers; give 2 to {layers} parts")


def partition(costs: list[float], weights: list[int], parts: int, max_bytes: int | None) -> list[int]:
    """The first layer of each part after the first, for contiguous parts of ``costs`` (per-layer seconds) whose
    slowest part is fastest, every part's ``weights`` (bytes) at most ``max_bytes``; UsageError when no split fits."""
    n = len(costs)
    check_parts(parts, n)

    @functools.cache
    def solve(start: int, k: int) -> tuple[float, list[int]]:
        """The best split of layers [start, n) into k parts: its slowest part's cost and its bounds."""
        if k == 1:
            fits = max_bytes is None or sum(weights[start:]) <= max_bytes
            return (sum(costs[start:]), []) if fits else (float("inf"), [])
        options = []
        for end in range(start + 1, n - k + 2):
            if max_bytes is not None and sum(weights[start:end]) > max_bytes:
                break
            rest, bounds = solve(end, k - 1)
            options.append((max(sum(costs[start:end]), rest), [end, *bounds]))
        return min(options, default=(float("inf"), []))

    worst, bounds = solve(0, parts)
    if worst == float("inf"):
        raise UsageError(f"no split into {parts} parts keeps every part's weights under {max_bytes / 1e6:.2f} MB "
                         f"(layers weigh {', '.join(f'{w / 1e6:.2f}' for w in weights)} MB); allow more parts or more memory")
    return bounds


# ONNX --------------------------------------------------------------------------------------------------------------


class OnnxGraph:
    """An ONNX model as ops, and the parts of it written as ONNX models."""

    def __init__(self, path: Path):
        import onnx

        self.model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        graph = self.model.graph
        self.weights = {t.name: t for t in graph.initializer}
        self.ops = [Op(n.name or f"{n.op_type}_{i}", list(n.input), list(n.output)) for i, n in enumerate(graph.node)]
        self.nodes = {id(op): node for op, node in zip(self.ops, graph.node, strict=True)}
        self.layers, self.constants = assign_stages(self.ops, set(self.weights))
        self.types = {v.name: v for v in [*graph.input, *graph.value_info, *graph.output]}
        self.graph_outputs = [o.name for o in graph.output]

    @staticmethod
    def name(key: str) -> str:
        """The name a runtime knows a tensor by: an ONNX tensor's own."""
        return key

    def write(self, part: Part, path: Path) -> None:
        import onnx

        missing = [t for t in [*part.inputs, *part.outputs] if t not in self.types]
        if missing:  # ONNX's inference skips ONNX Runtime's fused ops (Attention, SkipLayerNormalization); its own does not
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            graph = SymbolicShapeInference.infer_shapes(self.model, auto_merge=True).graph
            self.types.update({v.name: v for v in graph.value_info})
            missing = [t for t in missing if t not in self.types]
        if missing:
            raise ArtifactError(f"shape inference gave no type for {missing[:3]}: cannot cut the graph there")
        nodes = [self.nodes[id(op)] for op in part.ops]
        read = {t for n in nodes for t in n.input}
        graph = onnx.helper.make_graph(nodes, f"part-{part.first}", [self.types[t] for t in part.inputs],
                                       [self.types[t] for t in part.outputs],
                                       [w for name, w in self.weights.items() if name in read])
        model = onnx.helper.make_model(graph, opset_imports=self.model.opset_import, producer_name="edgetl shard")
        model.ir_version = self.model.ir_version
        onnx.save(model, str(path))


# OpenVINO ----------------------------------------------------------------------------------------------------------


class OpenVinoGraph:
    """An OpenVINO IR as ops (a tensor is an op's output port), and the parts of it written as IR."""

    def __init__(self, path: Path):
        import openvino as ov

        self.path = path
        self.model = ov.Core().read_model(str(path))
        self.ops, constants, self.graph_outputs = [], set(), []
        for node in self.model.get_ordered_ops():
            name = node.get_friendly_name()
            kind = node.get_type_name()
            outputs = [f"{name}:{i}" for i in range(node.get_output_size())]
            inputs = [f"{i.get_source_output().get_node().get_friendly_name()}:{i.get_source_output().get_index()}"
                      for i in node.inputs()]
            if kind == "Constant":
                constants.update(outputs)
            if kind == "Result":
                self.graph_outputs.extend(inputs)
                continue
            if kind != "Parameter":
                self.ops.append(Op(name, inputs, outputs))
        self.layers, self.constants = assign_stages(self.ops, constants)
        self.names = {f"{n.get_friendly_name()}:{i}": n.output(i).get_any_name()
                      for n in self.model.get_ordered_ops() for i in range(n.get_output_size()) if n.output(i).get_names()}

    def name(self, key: str) -> str:
        """The name a runtime knows a tensor by: the graph's own name for it, else the key."""
        return self.names.get(key, key)

    def write(self, part: Part, path: Path) -> None:
        import openvino as ov

        model = ov.Core().read_model(str(self.path))  # a fresh graph: cutting rewires it
        ports = {f"{n.get_friendly_name()}:{i}": n.output(i) for n in model.get_ordered_ops()
                 for i in range(n.get_output_size())}
        members = {op.name for op in part.ops}
        parameters = []
        for key in part.inputs:
            source = ports[key]
            if source.get_node().get_type_name() == "Parameter":
                parameters.append(source.get_node())
                continue
            parameter = ov.opset13.parameter(source.get_partial_shape(), source.get_element_type(), name=self.name(key))
            parameter.output(0).set_names({self.name(key)})
            for target in list(source.get_target_inputs()):
                if target.get_node().get_friendly_name() in members:
                    target.replace_source_output(parameter.output(0))
            parameters.append(parameter)
        results = []
        for key in part.outputs:
            source = ports[key]
            source.add_names({self.name(key)})
            results.append(ov.opset13.result(source))
        ov.save_model(ov.Model(results, parameters, f"part-{part.first}"), str(path), compress_to_fp16=False)


GRAPHS = {"onnx": (OnnxGraph, ".onnx"), "openvino": (OpenVinoGraph, ".xml")}
SAMPLE = "a gorgeous , witty , seductive movie that holds you from the first frame to the last credit . " * 4


def _names(graph, keys: list[str]) -> list[str]:
    return [graph.name(k) for k in keys]


def _write_parts(graph, parts: list[Part], folder: Path, suffix: str) -> list[dict]:
    entries = []
    for index, part in enumerate(parts):
        path = folder / f"part-{index}{suffix}"
        graph.write(part, path)
        entries.append({"path": path.name, "layers": [part.first, part.last], "inputs": _names(graph, part.inputs),
                        "outputs": _names(graph, part.outputs), "bytes": model_file_bytes(path)})
    return entries


def _time_parts(backend: str, folder: Path, entries: list[dict], feeds: dict, repeats: int = 20) -> list[float]:
    """Each part's median batch-1 seconds on ``feeds``, one thread, the parts run in order."""
    from types import SimpleNamespace

    from edgetl.bench.measure import timed_calls
    from edgetl.runtime.engines import open_engine

    tensors, seconds = dict(feeds), []
    for entry in entries:
        engine = open_engine(backend, folder / entry["path"], 1)
        part_feeds = {k: tensors[k] for k in entry["inputs"]}
        # timed_calls times run(); a part's run is every output it hands on
        seconds.append(float(np.median(timed_calls(SimpleNamespace(run=engine.run_all), [part_feeds] * repeats, 3))))
        tensors.update(engine.run_all(part_feeds))
    return seconds


def shard_bundle(bundle: str | Path, out: str | Path, parts: int, backends: list[str] | None = None,
                 max_part_mb: float | None = None, log=print) -> dict:
    """Writes ``out``: the bundle with each backend's model split into ``parts`` at layer boundaries (see the
    module). Returns the new manifest's ``models``. Nothing is written to ``out`` until every part is."""
    from edgetl.runtime.text import load_tokenizer, pad

    bundle, out = Path(bundle), Path(out)
    manifest = read_manifest(bundle)
    if out.exists():
        raise UsageError(f"{out} exists; give a new folder for the sharded bundle")
    backends = backends or list(manifest["models"])
    unknown = [b for b in backends if b not in manifest["models"] or b not in GRAPHS]
    if unknown:
        raise UsageError(f"backends {unknown}: the bundle has {list(manifest['models'])}")
    if any("parts" in manifest["models"][b] for b in backends):
        raise UsageError(f"{bundle} is already sharded")
    tokenizer = load_tokenizer(bundle, manifest["max_length"], manifest.get("truncation", "right"),
                               manifest.get("head_tokens", 0), manifest.get("cloze"))
    sample = tokenizer.encode_batch([(SAMPLE, SAMPLE) if manifest.get("text_pair") else SAMPLE])
    out.parent.mkdir(parents=True, exist_ok=True)
    # Not copied: the models being cut (their parts replace them) and the signature (the manifest changes).
    whole = {bundle / manifest["models"][b]["path"] for b in backends}
    skipped = {*whole, *(p.with_suffix(".bin") for p in whole if p.suffix == ".xml"), bundle / "edgetl.json.sig"}
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        shutil.copytree(bundle, staging, dirs_exist_ok=True,
                        ignore=lambda folder, names: [n for n in names if Path(folder) / n in skipped])
        for backend in backends:
            entry = manifest["models"][backend]
            klass, suffix = GRAPHS[backend]
            source = bundle / entry["path"]
            graph = klass(source)
            check_parts(parts, graph.layers)
            if manifest.get("task") == "text-generation":  # the prompt's pass, from an empty KV cache
                from edgetl.runtime.decoding import KVCacheDecoder
                from edgetl.runtime.engines import open_engine

                feeds = KVCacheDecoder(open_engine(backend, source, 1)).feeds(sample[0].ids)
            else:
                feeds = pad(sample)
            log(f"{backend}: {graph.layers} layers; timing each on its own")
            units = cut(graph.ops, graph.constants, graph.layers, list(range(1, graph.layers)), graph.graph_outputs)
            with tempfile.TemporaryDirectory() as scratch:
                unit_entries = _write_parts(graph, units, Path(scratch), suffix)
                costs = _time_parts(backend, Path(scratch), unit_entries, feeds)
            sizes = [e["bytes"] for e in unit_entries]
            bounds = partition(costs, sizes, parts, None if max_part_mb is None else int(max_part_mb * 1e6))
            target = staging / Path(entry["path"]).parent
            written = _write_parts(graph, cut(graph.ops, graph.constants, graph.layers, bounds, graph.graph_outputs),
                                   target, suffix)
            edges = [0, *bounds, graph.layers]
            for index, part in enumerate(written):
                part["path"] = (Path(entry["path"]).parent / part["path"]).as_posix()
                part["layer_ms"] = round(sum(costs[edges[index]:edges[index + 1]]) * 1e3, 4)
            manifest["models"][backend] = {**entry, "path": written[0]["path"], "parts": written,
                                           "outputs": _names(graph, graph.graph_outputs),
                                           "sharded_from": {"path": entry["path"], "bytes": model_file_bytes(source)}}
            log(f"{backend}: parts of layers {[p['layers'] for p in written]}, "
                f"{[round(p['layer_ms'], 2) for p in written]} ms, {[round(p['bytes'] / 1e6, 1) for p in written]} MB")
        manifest["files"] = {k: v for k, v in file_table(staging).items() if k not in ("edgetl.json", "edgetl.json.sig")}
        write_json_atomic(staging / "edgetl.json", manifest)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest["models"]

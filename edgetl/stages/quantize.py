"""Post-training INT8 quantization of exported models, calibrated on training text (never the evaluation split)."""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
from pathlib import Path

from edgetl.artifact import StageOutput, copy_tokenizer, model_file_bytes
from edgetl.data import load_labelled, target_texts
from edgetl.errors import StageError
from edgetl.recipe import QuantizeStage
from edgetl.runtime.text import encode, load_tokenizer
from edgetl.tasks import DEFAULT_TASK, TASKS, Task, task_for

log = logging.getLogger("edgetl")


def encode_texts(data, texts: list, tokenizer_dir: Path, is_pretokenized: bool = False) -> list[dict]:
    """One feed per text (or pair, or word list if ``is_pretokenized``), at its own length, cut as the recipe's
    data section says (as the runtime will)."""
    tokenizer = load_tokenizer(tokenizer_dir, data.max_length, data.truncation, data.head_tokens)
    return [encode(tokenizer, [text], is_pretokenized) for text in texts]


def calibration_pool(data, task: Task = TASKS[DEFAULT_TASK]) -> list:
    """The inputs calibration draws from (``task.examples``), in the fixed shuffled order it draws them:
    data.target's unlabelled training texts when the recipe has a target domain (the text the model will serve),
    else the training rows. Training text, never the evaluation split: calibrating on dev would leak it into the
    model.
    """
    if data.target:
        texts = target_texts(data)
        return random.Random(1).sample(texts, len(texts))
    train, _ = load_labelled(data, task)
    return task.examples(train.shuffle(seed=1)[:])


def held_out_inputs(ctx, start: int, samples: int) -> list:
    """``calibration_pool``'s inputs ``start`` .. ``start + samples``: training text that calibration did not see."""
    task = task_for(ctx.recipe.task)
    inputs = calibration_pool(ctx.recipe.data, task)[start:start + samples]
    if len(inputs) < 2:
        raise StageError(f"quantize: fidelity is measured on training texts after the {start} that calibrate, and "
                         f"the training split has {len(inputs)} more; lower calibration_samples")
    return inputs


def calibration_feeds(ctx, tokenizer_dir: Path, samples: int) -> list[dict]:
    """The first ``samples`` inputs of ``calibration_pool``, one per feed at its own length, encoded as the task's."""
    task = task_for(ctx.recipe.task)
    pool = calibration_pool(ctx.recipe.data, task)[:samples]
    return encode_texts(ctx.recipe.data, pool, tokenizer_dir, task.pretokenized)


def decoder_calibration_feeds(ctx, backend: str, model: Path, samples: int) -> list[dict]:
    """The KV graph's inputs (an empty cache) for the first ``samples`` texts of ``calibration_pool``, each cut to
    data.max_length as the runtime cuts it."""
    from edgetl.runtime.decoding import KVCacheDecoder
    from edgetl.runtime.engines import open_engine

    data = ctx.recipe.data
    tokenizer = load_tokenizer(model.parent, data.max_length, data.truncation, data.head_tokens)
    texts = calibration_pool(data, task_for(ctx.recipe.task))[:samples]
    decoder = KVCacheDecoder(open_engine(backend, model))
    return [decoder.feeds(cut.ids) for cut in tokenizer.encode_batch(texts) if cut.ids]


def evaluation_feeds(ctx, tokenizer_dir: Path) -> tuple[list[dict], list[int]]:
    """The evaluation split, one feed per text: what accuracy control measures the INT8 drop on."""
    _, dev = load_labelled(ctx.recipe.data)
    return encode_texts(ctx.recipe.data, dev["text"], tokenizer_dir), list(dev["label"])


def run(cfg: QuantizeStage, ctx, out_dir: Path) -> StageOutput:
    if cfg.method == "qat":
        return run_qat(cfg, ctx, out_dir)
    source = ctx.latest("exported")
    if source is None:
        raise StageError("quantize: no exported model; add an export stage before quantize")
    if cfg.method == "weights":
        return run_weights(cfg, ctx, source, out_dir)
    tokenizer_dir = next(source.model_path(b).parent for b in cfg.backends)
    feeds = calibration_feeds(ctx, tokenizer_dir, cfg.calibration_samples)
    # Accuracy control measures the INT8 drop on the evaluation split: it is model selection, which dev may
    # serve (the held-out test set never does).
    validation = evaluation_feeds(ctx, tokenizer_dir) if cfg.max_accuracy_drop is not None else None
    # A task judged by closeness to FP32 measures it on training text that calibration did not see.
    fidelity = task_for(ctx.recipe.task).fidelity is not None
    held_out = held_out_inputs(ctx, cfg.calibration_samples, cfg.fidelity_samples) if fidelity else None
    models = {}
    for backend in cfg.backends:
        folder = out_dir / backend
        folder.mkdir()
        # Dynamic INT8 calibrates nothing, so accuracy control has no static layer to return to FP32.
        if validation and not (backend == "onnx" and cfg.onnx_method == "dynamic"):
            models[backend] = _accuracy_controlled(cfg, source, backend, folder, feeds, validation)
        elif backend == "onnx":
            models[backend] = _onnxruntime_int8(cfg, source, folder, feeds)
        else:
            models[backend] = _openvino_int8(source, folder, feeds)
        copy_tokenizer(source.model_path(backend).parent, folder)
        if held_out:
            models[backend] = _fidelity_controlled(cfg, ctx, source, backend, folder, feeds, held_out, models[backend])
    metrics = {f"{b}_bytes": model_file_bytes(out_dir / m["path"]) for b, m in models.items()}
    return StageOutput(kind="quantized", precision="int8", models=models, metrics=metrics)


def _fidelity_controlled(cfg: QuantizeStage, ctx, source, backend: str, folder: Path, feeds: list[dict],
                         inputs: list, model: dict) -> dict:
    """Fidelity control, the accuracy control of a task judged by closeness to FP32 (``Task.fidelity``): keep the INT8
    model if its outputs stay close to the FP32 model's on ``inputs`` (held-out training text); else leave in FP32, one role at a
    time (every layer's FFN output projection, ...), the MatMul roles that cost most, until they do; else ship the
    FP32 model. On ONNX Runtime the nodes so chosen are then tried in the faster ways of ``ONNX_FALLBACKS`` (their
    outlier channels split off, then block-wise INT8), the first that holds the bar too shipping. The manifest entry
    records the fidelity, each variant's (``fallback_fidelity``) and the nodes left out of dynamic INT8."""
    from edgetl.quantization import matmul_roles
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import predict_outputs

    task, data = task_for(ctx.recipe.task), ctx.recipe.data
    tokenizer = load_tokenizer(folder, data.max_length, data.truncation, data.head_tokens)
    reference = predict_outputs(open_engine(backend, source.model_path(backend)), tokenizer, inputs, 1)[0]

    def quantized(exclude: list[str], fallback: str = "fp32") -> tuple[dict, dict]:
        made = model if not exclude else (_onnxruntime_int8(cfg, source, folder, feeds, exclude, fallback)
                                          if backend == "onnx" else _openvino_int8(source, folder, feeds, exclude))
        outputs = predict_outputs(open_engine(backend, folder.parent / made["path"]), tokenizer, inputs, 1)[0]
        fidelity = {k: round(v, 5) for k, v in task.fidelity(outputs, reference, inputs).items()}
        return made, {**fidelity, "texts": len(inputs)}

    def holds(f: dict) -> bool:
        return (f["cosine_mean"] >= cfg.min_cosine and f["cosine_p1"] >= cfg.min_cosine_p1
                and (cfg.min_recall_at_10 is None or f["recall_at_10"] >= cfg.min_recall_at_10))

    made, fidelity = quantized([])
    if holds(fidelity):
        return {**made, "fidelity": fidelity}
    roles = matmul_roles(source.path / source.manifest["unfused_onnx"])
    log.info("quantize: %s INT8 fidelity %s misses the bar; measuring what each of %d MatMul roles costs",
             backend, fidelity, len(roles))
    costs = {role: quantized(nodes)[1] for role, nodes in roles.items()}
    order = sorted(roles, key=lambda r: (costs[r]["recall_at_10"], costs[r]["cosine_mean"]), reverse=True)
    kept: list[str] = []
    for role in order[:-1]:  # all of them in FP32 is the FP32 model
        kept += roles[role]
        made, fidelity = quantized(kept)
        log.info("quantize: %s with %s in FP32 too: %s", backend, role, fidelity)
        if holds(fidelity) and backend != "onnx":
            return {**made, "fidelity": fidelity, "role_costs": costs}
        if holds(fidelity):
            tried = {"fp32": fidelity}
            for fallback in [f for f in ONNX_FALLBACKS if f != "fp32"]:
                faster, tried[fallback] = quantized(kept, fallback)
                log.info("quantize: onnx with those nodes as %s instead: %s", fallback, tried[fallback])
                if holds(tried[fallback]):
                    return {**faster, "fidelity": tried[fallback], "fallback_fidelity": tried, "role_costs": costs}
            made = _onnxruntime_int8(cfg, source, folder, feeds, kept)  # the FP32 variant back in place
            return {**made, "fidelity": fidelity, "fallback_fidelity": tried, "role_costs": costs}
    log.warning("quantize: no %s INT8 model keeps min_cosine %.3f, min_cosine_p1 %.3f, min_recall_at_10 %s: this "
                "backend ships its FP32 model", backend, cfg.min_cosine, cfg.min_cosine_p1, cfg.min_recall_at_10)
    target = folder.parent / made["path"]
    for file in target.parent.glob(target.stem + ".*"):
        file.unlink()
    for file in source.model_path(backend).parent.glob(source.model_path(backend).stem + ".*"):
        shutil.copy2(file, folder / file.name)
    return {"path": made["path"], "precision": "fp32", "int8_rejected": {**model, "fidelity": fidelity},
            "role_costs": costs}


# How the MatMuls fidelity control takes out of dynamic INT8 are stored on ONNX Runtime, fastest first (measured on
# stsb-embed-int8, benchmarks/fidelity_fallback.py): their outlier input channels split off in FP32 and the rest in
# dynamic INT8 (``outlier_split``), block-wise INT8 (``blockwise_int8``), FP32. Each with its manifest key.
ONNX_FALLBACKS = {"outlier-split": "outlier_split_nodes", "blockwise": "blockwise_int8_nodes", "fp32": "fp32_nodes"}


def _onnxruntime_int8(cfg: QuantizeStage, source, folder: Path, feeds: list[dict], exclude: list[str] = (),
                      fallback: str = "fp32") -> dict:
    """ONNX Runtime INT8 of ``source`` into ``folder``; the MatMuls ``exclude`` are stored as ``fallback`` says
    (``ONNX_FALLBACKS``): FP32, block-wise INT8, or dynamic INT8 with their outlier channels split off in FP32 (which
    measures the channels on ``feeds``)."""
    from edgetl.quantization import OUTLIER_CHANNELS, blockwise_int8, quantize_onnx

    unfused = source.path / source.manifest["unfused_onnx"]
    split = list(exclude) if fallback == "outlier-split" else []
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        # Dynamic INT8 quantizes ORT's fused graph (smoothed first if asked): one QAttention per layer instead of its
        # MatMuls, reshapes and softmax (1.17x faster at batch 1 on sst-tiny; benchmarks/ort_int8_graph.py), unless
        # a node to leave in FP32 is one the fusion absorbed (a query, key or value projection). Static QDQ
        # addresses the unfused graph.
        fused = _fused_graph(cfg, source, Path(scratch)) if cfg.onnx_method == "dynamic" else None
        graph = fused if fused and set(exclude) <= _node_names(fused) else unfused
        dynamic_nodes = quantize_onnx(graph, folder / "model.onnx", cfg.onnx_method, feeds, cfg.per_channel,
                                      cfg.onnx_calibration, cfg.onnx_dynamic_ffn_down, cfg.smooth_alpha,
                                      [] if split else exclude, cfg.onnx_embedding_bits, split)
    if fallback == "blockwise":
        blockwise_int8(folder / "model.onnx", exclude)
    left_out = {ONNX_FALLBACKS[fallback]: list(exclude)} if exclude else {}
    if split:
        left_out["outlier_channels"] = OUTLIER_CHANNELS
    return {"path": "onnx/model.onnx", "precision": "int8", "method": cfg.onnx_method, "smooth_alpha": cfg.smooth_alpha,
            "embedding_bits": cfg.onnx_embedding_bits, "fused": graph != unfused,
            "dynamic_int8_nodes": dynamic_nodes, **left_out}


def _fused_graph(cfg: QuantizeStage, source, scratch: Path) -> Path | None:
    """The export's fused ONNX graph; with a 4-bit table, fused again into ``scratch`` without the embedding fusion
    (the table keeps its own Gather). None where the export kept the unfused graph."""
    from edgetl.stages.export import fuse_onnx

    if not source.models["onnx"].get("fused"):
        return None
    if cfg.onnx_embedding_bits == 8:
        return source.model_path("onnx")
    target = scratch / "fused.onnx"
    unfused = source.path / source.manifest["unfused_onnx"]
    return target if fuse_onnx(unfused, target, _config(source), embedding=False) else None


def _node_names(model_file: Path) -> set[str]:
    import onnx

    return {node.name for node in onnx.load(str(model_file), load_external_data=False).graph.node}


def _config(source):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.model_path("onnx").parent)


def _openvino_int8(source, folder: Path, feeds: list[dict], exclude: list[str] = ()) -> dict:
    from edgetl.quantization import quantize_openvino

    quantize_openvino(source.model_path("openvino"), folder / "model.xml", feeds, exclude=exclude)
    return {"path": "openvino/model.xml", "precision": "int8", "method": "nncf.quantize",
            **({"fp32_nodes": list(exclude)} if exclude else {})}


def _accuracy_controlled(cfg: QuantizeStage, source, backend: str, folder: Path, feeds: list[dict], validation) -> dict:
    """Static INT8 where the layers that cost most accuracy fall back to FP32 until the drop is in budget."""
    from edgetl.stages._qat import quantize_with_accuracy_control

    model_file = source.path / source.manifest["unfused_onnx"] if backend == "onnx" else source.model_path(backend)
    target = folder / ("model.onnx" if backend == "onnx" else "model.xml")
    report = quantize_with_accuracy_control(backend, model_file, target, feeds, *validation, cfg.max_accuracy_drop)
    return {"path": f"{backend}/{target.name}", "precision": "int8", "method": "nncf.quantize_with_accuracy_control",
            **report}


def run_weights(cfg: QuantizeStage, ctx, source, out_dir: Path) -> StageOutput:
    """Weight-only INT8/INT4 of every exported backend in ``cfg.backends`` (``edgetl.quantization``), calibrated
    on training texts when ``cfg.algorithm`` is awq."""
    from edgetl.quantization import compress_weights_onnx, compress_weights_openvino

    for backend in cfg.backends:
        if backend not in source.models:
            raise StageError(f"quantize: {source.name} has no {backend} model; backends there: {list(source.models)}")
    # One set of calibration feeds for every backend: the OpenVINO model is converted from the ONNX graph, same inputs.
    first = cfg.backends[0]
    feeds = decoder_calibration_feeds(ctx, first, source.model_path(first), cfg.calibration_samples) \
        if cfg.algorithm == "awq" else None
    models = {}
    for backend in cfg.backends:
        folder = out_dir / backend
        folder.mkdir()
        compress = compress_weights_onnx if backend == "onnx" else compress_weights_openvino
        model = source.model_path(backend)
        settings = compress(model, folder / model.name, cfg.bits, cfg.group_size, feeds)
        copy_tokenizer(model.parent, folder)
        models[backend] = {"path": f"{backend}/{model.name}", "precision": f"int{cfg.bits}", "method": "weights",
                           "algorithm": cfg.algorithm, **settings}
    metrics = {f"{b}_bytes": model_file_bytes(out_dir / m["path"]) for b, m in models.items()}
    return StageOutput(kind="quantized", precision=f"int{cfg.bits}", models=models, metrics=metrics)


def run_qat(cfg: QuantizeStage, ctx, out_dir: Path) -> StageOutput:
    """NNCF fake-quantizers on the PyTorch model, trained against the FP32 model, exported with INT8 ops."""
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.distillation import distil
    from edgetl.modeling import load_classifier
    from edgetl.stages._qat import export_qat, insert_quantizers
    from edgetl.training import labelled_data, training_metrics

    if ctx.world_size > 1:
        raise StageError("quantize: method qat runs in one process; run this stage without torchrun/accelerate launch")
    source = ctx.latest("pytorch-model")
    if source is None:
        raise StageError("quantize: method qat needs a PyTorch model; add a finetune stage before it")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    feeds = calibration_feeds(ctx, source.path, cfg.calibration_samples)
    model = insert_quantizers(load_classifier(source.path), feeds)
    train_tok, dev_tok = labelled_data(ctx, tokenizer)
    trainer = distil(cfg.qat, ctx, model, load_classifier(source.path), tokenizer, train_tok, dev_tok,
                     DataCollatorWithPadding(tokenizer), "quantize")
    models = {}
    for backend in ("onnx", "openvino"):
        (out_dir / backend).mkdir()
        copy_tokenizer(source.path, out_dir / backend)
    counts = export_qat(model.eval(), feeds[0], out_dir / "onnx" / "model.onnx", out_dir / "openvino" / "model.xml")
    for backend in cfg.backends:
        models[backend] = {"path": f"{backend}/model.{'onnx' if backend == 'onnx' else 'xml'}", "precision": "int8",
                           "method": "qat", "int8_ops": counts[f"{backend}_int8_ops"]}
    for backend in {"onnx", "openvino"} - set(cfg.backends):
        shutil.rmtree(out_dir / backend)
    metrics = {f"{b}_bytes": model_file_bytes(out_dir / m["path"]) for b, m in models.items()}
    metrics.update(training_metrics(trainer, len(train_tok), len(dev_tok)))
    return StageOutput(kind="quantized", precision="int8", models=models, metrics=metrics)

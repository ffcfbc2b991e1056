"""Each stage's invariants on the tiny run: loss falls, exports match PyTorch, INT8 graphs are INT8, and so on.

The bundle stage and artifact checksums are in test_bundle.py.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml


# Texts whose batch pads the short one and whose lengths differ from the exporter's trace shape.
LONG_TEXT = "a gorgeous , witty , seductive movie that is also one of the best films of the year , and funny"
SHORT_TEXT = "dull"
PARITY_ATOL = 1e-4


def op_counts(path: Path) -> collections.Counter:
    import onnx

    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def ir_counts(xml_path: Path) -> tuple[collections.Counter, collections.Counter]:
    """(layer types, constant element types) of an OpenVINO IR."""
    import xml.etree.ElementTree as ET

    layers = ET.parse(xml_path).getroot().find("layers")
    types = collections.Counter(layer.get("type") for layer in layers)
    consts = collections.Counter(layer.find("data").get("element_type") for layer in layers
                                 if layer.get("type") == "Const")
    return types, consts


def model_bytes(artifact, backend: str) -> int:
    from edgetl.backends import Target

    return Target(artifact, backend).model_bytes


def parity_feeds(tokenizer_dir: Path, max_length: int = 64) -> dict[str, np.ndarray]:
    from edgetl.runtime.text import encode, load_tokenizer

    texts = [" ".join([LONG_TEXT] * 4), SHORT_TEXT, LONG_TEXT]  # the first is truncated at max_length
    feeds = encode(load_tokenizer(tokenizer_dir, max_length), texts)
    lengths = feeds["attention_mask"].sum(axis=1)
    assert lengths[0] == max_length and lengths[1] < lengths[2] < max_length, lengths
    return feeds


@pytest.fixture(scope="module")
def torch_logits(tiny_artifacts):
    from edgetl.backends import Target

    feeds = parity_feeds(tiny_artifacts["export"].path / "onnx")
    return feeds, Target(tiny_artifacts["finetune"], "pytorch").open().run(feeds)


# --- finetune ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def learning_run(tmp_path_factory, tiny_model, sst2_slice, quiet_cwd):
    """A finetune-only run that must fit its data: the dev split is part of the training split."""
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    folder = tmp_path_factory.mktemp("fit")
    train = (sst2_slice / "train.tsv").read_text().splitlines()
    (folder / "train.tsv").write_text("\n".join(train) + "\n")
    (folder / "dev.tsv").write_text("\n".join(train[:121]) + "\n")
    recipe_file = folder / "fit.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "name": "fit", "model": str(tiny_model), "data": {"path": str(folder), "max_length": 64},
        "stages": [{"stage": "finetune", "max_steps": 80, "eval_steps": 40, "batch_size": 16,
                    "learning_rate": 3e-3, "warmup_ratio": 0.0}],
    }))
    run_dir = folder / "run"
    run_recipe(load_recipe(str(recipe_file)), run_dir)
    return run_dir / "01-finetune"


def test_finetune_loss_falls(learning_run):
    history = json.loads((learning_run / "eval_history.json").read_text())
    steps = [h["step"] for h in history]
    assert steps == [40, 80], steps  # one evaluation per eval_steps
    losses = [h["eval_loss"] for h in history]
    assert losses[1] < losses[0] - 0.05, losses
    accuracy = json.loads((learning_run / "manifest.json").read_text())["metrics"]["accuracy"]
    assert accuracy > 0.7, accuracy


def test_finetune_keeps_the_best_checkpoint_and_records_its_accuracy(tiny_artifacts):
    finetune = tiny_artifacts["finetune"]
    metrics = finetune.metrics
    history = json.loads((finetune.path / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [3, 6]  # one evaluation per eval_steps
    best = max(history, key=lambda h: h["eval_accuracy"])  # the first of equals, as Trainer keeps it
    assert metrics["selection_accuracy"] == pytest.approx(best["eval_accuracy"], abs=1e-5)
    assert metrics["best_step"] == best["step"]
    # The recorded accuracy is the kept model's in FP32: what the evaluate stage measures for PyTorch.
    evaluated = tiny_artifacts["evaluate"].metrics[f"pytorch-fp32 ({finetune.name})"]
    assert metrics["accuracy"] == pytest.approx(evaluated, abs=1e-5)
    assert (metrics["steps"], metrics["train_samples"], metrics["eval_samples"]) == (6, 400, 120)
    assert 1_000 < metrics["parameters"] < 100_000


def test_length_grouped_batches_come_in_random_order_longest_first_and_the_short_remainder_last(tiny_model, tmp_path):
    import torch
    from transformers import TrainingArguments
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from edgetl.modeling import load_classifier
    from edgetl.training import ShuffledLengthGroupedSampler, Trainer

    size, lengths = 16, torch.randint(3, 60, (16 * 200 + 5,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = list(ShuffledLengthGroupedSampler(size, lengths=lengths, generator=torch.Generator().manual_seed(1)))
    hf = get_length_grouped_indices(lengths, size, generator=torch.Generator().manual_seed(1))

    def batches(indices):
        return [indices[i:i + size] for i in range(0, len(indices), size)]

    def trend(indices):
        """Correlation of a full batch's place in its mega-batch of 50 with its mean length."""
        full = batches(indices)[:-1]
        return np.corrcoef([i % 50 for i in range(len(full))], [np.mean([lengths[j] for j in b]) for b in full])[0, 1]

    assert sorted(ours) == list(range(len(lengths)))
    assert sorted(map(tuple, batches(ours))) == sorted(map(tuple, batches(hf))), "HF's groups, each kept whole"
    assert batches(ours)[0] == batches(hf)[0] and max(lengths[i] for i in ours[:size]) == max(lengths)
    assert batches(ours)[-1] == batches(hf)[-1] and len(batches(ours)[-1]) == 5
    assert trend(hf) < -0.8 and abs(trend(ours)) < 0.2, (trend(hf), trend(ours))

    rows = [{"input_ids": [1] * n, "label": 0} for n in lengths[:100]]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, group_by_length=True,
                             use_cpu=True, report_to=[])
    sampler = Trainer(model=load_classifier(tiny_model), args=args, train_dataset=rows)._get_train_sampler()
    assert type(sampler) is ShuffledLengthGroupedSampler and sampler.lengths == lengths[:100]


def test_rdrop_adds_alpha_times_the_symmetric_kl_of_two_dropout_passes_and_leaves_evaluation_alone(tiny_model, tmp_path):
    import torch
    from transformers import TrainingArguments

    from edgetl.modeling import load_classifier
    from edgetl.training import Trainer, regularized_dropout

    model = load_classifier(tiny_model)
    with torch.no_grad():  # the tiny model's logits barely move under dropout: widen them, so the KL is not
        model.classifier.weight.mul_(50)  # a difference of nearly equal float32 numbers
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    labels = torch.tensor([0, 1, 1, 0])
    inputs = {"input_ids": torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(0)),
              "attention_mask": torch.ones(4, 12, dtype=torch.long), "labels": labels}

    def loss(alpha: float) -> float:
        trainer = regularized_dropout(Trainer, alpha)(model=model, args=args)
        torch.manual_seed(0)  # the same dropout masks for every alpha
        return float(trainer.compute_loss(model, dict(inputs)))

    model.train()
    torch.manual_seed(0)
    first, second = model(**{k: torch.cat([v, v]) for k, v in inputs.items() if k != "labels"}).logits.chunk(2)
    p, q = first.double().softmax(-1), second.double().softmax(-1)
    kl = float(((p * (p / q).log()).sum(-1) + (q * (q / p).log()).sum(-1)).mean() / 2)
    assert kl > 0, "dropout made the two passes differ"
    assert loss(101.0) - loss(1.0) == pytest.approx(100 * kl, rel=1e-3)  # float32 losses: a wide alpha gap

    model.eval()
    with torch.no_grad():
        plain = float(model(**inputs).loss)
    assert loss(5.0) == pytest.approx(plain, rel=1e-5), "evaluation: one pass, plain cross-entropy"


def test_weight_average_follows_the_steps_swaps_in_and_out_and_reloads(tiny_model, tmp_path):
    import torch

    from edgetl.modeling import load_classifier
    from edgetl.training import WeightAverage

    model = load_classifier(tiny_model)
    average = WeightAverage(model, decay=0.9)
    name, param = next(iter(average.params.items()))
    expected = param.detach().clone()
    for n in range(1, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        average.update()
        decay = min(0.9, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * param.detach()
    torch.testing.assert_close(average.average[name], expected, rtol=0, atol=1e-6)
    training = {n: p.detach().clone() for n, p in average.params.items()}
    with average.applied():
        assert torch.equal(param, average.average[name])
    assert all(torch.equal(p, training[n]) for n, p in average.params.items()), "training weights restored exactly"

    average.save(tmp_path / "avg.safetensors")
    other = WeightAverage(load_classifier(tiny_model), decay=0.9)
    other.load(tmp_path / "avg.safetensors")
    assert other.updates == 29 and all(torch.equal(other.average[n], t) for n, t in average.average.items())


def test_averaging_trainer_evaluates_and_keeps_the_average_of_its_best_checkpoint(tiny_model, sst2_slice, tmp_path):
    import torch
    from transformers import DataCollatorWithPadding

    from edgetl.data import load_labelled, tokenize
    from edgetl.modeling import new_classifier
    from edgetl.recipe import DataConfig, FinetuneStage
    from edgetl.tasks.text_classification import accuracy
    from edgetl.training import (
        Trainer,
        WeightAverage,
        averaging,
        fp32_accuracy,
        training_arguments,
        write_eval_history,
    )

    data = DataConfig(path=str(sst2_slice), max_length=32, max_train_samples=128, max_eval_samples=64)
    cfg = FinetuneStage(stage="finetune", max_steps=12, eval_steps=4, batch_size=16, learning_rate=3e-3,
                        precision="fp32", ema_decay=0.5)
    model, tokenizer = new_classifier(str(tiny_model), data.labels, "mean")
    train, dev = (tokenize(split, tokenizer, data) for split in load_labelled(data))
    collator = DataCollatorWithPadding(tokenizer)
    ctx = type("Ctx", (), {"work_dir": tmp_path, "world_size": 1})()
    trainer = averaging(Trainer, cfg.ema_decay)(
        model=model, args=training_arguments(cfg, ctx), train_dataset=train, eval_dataset=dev,
        data_collator=collator, compute_metrics=accuracy)
    trainer.train()

    history = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    raw = [h for h in trainer.state.log_history if "eval_raw_accuracy" in h]
    assert [h["step"] for h in history] == [h["step"] for h in raw] == [4, 8, 12]
    best = trainer.state.best_model_checkpoint
    kept = WeightAverage(model, cfg.ema_decay)
    kept.load(Path(best) / WeightAverage.FILE)
    assert kept.updates == int(Path(best).name.split("-")[1])
    for name, p in kept.params.items():
        assert torch.equal(p, kept.average[name]), f"{name} is not the best checkpoint's average"
    assert fp32_accuracy(model, dev, collator, 64) == pytest.approx(trainer.state.best_metric, abs=1e-6)
    write_eval_history(trainer, tmp_path)
    written = json.loads((tmp_path / "eval_history.json").read_text())
    assert [(h["eval_accuracy"], h["eval_raw_accuracy"]) for h in written] == \
        [(h["eval_accuracy"], r["eval_raw_accuracy"]) for h, r in zip(history, raw, strict=True)]


def test_the_fp32_accuracy_runs_without_the_bf16_autocast_training_left_on_the_model(tiny_model):
    import torch
    from accelerate import Accelerator

    from edgetl.modeling import load_classifier
    from edgetl.training import without_autocast

    model = load_classifier(tiny_model)
    ids = torch.randint(5, 100, (2, 12))
    with torch.inference_mode():
        fp32 = model(input_ids=ids).logits
        Accelerator(mixed_precision="bf16", cpu=True).prepare_model(model)  # what Trainer does with bf16=True
        wrapped = model(input_ids=ids).logits
        unwrapped = without_autocast(model)(input_ids=ids).logits
    assert not torch.equal(wrapped, fp32), "the wrapper computes in bf16"
    assert torch.equal(unwrapped, fp32)


def test_trainer_evaluates_in_fp32_while_it_trains_in_bf16(tiny_model, sst2_slice, tmp_path):
    import torch
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from edgetl.data import load_labelled, tokenize
    from edgetl.modeling import load_classifier
    from edgetl.recipe import DataConfig
    from edgetl.training import Trainer, fp32_forward

    data = DataConfig(path=str(sst2_slice), max_length=32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    train, dev = (tokenize(split, tokenizer, data) for split in load_labelled(data))
    model = load_classifier(tiny_model).train()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8,
                             per_device_eval_batch_size=16, bf16=True, use_cpu=True, report_to=[], save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    evaluated = trainer.predict(dev.select(range(16))).predictions
    batch = DataCollatorWithPadding(tokenizer)([{k: v for k, v in row.items() if k != "label"}
                                                for row in dev.select(range(16))])
    model.eval()
    with torch.inference_mode():
        in_training = model(**batch).logits.float().numpy()  # accelerate's bf16 wrapper is still on the model
        with fp32_forward(model):
            fp32 = model(**batch).logits.numpy()
    assert "_original_forward" in model.__dict__, "training keeps its bf16 wrapper after evaluation"
    assert abs(in_training - fp32).max() > 1e-6, "the wrapper computes in bf16"
    assert abs(evaluated - fp32).max() < 1e-6


def test_finetune_output_reloads_and_holds_no_pickle(tiny_artifacts):
    from edgetl.modeling import MEAN_POOL_ARCH, load_classifier

    folder = tiny_artifacts["finetune"].path
    model = load_classifier(folder)
    assert MEAN_POOL_ARCH in model.config.architectures
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    pickles = [p.name for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert pickles == []


# --- export -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["onnx/model.onnx", "raw/model.onnx"])
def test_onnx_export_matches_pytorch_at_other_shapes_and_padding(tiny_artifacts, torch_logits, which):
    from edgetl.runtime.engines import open_engine

    feeds, expected = torch_logits
    logits = open_engine("onnx", tiny_artifacts["export"].path / which).run(feeds)
    assert logits.shape == expected.shape == (3, 2)
    np.testing.assert_allclose(logits, expected, rtol=0, atol=PARITY_ATOL)


def test_onnx_target_opens_the_fused_model(tiny_artifacts, torch_logits):
    from edgetl.backends import Target

    feeds, expected = torch_logits
    target = Target(tiny_artifacts["export"], "onnx")
    assert target.key == "onnx-fp32 (02-export)"
    np.testing.assert_allclose(target.open().run(feeds), expected, rtol=0, atol=PARITY_ATOL)
    assert op_counts(tiny_artifacts["export"].model_path("onnx"))["Attention"] == 2  # one fused block per layer


def test_openvino_ir_matches_pytorch_in_fp32(tiny_artifacts, torch_logits):
    import openvino as ov

    feeds, expected = torch_logits
    compiled = ov.Core().compile_model(str(tiny_artifacts["export"].model_path("openvino")), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    names = [i.get_any_name() for i in compiled.inputs]
    logits = np.asarray(compiled.create_infer_request().infer({k: feeds[k] for k in names})[compiled.output(0)])
    np.testing.assert_allclose(logits, expected, rtol=0, atol=PARITY_ATOL)


def test_openvino_engine_runs_fp32_models_in_fp32(tiny_artifacts, torch_logits):
    import openvino as ov

    from edgetl.backends import Target

    # Without an explicit f32 hint, OpenVINO runs float layers in bf16 on CPUs that have it (AVX512-BF16, AMX),
    # about 2e-3 off PyTorch: the "fp32" model evaluated and benchmarked would not be FP32.
    feeds, expected = torch_logits
    engine = Target(tiny_artifacts["export"], "openvino").open()
    assert engine.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32
    np.testing.assert_allclose(engine.run(feeds), expected, rtol=0, atol=PARITY_ATOL)


def test_exported_models_take_any_batch_and_length(tiny_artifacts):
    import onnx

    graph = onnx.load(str(tiny_artifacts["export"].path / "raw" / "model.onnx")).graph
    dims = {i.name: [d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert set(dims) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(len(d) == 2 and all(d) for d in dims.values()), dims


def test_export_manifest_and_tokenizer(tiny_artifacts):
    export = tiny_artifacts["export"]
    assert export.kind == "exported" and export.manifest["precision"] == "fp32"
    assert {b: m["precision"] for b, m in export.models.items()} == {"onnx": "fp32", "openvino": "fp32"}
    assert export.manifest["unfused_onnx"] == "raw/model.onnx"
    for backend in ("onnx", "openvino"):
        folder = export.model_path(backend).parent
        assert (folder / "tokenizer.json").is_file()
        assert json.loads((folder / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
        assert export.metrics[f"{backend}_bytes"] == model_bytes(export, backend)


# --- quantize ---------------------------------------------------------------------------------------------

def test_static_onnx_int8_quantizes_every_matmul_and_the_embeddings(tiny_artifacts):
    import onnx

    quantize = tiny_artifacts["quantize"]
    raw = onnx.load(str(tiny_artifacts["export"].path / "raw" / "model.onnx")).graph
    int8 = onnx.load(str(quantize.model_path("onnx"))).graph
    counts = collections.Counter(n.op_type for n in int8.node)
    assert counts["QuantizeLinear"] > 0 and counts["DequantizeLinear"] > 0
    producer = {out: node.op_type for node in int8.node for out in node.output}
    by_name = {n.name: n for n in int8.node}
    raw_matmuls = [n.name for n in raw.node if n.op_type == "MatMul"]
    assert len(raw_matmuls) == 16  # 8 per layer: q, k, v, scores, context, out, intermediate, output
    # Static QDQ for every MatMul, except those the manifest lists as dynamic INT8 (the FFN down-projections).
    dynamic = quantize.models["onnx"].get("dynamic_int8_nodes", [])
    if quantize.manifest["config"].get("onnx_dynamic_ffn_down"):
        raw_inits = {i.name: tuple(i.dims) for i in raw.initializer}
        down = [n.name for n in raw.node if n.op_type == "MatMul" and raw_inits.get(n.input[1]) == (64, 32)]
        assert sorted(dynamic) == sorted(down) and len(down) == 2
    assert counts["MatMulInteger"] == len(dynamic)
    for name in raw_matmuls:
        if name in dynamic:
            assert by_name[f"{name}_quant"].op_type == "MatMulInteger", name
        else:
            node = by_name[name]
            assert node.op_type == "MatMul" and [producer.get(i) for i in node.input] == ["DequantizeLinear"] * 2, name
    raw_inits = {i.name for i in raw.initializer}
    embeddings = [n for n in raw.node if n.op_type == "Gather" and n.input[0] in raw_inits and "embeddings" in n.name]
    assert len(embeddings) == 3
    int8_embeddings = [n for n in int8.node if n.op_type == "Gather" and "embeddings" in n.name]
    assert [producer.get(n.input[0]) for n in int8_embeddings] == ["DequantizeLinear"] * 3
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    int8_weights = [i.name for i in int8.initializer if i.data_type in eight_bit and len(i.dims) == 2]
    assert len(int8_weights) == 12 + 3, int8_weights  # 6 weight matrices per layer + 3 embedding tables
    # No FP32 copy of a quantized weight is left behind; only the 2-way classifier stays float.
    float_matrices = [i.name for i in int8.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert len(float_matrices) == 1 and float_matrices[0].startswith("classifier.weight"), float_matrices


@pytest.mark.parametrize("graph", ["unfused", "fused"])
def test_smoothing_keeps_the_fp32_function_and_evens_out_the_activation_channels(tiny_artifacts, dev_texts, tmp_path,
                                                                                 graph):
    """On the unfused graph and on ORT's fused one, where the query, key and value weights are one Attention's."""
    import onnx
    import onnxruntime as ort

    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import encode, load_tokenizer
    from edgetl.quantization import _weight_matmuls, quantize_onnx, smooth
    from edgetl.stages.export import fuse_onnx
    from edgetl.stages.quantize import _config

    export = tiny_artifacts["export"]
    raw = export.path / "raw" / "model.onnx"
    if graph == "fused":
        assert fuse_onnx(raw, tmp_path / "fused.onnx", _config(export))
        raw = tmp_path / "fused.onnx"
    tokenizer = load_tokenizer(export.model_path("onnx").parent, 64)
    feeds = [encode(tokenizer, [text]) for text in dev_texts[:16]]
    smoothed = tmp_path / "smoothed.onnx"
    assert smooth(raw, smoothed, feeds, alpha=0.85) == 8  # per layer: q/k/v input, context, FFN in, FFN out
    graph = onnx.load(str(smoothed)).graph
    muls = [n for n in graph.node if n.name.endswith("_smooth")]
    assert len(muls) == 8 and all(n.op_type == "Mul" for n in muls)
    # Every constant-weight MatMul now reads a smoothed input.
    assert sorted(_weight_matmuls(onnx.load(str(smoothed)))) == sorted(m.output[0] for m in muls)
    before, after = open_engine("onnx", raw), open_engine("onnx", smoothed)
    held_out = [encode(tokenizer, [text]) for text in dev_texts[16:40]]
    for feed in held_out:
        np.testing.assert_allclose(after.run(feed), before.run(feed), atol=1e-4)

    # The channel peaks of each smoothed activation are evener than those of the activation it replaced.
    def peaks(model, names):
        for name in names:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        inputs = [i.name for i in session.get_inputs()]
        outs = [session.run(names, {k: f[k] for k in inputs}) for f in feeds]
        return [np.max([np.abs(o[i]).reshape(-1, o[i].shape[-1]).max(0) for o in outs], 0) for i in range(len(names))]

    spread = [p.max() / p.mean() for p in peaks(onnx.load(str(smoothed)), [m.input[0] for m in muls])]
    smoothed_spread = [p.max() / p.mean() for p in peaks(onnx.load(str(smoothed)), [m.output[0] for m in muls])]
    assert all(b < a for a, b in zip(spread, smoothed_spread, strict=True)), (spread, smoothed_spread)

    # Dynamic INT8 of the smoothed model: every encoder weight MatMul is integer, fed through its smoothing Mul
    # (the classifier, a Gemm in the export, is quantized but not smoothed).
    int8 = tmp_path / "int8.onnx"
    quantize_onnx(raw, int8, "dynamic", feeds, per_channel=True, smooth_alpha=0.85)
    graph = onnx.load(str(int8)).graph
    producer = {out: node for node in graph.node for out in node.output}
    weights = {i.name for i in graph.initializer}
    integer = [n for n in graph.node if n.input[1:2] and n.input[1] in weights and (
        n.op_type == "QAttention" or n.op_type == "MatMulInteger" and n.name.startswith("/bert/encoder/"))]
    fused = raw.name == "fused.onnx"  # one QAttention per layer for its query, key and value MatMuls
    assert len(integer) == (8 if fused else 12) and sum(n.op_type == "QAttention" for n in integer) == 2 * fused
    assert all(producer[producer[n.input[0]].input[0]].name.endswith("_smooth") for n in integer)


def test_calibration_uses_the_target_domains_unlabelled_texts_cut_as_the_runtime_cuts_them(
        tiny_model, sst2_slice, electronics_slice):
    from types import SimpleNamespace

    from edgetl.data import load_labelled, target_texts
    from edgetl.recipe import DataConfig
    from edgetl.runtime.text import encode, load_tokenizer
    from edgetl.stages.quantize import calibration_feeds

    data = DataConfig(path=str(sst2_slice), target=str(electronics_slice), max_length=64, truncation="head+tail",
                      head_tokens=16)
    feeds = calibration_feeds(SimpleNamespace(recipe=SimpleNamespace(data=data, task="text-classification")), tiny_model, 30)
    tokenizer = load_tokenizer(tiny_model, 64, "head+tail", 16)
    reviews = {tuple(encode(tokenizer, [t])["input_ids"][0]) for t in target_texts(data)}
    sentences = {tuple(encode(tokenizer, [t])["input_ids"][0]) for t in load_labelled(data)[0]["text"]}
    ids = [tuple(f["input_ids"][0]) for f in feeds]
    assert len(set(ids)) == 30 and set(ids) <= reviews and not set(ids) & sentences
    assert max(len(i) for i in ids) == 64  # long reviews are cut to max_length, head and tail kept
    # Without a target domain: the labelled training sentences.
    plain_data = DataConfig(path=str(sst2_slice), max_length=64)
    plain = calibration_feeds(SimpleNamespace(recipe=SimpleNamespace(data=plain_data, task="text-classification")), tiny_model, 30)
    assert {tuple(f["input_ids"][0]) for f in plain} <= sentences


def test_four_bit_embeddings_look_up_each_row_within_a_step_of_its_fp32_values(tiny_artifacts, dev_texts, tmp_path):
    import onnx
    import onnxruntime as ort

    from edgetl.quantization import EMBEDDING_BLOCK, quantize_onnx, word_embedding_gather
    from edgetl.runtime.text import encode, load_tokenizer

    export = tiny_artifacts["export"]
    raw = export.path / "raw" / "model.onnx"
    tokenizer = load_tokenizer(export.model_path("onnx").parent, 64)
    feeds = [encode(tokenizer, [text]) for text in dev_texts[:8]]
    eight, four = tmp_path / "int8.onnx", tmp_path / "int4.onnx"
    quantize_onnx(raw, eight, "dynamic", feeds, per_channel=True)
    quantize_onnx(raw, four, "dynamic", feeds, per_channel=True, embedding_bits=4)

    gather = word_embedding_gather(raw)
    table = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(raw)).graph.initializer}[
        next(n.input[0] for n in onnx.load(str(raw)).graph.node if n.name == gather)]
    model = onnx.load(str(four))
    looked_up = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]
    assert [(n.name, n.input[1]) for n in looked_up] == [(gather + "_Q4", "input_ids")]
    ints = {i.name: i for i in model.graph.initializer}
    assert ints[looked_up[0].input[0]].data_type == onnx.TensorProto.UINT8  # two nibbles a byte
    # The other two tables (positions, token types) stay dynamic INT8, as in the INT8 model.
    assert sum(n.op_type == "Gather" and n.input[0].endswith("_quantized") for n in model.graph.node) == 2

    # Each looked-up value is within a quantization step of the FP32 one, step = the block's max |w| / 8 (the extreme
    # value maps to -8 exactly; one near its opposite rounds to 8 and is clipped to 7); all but those within half a step.
    model.graph.output.append(onnx.helper.make_tensor_value_info(looked_up[0].output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = feeds[0]
    rows = session.run([looked_up[0].output[0]], {i.name: feed[i.name] for i in session.get_inputs()})[0][0]
    exact = table[feed["input_ids"][0]]
    step = np.abs(exact.reshape(len(exact), -1, EMBEDDING_BLOCK)).max(-1, keepdims=True) / 8
    error = np.abs(rows - exact).reshape(step.shape[0], -1, EMBEDDING_BLOCK)
    assert (error <= step + 1e-6).all() and (error <= step / 2 + 1e-6).mean() > 0.97 and error.max() > 0

    # The 4-bit table holds half a byte per weight and one FP32 scale per block; the file shrinks by the rest.
    vocab, width = table.shape
    scales = onnx.numpy_helper.to_array(ints[looked_up[0].input[2]])
    assert len(ints[looked_up[0].input[0]].raw_data) == vocab * width // 2
    assert scales.shape == (vocab, width // EMBEDDING_BLOCK) and scales.dtype == np.float32
    assert eight.stat().st_size - four.stat().st_size == pytest.approx(vocab * width / 2 - scales.nbytes, abs=512)


def test_openvino_int8_ir_holds_fake_quantize_and_int8_weights(tiny_artifacts):
    fp32_types, fp32_consts = ir_counts(tiny_artifacts["export"].model_path("openvino"))
    int8_types, int8_consts = ir_counts(tiny_artifacts["quantize"].model_path("openvino"))
    assert fp32_types["FakeQuantize"] == 0 and fp32_consts["i8"] + fp32_consts["u8"] == 0
    assert int8_types["FakeQuantize"] >= 12
    assert int8_consts["i8"] + int8_consts["u8"] >= 12


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_int8_models_are_smaller_than_fp32(tiny_artifacts, backend):
    export, quantize = tiny_artifacts["export"], tiny_artifacts["quantize"]
    int8 = model_bytes(quantize, backend)
    assert int8 < model_bytes(export, backend)
    if backend == "onnx":
        assert int8 < (export.path / "raw" / "model.onnx").stat().st_size
    assert quantize.metrics[f"{backend}_bytes"] == int8


def test_quantize_manifest(tiny_artifacts):
    quantize = tiny_artifacts["quantize"]
    assert quantize.kind == "quantized" and quantize.manifest["precision"] == "int8"
    assert {b: (m["precision"], m["method"]) for b, m in quantize.models.items()} == {
        "onnx": ("int8", "static"), "openvino": ("int8", "nncf.quantize")}


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_onnx_int8_quantizes_the_fused_graph_without_skip_layer_norms(tiny_artifacts, dev_texts, tmp_path, bits):
    """One QAttention per layer instead of its MatMuls; residual adds and layer norms stay two ops (ORT's fused kernel
    is the slower one on the CPU); the embeddings fused into one op unless the table is 4-bit. The logits are those of
    the unfused graph's dynamic INT8 (QAttention quantizes the same input with the same weight scales), up to the fused
    lookup of the 8-bit tables."""
    import onnx

    from edgetl.quantization import quantize_onnx
    from edgetl.recipe import QuantizeStage
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import encode, load_tokenizer
    from edgetl.stages.quantize import _onnxruntime_int8

    export = tiny_artifacts["export"]
    assert export.models["onnx"]["fused"]
    tokenizer = load_tokenizer(export.model_path("onnx").parent, 64)
    feeds = [encode(tokenizer, [text]) for text in dev_texts[:16]]
    cfg = QuantizeStage(stage="quantize", onnx_method="dynamic", onnx_embedding_bits=bits)
    folder = tmp_path / "onnx"
    folder.mkdir()
    made = _onnxruntime_int8(cfg, export, folder, feeds)
    assert made["fused"] and sorted(p.name for p in folder.iterdir()) == ["model.onnx"]  # no scratch left
    ops = collections.Counter(n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node)
    assert ops["QAttention"] == 2 and ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] >= 4
    assert ops["QEmbedLayerNormalization"] == (bits == 8) and ops["GatherBlockQuantized"] == (bits == 4)

    unfused = tmp_path / "unfused.onnx"
    quantize_onnx(export.path / "raw" / "model.onnx", unfused, "dynamic", feeds, cfg.per_channel, embedding_bits=bits)
    fused_logits, unfused_logits = ([open_engine("onnx", path).run(f) for f in feeds]
                                    for path in (folder / "model.onnx", unfused))
    spread = np.abs(np.concatenate(unfused_logits)).max()
    assert np.abs(np.concatenate(fused_logits) - np.concatenate(unfused_logits)).max() < 0.05 * spread


def test_dynamic_int8_leaves_nodes_in_fp32_in_the_fused_graph_unless_the_fusion_absorbed_them(tiny_artifacts, dev_texts,
                                                                                             tmp_path):
    """Fidelity control's fallback names unfused MatMuls: the FFN's survive fusion, a query projection does not."""
    import onnx

    from edgetl.quantization import OUTLIER_CHANNELS, matmul_roles
    from edgetl.recipe import QuantizeStage
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import encode, load_tokenizer
    from edgetl.stages.quantize import _onnxruntime_int8

    export = tiny_artifacts["export"]
    roles = matmul_roles(export.path / "raw" / "model.onnx")
    ffn_out = next(nodes for role, nodes in roles.items() if role.endswith("/output/dense/MatMul"))
    query = next(nodes for role, nodes in roles.items() if "/attention/self/query/" in role)
    cfg = QuantizeStage(stage="quantize", onnx_method="dynamic")
    for exclude, fused in ((ffn_out, True), (query, False)):
        folder = tmp_path / str(fused)
        folder.mkdir()
        made = _onnxruntime_int8(cfg, export, folder, [], exclude)
        graph = onnx.load(str(folder / "model.onnx")).graph
        assert made["fused"] is fused and made["fp32_nodes"] == exclude
        assert sum(n.op_type == "QAttention" for n in graph.node) == (2 if fused else 0)
        assert [n.op_type for n in graph.node if n.name in exclude] == ["MatMul"] * len(exclude) == ["MatMul"] * 2
    folder = tmp_path / "blockwise"
    folder.mkdir()
    made = _onnxruntime_int8(cfg, export, folder, [], ffn_out, "blockwise")
    assert made["fused"] and made["blockwise_int8_nodes"] == ffn_out and "fp32_nodes" not in made
    blockwise = [n for n in onnx.load(str(folder / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
    assert len(blockwise) == 2 and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in blockwise)

    feeds = [encode(load_tokenizer(export.model_path("onnx").parent, 64), [text]) for text in dev_texts[:8]]
    folder = tmp_path / "outlier-split"
    folder.mkdir()
    made = _onnxruntime_int8(cfg, export, folder, feeds, ffn_out, "outlier-split")
    assert made["fused"] and made["outlier_split_nodes"] == ffn_out and made["outlier_channels"] == OUTLIER_CHANNELS
    ops = {n.name: n.op_type for n in onnx.load(str(folder / "model.onnx")).graph.node}
    assert [ops.get(f"{n}_outliers_matmul") for n in ffn_out] == ["MatMul"] * 2  # the split-off channels: FP32
    assert "MatMul" not in [ops.get(n) for n in ffn_out]  # the rest: dynamic INT8
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx"]
    split, fp32 = (np.concatenate([open_engine("onnx", path).run(f) for f in feeds])
                   for path in (folder / "model.onnx", export.model_path("onnx")))
    assert np.abs(split - fp32).max() < 0.05 * np.abs(fp32).max()


def test_blockwise_int8_and_outlier_split_keep_an_activation_with_an_outlier_channel_closer_to_fp32(tmp_path):
    """One range for the whole activation (dynamic INT8) is set by its outlier channel and rounds the other channels
    away; a range per block of 128 channels keeps the blocks without it exact to INT8 precision, and splitting the
    outlier channel off in FP32 leaves dynamic INT8 the range of the others. The split graph alone computes the same
    function as the FP32 one."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgetl.quantization import blockwise_int8, outlier_split, quantize_onnx

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(512, 64)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="ffn")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 64])],
                              [numpy_helper.from_array(weight, "w")])
    source = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    dynamic, blockwise = tmp_path / "dynamic.onnx", tmp_path / "blockwise.onnx"
    quantize_dynamic(source, dynamic, weight_type=QuantType.QInt8, per_channel=True)
    blockwise.write_bytes(source.read_bytes())
    blockwise_int8(blockwise, ["ffn"])
    assert [n.op_type for n in onnx.load(str(blockwise)).graph.node] == ["MatMulNBits"]
    x = rng.normal(size=(16, 512)).astype(np.float32)
    x[:, 3] *= 200  # one outlier channel, in the first block
    split, split_int8 = tmp_path / "split.onnx", tmp_path / "split_int8.onnx"
    calibration = [{"x": row[None]} for row in rng.normal(size=(4, 512)).astype(np.float32) * np.where(
        np.arange(512) == 3, 200, 1).astype(np.float32)]
    assert outlier_split(source, split, calibration, ["ffn"], 1) == ["ffn_outliers_gather", "ffn_outliers_matmul"]
    quantize_onnx(source, split_int8, "dynamic", calibration, True, outlier_nodes=["ffn"])
    exact = x @ weight
    run = {path.stem: ort.InferenceSession(str(path)).run(None, {"x": x})[0]
           for path in (dynamic, blockwise, split, split_int8)}
    np.testing.assert_allclose(run["split"], exact, rtol=1e-4, atol=1e-3)
    error = {name: np.abs(y - exact).mean() for name, y in run.items()}
    assert error["blockwise"] < error["dynamic"] / 2, error
    assert error["split_int8"] < error["dynamic"] / 2, error
    with pytest.raises(ValueError, match="no MatMul named"):
        blockwise_int8(blockwise, ["ffn"])  # already rewritten


def test_dynamic_onnx_int8_uses_integer_matmuls(dynamic_run):
    import onnx

    run_dir = dynamic_run["run_dir"]
    raw = onnx.load(str(run_dir / "02-export" / "raw" / "model.onnx")).graph
    graph = onnx.load(str(run_dir / "03-quantize" / "onnx" / "model.onnx")).graph
    counts = collections.Counter(n.op_type for n in graph.node)
    raw_inits, inits = {i.name for i in raw.initializer}, {i.name for i in graph.initializer}
    weight_matmuls = sum(n.op_type == "MatMul" and any(i in raw_inits for i in n.input) for n in raw.node)
    assert weight_matmuls == 12
    # Quantized from ORT's fused graph, smoothed as sst-int8 asks: a QAttention stands for a layer's query, key and
    # value MatMuls.
    assert dynamic_run["after"]["03-quantize"]["models"]["onnx"]["fused"] and counts["QAttention"] == 2
    assert counts["MatMulInteger"] + 3 * counts["QAttention"] >= weight_matmuls and counts["DynamicQuantizeLinear"] > 0
    assert counts["QuantizeLinear"] == 0  # no static QDQ pairs
    float_weight_matmuls = [n.name for n in graph.node if n.op_type == "MatMul" and any(i in inits for i in n.input)]
    assert float_weight_matmuls == []
    manifest = dynamic_run["after"]["03-quantize"]
    assert manifest["models"]["onnx"]["method"] == "dynamic"


# --- evaluate ---------------------------------------------------------------------------------------------

def test_evaluation_has_a_row_per_model_artifact_and_backend(tiny_run, tiny_artifacts):
    rows = json.loads((tiny_run / "04-evaluate" / "evaluation.json").read_text())
    expected = {(a.name, backend) for a in tiny_artifacts.values()
                if a.kind in ("pytorch-model", "exported", "quantized") for backend in a.models}
    assert len(expected) == 5
    assert {(r["artifact"], r["backend"]) for r in rows} == expected and len(rows) == len(expected)
    assert [r["artifact"] for r in rows] == sorted(r["artifact"] for r in rows)  # in stage order
    evaluation = tiny_artifacts["evaluate"]
    for row in rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["samples"] == 120
        assert evaluation.metrics[row["target"]] == row["accuracy"]


def test_evaluation_accuracy_is_that_of_its_saved_logits(tiny_run, sst2_slice):
    from edgetl.data import load_labelled
    from edgetl.recipe import DataConfig

    _, dev = load_labelled(DataConfig(path=str(sst2_slice)))
    labels = np.asarray(dev["label"])
    for row in json.loads((tiny_run / "04-evaluate" / "evaluation.json").read_text()):
        logits = np.load(tiny_run / "04-evaluate" / f"logits-{row['artifact']}-{row['backend']}.npy")
        assert logits.shape == (120, 2)
        assert row["accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).mean()), abs=1e-5)


def test_evaluated_onnx_fp32_logits_match_pytorch(tiny_run):
    folder = tiny_run / "04-evaluate"
    reference = np.load(folder / "logits-01-finetune-pytorch.npy")
    np.testing.assert_allclose(np.load(folder / "logits-02-export-onnx.npy"), reference, rtol=0, atol=PARITY_ATOL)


# --- benchmark --------------------------------------------------------------------------------------------

def test_benchmark_has_a_row_per_target_with_the_evaluated_accuracy(tiny_run, tiny_artifacts):
    result = json.loads((tiny_run / "05-benchmark" / "results.json").read_text())
    accuracy = tiny_artifacts["evaluate"].metrics
    assert [r["target"] for r in result["rows"]] == list(accuracy)
    assert result["settings"]["sentences"] == 20 and result["settings"]["rounds"] == 1
    for row in result["rows"]:
        assert row["p50_ms"] > 0 and row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["calls"] == 20 and row["throughput_per_s"] > 0 and row["model_mb"] > 0
        assert row["accuracy"] == accuracy[row["target"]]
    for name in ("report.md", "results.csv", "accuracy_vs_latency.png"):
        assert (tiny_run / "05-benchmark" / name).stat().st_size > 0


def test_cli_bench_on_one_artifact(tiny_run, tmp_path):
    from edgetl.cli import main

    out = tmp_path / "bench"
    assert main(["bench", str(tiny_run / "03-quantize"), "--out", str(out), "--rounds", "1", "--max-calls", "5",
                 "--batch-sizes", "1", "--seq-lengths", "own"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert [r["target"] for r in result["rows"]] == ["onnx-int8 (03-quantize)", "openvino-int8 (03-quantize)"]
    assert any("peers: skipped (no FP32 export" in note for note in result["notes"])
    # Accuracy on the whole evaluation split, batched as the evaluate stage batches: the same numbers.
    evaluated = json.loads((tiny_run / "04-evaluate" / "manifest.json").read_text())["metrics"]
    for row in result["rows"]:
        assert row["calls"] == 5 and row["p50_ms"] > 0 and row["accuracy"] == evaluated[row["target"]]


# --- stage errors that the chain check normally prevents -------------------------------------------------

@pytest.mark.parametrize("module, config, message", [
    ("export", {"stage": "export"}, "export: no PyTorch model artifact to export"),
    ("quantize", {"stage": "quantize"}, "quantize: no exported model; add an export stage before quantize"),
    ("bundle", {"stage": "bundle"}, "bundle: no exported or quantized model to bundle"),
])
def test_stage_without_its_input_says_what_is_missing(tiny_run, shrink, tmp_path, module, config, message):
    import importlib

    from edgetl.errors import StageError
    from edgetl.pipeline import StageContext
    from edgetl.recipe import load_recipe

    recipe = load_recipe("sst-int8", shrink())
    stage_cfg = next(s for s in recipe.stages if s.stage == config["stage"])
    ctx = StageContext(recipe, [], tmp_path, tmp_path / "work")
    with pytest.raises(StageError, match=re.escape(message)):
        importlib.import_module(f"edgetl.stages.{module}").run(stage_cfg, ctx, tmp_path)


def test_bundle_of_a_backend_the_model_lacks(tiny_artifacts, shrink, tmp_path):
    from edgetl.artifact import Artifact
    from edgetl.errors import StageError
    from edgetl.pipeline import StageContext
    from edgetl.recipe import load_recipe
    from edgetl.stages import bundle

    onnx_only = Artifact(tiny_artifacts["quantize"].path, {**tiny_artifacts["quantize"].manifest,
                                                           "models": {"onnx": tiny_artifacts["quantize"].models["onnx"]}})
    recipe = load_recipe("sst-int8", shrink())
    ctx = StageContext(recipe, [onnx_only], tmp_path, tmp_path / "work")
    with pytest.raises(StageError, match=r"bundle: 03-quantize has no \['openvino'\] model; backends there: \['onnx'\]"):
        bundle.run(recipe.stages[-1], ctx, tmp_path)

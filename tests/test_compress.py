"""Distillation and structured pruning on tiny BERTs: the invariants, not golden numbers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from edgetl.distillation import StudentWithProjections, distillation_loss, layer_map, shallow_copy
from edgetl.modeling import MeanPoolBertForSequenceClassification, load_classifier
from edgetl.pruning import PrunePlan, apply_plan, fisher_importance, magnitude_importance, make_plan, taylor_importance
from edgetl.recipe import DistillationConfig


def random_bert(layers=3, heads=4, hidden=32, ffn=64, seed=0):
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=120, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=ffn, max_position_embeddings=64, num_labels=2)
    return MeanPoolBertForSequenceClassification(config).eval()


def batch(length=11, size=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 120, (size, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[size - 1, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.arange(size) % 2}


def logits(model, feeds):
    with torch.no_grad():
        return model(**{k: v for k, v in feeds.items() if k != "labels"}).logits


def test_pruned_sizes_match_the_keep_ratios():
    model = random_bert()
    importance = taylor_importance(model, [batch()])
    plan = make_plan(importance, heads_keep=0.5, ffn_keep=0.25, layers_drop=0)
    apply_plan(model, plan)
    sizes = model.config.edgetl_layers
    assert sum(s["heads"] for s in sizes) == round(0.5 * 12)
    assert sum(s["intermediate"] for s in sizes) == round(0.25 * 3 * 64)
    hidden, head = 32, 8
    expected = sum(4 * hidden * s["heads"] * head + 3 * s["heads"] * head + hidden  # Q K V O weights, biases
                   + 2 * hidden * s["intermediate"] + s["intermediate"] + hidden for s in sizes)
    encoder = sum(p.numel() for n, p in model.named_parameters() if ".encoder." in n and "LayerNorm" not in n)
    assert encoder == expected


@pytest.mark.parametrize("score", ["taylor", "magnitude"])
def test_the_least_important_units_are_pruned(score):
    model = random_bert()
    importance = taylor_importance(model, [batch(), batch(seed=2)]) if score == "taylor" else magnitude_importance(model)
    plan = make_plan(importance, heads_keep=0.5, ffn_keep=0.5, layers_drop=0)
    for kind, kept_lists in (("heads", plan.heads), ("neurons", plan.neurons)):
        scores = [s / s.norm() for s in getattr(importance, kind)]
        kept = [float(s[i]) for s, keep in zip(scores, kept_lists, strict=True) for i in keep]
        dropped = [float(v) for s, keep in zip(scores, kept_lists, strict=True) for i, v in enumerate(s) if i not in keep]
        # Each layer keeps its best unit whatever its rank; the rest go strictly by score.
        forced = {float(s.max()) for s in scores}
        assert max(dropped) <= min(v for v in kept if v not in forced) + 1e-7, kind


def test_fisher_scores_sum_the_squared_gradients_of_each_text_alone():
    model, whole = random_bert(), batch()
    one_pass = fisher_importance(model, [whole])
    # The same texts one at a time: the batch-wide gate of a batch of one is that text's own gate.
    singles = [{k: v[i:i + 1] for k, v in whole.items()} for i in range(len(whole["labels"]))]
    slow = [taylor_importance(model, [single]) for single in singles]
    for kind in ("heads", "neurons"):
        for layer, score in enumerate(getattr(one_pass, kind)):
            expected = sum(getattr(s, kind)[layer] ** 2 for s in slow)
            torch.testing.assert_close(score, expected, rtol=1e-4, atol=1e-10)
    torch.testing.assert_close(one_pass.layers, sum(s.layers ** 2 for s in slow), rtol=1e-4, atol=1e-10)


def test_layers_drop_removes_the_lowest_scoring_layer():
    model = random_bert(layers=3)
    importance = taylor_importance(model, [batch()])
    plan = make_plan(importance, 1.0, 1.0, layers_drop=1)
    assert plan.drop_layers == [int(importance.layers.argmin())]
    apply_plan(model, plan)
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers == 2


def test_a_pruned_model_reloads_bit_exactly_and_exports_within_1e4(tmp_path):
    import onnx
    import onnxruntime as ort

    from edgetl.stages.export import export_onnx, fuse_onnx

    model = random_bert()
    apply_plan(model, make_plan(taylor_importance(model, [batch()]), 0.5, 0.5, 1))
    model.save_pretrained(tmp_path / "pruned")
    reloaded = load_classifier(tmp_path / "pruned")
    feeds = batch(length=23)  # not the exporter's trace shape
    assert torch.equal(logits(model, feeds), logits(reloaded, feeds))
    raw = export_onnx(reloaded, tmp_path, opset=17)
    fused_path = tmp_path / "fused.onnx"
    assert fuse_onnx(raw, fused_path, reloaded.config)
    ops = [n.op_type for n in onnx.load(str(fused_path)).graph.node]
    assert ops.count("Attention") == len(reloaded.bert.encoder.layer) and "SkipLayerNormalization" not in ops
    onnx_feeds = {k: feeds[k].numpy() for k in ("input_ids", "attention_mask")}
    onnx_feeds["token_type_ids"] = np.zeros_like(onnx_feeds["input_ids"])
    for path in (raw, fused_path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        out = session.run(None, {k: v for k, v in onnx_feeds.items() if k in names})[0]
        assert np.abs(out - logits(model, feeds).numpy()).max() < 1e-4, path.name


def test_make_plan_refuses_to_drop_every_layer():
    importance = taylor_importance(random_bert(layers=2), [batch()])
    with pytest.raises(ValueError, match="would remove all 2 layers"):
        make_plan(importance, 1.0, 1.0, layers_drop=2)


def test_plan_round_trips_through_json():
    plan = make_plan(magnitude_importance(random_bert()), 0.5, 0.5, 0)
    assert PrunePlan(**json.loads(json.dumps(plan.__dict__))) == plan


def test_shallow_copy_keeps_the_chosen_layers():
    teacher = random_bert(layers=4)
    student = shallow_copy(teacher, [0, 2])
    assert student.config.num_hidden_layers == 2
    for mine, theirs in zip(student.bert.encoder.layer, (teacher.bert.encoder.layer[0], teacher.bert.encoder.layer[2]), strict=True):
        assert torch.equal(mine.intermediate.dense.weight, theirs.intermediate.dense.weight)
    with pytest.raises(ValueError, match="out of range"):
        shallow_copy(teacher, [4])


@pytest.mark.parametrize("exhaustive", [True, False])
def test_depth_keeps_the_teacher_layers_whose_copy_reproduces_its_outputs(exhaustive, monkeypatch):
    import datasets

    from edgetl import distillation
    from edgetl.recipe import DistillationConfig

    teacher = random_bert(layers=4)
    with torch.no_grad():  # layers 1 and 2 add nothing to the residual stream: each then returns its (normalised) input
        for module in teacher.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1.0), module.bias.zero_()
        for i in (1, 2):
            layer = teacher.bert.encoder.layer[i]
            for dense in (layer.attention.output.dense, layer.output.dense):
                dense.weight.zero_(), dense.bias.zero_()
        teacher.classifier.weight.mul_(100.0)  # a random tiny head barely tells its inputs apart
    if not exhaustive:  # 6 subsets of 2 in 4 layers: dropped one at a time instead
        monkeypatch.setattr(distillation, "EXHAUSTIVE_SUBSETS", 5)
    rows = datasets.Dataset.from_dict({k: v.tolist() for k, v in batch(size=40, seed=3).items()}).rename_column("labels", "label")

    def collate(items):
        return {("labels" if k == "label" else k): torch.tensor([item[k] for item in items]) for k in items[0]}

    layers, scores = distillation.choose_layers(DistillationConfig(), teacher, 2, rows, collate, "soft_targets")
    assert layers == [0, 3]
    pairs = {k: v for k, v in scores.items() if k.count(",") == 1}  # the greedy path scores 3-layer sets first
    assert scores["0,3"] < 1e-6 and min(v for k, v in pairs.items() if k != "0,3") > 100 * scores["0,3"]
    assert len(scores) == (6 if exhaustive else 4 + 3)
    with pytest.raises(ValueError, match="the teacher has 4 layers"):
        distillation.choose_layers(DistillationConfig(), teacher, 5, rows, collate, "soft_targets")


def test_layer_map_spreads_student_layers_over_the_teacher():
    assert layer_map(3, 6) == [0, 2, 4, 6]
    assert layer_map(2, 2) == [0, 1, 2]


def test_kd_loss_falls_and_reaches_every_term():
    teacher, student = random_bert(layers=4, seed=0), random_bert(layers=2, hidden=16, heads=2, seed=3)
    cfg = DistillationConfig(temperature=2.0, kd_weight=0.7, hidden_weight=1.0, attention_weight=1.0)
    wrapped = StudentWithProjections(student, teacher.config.hidden_size, use_hidden=True)
    assert len(wrapped.projections) == 3  # widths differ: embeddings + 2 layers projected
    feeds = batch()
    inputs = {k: v for k, v in feeds.items() if k != "labels"}
    wants = {"output_hidden_states": True, "output_attentions": True}
    with torch.no_grad():
        teacher_out = teacher(**inputs, **wants)
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=1e-2)
    wrapped.train()
    losses = []
    for _ in range(30):
        loss = distillation_loss(cfg, wrapped(**inputs, **wants), teacher_out, feeds["labels"], inputs["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.grad is not None for p in wrapped.projections.parameters())


def test_unlabelled_rows_add_only_the_soft_loss():
    teacher, student = random_bert(seed=0), random_bert(layers=1, seed=3)
    cfg = DistillationConfig(kd_weight=0.5)
    feeds = batch()
    inputs = {k: v for k, v in feeds.items() if k != "labels"}
    with torch.no_grad():
        teacher_out = teacher(**inputs)
        out = {"logits": student(**inputs).logits}
    unlabelled = torch.full_like(feeds["labels"], -100)
    loss = distillation_loss(cfg, out, teacher_out, unlabelled, inputs["attention_mask"])
    soft_only = distillation_loss(DistillationConfig(kd_weight=1.0), out, teacher_out, feeds["labels"], inputs["attention_mask"])
    assert torch.isfinite(loss) and torch.isclose(loss, 0.5 * soft_only)


@pytest.mark.slow
def test_sst_tiny_reuses_the_teacher_and_shrinks_at_each_step(tiny_runs):
    from conftest import manifests

    tiny, int8 = manifests(tiny_runs("sst-tiny")), manifests(tiny_runs("sst-int8"))
    # The finetune stage is sst-int8's, so its finished artifact was copied rather than trained again.
    assert tiny["01-finetune"]["fingerprint"] == int8["01-finetune"]["fingerprint"]
    assert tiny["01-finetune"]["timings"] == int8["01-finetune"]["timings"]
    params = [tiny[name]["metrics"]["parameters"] for name in ("01-finetune", "02-distill", "03-prune")]
    assert params[0] > params[1] > params[2]
    prune = tiny["03-prune"]["metrics"]
    assert prune["vocabulary"]["vocab_after"] < prune["vocabulary"]["vocab_before"]
    assert sum(layer["heads"] for layer in prune["layers"]) == 1 * len(prune["layers"])  # 0.5 of 2 heads a layer
    for name in ("01-finetune", "02-distill", "03-prune"):
        assert tiny[name]["metrics"]["gflops_per_text"] > 0 and 0 <= tiny[name]["metrics"]["accuracy"] <= 1


def test_sst_tiny_distils_and_recovers_on_the_extra_text_too(tiny_runs):
    from conftest import manifests

    metrics = {name: m["metrics"] for name, m in manifests(tiny_runs("sst-tiny")).items()}
    labelled = metrics["01-finetune"]["train_samples"]
    assert metrics["02-distill"]["train_samples"] == metrics["03-prune"]["train_samples"] > labelled
    # Recovery read dropped tokens as [UNK] (vocabulary_in_recovery), so the checkpoint it chose scores the same
    # after the cut as when it was chosen.
    prune = metrics["03-prune"]
    assert prune["kept"] == "best" and prune["accuracy"] == pytest.approx(prune["selection_accuracy"], abs=1e-5)


def test_the_pruned_vocabulary_can_keep_the_extra_texts_words_and_ship_a_four_bit_table(tiny_runs, dev_texts, tmp_path):
    import onnx
    from tokenizers import Tokenizer

    from edgetl.runtime import load

    extra = tmp_path / "extra.txt"  # the slice's dev sentences: words of the tiny vocabulary its training split lacks
    extra.write_text("\n".join(dev_texts) + "\n")
    default = tiny_runs("sst-tiny", f"stages.prune.extra_text_file={extra}", "stages.prune.vocabulary_extra_text=false")
    kept = tiny_runs("sst-tiny", f"stages.prune.extra_text_file={extra}", "stages.prune.vocabulary_extra_text=true",
                     "stages.quantize.onnx_method=dynamic", "stages.quantize.onnx_embedding_bits=4")

    def unknown(folder):
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        unk = tokenizer.token_to_id("[UNK]")
        return sum(e.ids.count(unk) for e in tokenizer.encode_batch(dev_texts, add_special_tokens=False))

    whole = unknown(default / "02-distill")
    assert unknown(default / "03-prune") > whole  # the cut to the training split's tokens drops some of dev's
    assert unknown(kept / "03-prune") == whole
    sizes = [json.loads((run / "03-prune" / "manifest.json").read_text())["metrics"]["vocabulary"]["vocab_after"]
             for run in (default, kept)]
    assert sizes[1] > sizes[0]
    # The bundle's ONNX model looks words up in the 4-bit table, and the runtime answers with it.
    bundle = kept / "08-bundle"
    graph = onnx.load(str(bundle / json.loads((bundle / "edgetl.json").read_text())["models"]["onnx"]["path"])).graph
    assert "GatherBlockQuantized" in [n.op_type for n in graph.node if "input_ids" in n.input]
    assert len(load(bundle).predict(["the zeppelin drifts over a quarry ."])) == 1


def test_sst_tiny_benchmarks_the_sst_int8_bundle_in_the_same_run(tiny_runs):
    run_dir = tiny_runs("sst-tiny")
    rows = json.loads((run_dir / "07-benchmark" / "results.json").read_text())["rows"]
    targets = {row["target"] for row in rows}
    assert {"onnx-int8 (sst-int8/06-bundle)", "pytorch-fp32 (01-finetune)", "onnx-int8 (05-quantize)"} <= targets
    assert all(row["accuracy"] is not None for row in rows)
    bundle = json.loads((run_dir / "08-bundle" / "edgetl.json").read_text())
    assert list(bundle["models"]) == ["onnx"]


def test_a_missing_compared_run_fails_before_any_stage(tmp_path, shrink):
    from edgetl.errors import RecipeError
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    with pytest.raises(RecipeError, match=r"bench.compare 'sst-int8:bundle': no finished bundle artifact; run `edgetl run sst-int8` first"):
        run_recipe(load_recipe("sst-tiny", shrink("sst-tiny")), tmp_path / "sst-tiny")
    assert not list((tmp_path / "sst-tiny").glob("[0-9][0-9]-*"))


@pytest.mark.slow
def test_qat_in_the_pipeline_exports_int8_graphs_and_reuses_finished_stages(tiny_runs, shrink):
    from conftest import manifests
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe
    from edgetl.stages._qat import count_int8_ops_onnx, count_int8_ops_openvino

    tiny = tiny_runs("sst-tiny")
    run_dir = tiny.parent / "sst-tiny-qat"
    overrides = shrink("sst-tiny") + ["stages.quantize.method=qat", "stages.quantize.max_accuracy_drop=null",
                                      "stages.quantize.qat.max_steps=4", "stages.quantize.qat.eval_steps=2",
                                      "stages.quantize.qat.batch_size=16"]
    run_recipe(load_recipe("sst-tiny", overrides), run_dir)
    ran, before = manifests(run_dir), manifests(tiny)
    for name in ("01-finetune", "02-distill", "03-prune", "04-export"):
        assert ran[name]["fingerprint"] == before[name]["fingerprint"]  # copied from the sst-tiny run beside it
    quantized = ran["05-quantize"]
    assert quantized["models"]["onnx"]["method"] == "qat"
    assert count_int8_ops_onnx(run_dir / "05-quantize" / "onnx" / "model.onnx") == quantized["models"]["onnx"]["int8_ops"] > 0
    assert count_int8_ops_openvino(run_dir / "05-quantize" / "openvino" / "model.xml") > 0


def test_accuracy_controlled_ptq_records_its_fallbacks(tiny_runs):
    from conftest import manifests

    quantized = manifests(tiny_runs("sst-tiny"))["05-quantize"]  # the tiny runs quantize ONNX statically
    max_drop = quantized["config"]["max_accuracy_drop"]  # the tiny runs widen the recipe's bar (conftest)
    for backend in ("onnx", "openvino"):
        model = quantized["models"][backend]
        assert model["method"] == "nncf.quantize_with_accuracy_control"
        assert isinstance(model["fallback_layers"], list)
        drop = 100 * (model["accuracy_fp32"] - model["accuracy_int8"])
        assert model["drop_met"] == (drop <= max_drop + 2e-3), (drop, max_drop)  # accuracies rounded to 1e-5


def test_a_latency_budget_picks_the_largest_keep_ratio_that_meets_it():
    from edgetl.errors import StageError
    from edgetl.recipe import PruneStage
    from edgetl.stages.prune import keep_ratio_for_budget

    model = random_bert(layers=2)
    importance = magnitude_importance(model)
    feeds = [{k: v[:1].numpy() for k, v in batch(length=9, size=2, seed=s).items() if k != "labels"} for s in range(12)]
    for feed in feeds:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
    generous = PruneStage(stage="prune", latency_budget_ms=1e4)
    assert keep_ratio_for_budget(generous, model, importance, feeds)[0] == 1.0
    impossible = PruneStage(stage="prune", latency_budget_ms=1e-6)
    with pytest.raises(StageError, match=r"prune.latency_budget_ms: even keeping 10 % .* raise the budget"):
        keep_ratio_for_budget(impossible, model, importance, feeds)


def test_latency_budget_and_keep_ratios_exclude_each_other():
    from pydantic import ValidationError

    from edgetl.recipe import PruneStage

    with pytest.raises(ValidationError, match="latency_budget_ms chooses the keep ratio itself"):
        PruneStage(stage="prune", latency_budget_ms=1.0, heads_keep=0.5)


def test_recovery_can_distil_from_the_fine_tuned_teacher(tiny_runs, shrink, monkeypatch):
    import edgetl.distillation
    from conftest import manifests
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    tiny = tiny_runs("sst-tiny")
    recipe = load_recipe("sst-tiny", [*shrink("sst-tiny"), "stages.prune.recovery_teacher=first"])
    recipe = recipe.model_copy(update={"stages": recipe.stages[:3]})  # finetune, distill, prune
    teachers, distil = [], edgetl.distillation.distil

    def spy(cfg, ctx, student, teacher, *args):
        teachers.append(teacher.config.num_hidden_layers)
        return distil(cfg, ctx, student, teacher, *args)

    monkeypatch.setattr(edgetl.distillation, "distil", spy)
    run_dir = tiny.parent / "sst-tiny-first"
    run_recipe(recipe, run_dir)
    ran, before = manifests(run_dir), manifests(tiny)
    layers = {name: json.loads((run_dir / name / "config.json").read_text())["num_hidden_layers"]
              for name in ("01-finetune", "02-distill")}
    assert layers["01-finetune"] > layers["02-distill"] and teachers == [layers["01-finetune"]]
    assert [Path(i["path"]).name for i in ran["03-prune"]["inputs"]] == ["01-finetune", "02-distill"]
    assert ran["02-distill"]["fingerprint"] == before["02-distill"]["fingerprint"]  # copied, not trained again
    assert ran["03-prune"]["fingerprint"] != before["03-prune"]["fingerprint"]

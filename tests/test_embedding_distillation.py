"""Sentence-embedding distillation and pruning: the student learns the teacher's vectors (MSE) on unlabelled training
sentences, units are scored without labels, and the whole chain ends in a bundle that embeds."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import manifests

TEXTS = ["A man is playing a guitar.", "A woman is slicing an onion.", "Two dogs run through a field.",
         "A plane is taking off.", "The cat sleeps on the sofa.", "Children play football in the park."]


@pytest.fixture(scope="module")
def tiny_embedder(tiny_task_model):
    from transformers import AutoTokenizer

    from edgetl.modeling import new_embedder

    torch.manual_seed(0)
    model, _ = new_embedder(str(tiny_task_model), "mean", True)
    return model.eval(), AutoTokenizer.from_pretrained(str(tiny_task_model))


def test_the_vector_objective_lowers_the_student_teacher_gap_in_a_few_steps(tiny_embedder):
    from edgetl.distillation import distillation_loss, shallow_copy, vector_loss
    from edgetl.recipe import DistillationConfig

    teacher, tokenizer = tiny_embedder
    student = shallow_copy(teacher, [0]).eval()  # no dropout: the gap is measured as it is trained
    torch.manual_seed(1)
    student.apply(student._init_weights)  # a real gap: the random tiny teacher's copy would start almost on it
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    cfg = DistillationConfig(kd_weight=1.0, temperature=9.0)  # soft-target settings play no part
    with torch.no_grad():
        target = teacher(**batch)

    def gap() -> float:
        with torch.no_grad():
            return float(vector_loss(cfg, student(**batch).logits, target.logits, None))

    before = gap()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(20):
        loss = distillation_loss(cfg, {"logits": student(**batch).logits}, target, None, batch["attention_mask"],
                                 objective="vectors")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert before > 0 and gap() < 0.5 * before


def test_embedding_distillation_reads_each_training_text_once_holds_some_out_and_never_the_dev_split(
        tiny_embedder, shrink, tmp_path):
    from edgetl.data import load_labelled
    from edgetl.distillation import distillation_data
    from edgetl.recipe import DistillStage, load_recipe
    from edgetl.tasks import TASKS

    def extra_text(path, **fields) -> DistillStage:
        return DistillStage(stage="distill", extra_text_file=str(path), **fields)

    _, tokenizer = tiny_embedder
    recipe = load_recipe("stsb-embed-tiny", shrink("stsb-embed-tiny"))
    train, dev = load_labelled(recipe.data, TASKS["sentence-embedding"])
    texts = set(train["text"]) | set(train["text_pair"])
    extra = tmp_path / "extra.txt"
    extra.write_text("a sentence from elsewhere .\n" + train["text"][0] + "\n")
    ctx = SimpleNamespace(recipe=recipe, latest=lambda *kinds: None)
    training, held_out = distillation_data(ctx, tokenizer, extra_text(extra))

    def ids(rows) -> list[tuple]:
        return [tuple(row) for row in rows["input_ids"]]

    assert set(training["label"]) == set(held_out["label"]) == {-100}  # no labels: the scores are never trained on
    assert 0 < len(held_out) <= len(texts) // 10 and not set(ids(held_out)) & set(ids(training))
    assert len(training) + len(held_out) == len(texts) + 1  # each text once; the extra one that is new trains
    encoded = {tuple(tokenizer(t, truncation=True, max_length=recipe.data.max_length)["input_ids"]) for t in texts}
    unseen_dev = {t for t in set(dev["text"]) | set(dev["text_pair"]) if t not in texts}
    dev_ids = {tuple(tokenizer(t, truncation=True, max_length=recipe.data.max_length)["input_ids"]) for t in unseen_dev}
    assert not dev_ids - encoded & set(ids(training) + ids(held_out))
    assert len(set(ids(training)) - encoded) == 1  # the extra sentence
    column = tmp_path / "extra.tsv"  # SST-2's layout: the text under its own column name
    column.write_text("sentence\tlabel\na sentence from elsewhere .\t1\nanother one .\t0\n")
    assert len(distillation_data(ctx, tokenizer, extra_text(column, extra_text_field="sentence"))[0]) == len(training) + 1
    reviews = tmp_path / "reviews.jsonl"  # a review's title and body: three sentences, each a text of its own
    reviews.write_text(json.dumps({"text": "Dull.\n\tIt never ends! I left early."}) + "\n")
    split = distillation_data(ctx, tokenizer, extra_text(reviews, extra_text_field="text", extra_text_sentences=True))[0]
    assert len(split) == len(training) - 1 + 3  # training held one extra text


@pytest.mark.parametrize("score", ["taylor", "fisher"])
def test_vector_importance_scores_every_unit_without_labels(tiny_embedder, score):
    from edgetl.pruning import fisher_importance, taylor_importance

    model, tokenizer = tiny_embedder
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))
    batch["labels"] = torch.full((len(TEXTS),), -100)
    scorer = taylor_importance if score == "taylor" else fisher_importance
    importance = scorer(model, [batch], objective="vectors")
    for scores in (*importance.heads, *importance.neurons):
        assert torch.isfinite(scores).all() and (scores > 0).all()
    again = scorer(model, [batch], objective="vectors")
    assert all(torch.equal(a, b) for a, b in zip(importance.neurons, again.neurons, strict=True))  # seeded directions


def test_a_pretrained_student_is_refused_for_embeddings(shrink):
    from edgetl.errors import RecipeError
    from edgetl.recipe import load_recipe

    overrides = [*shrink("stsb-embed-tiny"), "stages.distill.depth=null", "stages.distill.student=minilm-l6"]
    with pytest.raises(RecipeError, match=r"distill\)\.student: task sentence-embedding does not support student"):
        load_recipe("stsb-embed-tiny", overrides)


@pytest.mark.slow
def test_the_distilled_and_pruned_embedder_chain_ends_in_a_bundle_that_embeds(tiny_runs):
    from edgetl.runtime import load

    run_dir = tiny_runs("stsb-embed-tiny")
    ran = manifests(run_dir)
    teacher, distilled, pruned = ran["01-pretrained"], ran["02-distill"], ran["03-prune"]
    assert len(distilled["metrics"]["layers"]) < len(teacher["metrics"]["layers"])
    # depth (1 of the tiny teacher's 2 layers here): the layers chosen are the best scored set
    scores = distilled["metrics"]["layer_scores"]
    assert len(distilled["metrics"]["chosen_layers"]) == 1 and len(scores) == 2
    assert ",".join(map(str, distilled["metrics"]["chosen_layers"])) == min(scores, key=scores.get)
    assert pruned["metrics"]["parameters"] < distilled["metrics"]["parameters"]
    for metrics in (distilled["metrics"], pruned["metrics"]):
        assert np.isfinite(metrics["spearman"]) and "selection_loss" in metrics  # chosen by the held-out MSE
    assert "spearman_before_recovery" in pruned["metrics"]
    evaluated = ran["06-evaluate"]["metrics"]
    assert any("(stsb-embed-int8/" in key for key in evaluated)  # the compared run is scored beside it
    runtime = load(run_dir / "08-bundle")
    vectors = np.asarray(runtime.predict(TEXTS[:2]))
    assert vectors.shape == (2, 32) and np.isfinite(vectors).all() and not runtime.text_pair  # one text per vector

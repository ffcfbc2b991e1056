"""The task seam: each task declares its head, data, metric and stages; recipes of every task fine-tune on tiny
models; what a task does not support is refused when the recipe loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgetl.errors import RecipeError
from edgetl.recipe import STAGE_NAMES, DataConfig, load_recipe
from edgetl.tasks import COLUMN_FIELDS, OPTIONS, TASKS


def write_yaml(folder: Path, raw: dict) -> Path:
    path = folder / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def task_recipe(folder: Path, task: str, model: Path, data: dict, stages: list[dict] | None = None, **top) -> Path:
    finetune = {"stage": "finetune", "max_steps": 30, "eval_steps": 10, "batch_size": 8, "learning_rate": 5e-3,
                "warmup_ratio": 0.0}
    raw = {"name": task, "task": task, "model": str(model), "data": {"max_length": 64} | data,
           "stages": stages or [finetune]} | top
    return write_yaml(folder, raw)


# --- declarations ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TASKS)
def test_every_task_supports_or_gives_a_reason_for_every_stage_and_option(name):
    task = TASKS[name]
    assert task.name == name and set(task.stages) <= set(STAGE_NAMES)
    for stage_or_option in (*STAGE_NAMES, *OPTIONS):
        supported = stage_or_option in task.stages or stage_or_option in task.options
        assert supported or task.reasons.get(stage_or_option), f"{name}: no reason for {stage_or_option}"
    assert set(task.columns) <= set(COLUMN_FIELDS) <= set(DataConfig.model_fields)
    assert task.metric in {"accuracy", "f1", "spearman"} and "finetune" in task.stages


def test_text_classification_supports_every_stage_and_option():
    task = TASKS["text-classification"]
    assert task.stages == set(STAGE_NAMES) and task.options == set(OPTIONS) and not task.reasons


# --- how rows become model inputs, and metrics ---------------------------------------------------------------------

def test_each_word_tag_goes_on_its_first_sub_token_and_minus_100_elsewhere(tiny_task_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_task_model))
    task = TASKS["token-classification"]
    words = ["Peter", "1996-08-22", "Blackburn"]  # the date is five tokens: 1996 - 08 - 22
    out = task.encode({"tokens": [words], "tags": [[3, 8, 7]]}, tokenizer, DataConfig(dataset="conll2003"), 64)
    word_ids = out.word_ids(0)
    assert word_ids == [None, 0, 1, 1, 1, 1, 1, 2, None]
    assert out["labels"][0] == [-100, 3, 8, -100, -100, -100, -100, 7, -100]


def test_a_pair_is_cut_longest_first_and_typed_by_segment(tiny_task_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_task_model))
    short, long = "a man", " ".join(["a man is playing the guitar"] * 6)
    out = TASKS["text-regression"].encode({"text": [long], "text_pair": [short]}, tokenizer, DataConfig(dataset="stsb"), 16)
    ids, types = out["input_ids"][0], out["token_type_ids"][0]
    assert len(ids) == 16 and types.count(1) == len(tokenizer(short)["input_ids"]) - 1  # the short text kept whole


def test_entity_f1_is_seqeval_s_over_the_labelled_sub_tokens():
    import numpy as np
    from seqeval.metrics import f1_score

    labels = ["B-PER", "I-PER", "O"]
    gold = np.array([[-100, 0, 1, 2, -100], [-100, 2, 0, -100, -100]])
    guess = np.array([[0, 0, 1, 2, 2], [2, 2, 2, 0, 0]])  # one sentence right, one entity missed
    logits = np.eye(3)[guess]
    metrics = TASKS["token-classification"].compute_metrics(labels)((logits, gold))
    assert metrics["f1"] == pytest.approx(f1_score([["B-PER", "I-PER", "O"], ["O", "B-PER"]],
                                                   [["B-PER", "I-PER", "O"], ["O", "O"]]))
    assert metrics["precision"] == 1.0 and metrics["recall"] == 0.5


def test_regression_reports_spearman_and_pearson_x100():
    import numpy as np
    from scipy.stats import pearsonr, spearmanr

    scores = np.array([0.0, 1.5, 2.0, 4.5, 5.0], dtype=np.float32)
    predictions = np.array([[0.1], [0.3], [0.2], [3.0], [9.0]], dtype=np.float32)
    metrics = TASKS["text-regression"].compute_metrics(None)((predictions, scores))
    assert metrics["spearman"] == pytest.approx(100 * spearmanr(predictions[:, 0], scores)[0])
    assert metrics["pearson"] == pytest.approx(100 * pearsonr(predictions[:, 0], scores)[0])
    assert TASKS["text-regression"].compute_metrics(None)((np.ones((5, 1)), scores))["spearman"] == 0.0


# --- refused when the recipe loads -------------------------------------------------------------------------------

@pytest.mark.parametrize("task, stages, message", [
    ("token-classification", [{"stage": "finetune"}, {"stage": "distill"}],
     r"stages\[1\] \(distill\): task token-classification does not support the distill stage: distill is written "
     r"for one label per text"),
    ("token-classification", [{"stage": "finetune"}, {"stage": "prune", "heads_keep": 0.5}],
     r"stages\[1\] \(prune\): task token-classification does not support the prune stage"),
    ("text-regression", [{"stage": "augment"}, {"stage": "finetune"}],
     r"stages\[0\] \(augment\): task text-regression does not support the augment stage"),
    ("token-classification", [{"stage": "finetune", "pooling": "mean"}],
     r"stages\[0\] \(finetune\)\.pooling: task token-classification does not support pooling: every token gets its "
     r"own label"),
    ("token-classification", [{"stage": "finetune", "method": "lora"}],
     r"stages\[0\] \(finetune\)\.method: task token-classification does not support lora"),
    ("text-regression", [{"stage": "finetune", "rdrop_alpha": 1.0}],
     r"stages\[0\] \(finetune\)\.rdrop_alpha: task text-regression does not support rdrop_alpha"),
], ids=["ner-distill", "ner-prune", "regression-augment", "ner-pooling", "ner-lora", "regression-rdrop"])
def test_an_unsupported_stage_or_option_is_refused_at_load_naming_it(tmp_path, tiny_model, task, stages, message):
    data = {"dataset": "conll2003"} if task == "token-classification" else {"dataset": "stsb"}
    path = task_recipe(tmp_path, task, tiny_model, data, stages)
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(path))


def test_data_of_another_task_is_refused_at_load(tmp_path, tiny_model):
    path = task_recipe(tmp_path, "text-classification", tiny_model, {"dataset": "conll2003"})
    with pytest.raises(RecipeError, match=r"data\.dataset: 'conll2003' holds token-classification data, but the task "
                                          r"is text-classification: set task: token-classification"):
        load_recipe(str(path))


@pytest.mark.parametrize("task, data, message", [
    ("token-classification", {"dataset": "conll2003", "truncation": "left"},
     r"data\.truncation: 'left' does not apply to token-classification"),
    ("text-regression", {"dataset": "stsb", "labels": ["low", "high"]}, r"data\.labels: text-regression predicts a score"),
    ("text-classification", {"dataset": "sst2", "text_pair_field": "other", "truncation": "left"},
     r"data\.truncation: 'left' cuts one text; a pair \(data\.text_pair_field\) is cut longest_first"),
])
def test_a_data_setting_the_task_cannot_honour_is_refused_at_load(tmp_path, tiny_model, task, data, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(str(task_recipe(tmp_path, task, tiny_model, data)))


_REFUSE_FAST = """
import sys, time
started = time.perf_counter()
from edgetl.errors import RecipeError
from edgetl.recipe import load_recipe
try:
    load_recipe(sys.argv[1])
except RecipeError as exc:
    message = str(exc)
else:
    raise SystemExit("not refused")
heavy = sorted(m for m in ("torch", "transformers", "datasets", "seqeval", "scipy") if m in sys.modules)
print(time.perf_counter() - started, heavy, message)
"""


def test_an_unsupported_task_and_stage_is_refused_in_a_fresh_process_in_seconds_without_torch(tmp_path, tiny_model):
    stages = [{"stage": "finetune"}, {"stage": "export"}, {"stage": "quantize"}, {"stage": "evaluate"}]
    path = task_recipe(tmp_path, "text-regression", tiny_model, {"dataset": "stsb"}, stages)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _REFUSE_FAST, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    seconds, heavy, message = done.stdout.split(" ", 2)
    assert heavy == "[]" and float(seconds) < 5 and wall < 5
    assert "stages[2] (quantize): task text-regression does not support the quantize stage" in message
    assert "stages[3] (evaluate): task text-regression does not support the evaluate stage" in message


# --- fine-tuning every task end to end on tiny models ------------------------------------------------------------

def finetune_manifest(tmp_path: Path, recipe: Path) -> dict:
    from edgetl.pipeline import run_recipe

    run_dir = tmp_path / "runs" / "run"
    run_recipe(load_recipe(str(recipe)), run_dir)
    return json.loads((run_dir / "01-finetune" / "manifest.json").read_text())


def test_a_recipe_on_its_own_csv_with_its_own_column_and_label_names_runs_finetune(tmp_path, tiny_model, sst2_slice,
                                                                                   quiet_cwd):
    import csv

    names = {"0": "thumbs-down", "1": "thumbs-up"}
    for source, target in (("train.tsv", "reviews-train.csv"), ("dev.tsv", "reviews-dev.csv")):
        rows = [line.rsplit("\t", 1) for line in (sst2_slice / source).read_text().splitlines()[1:]]
        with (tmp_path / target).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["opinion", "verdict"])
            writer.writerows([text, names[label]] for text, label in rows)
    data = {"dataset": "files", "train_file": str(tmp_path / "reviews-train.csv"),
            "eval_file": str(tmp_path / "reviews-dev.csv"), "text_field": "opinion", "label_field": "verdict"}
    manifest = finetune_manifest(tmp_path, task_recipe(tmp_path, "text-classification", tiny_model, data))
    config = json.loads((tmp_path / "runs" / "run" / "01-finetune" / "config.json").read_text())
    assert config["id2label"] == {"0": "thumbs-down", "1": "thumbs-up"}  # read from the data, sorted
    assert 0.0 <= manifest["metrics"]["accuracy"] <= 1.0 and manifest["metrics"]["eval_samples"] == 120


def test_token_classification_finetunes_and_reports_entity_f1(tmp_path, tiny_task_model, conll_slice, quiet_cwd):
    data = {"dataset": "conll2003", "path": str(conll_slice)}
    manifest = finetune_manifest(tmp_path, task_recipe(tmp_path, "token-classification", tiny_task_model, data))
    folder = tmp_path / "runs" / "run" / "01-finetune"
    config = json.loads((folder / "config.json").read_text())
    tags = {tag for line in (conll_slice / "train.jsonl").read_text().splitlines() for tag in json.loads(line)["tags"]}
    assert config["architectures"] == ["BertForTokenClassification"] and set(config["label2id"]) == tags
    assert list(config["label2id"]) == sorted(tags)
    metrics = manifest["metrics"]
    assert {"f1", "precision", "recall"} <= set(metrics) and 0.0 <= metrics["f1"] <= 1.0
    # Trainer evaluated in FP32 too, so the kept checkpoint's selection F1 is the F1 measured after training.
    assert metrics["f1"] == pytest.approx(metrics["selection_f1"], abs=1e-5)
    history = json.loads((folder / "eval_history.json").read_text())
    assert [h["step"] for h in history] == [10, 20, 30] and all("eval_f1" in h for h in history)
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]


def test_text_regression_finetunes_and_reports_spearman(tmp_path, tiny_task_model, stsb_slice, quiet_cwd):
    data = {"dataset": "stsb", "path": str(stsb_slice)}
    manifest = finetune_manifest(tmp_path, task_recipe(tmp_path, "text-regression", tiny_task_model, data))
    config = json.loads((tmp_path / "runs" / "run" / "01-finetune" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1
    assert config["architectures"] == ["MeanPoolBertForSequenceClassification"]  # pooling: the task's default, mean
    metrics = manifest["metrics"]
    assert -100 <= metrics["spearman"] <= 100 and -100 <= metrics["pearson"] <= 100
    assert metrics["spearman"] == pytest.approx(metrics["selection_spearman"], abs=1e-3)


# --- fingerprints -----------------------------------------------------------------------------------------------

def test_a_text_classification_fingerprint_reads_no_column_of_another_task():
    from edgetl.pipeline import _data_reads

    recipe = load_recipe("sst-int8")
    config = _data_reads(recipe)["config"]
    # The data fields before tasks existed: adding the other tasks' columns changed no shipped fingerprint.
    assert set(config) == {"dataset", "path", "train_file", "eval_file", "hub_config", "train_split", "eval_split",
                           "text_field", "label_field", "labels", "max_length", "truncation", "head_tokens", "target",
                           "max_train_samples", "max_eval_samples"}
    assert "task" not in _data_reads(recipe)
    other = recipe.model_copy(update={"data": recipe.data.model_copy(update={"tags_field": "ner"})})
    assert _data_reads(other) == _data_reads(recipe)


# Rows of other lengths than the exporter traced, the shorter ones padded.
EXPORT_CASES = {
    "token-classification": ("conll2003", "conll_slice", lambda tokenizer: tokenizer(
        [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."], ["Peter", "Blackburn"],
         ["BRUSSELS", "1996-08-22", "said", "the", "commission"]], is_split_into_words=True, padding=True,
        return_tensors="np")),
    "text-regression": ("stsb", "stsb_slice", lambda tokenizer: tokenizer(
        ["A plane is taking off.", "A man is playing a large flute in the park today."],
        ["An air plane is taking off.", "A man plays."], padding=True, return_tensors="np")),
}


@pytest.mark.parametrize("task", EXPORT_CASES)
def test_export_to_onnx_and_openvino_matches_pytorch_at_an_untraced_padded_shape(task, request, tmp_path,
                                                                                  tiny_task_model, quiet_cwd):
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from edgetl.modeling import load_classifier
    from edgetl.pipeline import run_recipe
    from edgetl.runtime.engines import open_engine

    dataset, slice_fixture, encode = EXPORT_CASES[task]
    finetune = {"stage": "finetune", "max_steps": 6, "eval_steps": 3, "batch_size": 8, "learning_rate": 5e-3}
    data = {"dataset": dataset, "path": str(request.getfixturevalue(slice_fixture))}
    run_recipe(load_recipe(str(task_recipe(tmp_path, task, tiny_task_model, data, [finetune, {"stage": "export"}]))),
               tmp_path / "run")
    trained, exported = tmp_path / "run" / "01-finetune", tmp_path / "run" / "02-export"
    model = load_classifier(trained, TASKS[task])
    feeds = {k: v.astype(np.int64) for k, v in encode(AutoTokenizer.from_pretrained(str(trained))).items()}
    with torch.inference_mode():
        expected = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    # Token classification: one row of logits per token, compared where there is a token (not padding).
    real = feeds["attention_mask"].astype(bool) if expected.ndim == 3 else slice(None)
    for backend, model_file in (("onnx", "onnx/model.onnx"), ("openvino", "openvino/model.xml")):
        logits = open_engine(backend, exported / model_file).run(feeds)
        assert logits.shape == expected.shape, backend
        np.testing.assert_allclose(logits[real], expected[real], atol=1e-4, rtol=0, err_msg=backend)

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
    assert task.metric in {"accuracy", "f1", "spearman", "perplexity"} and {"finetune", "pretrained"} & task.stages


def test_text_classification_supports_every_stage_and_option_but_taking_a_headless_checkpoint_as_is():
    task = TASKS["text-classification"]
    assert task.stages == set(STAGE_NAMES) - {"pretrained"} and task.options == set(OPTIONS)
    assert sorted(task.reasons) == ["pretrained"]


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
    ("token-classification", [{"stage": "finetune"}, {"stage": "quantize", "method": "qat"}],
     r"stages\[1\] \(quantize\)\.method: task token-classification does not support qat"),
    ("text-regression", [{"stage": "finetune"}, {"stage": "export"}, {"stage": "quantize", "max_accuracy_drop": 1.0}],
     r"stages\[2\] \(quantize\)\.max_accuracy_drop: task text-regression does not support max_accuracy_drop: "
     r"accuracy control measures the INT8 drop in accuracy"),
], ids=["ner-distill", "ner-prune", "regression-augment", "ner-pooling", "ner-lora", "regression-rdrop", "ner-qat",
        "regression-accuracy-control"])
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
    ("token-classification", {"dataset": "conll2003", "target": "electronics"},
     r"data\.target: a target domain holds labelled texts \(text-classification\), which token-classification"),
    ("text-regression", {"dataset": "stsb", "target": "electronics"},
     r"data\.target: a target domain holds labelled texts \(text-classification\), which text-regression"),
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
    stages = [{"stage": "finetune"}, {"stage": "distill"}, {"stage": "prune"}]
    path = task_recipe(tmp_path, "text-regression", tiny_model, {"dataset": "stsb"}, stages)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _REFUSE_FAST, str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr
    seconds, heavy, message = done.stdout.split(" ", 2)
    assert heavy == "[]" and float(seconds) < 5 and wall < 5
    assert "stages[1] (distill): task text-regression does not support the distill stage" in message
    assert "stages[2] (prune): task text-regression does not support the prune stage" in message


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


# --- quantized and evaluated through every runtime ----------------------------------------------------------------

# The token model's ONNX Runtime INT8 is static (calibrated on feeds the task encodes), the regression one's dynamic.
CHAIN_CASES = {"token-classification": ("conll2003", "conll_slice", "static", "f1"),
               "text-regression": ("stsb", "stsb_slice", "dynamic", "spearman")}


@pytest.fixture(scope="module")
def evaluated_runs(tmp_path_factory, request, tiny_task_model, quiet_cwd):
    """task -> a finetune -> export -> quantize -> evaluate -> benchmark -> bundle run of the task on the tiny model,
    run once."""
    from edgetl.pipeline import run_recipe

    runs = {}

    def get(task: str) -> Path:
        if task not in runs:
            dataset, slice_fixture, onnx_method, _ = CHAIN_CASES[task]
            folder = tmp_path_factory.mktemp(task)
            stages = [{"stage": "finetune", "max_steps": 12, "eval_steps": 6, "batch_size": 8, "learning_rate": 5e-3},
                      {"stage": "export"},
                      {"stage": "quantize", "onnx_method": onnx_method, "calibration_samples": 16},
                      {"stage": "evaluate"}, {"stage": "benchmark"}, {"stage": "bundle", "backends": ["onnx", "openvino"]}]
            data = {"dataset": dataset, "path": str(request.getfixturevalue(slice_fixture))}
            bench = {"warmup": 1, "rounds": 2, "max_sentences": 6, "throughput_batch_size": 4}
            recipe = task_recipe(folder, task, tiny_task_model, data, stages, bench=bench)
            run_recipe(load_recipe(str(recipe)), folder / "run")
            runs[task] = folder / "run"
        return runs[task]

    return get


@pytest.mark.parametrize("task", CHAIN_CASES)
def test_every_artifact_is_evaluated_with_the_task_metric_and_onnx_fp32_scores_as_pytorch(task, evaluated_runs):
    import numpy as np

    run_dir = evaluated_runs(task)
    metric = CHAIN_CASES[task][3]
    quantized = json.loads((run_dir / "03-quantize" / "manifest.json").read_text())
    assert {m["precision"] for m in quantized["models"].values()} == {"int8"} and set(quantized["models"]) == {"onnx", "openvino"}
    rows = json.loads((run_dir / "04-evaluate" / "evaluation.json").read_text())
    found = {(r["artifact"], r["backend"], r["precision"]): r for r in rows}
    assert set(found) == {("01-finetune", "pytorch", "fp32"), ("02-export", "onnx", "fp32"),
                          ("02-export", "openvino", "fp32"), ("03-quantize", "onnx", "int8"),
                          ("03-quantize", "openvino", "int8")}
    assert all("accuracy" not in r and np.isfinite(r[metric]) and r["samples"] == 30 for r in rows)
    pytorch = found[("01-finetune", "pytorch", "fp32")][metric]
    assert found[("02-export", "onnx", "fp32")][metric] == pytest.approx(pytorch, abs=1e-6)
    assert pytorch == pytest.approx(json.loads((run_dir / "01-finetune" / "manifest.json").read_text())["metrics"][metric],
                                    abs=1e-4)
    evaluation = json.loads((run_dir / "04-evaluate" / "manifest.json").read_text())["metrics"]
    assert evaluation == {r["target"]: r[metric] for r in rows}


@pytest.mark.parametrize("task", CHAIN_CASES)
def test_every_artifact_is_benchmarked_on_the_task_inputs_and_bundled_with_the_task_metric(task, evaluated_runs):
    run_dir = evaluated_runs(task)
    metric = CHAIN_CASES[task][3]
    scores = json.loads((run_dir / "04-evaluate" / "manifest.json").read_text())["metrics"]
    result = json.loads((run_dir / "05-benchmark" / "results.json").read_text())
    assert result["task"] == task and result["metric"] == {"name": metric, "scale": TASKS[task].metric_scale}
    assert {r["target"] for r in result["rows"]} == set(scores)
    for row in result["rows"]:
        assert row[metric] == scores[row["target"]] and row["calls"] == 12 and row["p50_ms"] > 0, row["target"]
        assert row["peak_rss_mb"] is not None, row.get("memory_error")
    assert f"| {metric} " in (run_dir / "05-benchmark" / "report.md").read_text()
    assert (run_dir / "05-benchmark" / f"{metric}_vs_latency.png").is_file()
    bundle = json.loads((run_dir / "06-bundle" / "edgetl.json").read_text())
    assert bundle["task"] == task and bundle["metrics"]["metric"] == metric
    assert bundle["text_pair"] is (task == "text-regression")
    assert bundle["labels"] == (sorted(json.loads((run_dir / "01-finetune" / "config.json").read_text())["label2id"])
                                if task == "token-classification" else [])
    for backend in ("onnx", "openvino"):
        assert bundle["metrics"]["per_backend"][backend][metric] == scores[f"{backend}-int8 (03-quantize)"]


def test_evaluation_tags_each_word_by_its_first_sub_token_as_pytorch_logits_do(evaluated_runs, conll_slice):
    import numpy as np
    import torch
    from seqeval.metrics import f1_score
    from transformers import AutoTokenizer

    from edgetl.modeling import load_classifier
    from edgetl.runtime.entities import word_labels

    run_dir = evaluated_runs("token-classification")
    trained = run_dir / "01-finetune"
    model, tokenizer = load_classifier(trained, TASKS["token-classification"]), AutoTokenizer.from_pretrained(str(trained))
    id2label = model.config.id2label
    sentences = [json.loads(line) for line in (conll_slice / "dev.jsonl").read_text().splitlines()]
    by_hand, token_logits, word_ids_of = [], [], []
    for sentence in sentences:
        encoded = tokenizer(sentence["tokens"], is_split_into_words=True, truncation=True, max_length=64,
                            return_tensors="pt")
        with torch.inference_mode():
            logits = model(**encoded).logits[0].numpy()
        word_ids = encoded.word_ids(0)
        firsts = {word: index for index, word in reversed(list(enumerate(word_ids))) if word is not None}
        tags = ["O"] * len(sentence["tokens"])
        for word, index in firsts.items():
            tags[word] = id2label[int(logits[index].argmax())]
        by_hand.append(tags)
        token_logits.append(logits)
        word_ids_of.append(word_ids)
    # The evaluation saved every sentence's token logits in turn; the first sentence's are PyTorch's.
    saved = np.load(run_dir / "04-evaluate" / "logits-01-finetune-pytorch.npy")
    assert len(saved) == sum(len(logits) for logits in token_logits)
    first = saved[: len(token_logits[0])]
    np.testing.assert_allclose(first, token_logits[0], atol=1e-5, rtol=0)
    assert word_labels(first, word_ids_of[0], id2label, num_words=len(sentences[0]["tokens"])) == by_hand[0]
    rows = json.loads((run_dir / "04-evaluate" / "evaluation.json").read_text())
    pytorch = next(r for r in rows if r["backend"] == "pytorch")
    gold = [[str(tag) for tag in sentence["tags"]] for sentence in sentences]
    assert pytorch["f1"] == pytest.approx(f1_score(gold, by_hand, zero_division=0), abs=1e-5)

"""The sentence-embedding task: Spearman of pair cosines, fidelity of compressed vectors to FP32, the data it needs,
the sentence-transformers files it reads and writes, and the quantize gate that ships FP32 where INT8 drifts.

Fast: numpy on hand-made vectors, and one tiny pretrained -> export -> quantize run (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from edgetl.errors import RecipeError
from edgetl.recipe import load_recipe
from edgetl.tasks import TASKS

TASK = TASKS["sentence-embedding"]


def at_angles(degrees: list[float], scale: float = 1.0) -> np.ndarray:
    """Unit 2-D vectors at the given angles from the x axis (times ``scale``), as float32 rows."""
    radians = np.radians(degrees)
    return scale * np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# --- score: Spearman x100 of pair cosines --------------------------------------------------------------------------

def test_score_ranks_the_cosine_of_each_pair_against_its_gold_score():
    # Pair i: a vector on the x axis and one at 0, 30, 60, 90 degrees: cosines 1, 0.87, 0.5, 0.
    first, second = at_angles([0, 0, 0, 0]), at_angles([0, 30, 60, 90], scale=3.0)  # length is no similarity
    outputs = list(first) + list(second)
    score = TASK.score(outputs, [], {"label": [5.0, 4.0, 1.0, 0.5]}, None)
    assert score["spearman"] == pytest.approx(100.0)
    assert score["pearson"] == pytest.approx(100 * np.corrcoef([1, np.sqrt(3) / 2, 0.5, 0], [5, 4, 1, 0.5])[0, 1])
    # Ranks of the cosines 4 3 2 1 against the gold's 4 2 3 1: rho = 1 - 6 * 2 / (4 * 15) = 0.8.
    assert TASK.score(outputs, [], {"label": [5.0, 1.0, 4.0, 0.5]}, None)["spearman"] == pytest.approx(80.0)
    assert TASK.score(outputs, [], {"label": [0.5, 1.0, 4.0, 5.0]}, None)["spearman"] == pytest.approx(-100.0)


def test_the_texts_to_embed_are_every_first_text_then_every_second_one():
    columns = {"text": ["a", "b"], "text_pair": ["c", "d"], "label": [1.0, 2.0]}
    assert TASK.examples(columns) == ["a", "b", "c", "d"]


# --- fidelity: mean / 1st-percentile cosine, recall@10 ---------------------------------------------------------------

def random_vectors(rows: int, dimension: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dimension)).astype(np.float32)


def test_identical_vectors_have_fidelity_one_on_every_measure():
    vectors = list(random_vectors(40))
    texts = [f"text {i}" for i in range(40)]
    assert TASK.fidelity(vectors, vectors, texts) == {"cosine_mean": pytest.approx(1.0), "cosine_p1": pytest.approx(1.0),
                                                      "recall_at_10": 1.0}


def test_rescaled_vectors_keep_fidelity_one_and_two_turned_60_degrees_give_cosine_one_half():
    reference = np.zeros((100, 3), dtype=np.float32)
    reference[:, :2] = at_angles(list(np.linspace(0, 170, 100)))
    texts = [f"text {i}" for i in range(100)]
    rescaled = reference * np.linspace(0.5, 4, 100, dtype=np.float32)[:, None]
    assert TASK.fidelity(list(rescaled), list(reference), texts)["cosine_mean"] == pytest.approx(1.0)
    turned = reference.copy()
    # Half the in-plane unit vector plus sqrt(3)/2 out of the plane: a unit vector 60 degrees from it.
    turned[[10, 70], :2] *= 0.5
    turned[[10, 70], 2] = np.sqrt(3) / 2
    fidelity = TASK.fidelity(list(turned), list(reference), texts)
    assert fidelity["cosine_mean"] == pytest.approx((98 + 2 * 0.5) / 100)
    assert fidelity["cosine_p1"] == pytest.approx(0.5)  # 2 of 100: the 1st percentile falls between them


def test_recall_at_10_is_counted_once_per_distinct_text_among_the_distinct_texts():
    reference = random_vectors(30)
    texts = [f"text {i}" for i in range(30)] * 2  # every text twice, as a text in two pairs
    doubled = np.concatenate([reference, reference])
    # The second rows of each text differ in the compressed model: only a text's first row counts for recall, and
    # a text is never its own neighbour.
    compressed = np.concatenate([reference, random_vectors(30, seed=1)])
    assert TASK.fidelity(list(doubled), list(doubled), texts)["recall_at_10"] == 1.0
    assert TASK.fidelity(list(compressed), list(doubled), texts)["recall_at_10"] == 1.0
    unrelated = TASK.fidelity(list(random_vectors(30, seed=2)), list(reference), texts[:30])["recall_at_10"]
    assert unrelated < 0.6  # 10 of 29 others drawn at random share about a third


def test_with_11_distinct_texts_recall_looks_at_all_10_others_and_with_one_it_is_undefined():
    reference, texts = random_vectors(11), [f"text {i}" for i in range(11)]
    assert TASK.fidelity(list(random_vectors(11, seed=3)), list(reference), texts)["recall_at_10"] == 1.0
    assert np.isnan(TASK.fidelity(list(reference[:2]), list(reference[:2]), ["same", "same"])["recall_at_10"])


# --- data ----------------------------------------------------------------------------------------------------------

def embedding_recipe(folder: Path, model: Path, data: dict, stages: list[dict] | None = None, name: str = "embed") -> Path:
    raw = {"name": name, "task": "sentence-embedding", "model": str(model), "data": {"max_length": 48} | data,
           "stages": stages or [{"stage": "pretrained"}, {"stage": "evaluate"}]}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_data_without_a_second_text_or_with_labels_is_refused_at_load_naming_both(tmp_path, tiny_task_model):
    data = {"dataset": "files", "train_file": "train.jsonl", "eval_file": "dev.jsonl", "text_field": "s1",
            "score_field": "score", "labels": ["low", "high"]}
    with pytest.raises(RecipeError, match=r"data\.labels: sentence-embedding is evaluated on scored pairs "
                                          r"\(data\.score_field\), not labels(.|\n)*data\.text_pair_field: "
                                          r"sentence-embedding is evaluated on pairs of texts"):
        load_recipe(str(embedding_recipe(tmp_path, tiny_task_model, data)))


def test_stsb_names_the_second_text_so_an_embedding_recipe_on_it_loads(tmp_path, tiny_task_model):
    recipe = load_recipe(str(embedding_recipe(tmp_path, tiny_task_model, {"dataset": "stsb"})))
    assert recipe.data.text_pair_field == "sentence2" and recipe.data.score_field == "score"


# --- sentence-transformers files ------------------------------------------------------------------------------------

def st_folder(folder: Path, pooling_keys: dict, normalize: bool) -> Path:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 8, **pooling_keys}))
    (folder / "modules.json").write_text(json.dumps(modules))
    return folder


def test_sentence_transformers_files_say_how_a_checkpoint_pools_and_normalises(tmp_path):
    from edgetl.models import sentence_transformers_setup

    mean = st_folder(tmp_path / "mean", {"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, True)
    cls = st_folder(tmp_path / "cls", {"pooling_mode_cls_token": True}, False)
    assert sentence_transformers_setup(str(mean)) == {"pooling": "mean", "normalize": True}
    assert sentence_transformers_setup(str(cls)) == {"pooling": "cls", "normalize": False}
    assert sentence_transformers_setup(str(tmp_path)) == {}  # no modules.json: not a sentence-transformers folder
    assert sentence_transformers_setup("sentence-transformers/all-MiniLM-L6-v2") == {}


def test_a_checkpoint_pooled_otherwise_than_by_mean_or_cls_is_refused_unless_the_recipe_names_a_pooling(
        tmp_path, tiny_task_model):
    import shutil

    from edgetl.errors import ArchitectureError
    from edgetl.modeling import new_embedder
    from edgetl.models import sentence_transformers_setup

    both = st_folder(tmp_path / "both", {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, False)
    assert sentence_transformers_setup(str(both)) == {"pooling": "mean+max", "normalize": False}
    folder = tmp_path / "max-pooled"
    shutil.copytree(tiny_task_model, folder)
    st_folder(folder, {"pooling_mode_max_tokens": True}, True)
    with pytest.raises(ArchitectureError, match=r"pools by 'max', and edgetl pools by mean or cls only: set "
                                                r"stages\.pretrained\.pooling"):
        new_embedder(str(folder))
    model, _ = new_embedder(str(folder), pooling="mean")
    assert model.config.sentence_pooling == "mean" and model.config.sentence_normalize is True


@pytest.mark.parametrize("pooling, normalize", [("mean", True), ("cls", False)])
def test_the_files_edgetl_writes_read_back_as_the_same_pooling_and_normalisation(tmp_path, pooling, normalize):
    from edgetl.models import sentence_transformers_setup, write_sentence_transformers_files

    write_sentence_transformers_files(tmp_path, pooling, normalize, 32, 48)
    assert sentence_transformers_setup(str(tmp_path)) == {"pooling": pooling, "normalize": normalize}
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == 48


# --- the pretrained stage, the quantize gate, the bundle --------------------------------------------------------------------

GATED = [{"stage": "pretrained"}, {"stage": "export", "formats": ["onnx"]},
         {"stage": "quantize", "backends": ["onnx"], "onnx_method": "dynamic", "calibration_samples": 8,
          "fidelity_samples": 40},
         {"stage": "evaluate"}, {"stage": "bundle", "backends": ["onnx"]}]


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory, tiny_task_model, stsb_slice, quiet_cwd) -> Path:
    from edgetl.pipeline import run_recipe

    folder = tmp_path_factory.mktemp("gated")
    recipe = embedding_recipe(folder, tiny_task_model, {"dataset": "stsb", "path": str(stsb_slice)}, GATED)
    run_recipe(load_recipe(str(recipe)), folder / "run")
    return folder / "run"


def test_the_pretrained_stage_saves_the_checkpoint_mean_pooled_as_sentence_transformers_reads_it(gated_run):
    from edgetl.models import sentence_transformers_setup

    manifest = json.loads((gated_run / "01-pretrained" / "manifest.json").read_text())
    assert manifest["kind"] == "pytorch-model" and manifest["precision"] == "fp32"
    # The tiny checkpoint has no sentence-transformers files: mean pooling, no normalisation.
    assert {k: manifest["metrics"][k] for k in ("pooling", "normalize", "dimension")} == {
        "pooling": "mean", "normalize": False, "dimension": 32}
    config = json.loads((gated_run / "01-pretrained" / "config.json").read_text())
    assert config["architectures"] == ["BertForSentenceEmbedding"] and config["sentence_pooling"] == "mean"
    assert sentence_transformers_setup(str(gated_run / "01-pretrained")) == {"pooling": "mean", "normalize": False}


def test_int8_that_stays_close_to_fp32_ships_with_its_measured_fidelity(gated_run):
    model = json.loads((gated_run / "03-quantize" / "manifest.json").read_text())["models"]["onnx"]
    assert model["precision"] == "int8" and "int8_rejected" not in model
    assert model["fidelity"]["texts"] == 40 and 0.99 <= model["fidelity"]["cosine_p1"] <= model["fidelity"]["cosine_mean"]


def test_int8_under_min_cosine_is_replaced_by_the_fp32_model_and_the_manifest_says_why(gated_run, tmp_path, quiet_cwd):
    from conftest import copy_run
    from edgetl.pipeline import run_recipe

    run_dir = copy_run(gated_run, tmp_path / "run")
    recipe = load_recipe(str(gated_run / "recipe.resolved.yaml"),
                         ["stages.quantize.min_cosine=1.0", "stages.quantize.min_cosine_p1=1.0"])
    run_recipe(recipe, run_dir)
    manifest = json.loads((run_dir / "03-quantize" / "manifest.json").read_text())
    model = manifest["models"]["onnx"]
    assert model["precision"] == "fp32" and model["path"] == "onnx/model.onnx"
    rejected = model["int8_rejected"]
    assert rejected["precision"] == "int8" and rejected["method"] == "dynamic"
    assert rejected["fidelity"]["cosine_p1"] < 1.0 and rejected["fidelity"]["texts"] == 40
    exported = json.loads((run_dir / "02-export" / "manifest.json").read_text())["models"]["onnx"]["path"]
    assert (run_dir / "03-quantize" / "onnx" / "model.onnx").read_bytes() == (run_dir / "02-export" / exported).read_bytes()


def edgetl_vectors(folder: Path, texts: list[str], max_length: int) -> np.ndarray:
    """The FP32 model's vectors as the evaluate stage computes them (TorchEngine, the runtime's tokenizer)."""
    from edgetl.backends import TorchEngine
    from edgetl.runtime.text import load_tokenizer, predict_outputs

    engine = TorchEngine(folder, task=TASK)
    return np.stack(predict_outputs(engine, load_tokenizer(folder, max_length), texts, 8)[0])


def assert_same_directions(found: np.ndarray, expected: np.ndarray, min_cosine: float = 0.9999) -> None:
    cosine = (found * expected).sum(1) / (np.linalg.norm(found, axis=1) * np.linalg.norm(expected, axis=1))
    assert found.shape == expected.shape and cosine.min() >= min_cosine, cosine.min()


def test_sentence_transformers_loads_the_pretrained_folder_and_embeds_as_edgetl_does(gated_run, stsb_slice):
    sentence_transformers = pytest.importorskip("sentence_transformers")

    folder = gated_run / "01-pretrained"
    rows = [json.loads(line) for line in (stsb_slice / "dev.jsonl").read_text().splitlines()[:12]]
    texts = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    assert model.max_seq_length == 48
    found = model.encode(texts, batch_size=8, convert_to_numpy=True)
    expected = edgetl_vectors(folder, texts, 48)
    assert_same_directions(found, expected)
    np.testing.assert_allclose(found, expected, atol=1e-4, rtol=0)  # no Normalize module: the same lengths too


def test_the_bundle_embeds_one_text_at_a_time_as_the_evaluate_stage_did(gated_run, stsb_slice):
    from edgetl.runtime import Embedder, load

    bundle = gated_run / "05-bundle"
    manifest = json.loads((bundle / "edgetl.json").read_text())
    # STS-B names a second text, but an embedding model reads each text alone: the bundle takes single texts.
    assert manifest["text_pair"] is False and manifest["embedding"] == {"dimension": 32, "pooling": "mean",
                                                                         "normalize": False}
    embedder = load(bundle)
    assert isinstance(embedder, Embedder)
    rows = [json.loads(line) for line in (stsb_slice / "dev.jsonl").read_text().splitlines()]
    texts = [row["sentence1"] for row in rows] + [row["sentence2"] for row in rows]
    evaluated = np.load(gated_run / "04-evaluate" / "logits-03-quantize-onnx.npy")
    np.testing.assert_allclose(embedder.embed(texts), evaluated, atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match=r"texts\[0\] is a \(text, text_pair\) pair, but this bundle's model reads "
                                        r"single texts"):
        embedder.embed([("a man", "a woman")])

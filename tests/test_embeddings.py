"""Sentence embeddings at run time: ``Embedder``'s vectors are the ones the evaluate stage scored, ``edgetl embed``
writes them as a .npy array, and the semantic-search example finds neighbours with them.

The bundle is ``tiny_embedding_bundle`` (conftest): a tiny BERT from a config, mean-pooled and L2-normalised, built in
seconds.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO
from edgetl.errors import UsageError


@pytest.fixture(scope="module")
def stsb_columns(stsb_slice) -> dict[str, list]:
    rows = [json.loads(line) for line in (stsb_slice / "dev.jsonl").read_text().splitlines()]
    return {"text": [r["sentence1"] for r in rows], "text_pair": [r["sentence2"] for r in rows],
            "label": [r["score"] for r in rows]}


@pytest.fixture(scope="module")
def embedder(tiny_embedding_bundle):
    from edgetl.runtime import Embedder

    return Embedder.load(tiny_embedding_bundle, backend="onnxruntime")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_embedder_vectors_are_the_evaluate_stages_on_every_input(tiny_embedding_bundle, stsb_columns, backend):
    from edgetl.runtime import Embedder
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_outputs
    from edgetl.tasks import task_for

    task = task_for("sentence-embedding")
    inputs = task.examples(stsb_columns)  # every first text, then every second text
    manifest = json.loads((tiny_embedding_bundle / "edgetl.json").read_text())
    outputs, _ = predict_outputs(open_engine("onnx", tiny_embedding_bundle / "onnx" / "model.onnx"),
                                 load_tokenizer(tiny_embedding_bundle, manifest["max_length"]), inputs,
                                 batch_size_for(True), task.pretokenized)
    expected = np.stack(outputs)
    embedder = Embedder.load(tiny_embedding_bundle, backend=backend)
    vectors = embedder.embed(inputs)
    assert vectors.dtype == np.float32 and vectors.shape == (len(inputs), manifest["embedding"]["dimension"])
    assert _cosines(vectors, expected).min() >= 0.9999
    # The same metric the evaluate stage reports, from the runtime's vectors.
    assert task.score(list(vectors), None, stsb_columns, None)["spearman"] == pytest.approx(
        task.score(outputs, None, stsb_columns, None)["spearman"], abs=0.5)


def test_normalised_vectors_have_unit_length_and_one_text_gives_its_row(embedder, stsb_columns):
    texts = stsb_columns["text"] + ["", "   ", "\ud800 lone surrogate", "word " * 500]
    vectors = embedder.embed(texts)
    assert embedder.normalize and embedder.text_pair is False
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cosines(embedder.predict_one(texts[3])[None], vectors[3:4])[0] >= 0.9999
    assert embedder.embed([]).shape == (0, embedder.dimension)
    assert embedder.to_json(vectors[0]) == {"embedding": [float(x) for x in vectors[0]]}


def test_an_embedder_takes_single_texts_though_its_recipe_scores_pairs(tiny_embedding_bundle):
    from edgetl.runtime import load

    embedder = load(tiny_embedding_bundle, backend="onnxruntime")
    assert embedder.text_pair is False and embedder.embed(["a man", "a dog"]).shape == (2, embedder.dimension)
    with pytest.raises(TypeError, match=r"texts\[0\] is a \(text, text_pair\) pair, but this bundle's model reads single"):
        embedder.embed([("a", "b")])


# --- edgetl embed ---------------------------------------------------------------------------------------------

def _embed(bundle: Path, source: Path, target: Path, *options: str) -> int:
    from edgetl.cli import main

    return main(["--debug", "embed", str(bundle), "--input", str(source), "--output", str(target),
                 "--backend", "onnxruntime", *options])


def test_cli_embed_writes_one_float32_row_per_text_of_a_txt_or_jsonl_file(tiny_embedding_bundle, embedder, tmp_path,
                                                                         capsys):
    texts = ["A man is playing a flute.", "", "A dog \u2028runs.", "Caf\u00e9 \U0001f3ac"]
    (tmp_path / "in.txt").write_text("\r\n".join(texts) + "\n", encoding="utf-8")
    assert _embed(tiny_embedding_bundle, tmp_path / "in.txt", tmp_path / "txt.npy", "--batch-size", "2") == 0
    vectors = np.load(tmp_path / "txt.npy")
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), embedder.dimension)
    np.testing.assert_allclose(vectors, embedder.embed(texts), atol=1e-6)
    assert "wrote 4 vectors of 32 float32 values" in capsys.readouterr().err
    rows = [json.dumps({"body": text, "id": i}, ensure_ascii=False) for i, text in enumerate(texts)]
    (tmp_path / "in.jsonl").write_text("\n".join(rows[:2]) + "\n\n" + "\n".join(rows[2:]) + "\n", encoding="utf-8")
    assert _embed(tiny_embedding_bundle, tmp_path / "in.jsonl", tmp_path / "jsonl.npy", "--field", "body") == 0
    np.testing.assert_array_equal(np.load(tmp_path / "jsonl.npy"), vectors)
    (tmp_path / "empty.txt").write_text("")
    assert _embed(tiny_embedding_bundle, tmp_path / "empty.txt", tmp_path / "empty.npy") == 0
    assert np.load(tmp_path / "empty.npy").shape == (0, embedder.dimension)


@pytest.mark.parametrize("name, content, message", [
    ("in.jsonl", '{"text": "a"}\n\n{"body": "b"}\n', "in.jsonl:3: expected a string or an object with a string 'text' "
                                                     "(its keys: body)"),
    ("in.jsonl", '"a"\n{"text": 3}\n', "in.jsonl:2: expected a string or an object with a string 'text'"),
    ("in.jsonl", '"a"\n{not json\n', "in.jsonl:2: not valid JSON"),
    ("in.jsonl", '{"text": "a", "text_pair": "b"}\n', "in.jsonl:1: 'text_pair' given, but this bundle's model reads"),
    ("in.txt", b"fine\nalso fine\n\xff broken\n", "in.txt:3: not UTF-8"),
    ("in.csv", "a,b\n", "in.csv: expected a .jsonl file"),
    ("absent.txt", None, "--input: file not found"),
])
def test_cli_embed_names_the_file_and_line_of_bad_input_and_writes_nothing(tiny_embedding_bundle, tmp_path, name,
                                                                           content, message):
    source = tmp_path / name
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        _embed(tiny_embedding_bundle, source, tmp_path / "out.npy")
    assert not any(p.suffix in (".npy", ".tmp") for p in tmp_path.iterdir())


def test_cli_embed_refuses_bad_options_before_loading(tiny_embedding_bundle, tmp_path):
    (tmp_path / "in.txt").write_text("a\n")
    with pytest.raises(UsageError, match=r"--output: .*out.json: the vectors are written as a NumPy .npy file"):
        _embed(tiny_embedding_bundle, tmp_path / "in.txt", tmp_path / "out.json")
    with pytest.raises(UsageError, match=r"--batch-size: 0 is not a positive integer"):
        _embed(tiny_embedding_bundle, tmp_path / "in.txt", tmp_path / "out.npy", "--batch-size", "0")


def test_cli_predict_prints_an_embedding_bundles_vectors(tiny_embedding_bundle, embedder, capsys):
    from edgetl.cli import main

    assert main(["predict", str(tiny_embedding_bundle), "a man", "a dog", "--backend", "onnxruntime"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1] for line in lines] == ["a man", "a dog"]
    printed = np.array([[float(x) for x in line.split("\t")[0].split()] for line in lines])
    np.testing.assert_allclose(printed, embedder.embed(["a man", "a dog"]), atol=1e-5)


# --- examples/semantic_search.py ------------------------------------------------------------------------------

def test_the_semantic_search_example_indexes_a_folder_and_finds_each_sentence_first(tiny_embedding_bundle,
                                                                                   stsb_columns, tmp_path):
    example = REPO / "examples" / "semantic_search.py"
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sentences = list(dict.fromkeys(stsb_columns["text"]))[:20]
    (corpus / "a.txt").write_text("\n".join(sentences[:12]) + "\n\n")
    (corpus / "b.txt").write_text("\n".join(sentences[12:]) + "\n")

    def run(*args: str) -> str:
        done = subprocess.run([sys.executable, str(example), *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    run("index", str(tiny_embedding_bundle), str(corpus), "--out", str(tmp_path / "index"))
    assert np.load(tmp_path / "index" / "vectors.npy").shape[0] == len(sentences)
    for query in (sentences[3], sentences[15]):
        lines = run("query", str(tiny_embedding_bundle), str(tmp_path / "index"), query, "-k", "3").splitlines()
        assert len(lines) == 3
        score, found = lines[0].split("\t", 1)
        assert found == query and float(score) == pytest.approx(1.0, abs=1e-4)
        assert [float(line.split("\t")[0]) for line in lines] == sorted((float(line.split("\t")[0]) for line in lines),
                                                                       reverse=True)

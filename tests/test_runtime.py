"""The app runtime: torch-free, the CLI predicts, and it agrees with what the evaluate stage measured."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, edgetl_cli
from edgetl.errors import UsageError

HEAVY = ("torch", "transformers", "optimum", "nncf", "datasets")


def run_python(code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=180)


def test_importing_the_runtime_never_imports_torch(tmp_path):
    done = run_python("import edgetl.runtime, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules",
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr


_LOAD_AND_PREDICT = f"""
import sys
from edgetl.runtime import TextClassifier
classifier = TextClassifier.load(sys.argv[1], backend=sys.argv[2])
assert classifier.backend == {{"onnxruntime": "onnx"}}.get(sys.argv[2], sys.argv[2])
predictions = classifier.predict(["a gorgeous , witty film", "dull and lifeless"])
assert len(predictions) == 2
heavy = [m for m in {HEAVY!r} if m in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_loading_a_bundle_and_predicting_never_imports_torch(tiny_run, tmp_path, backend):
    done = run_python(_LOAD_AND_PREDICT, str(tiny_run / "06-bundle"), backend, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_cli_predict_prints_one_line_per_text(tiny_run, tmp_path):
    texts = ["a gorgeous , witty film", "dull and lifeless", "it 's a movie"]
    done = edgetl_cli("predict", str(tiny_run / "06-bundle"), *texts, "--backend", "onnxruntime", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(texts)
    for line, text in zip(lines, texts, strict=True):
        label, score, echoed = line.split("\t")
        assert label in ("negative", "positive") and 0.5 <= float(score) <= 1.0 and echoed == text


def test_cli_predict_without_texts(tiny_run):
    from edgetl.cli import main

    with pytest.raises(UsageError, match="predict: give texts on the command line or --input FILE.jsonl"):
        main(["--debug", "predict", str(tiny_run / "06-bundle")])
    assert main(["predict", str(tiny_run / "06-bundle")]) == 2


def test_cli_predict_a_jsonl_file_matches_the_library(tiny_run, tmp_path):
    import json

    from edgetl.runtime import TextClassifier

    texts = ["a gorgeous , witty film", "", "dull and lifeless", "\u00e9l\u00e9gant \U0001f3ac", "x " * 3000]
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"text": t} if i % 2 else t) for i, t in enumerate(texts)) + "\n\n")
    target = tmp_path / "out.jsonl"
    done = edgetl_cli("predict", str(tiny_run / "06-bundle"), "--input", str(source), "--output", str(target),
                      "--backend", "onnxruntime", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in target.read_text().splitlines()]
    expected = TextClassifier.load(tiny_run / "06-bundle", backend="onnxruntime").predict(texts)
    assert [r["text"] for r in rows] == texts
    assert [r["label"] for r in rows] == [p.label for p in expected]
    assert all(abs(r["score"] - p.score) < 1e-6 for r, p in zip(rows, expected, strict=True))
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("content, message", [
    ('{"text": "fine"}\n{"text": 3}\n', r"in.jsonl:2: expected a string or an object with a string 'text'"),
    ('"fine"\n{not json\n', r"in.jsonl:2: not valid JSON"),
])
def test_cli_predict_names_the_bad_line_and_writes_nothing(tiny_run, tmp_path, content, message):
    from edgetl.cli import main

    (tmp_path / "in.jsonl").write_text(content)
    target = tmp_path / "out.jsonl"
    with pytest.raises(UsageError, match=message):
        main(["--debug", "predict", str(tiny_run / "06-bundle"), "--input", str(tmp_path / "in.jsonl"),
              "--output", str(target)])
    assert not target.exists()


def test_cli_predict_on_a_folder_that_is_not_a_bundle(tmp_path):
    done = edgetl_cli("predict", str(tmp_path), "some text", cwd=tmp_path, timeout=120)
    assert done.returncode == 1
    assert "edgetl: error:" in done.stderr and "not an edgetl bundle" in done.stderr and "Traceback" not in done.stderr


def test_cli_bench_on_a_path_that_is_no_artifact(tmp_path):
    from edgetl.cli import main

    with pytest.raises(UsageError, match="neither an artifact folder, a bundle nor a run folder"):
        main(["--debug", "bench", str(tmp_path / "missing")])


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_runtime_agrees_with_the_evaluate_stage(tiny_run, dev_texts, backend):
    from edgetl.runtime import TextClassifier

    saved = np.load(tiny_run / "04-evaluate" / f"logits-03-quantize-{backend}.npy")
    classifier = TextClassifier.load(tiny_run / "06-bundle", backend=backend)
    rows = json.loads((tiny_run / "04-evaluate" / "evaluation.json").read_text())
    evaluated = next(r for r in rows if r["target"] == f"{backend}-int8 (03-quantize)")
    # The runtime batches as the evaluate stage did (one text per call for a batch-dependent model), so the
    # same engine must give the same logits.
    assert classifier.batch_size == evaluated["batch_size"]
    np.testing.assert_allclose(classifier.logits(dev_texts), saved, rtol=0, atol=1e-5)
    predicted = [p.label for p in classifier.predict(dev_texts)]
    assert predicted == [classifier.labels[i] for i in saved.argmax(axis=-1)]


def test_a_model_with_per_call_activation_ranges_classifies_each_text_alone(tiny_run, dev_texts):
    """The tiny run's ONNX model has dynamic INT8 FFN down-projections: batch-mates would move its logits."""
    from edgetl.backends import per_call_activation_scales
    from edgetl.runtime import TextClassifier

    bundle = tiny_run / "06-bundle"
    models = json.loads((bundle / "edgetl.json").read_text())["models"]
    assert per_call_activation_scales(bundle / models["onnx"]["path"])
    assert models["onnx"]["batch_invariant"] is False and models["openvino"]["batch_invariant"] is True
    classifier = TextClassifier.load(bundle, backend="onnx")
    assert classifier.batch_size == 1
    batched = classifier.logits(dev_texts, batch_size=32)
    alone = np.concatenate([classifier.logits([t]) for t in dev_texts])
    assert not np.allclose(batched, alone, rtol=0, atol=1e-6), "batching no longer changes this model's logits"
    reordered = np.random.default_rng(0).permutation(len(dev_texts))
    np.testing.assert_array_equal(classifier.logits(dev_texts), alone)
    np.testing.assert_array_equal(classifier.logits([dev_texts[i] for i in reordered]), alone[reordered])


def test_predict_validates_its_input(tiny_run):
    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(tiny_run / "06-bundle", backend="onnxruntime")
    with pytest.raises(TypeError, match="predict takes a list of strings; use predict_one"):
        classifier.predict("a single string")
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not str"):
        classifier.predict(["fine", 3])
    assert classifier.predict([]) == []
    one = classifier.predict_one("a gorgeous , witty film")
    assert one == classifier.predict(["a gorgeous , witty film"])[0]


def test_predictions_do_not_depend_on_batching(tiny_run, dev_texts, tmp_path):
    import shutil

    from edgetl.runtime import TextClassifier

    # The FP32 model in the bundle's place: INT8 kernels may round a value to the next step when the batch shape
    # changes, FP32 does not, so any difference here comes from how the runtime batches, pads and reorders.
    bundle = shutil.copytree(tiny_run / "06-bundle", tmp_path / "bundle")
    shutil.copy2(tiny_run / "02-export" / "onnx" / "model.onnx", bundle / "onnx" / "model.onnx")
    classifier = TextClassifier.load(bundle, backend="onnxruntime", verify=False)
    texts = dev_texts[:40]
    batched = classifier.logits(texts, batch_size=16)
    single = np.concatenate([classifier.logits([t]) for t in texts])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-5)
    reordered = single[np.random.default_rng(0).permutation(len(texts))]
    assert not np.allclose(batched, reordered, rtol=0, atol=1e-5), "rows too alike for this test to see a mix-up"


def test_auto_backend_prefers_openvino_when_installed(tiny_run):
    from edgetl.runtime import TextClassifier

    assert TextClassifier.load(tiny_run / "06-bundle").backend == "openvino"


@pytest.mark.parametrize("backend, package", [("onnx", "onnxruntime"), ("openvino", "openvino")])
def test_missing_runtime_says_what_to_install(tiny_run, monkeypatch, backend, package):
    from edgetl.errors import MissingDependencyError
    from edgetl.runtime.engines import open_engine

    monkeypatch.setitem(sys.modules, package, None)  # what an environment without the package looks like
    model = tiny_run / "06-bundle" / ("onnx/model.onnx" if backend == "onnx" else "openvino/model.xml")
    with pytest.raises(MissingDependencyError, match=rf"the .* backend needs the '{package}' package; install it with: pip install"):
        open_engine(backend, model)


@pytest.mark.parametrize("backend", ["onnx", "openvino"])
def test_install_hints_name_an_extra_that_exists(tiny_run, monkeypatch, backend):
    import re

    tomllib = pytest.importorskip("tomllib")
    from conftest import REPO
    from edgetl.errors import MissingDependencyError
    from edgetl.runtime.engines import open_engine

    monkeypatch.setitem(sys.modules, {"onnx": "onnxruntime", "openvino": "openvino"}[backend], None)
    model = tiny_run / "06-bundle" / ("onnx/model.onnx" if backend == "onnx" else "openvino/model.xml")
    with pytest.raises(MissingDependencyError) as excinfo:
        open_engine(backend, model)
    extra = re.search(r"edgetl\[(\w+)\]", str(excinfo.value)).group(1)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extra in extras, f"'{extra}' is not an extra of edgetl (extras: {sorted(extras)})"


def test_the_example_app_is_short_and_classifies_with_a_bundle(tiny_run, tmp_path):
    example = REPO / "examples" / "classify.py"
    assert len(example.read_text().splitlines()) < 30
    done = subprocess.run([sys.executable, str(example), str(tiny_run / "06-bundle"), "a witty film", "dull"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    labels = [line.split("\t")[0] for line in done.stdout.splitlines()]
    assert len(labels) == 2 and set(labels) <= {"negative", "positive"}


def _fuzz_texts(count: int, seed: int = 0) -> list[str]:
    """Generated inputs: random code points (controls, combining marks, emoji, lone surrogates), whitespace,
    empty strings, repeated words, and texts far longer than max_length."""
    import random

    rng = random.Random(seed)
    words = ["film", "witty", "dull", "not", "a", "movie", ",", "!", "'s"]
    makers = [
        lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(0, 40))),
        lambda: "".join(chr(rng.choice([rng.randrange(0, 0x20), rng.randrange(0xD800, 0xE000), rng.randrange(0x1F300, 0x1FAFF),
                                       rng.randrange(0x300, 0x370)])) for _ in range(rng.randrange(1, 20))),
        lambda: rng.choice(["", " ", "\t\n", "\u00a0\u2003", "\x00"]),
        lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(1, 60))),
        lambda: "word " * rng.randrange(200, 4000),
    ]
    return [rng.choice(makers)() for _ in range(count)]


def _valid_predictions(classifier, texts: list[str], predictions: list) -> None:
    for prediction in predictions:
        assert prediction.label in classifier.labels and 0.0 <= prediction.score <= 1.0
        assert abs(sum(prediction.scores.values()) - 1.0) < 1e-5 and prediction.score == max(prediction.scores.values())
    # The batch did not change the answers: a sample predicted one at a time agrees.
    for index in range(0, len(texts), 97):
        alone = classifier.predict_one(texts[index])
        # INT8 kernels differ by batch shape, so a value may round to the next step (observed 1.1e-4 on a score).
        assert alone.label == predictions[index].label and abs(alone.score - predictions[index].score) < 1e-3


def _valid_vectors(embedder, texts: list[str], vectors: list) -> None:
    stacked = np.stack(vectors)
    assert stacked.dtype == np.float32 and stacked.shape == (len(texts), embedder.dimension)
    assert np.isfinite(stacked).all()
    np.testing.assert_allclose(np.linalg.norm(stacked, axis=1), 1.0, atol=1e-5)  # the tiny bundle normalises
    # The batch did not change the answers: a sample embedded one at a time points the same way.
    for index in range(0, len(texts), 97):
        assert float(embedder.predict_one(texts[index]) @ stacked[index]) >= 0.9999


# Runtime -> (the fixture that gives its bundle, the folder in it, the check of its results).
FUZZED = {"TextClassifier": ("tiny_run", "06-bundle", _valid_predictions),
          "Embedder": ("tiny_embedding_bundle", ".", _valid_vectors)}


@pytest.mark.parametrize("runtime_name", FUZZED)
def test_fuzz_ten_thousand_generated_inputs_give_valid_results(request, runtime_name):
    import edgetl.runtime

    fixture, folder, check = FUZZED[runtime_name]
    runtime = getattr(edgetl.runtime, runtime_name).load(request.getfixturevalue(fixture) / folder, backend="onnxruntime")
    texts = _fuzz_texts(10_000)
    results = runtime.predict(texts)  # one call with all 10,000: batched by length inside
    assert len(results) == len(texts)
    check(runtime, texts, results)


def test_lone_surrogates_are_replaced_not_fatal(tiny_run):
    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(tiny_run / "06-bundle", backend="onnxruntime")
    assert classifier.predict_one("a witty \ud800 film") == classifier.predict_one("a witty \ufffd film")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_one_classifier_serves_many_threads(tiny_run, dev_texts, backend):
    from concurrent.futures import ThreadPoolExecutor

    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(tiny_run / "06-bundle", backend=backend)
    chunks = [dev_texts[i:i + 7] for i in range(0, len(dev_texts), 7)] * 4
    expected = [classifier.predict(chunk) for chunk in chunks]
    with ThreadPoolExecutor(max_workers=16) as pool:
        got = list(pool.map(classifier.predict, chunks))
    assert [[p.label for p in ps] for ps in got] == [[p.label for p in ps] for ps in expected]
    assert all(abs(a.score - b.score) < 1e-5 for ps, qs in zip(got, expected, strict=True) for a, b in zip(ps, qs, strict=True))


def test_a_one_megabyte_text_is_truncated_to_max_length(tiny_run):
    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(tiny_run / "06-bundle", backend="onnxruntime")
    huge = "a witty film " * 80_000  # ~1 MB
    assert len(huge.encode()) > 1_000_000
    head = "a witty film " * 200  # already longer than max_length: cut to the same tokens
    ids = classifier.tokenizer.encode(huge).ids
    assert len(ids) == classifier.manifest["max_length"] and classifier.tokenizer.encode(head).ids == ids
    np.testing.assert_array_equal(classifier.logits([huge]), classifier.logits([head]))

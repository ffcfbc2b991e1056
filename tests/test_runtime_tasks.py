"""Runtimes for every task: ``edgetl.runtime.load`` picks the task's runtime; TokenClassifier's entities and word tags,
TextRegressor's scores and pair classification agree with the engine's own outputs and with what the evaluate stage
scores; ``edgetl predict`` and ``edgetl serve`` take and answer each task's inputs.

The bundles are tiny BERTs built from configs (random weights), exported with the export stage's own functions and
described by an ``edgetl.json`` written as the bundle stage writes it; building all three takes seconds.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, write_tiny_bundle
from edgetl.errors import ArtifactError, UsageError

sys.path.insert(0, str(REPO / "benchmarks"))
from serve_load import request, start_server, stop_server  # noqa: E402

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
MAX_LENGTH = 32  # CoNLL's longer sentences run past it, so truncation is exercised
PAIRS = [("A man is playing a flute.", "A man plays the flute."), ("A dog runs.", "The cat is asleep on the sofa."),
         ("", "An empty first text."), ("A plane is taking off.", "A plane is taking off.")]
TEXTS = ["Peter Blackburn visited London on Friday", "EU  rejects German call to boycott British lamb .",
         "West \ud800 Indian all-rounder Phil Simmons", "Jos\u00e9 \ud83c\udfac Leicestershire beat Somerset", "", "   "]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_task_model, tiny_embedding_bundle) -> dict[str, Path]:
    """'tokens' (NER tags), 'regression' (a score per pair), 'pairs' (two labels per pair) and 'embedding' (a vector
    per text) bundles."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    root = tmp_path_factory.mktemp("task-bundles")
    made = {}
    cases = {"tokens": (BertForTokenClassification, "token-classification", TAGS, False),
             "regression": (BertForSequenceClassification, "text-regression", [], True),
             "pairs": (BertForSequenceClassification, "text-classification", ["different", "same"], True)}
    for name, (head, task, labels, text_pair) in cases.items():
        names = labels or ["score"]
        config = BertConfig.from_pretrained(str(tiny_task_model), num_labels=len(names), id2label=dict(enumerate(names)),
                                            label2id={label: i for i, label in enumerate(names)})
        torch.manual_seed(0)
        model = head(config).eval()
        made[name] = write_tiny_bundle(root / name, model, task, labels, text_pair, tiny_task_model, MAX_LENGTH)
    return made | {"embedding": tiny_embedding_bundle}


@pytest.fixture(scope="module")
def sentences(conll_slice) -> list[dict]:
    return [json.loads(line) for line in (conll_slice / "dev.jsonl").read_text().splitlines()]


def _session(bundle: Path):
    """An ONNX Runtime session of the bundle's model, opened apart from the runtime under test."""
    import onnxruntime as ort

    return ort.InferenceSession(str(bundle / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])


def _alone(session, encoding) -> np.ndarray:
    """One input's logits, run alone (no padding, no batch-mates)."""
    feeds = {"input_ids": [encoding.ids], "attention_mask": [encoding.attention_mask], "token_type_ids": [encoding.type_ids]}
    return session.run(["logits"], {k: np.asarray(v, dtype=np.int64) for k, v in feeds.items()})[0][0]


def _edit_manifest(bundle: Path, target: Path, **changes) -> Path:
    copy = Path(shutil.copytree(bundle, target))
    manifest = json.loads((copy / "edgetl.json").read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key)
        else:
            manifest[key] = value
    (copy / "edgetl.json").write_text(json.dumps(manifest))
    return copy


# --- load: the runtime the task declares ---------------------------------------------------------------------

@pytest.mark.parametrize("name, runtime", [("tokens", "TokenClassifier"), ("regression", "TextRegressor"),
                                           ("pairs", "TextClassifier"), ("embedding", "Embedder")])
def test_load_returns_the_runtime_that_the_bundles_task_declares(bundles, name, runtime):
    import edgetl.runtime
    from edgetl.tasks import task_for

    loaded = edgetl.runtime.load(bundles[name], backend="onnxruntime")
    manifest = json.loads((bundles[name] / "edgetl.json").read_text())
    assert type(loaded).__name__ == runtime == task_for(manifest["task"]).runtime
    assert type(loaded) is getattr(edgetl.runtime, runtime) and loaded.task == manifest["task"]
    assert loaded.text_pair is manifest["text_pair"] and loaded.labels == manifest["labels"]


_LOAD_EVERY_TASK = """
import sys
from edgetl.runtime import load
for folder in sys.argv[1:]:
    runtime = load(folder, backend="onnxruntime")
    items = [("a man", "a dog")] if runtime.text_pair else ["Peter visited London"]
    assert len(runtime.predict(items)) == 1
    if runtime.takes_words:
        assert len(runtime.predict_words([["Peter", "visited"]])) == len(runtime.tags_words([["Peter"]])) == 1
heavy = [m for m in ("torch", "transformers", "optimum", "nncf", "datasets") if m in sys.modules]
assert not heavy, heavy
"""


def test_loading_and_predicting_with_every_task_never_imports_torch(bundles, tmp_path):
    import subprocess

    done = subprocess.run([sys.executable, "-c", _LOAD_EVERY_TASK, *map(str, bundles.values())], cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr


def test_a_bundle_without_task_or_text_pair_loads_as_single_text_classification(bundles, tmp_path):
    from edgetl.runtime import TextClassifier, load

    old = _edit_manifest(bundles["pairs"], tmp_path / "old", task=None, text_pair=None)
    classifier = load(old, backend="onnxruntime")
    assert type(classifier) is TextClassifier and classifier.task == "text-classification"
    assert classifier.text_pair is False
    assert classifier.predict_one("a man plays").label in ("different", "same")


@pytest.mark.parametrize("task, shown", [("summarization", "'summarization'"), (["a", "list"], r"\['a', 'list'\]")])
def test_a_bundle_of_an_unknown_task_is_refused_naming_it(bundles, tmp_path, task, shown):
    from edgetl.runtime import load

    odd = _edit_manifest(bundles["pairs"], tmp_path / "odd", task=task)
    with pytest.raises(ArtifactError, match=rf"task {shown} is not one this edgetl serves \(it serves text-classification"):
        load(odd)


@pytest.mark.parametrize("runtime, name, served_by", [("TextClassifier", "tokens", "TokenClassifier"),
                                                      ("TokenClassifier", "regression", "TextRegressor"),
                                                      ("TextRegressor", "pairs", "TextClassifier"),
                                                      ("Embedder", "pairs", "TextClassifier"),
                                                      ("TextClassifier", "embedding", "Embedder")])
def test_a_runtime_refuses_a_bundle_of_another_task(bundles, runtime, name, served_by):
    import edgetl.runtime

    with pytest.raises(ArtifactError, match=rf"bundle is served by {served_by}, not {runtime}: load it with edgetl.runtime.load"):
        getattr(edgetl.runtime, runtime).load(bundles[name], backend="onnxruntime")


def test_a_regression_model_with_more_than_one_output_is_refused(bundles, tmp_path):
    from edgetl.runtime import TextRegressor

    copy = Path(shutil.copytree(bundles["regression"], tmp_path / "two"))
    config = json.loads((copy / "onnx" / "config.json").read_text())
    config["id2label"] = {"0": "a", "1": "b"}
    (copy / "onnx" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match=r"a score is one output per text, but the model has 2 \(config.json\)"):
        TextRegressor.load(copy, backend="onnxruntime", verify=False)


# --- token classification -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tagger(bundles):
    from edgetl.runtime import TokenClassifier

    return TokenClassifier.load(bundles["tokens"], backend="onnxruntime")


def test_entities_of_texts_index_the_callers_string_and_match_the_engine(tagger, bundles):
    from edgetl.runtime.entities import entities_from_logits
    from edgetl.runtime.text import load_tokenizer

    session, tokenizer = _session(bundles["tokens"]), load_tokenizer(bundles["tokens"], MAX_LENGTH)
    found = tagger.predict(TEXTS)
    assert len(found) == len(TEXTS) and sum(map(len, found)) >= 4, "too few entities for this test to see anything"
    for text, entities in zip(TEXTS, found, strict=True):
        for entity in entities:
            assert entity.text == text[entity.start:entity.end] and entity.type in {t[2:] for t in TAGS[1:]}
        # Lone surrogates (one U+FFFD each, so offsets keep their place) are what the engine saw.
        clean = "".join("\ufffd" if 0xD800 <= ord(c) < 0xE000 else c for c in text)
        encoding = tokenizer.encode(clean)
        expected = entities_from_logits(_alone(session, encoding), encoding.offsets, encoding.word_ids, text, TAGS)
        assert [(e.type, e.start, e.end, e.text) for e in entities] == [(e.type, e.start, e.end, e.text) for e in expected]
        np.testing.assert_allclose([e.score for e in entities], [e.score for e in expected], atol=1e-5, rtol=0)
    assert tagger.predict_one(TEXTS[0]) == found[0] and tagger.predict([]) == []


def test_entities_of_a_text_equal_those_of_its_words(tagger, sentences):
    """With single spaces and no punctuation, a text's words are its space-split words: the same tokens, logits and
    offsets (``" ".join(words)`` is the text)."""
    texts = [" ".join(w for w in s["tokens"] if w.isalnum()) for s in sentences[:12]]
    by_text = tagger.predict(texts)
    assert by_text == tagger.predict_words([text.split(" ") for text in texts])
    assert any(len(e.text.split(" ")) > 1 for entities in by_text for e in entities), "no entity of several words"


def test_word_tags_are_what_the_evaluate_stage_scores(tagger, bundles, sentences):
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.entities import word_labels
    from edgetl.runtime.text import batch_size_for, load_tokenizer, predict_outputs
    from edgetl.tasks import task_for
    from edgetl.tasks.token_classification import entity_scores

    words = [s["tokens"] for s in sentences]
    tags = tagger.tags_words(words)
    assert [len(t) for t in tags] == [len(w) for w in words]
    # As the evaluate stage computes them: the task's inputs, the same batching, the task's own scoring.
    task = task_for("token-classification")
    columns = {"tokens": words, "tags": [[TAGS.index(t) for t in s["tags"]] for s in sentences]}
    outputs, encodings = predict_outputs(open_engine("onnx", bundles["tokens"] / "onnx" / "model.onnx"),
                                         load_tokenizer(bundles["tokens"], MAX_LENGTH), task.examples(columns),
                                         batch_size_for(True), task.pretokenized)
    assert tags == [word_labels(o, e.word_ids, TAGS, num_words=len(w)) for o, e, w in zip(outputs, encodings, words, strict=True)]
    gold = [s["tags"] for s in sentences]
    assert task.score(outputs, encodings, columns, TAGS)["f1"] == entity_scores(gold, tags)["f1"]
    # Each word's tag is the argmax of its first sub-token, from logits of the sentence run alone.
    session, tokenizer = _session(bundles["tokens"]), load_tokenizer(bundles["tokens"], MAX_LENGTH)
    cut = 0
    for sentence, sentence_tags in zip(words, tags, strict=True):
        encoding = tokenizer.encode(sentence, is_pretokenized=True)
        logits = _alone(session, encoding)
        firsts = {w: i for i, w in reversed(list(enumerate(encoding.word_ids))) if w is not None}
        assert [TAGS[int(logits[firsts[w]].argmax())] if w in firsts else "O" for w in range(len(sentence))] == sentence_tags
        cut += len(sentence) - len(firsts)
    assert cut > 0, "no sentence ran past max_length: truncated words were never tagged"


def test_entities_of_words_cover_whole_words_tagged_with_their_type(tagger, sentences):
    words = [s["tokens"] for s in sentences]
    tags = tagger.tags_words(words)
    found = tagger.predict_words(words)
    assert sum(map(len, found)) > 10
    for sentence, sentence_tags, entities in zip(words, tags, found, strict=True):
        joined = " ".join(sentence)
        starts = np.cumsum([0] + [len(w) + 1 for w in sentence[:-1]]).tolist()
        for entity in entities:
            assert entity.text == joined[entity.start:entity.end]
            inside = [i for i, start in enumerate(starts) if entity.start <= start < entity.end]
            assert entity.text == " ".join(sentence[i] for i in inside)
            assert {sentence_tags[i].split("-", 1)[-1] for i in inside} == {entity.type}


def test_a_model_that_is_not_batch_invariant_tags_one_text_per_call(bundles, tmp_path, sentences):
    from edgetl.runtime import TokenClassifier

    models = json.loads((bundles["tokens"] / "edgetl.json").read_text())["models"]
    models["onnx"]["batch_invariant"] = False
    tagger = TokenClassifier.load(_edit_manifest(bundles["tokens"], tmp_path / "dynamic", models=models),
                                  backend="onnxruntime")
    calls = []
    run = tagger.engine.run
    tagger.engine.run = lambda feeds: calls.append(len(feeds["input_ids"])) or run(feeds)
    tagger.tags_words([s["tokens"] for s in sentences[:5]])
    tagger.predict(TEXTS)
    assert tagger.batch_size == 1 and calls == [1] * (5 + len(TEXTS))


def test_token_classifier_names_what_is_wrong_with_its_input(tagger):
    with pytest.raises(TypeError, match=r"texts\[1\] is list, not str: pass pre-split words to predict_words"):
        tagger.predict(["fine", ["New", "York"]])
    with pytest.raises(TypeError, match=r"predict_words takes a list of sentences, each a list of words"):
        tagger.predict_words(["New", "York"])
    with pytest.raises(TypeError, match=r"sentences\[1\]\[2\] is int, not str"):
        tagger.tags_words([["a"], ["New", "York", 3]])
    with pytest.raises(TypeError, match=r"sentences\[0\] is str, not a list of words"):
        tagger.predict_words(["New York", ["a"]])
    assert tagger.predict_words([[]]) == [[]] and tagger.tags_words([[], [""]]) == [[], ["O"]]


def test_a_token_bundle_cut_head_and_tail_is_refused(bundles, tmp_path):
    from edgetl.runtime import load

    cut = _edit_manifest(bundles["tokens"], tmp_path / "cut", truncation="head+tail", head_tokens=8)
    with pytest.raises(ArtifactError, match=r"truncation 'head\+tail' cannot tag words"):
        load(cut, backend="onnxruntime")


def test_openvino_tags_as_onnx_runtime_does(bundles, sentences):
    from edgetl.runtime import TokenClassifier

    words = [s["tokens"] for s in sentences]
    onnx, openvino = (TokenClassifier.load(bundles["tokens"], backend=b) for b in ("onnxruntime", "openvino"))
    assert openvino.backend == "openvino" and openvino.tags_words(words) == onnx.tags_words(words)


# --- regression and pairs -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def regressor(bundles):
    from edgetl.runtime import TextRegressor

    return TextRegressor.load(bundles["regression"], backend="onnxruntime")


def test_regression_scores_are_the_engines_raw_output_for_each_pair(regressor, bundles):
    from edgetl.runtime.text import load_tokenizer

    session, tokenizer = _session(bundles["regression"]), load_tokenizer(bundles["regression"], MAX_LENGTH)
    raw = [float(_alone(session, tokenizer.encode(a, b))[0]) for a, b in PAIRS]
    assert [regressor.predict_one(a, b) for a, b in PAIRS] == raw  # one pair, one call: the same computation
    scores = regressor.predict(PAIRS)
    assert all(isinstance(s, float) for s in scores) and np.allclose(scores, raw, atol=1e-5, rtol=0)
    assert regressor.predict([list(p) for p in PAIRS]) == scores
    assert len(set(np.round(scores, 6))) == len(PAIRS), "the pairs score alike: the test could not see a mix-up"
    assert regressor.predict([]) == []


def test_pair_classification_reads_both_texts_as_segments(bundles):
    from edgetl.runtime import TextClassifier
    from edgetl.runtime.text import load_tokenizer, softmax

    classifier = TextClassifier.load(bundles["pairs"], backend="onnxruntime")
    session, tokenizer = _session(bundles["pairs"]), load_tokenizer(bundles["pairs"], MAX_LENGTH)
    expected = np.stack([_alone(session, tokenizer.encode(a, b)) for a, b in PAIRS])
    assert tokenizer.encode(*PAIRS[0]).type_ids.count(1) > 0
    np.testing.assert_allclose(classifier.logits(PAIRS), expected, atol=1e-5, rtol=0)
    predictions = classifier.predict(PAIRS)
    assert [p.label for p in predictions] == [classifier.labels[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose([p.score for p in predictions], softmax(expected).max(-1), atol=1e-5)
    assert classifier.predict_one(*PAIRS[1]) == classifier.predict([PAIRS[1]])[0]
    # Swapping the texts swaps their segments: a runtime that glued them into one text would not see it.
    assert not np.allclose(classifier.logits([(b, a) for a, b in PAIRS[:2]]), expected[:2], atol=1e-5)


@pytest.mark.parametrize("items, error, message", [
    (["just one text"], TypeError, r"texts\[0\] is a single text, but this bundle's model reads \(text, text_pair\) "
                                   r"pairs: pass a tuple of two strings"),
    ([("a", "b"), ("a", 3)], TypeError, r"texts\[1\] is tuple \('a', 3\), but this bundle's model reads"),
    ([("a", "b", "c")], TypeError, r"texts\[0\] is tuple"),
    (("a", "b"), TypeError, r"predict takes a list of \(text, text_pair\) pairs; use predict_one for a single text"),
    ("a", TypeError, r"predict takes a list of \(text, text_pair\) pairs"),
])
def test_a_pair_bundle_refuses_single_texts_naming_the_index(regressor, items, error, message):
    with pytest.raises(error, match=message):
        regressor.predict(items)


def test_a_single_text_bundle_refuses_pairs_naming_the_index(bundles, tmp_path):
    from edgetl.runtime import load

    single = load(_edit_manifest(bundles["pairs"], tmp_path / "single", text_pair=False), backend="onnxruntime")
    with pytest.raises(TypeError, match=r"texts\[1\] is a \(text, text_pair\) pair, but this bundle's model reads single texts"):
        single.predict(["fine", ("a", "b")])
    with pytest.raises(TypeError, match=r"texts\[0\] is a \(text, text_pair\) pair"):
        single.predict_one("a", "b")


def test_lone_surrogates_in_pairs_are_replaced_not_fatal(regressor):
    assert regressor.predict_one("a \ud800 man", "a man") == regressor.predict_one("a \ufffd man", "a man")


# --- edgetl predict -------------------------------------------------------------------------------------------

def test_cli_predict_reads_a_pair_bundles_texts_two_at_a_time(bundles, regressor, capsys):
    from edgetl.cli import main

    flat = [text for pair in PAIRS[:2] for text in pair]
    assert main(["predict", str(bundles["regression"]), *flat, "--backend", "onnxruntime"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[1:] for line in lines] == [list(p) for p in PAIRS[:2]]
    assert [float(line.split("\t")[0]) for line in lines] == pytest.approx(regressor.predict(PAIRS[:2]), abs=1e-4)
    with pytest.raises(UsageError, match=r"reads \(text, text_pair\) pairs, so texts go two at a time; 3 is an odd count"):
        main(["--debug", "predict", str(bundles["regression"]), *flat[:3]])


def test_cli_predict_prints_the_entities_of_each_text_as_json(bundles, tagger, capsys):
    from edgetl.cli import main

    texts = TEXTS[:2]
    assert main(["predict", str(bundles["tokens"]), *texts, "--backend", "onnxruntime"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(texts)
    for line, text, entities in zip(lines, texts, tagger.predict(texts), strict=True):
        printed, echoed = line.split("\t", 1)
        assert echoed == text and json.loads(printed) == tagger.to_json(entities)["entities"]
        assert all(set(e) == {"type", "score", "start", "end", "text"} for e in json.loads(printed))


def test_cli_predict_jsonl_rows_hold_the_input_and_its_result(bundles, tagger, regressor, tmp_path):
    from edgetl.cli import main

    # TEXTS[2] holds a lone surrogate: echoed back escaped, as UTF-8 cannot hold it.
    rows = [{"text": TEXTS[0]}, {"words": ["Peter", "Blackburn", "visited", "London"]}, TEXTS[2], {"words": []}]
    (tmp_path / "tokens.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["predict", str(bundles["tokens"]), "--input", str(tmp_path / "tokens.jsonl"),
                 "--output", str(tmp_path / "tokens.out"), "--backend", "onnxruntime"]) == 0
    written = [json.loads(line) for line in (tmp_path / "tokens.out").read_text().splitlines()]
    # Texts in one call and word lists in another, as the library batches them when asked the same way.
    by_text, by_words = tagger.predict([TEXTS[0], TEXTS[2]]), tagger.predict_words([rows[1]["words"], []])
    assert written == [{"text": TEXTS[0], **tagger.to_json(by_text[0])},
                       {"words": rows[1]["words"], **tagger.to_json(by_words[0])},
                       {"text": TEXTS[2], **tagger.to_json(by_text[1])}, {"words": [], "entities": []}]
    pairs = [{"text": a, "text_pair": b} for a, b in PAIRS]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs[:3]) + f"\n{json.dumps(PAIRS[3])}\n")
    assert main(["predict", str(bundles["regression"]), "--input", str(tmp_path / "pairs.jsonl"),
                 "--output", str(tmp_path / "pairs.out"), "--backend", "onnxruntime"]) == 0
    written = [json.loads(line) for line in (tmp_path / "pairs.out").read_text().splitlines()]
    assert written == [{**pair, "score": score} for pair, score in zip(pairs, regressor.predict(PAIRS), strict=True)]


@pytest.mark.parametrize("name, content, message", [
    ("regression", '{"text": "a", "text_pair": "b"}\n{"text": "a"}\n',
     "in.jsonl:2: expected an object with a string 'text' and a string 'text_pair'"),
    ("regression", '["a", "b"]\n"a"\n', "in.jsonl:2: expected an object with a string 'text'"),
    ("tokens", '{"words": ["a"]}\n\n{"words": ["a", 3]}\n', "in.jsonl:3: 'words' must be a list of strings"),
    ("tokens", '{"text": ["a"]}\n', "in.jsonl:1: expected a string or an object with a string 'text', or an object "
                                    "with a list of strings 'words'"),
])
def test_cli_predict_names_the_line_a_tasks_input_is_wrong_on(bundles, tmp_path, name, content, message):
    from edgetl.cli import main

    (tmp_path / "in.jsonl").write_text(content)
    with pytest.raises(UsageError, match=re.escape(message)):
        main(["--debug", "predict", str(bundles[name]), "--input", str(tmp_path / "in.jsonl"), "--output",
              str(tmp_path / "out.jsonl")])
    assert not (tmp_path / "out.jsonl").exists()


def test_cli_embed_refuses_a_bundle_of_another_task_naming_predict(bundles, tmp_path, capsys):
    from edgetl.cli import main

    (tmp_path / "in.txt").write_text("a man\n")
    code = main(["embed", str(bundles["pairs"]), "--input", str(tmp_path / "in.txt"), "--output",
                 str(tmp_path / "out.npy")])
    err = capsys.readouterr().err
    assert code == 2 and "is a text-classification bundle (served by TextClassifier), not a sentence-embedding" in err
    assert "use edgetl predict" in err and not (tmp_path / "out.npy").exists()


def test_cli_predict_refuses_a_text_pair_for_a_single_text_bundle(bundles, tmp_path):
    from edgetl.cli import main

    single = _edit_manifest(bundles["pairs"], tmp_path / "single", text_pair=False)
    (tmp_path / "in.jsonl").write_text('{"text": "a", "text_pair": "b"}\n')
    with pytest.raises(UsageError, match=r"in.jsonl:1: 'text_pair' given, but this bundle's model reads single texts"):
        main(["--debug", "predict", str(single), "--input", str(tmp_path / "in.jsonl")])


# --- edgetl serve ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def servers(bundles):
    """name -> the port of ``edgetl serve`` (a subprocess on loopback) serving that bundle."""
    started = {}
    try:
        for name in ("tokens", "regression", "pairs"):
            started[name] = start_server(bundles[name], "--backend", "onnxruntime")
        yield {name: port for name, (_, port) in started.items()}
    finally:
        stopped = {name: stop_server(process) for name, (process, _) in started.items()}
    assert all(code == 0 for code, _ in stopped.values()), stopped


def post(port: int, body: dict) -> tuple[int, dict]:
    return request("127.0.0.1", port, "POST", "/predict", json.dumps(body).encode())  # lone surrogates escaped


def test_serve_answers_entities_for_texts_and_words(servers, tagger):
    port = servers["tokens"]
    assert post(port, {"text": TEXTS[0]}) == (200, {"prediction": tagger.to_json(tagger.predict_one(TEXTS[0]))})
    sent = json.loads(json.dumps(TEXTS))  # as the server reads them: JSON joins TEXTS[3]'s split surrogate pair
    assert post(port, {"texts": TEXTS}) == (200, {"predictions": [tagger.to_json(e) for e in tagger.predict(sent)]})
    words = [["Peter", "Blackburn", "visited", "London"], ["EU", "rejects", "German", "call"]]
    assert post(port, {"words": words[0]}) == (200, {"prediction": tagger.to_json(tagger.predict_words(words[:1])[0])})
    assert post(port, {"sentences": words}) == (200, {"predictions": [tagger.to_json(e) for e in tagger.predict_words(words)]})


def test_serve_echoes_a_lone_surrogate_in_an_entity_escaped(servers, tagger):
    """UTF-8 cannot hold a lone surrogate: an entity's text that has one is sent as a JSON escape, not a 500."""
    text = "Lon\ud800don visited"
    entities = tagger.predict_one(text)
    assert any("\ud800" in e.text for e in entities), "no entity holds the surrogate: the test would see nothing"
    assert post(servers["tokens"], {"text": text}) == (200, {"prediction": tagger.to_json(entities)})


def test_serve_answers_a_score_per_pair(servers, regressor):
    port = servers["regression"]
    assert post(port, {"text": PAIRS[0][0], "text_pair": PAIRS[0][1]}) == (200, {"prediction": {"score": regressor.predict_one(*PAIRS[0])}})
    items = [{"text": a, "text_pair": b} if i % 2 else [a, b] for i, (a, b) in enumerate(PAIRS)]
    assert post(port, {"texts": items}) == (200, {"predictions": [{"score": s} for s in regressor.predict(PAIRS)]})


def test_serve_classifies_pairs(servers, bundles):
    from dataclasses import asdict

    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(bundles["pairs"], backend="onnxruntime")
    status, answer = post(servers["pairs"], {"texts": [list(p) for p in PAIRS]})
    assert status == 200 and answer == {"predictions": [asdict(p) for p in classifier.predict(PAIRS)]}


@pytest.mark.parametrize("name, body, status, message", [
    ("regression", {"text": "a"}, 422, "\"text_pair\" is missing: this bundle's model reads (text, text_pair) pairs"),
    ("regression", {"text": "a", "text_pair": 3}, 422, '"text_pair" must be a string, not int'),
    ("regression", {"texts": [["a", "b"], "c"]}, 422,
     '"texts"[1] must be {"text": string, "text_pair": string} or [string, string], not str'),
    ("regression", {"texts": [{"text": "a"}]}, 422, "\"texts\"[0] must be {\"text\": string, \"text_pair\": string} "
                                                    "or [string, string], not an object with keys ['text']"),
    ("regression", {"texts": "a"}, 422, '"texts" must be a list of pairs, not str'),
    ("regression", {"words": ["a"]}, 422, 'either "text": string and "text_pair": string, or "texts"'),
    ("tokens", {"text": "a", "words": ["a"]}, 422, 'one of "text": string, "texts": [string, ...], "words"'),
    ("tokens", {"words": "a b"}, 422, '"words" must be a list of strings (words), not str'),
    ("tokens", {"sentences": [["a"], ["b", None]]}, 422, '"sentences"[1][1] must be a string, not NoneType'),
    ("tokens", {"sentences": [["a"]] * 1025}, 413, '"sentences" has 1025 items, over the limit of 1024 per request'),
    ("tokens", {"text": "a", "text_pair": "b"}, 422, "\"text_pair\" was given, but this bundle's model reads single texts"),
])
def test_serve_refuses_a_tasks_malformed_inputs_naming_them(servers, name, body, status, message):
    answer_status, answer = post(servers[name], body)
    assert answer_status == status and message in answer["error"]
    assert post(servers[name], {"text": "a", "text_pair": "b"} if name == "regression" else {"text": "a"})[0] == 200


@pytest.mark.parametrize("name, task, text_pair", [("tokens", "token-classification", False),
                                                   ("regression", "text-regression", True)])
def test_serve_metadata_names_the_task_and_whether_inputs_are_pairs(servers, bundles, name, task, text_pair):
    status, meta = request("127.0.0.1", servers[name], "GET", "/metadata")
    assert status == 200 and meta["task"] == task and meta["text_pair"] is text_pair
    assert meta["labels"] == json.loads((bundles[name] / "edgetl.json").read_text())["labels"]


def test_the_micro_batcher_sends_texts_and_words_each_to_their_own_method(tagger):
    import asyncio

    from edgetl.runtime.server import MicroBatcher

    words = [["Peter", "Blackburn"], ["London"]]

    async def concurrently():
        batcher = MicroBatcher(tagger, max_batch=64)
        batcher.start()
        answers = await asyncio.gather(batcher.predict(TEXTS[:2]), batcher.predict(words, "predict_words"),
                                       batcher.predict(TEXTS[2:]))
        await batcher.stop()
        return answers, batcher.batches

    (texts_a, by_words, texts_b), batches = asyncio.run(concurrently())
    assert texts_a + texts_b == tagger.predict(TEXTS) and by_words == tagger.predict_words(words)
    assert batches == 2, "the three requests were not batched by method"

"""Entities from logits without torch: the same entities as transformers' pipeline with aggregation 'first'.

The model is a tiny BERT whose embeddings and head are set so that each token leans to a label chosen for it
(names to PER, places to LOC, a word's later sub-tokens to a label its first one does not have), with random
layers on top so that context moves the scores. Torch computes the logits here only; the function under test
gets them as numpy, with offsets and word ids from a ``tokenizers.Tokenizer`` as the runtime loads it.
"""

from __future__ import annotations

import string
import subprocess
import sys

import numpy as np
import pytest

from edgetl.runtime.entities import Entity, entities_from_logits, entities_from_words, word_labels
from edgetl.runtime.text import load_tokenizer

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
NAMED = {"john": "B-PER", "marie": "B-PER", "jose": "B-PER", "smith": "I-PER", "curie": "I-PER",
         "paris": "B-LOC", "london": "B-LOC", "new": "B-LOC", "wash": "B-LOC", "york": "I-LOC",
         "acme": "B-ORG", "united": "B-ORG", "corp": "I-ORG", "nations": "I-ORG", "cafe": "B-MISC",
         # Later sub-tokens of washington: a first-sub-token rule must not see them.
         "##ing": "B-PER", "##ton": "I-ORG",
         "visited": "O", "met": "O", "the": "O", "of": "O", "in": "O", "and": "O", "at": "O"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SENTENCES = [
    "John  Smith visited New York.",                  # spaces squeezed by the tokenizer, B- then I-
    "Marie Curie, John Smith and ACME Corp.",         # punctuation, uppercase
    "John Marie met Paris London",                    # B- after B- of the same type starts a new entity
    "the york of smith",                              # I- with no B- before it
    "smith john and new smith",                       # B- after I-, and I-PER after B-LOC
    "Washington visited Paris",                       # a word of three sub-tokens
    "José   visited the Café Ñandú in Zürich!",       # accents stripped by the uncased tokenizer
    "United\tNations\n in  Paris ,ACME  corp",        # tabs, newlines, a comma glued to the next word
    "Xqzv wbjk-plo: Ürümqi 東京 at ☃ Jose",            # letters spelled out, hyphen, colon, [UNK]
]
WORD_LISTS = [
    ["John", "Smith", "visited", "New", "York"],
    ["Washington", "met", "Marie", "Curie", "in", "Zürich"],
    ["the", "york", "of", "ACME", "Corp", "and", "Xqzv", "wbjk"],
]


def _vocab(lowercase: bool) -> list[str]:
    letters = string.ascii_lowercase + "éñü" + ("" if lowercase else string.ascii_uppercase + "ÉÑÜ")
    words = [w for w in NAMED if not w.startswith("##")]
    cased = [] if lowercase else [w.capitalize() for w in words] + ["ACME"]
    pieces = ["##" + c for c in letters] + ["##ing", "##ton"]
    return SPECIAL + list(string.punctuation) + list(letters) + pieces + words + cased


def _token_labels(vocab: list[str], seed: int) -> np.ndarray:
    """The label each token leans to: NAMED's, else drawn at random (half of them O)."""
    rng = np.random.default_rng(seed)
    drawn = np.where(rng.random(len(vocab)) < 0.5, 0, rng.integers(1, len(LABELS), len(vocab)))
    return np.array([LABELS.index(NAMED[t.lower()]) if t.lower() in NAMED else int(d)
                     for t, d in zip(vocab, drawn, strict=True)])


@pytest.fixture(scope="module", params=[True, False], ids=["uncased", "cased"])
def ner(request, tmp_path_factory):
    """(pipeline, model, runtime tokenizer) for a tiny BERT NER model whose predictions vary from token to token."""
    import torch
    from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast, pipeline

    lowercase = request.param
    folder = tmp_path_factory.mktemp("ner")
    vocab = _vocab(lowercase)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=lowercase)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(LABELS),
                        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    # One direction per label, orthogonal to each other and to the constant vector that LayerNorm removes.
    rng = np.random.default_rng(0)
    centred = rng.standard_normal((32, len(LABELS)))
    directions, _ = np.linalg.qr(centred - centred.mean(axis=0))
    lean = _token_labels(vocab, seed=1 if lowercase else 2)
    embeddings = 3.0 * directions[:, lean].T + 0.8 * rng.standard_normal((len(vocab), 32))
    with torch.no_grad():
        model.bert.embeddings.word_embeddings.weight.copy_(torch.tensor(embeddings, dtype=torch.float32))
        model.classifier.weight.copy_(torch.tensor(1.5 * directions.T, dtype=torch.float32))
        model.classifier.bias.zero_()
    classify = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="first")
    return classify, model, load_tokenizer(folder, max_length=64)


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy()


def _assert_same(ours: list[Entity], theirs: list[dict], source: str) -> None:
    assert [(e.type, e.start, e.end) for e in ours] == [(t["entity_group"], t["start"], t["end"]) for t in theirs]
    assert [e.text for e in ours] == [source[t["start"]:t["end"]] for t in theirs]
    np.testing.assert_allclose([e.score for e in ours], [float(t["score"]) for t in theirs], rtol=0, atol=1e-5)


@pytest.mark.parametrize("sentence", SENTENCES)
def test_entities_from_logits_equal_the_pipelines_with_aggregation_first(ner, sentence):
    classify, model, tokenizer = ner
    encoding = tokenizer.encode(sentence)
    assert encoding.ids == classify.tokenizer(sentence)["input_ids"]
    ours = entities_from_logits(_logits(model, encoding.ids), encoding.offsets, encoding.word_ids, sentence,
                                classify.model.config.id2label)
    _assert_same(ours, classify(sentence), sentence)
    assert all(e.text == sentence[e.start:e.end] and e.text.strip() == e.text for e in ours)


def test_the_sentences_cover_the_cases_they_are_there_for(ner):
    """Guards against a model that, after some change, no longer makes the entities the parity tests need."""
    classify, _, _ = ner
    found = {(e["entity_group"], sentence[e["start"]:e["end"]]) for sentence in SENTENCES for e in classify(sentence)}
    # squeezed spaces, B- after B-, I- first, a first sub-token deciding for its word, accents, tab and newline
    assert {("PER", "John  Smith"), ("LOC", "New York"), ("PER", "John"), ("PER", "Marie"), ("LOC", "york"),
            ("PER", "smith"), ("LOC", "Washington"), ("ORG", "ACME Corp"), ("PER", "José"),
            ("ORG", "United\tNations"), ("ORG", "ACME  corp")} <= found


@pytest.mark.parametrize("words", WORD_LISTS, ids=lambda words: words[0])
def test_entities_from_words_equal_the_pipelines_split_into_words(ner, words):
    classify, model, tokenizer = ner
    encoding = tokenizer.encode(words, is_pretokenized=True)
    ours = entities_from_words(_logits(model, encoding.ids), encoding.word_ids, words, LABELS)
    _assert_same(ours, classify(words, is_split_into_words=True)[0], " ".join(words))


@pytest.mark.parametrize("words", WORD_LISTS, ids=lambda words: words[0])
def test_word_labels_are_the_pipelines_label_of_each_words_first_token(ner, words):
    classify, model, tokenizer = ner
    encoding = tokenizer.encode(words, is_pretokenized=True)
    logits = _logits(model, encoding.ids)
    per_token = {t["index"]: t["entity"] for t in classify(words, is_split_into_words=True, aggregation_strategy="none",
                                                           ignore_labels=[])[0]}
    first_tokens = [encoding.word_ids.index(i) for i in range(len(words))]
    tags = word_labels(logits, encoding.word_ids, LABELS)
    assert tags == [per_token[t] for t in first_tokens]
    assert len(set(tags)) > 2
    # An entity covers whole words, and the words it covers are tagged with its type.
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
    for entity in entities_from_words(logits, encoding.word_ids, words, LABELS):
        inside = [i for i, start in enumerate(starts) if entity.start <= start < entity.end]
        assert entity.text == " ".join(words[i] for i in inside)
        assert {tags[i].split("-", 1)[-1] for i in inside} == {entity.type}


def test_a_pre_split_word_that_the_tokenizer_cuts_keeps_one_tag_and_one_span(ner):
    """'U.S.' is one word to the caller (and to training's labels); the pipeline's guess would make it four."""
    _, model, tokenizer = ner
    words = ["Smith,", "U.S.", "Paris"]
    encoding = tokenizer.encode(words, is_pretokenized=True)
    logits = _logits(model, encoding.ids)
    first = {w: encoding.word_ids.index(w) for w in range(3)}
    tags = word_labels(logits, encoding.word_ids, LABELS)
    assert tags == [LABELS[int(logits[first[w]].argmax())] for w in range(3)]
    joined = " ".join(words)
    for entity in entities_from_words(logits, encoding.word_ids, words, LABELS):
        assert entity.text == joined[entity.start:entity.end]
        assert entity.text.split(" ")[0] in words and entity.text.split(" ")[-1] in words


def test_a_word_with_a_dropped_character_inside_stays_a_word_of_its_own(ner):
    """The pipeline would glue 'jo-hn' (a soft hyphen inside) to 'smith': its token 'john' is shorter than its span."""
    _, model, tokenizer = ner
    text = "smith jo\u00adhn"
    encoding = tokenizer.encode(text)
    assert encoding.word_ids[1:3] == [0, 1]
    entities = entities_from_logits(_logits(model, encoding.ids), encoding.offsets, encoding.word_ids, text, LABELS)
    assert [(e.type, e.text) for e in entities] == [("PER", "smith"), ("PER", "jo\u00adhn")]


def test_words_cut_off_by_truncation_are_tagged_missing(ner):
    _, model, tokenizer = ner
    words = ["John", "Smith", "visited", "New", "York", "and", "Paris"]
    tokenizer.enable_truncation(max_length=6)
    try:
        encoding = tokenizer.encode(words, is_pretokenized=True)
    finally:
        tokenizer.enable_truncation(max_length=64)
    logits = _logits(model, encoding.ids)
    tags = word_labels(logits, encoding.word_ids, LABELS, num_words=len(words))
    assert len(tags) == len(words) and tags[4:] == ["O", "O", "O"]
    assert tags[:4] == word_labels(logits, encoding.word_ids, LABELS)
    entities = entities_from_words(logits, encoding.word_ids, words, LABELS)
    assert all(e.end <= len("John Smith visited New") for e in entities)


def test_labels_without_a_prefix_continue_and_ignored_types_are_dropped(ner):
    classify, _, _ = ner
    labels = ["O", "PER", "B-LOC", "I-LOC", "E-ORG"]
    logits = np.full((7, 5), -5.0, dtype=np.float32)
    for row, label in enumerate([0, 1, 1, 2, 2, 3, 4]):
        logits[row, label] = 5.0
    text, offsets, word_ids = "a b c d e f g", [(i, i + 1) for i in range(0, 13, 2)], list(range(7))
    entities = entities_from_logits(logits, offsets, word_ids, text, labels)
    # PER PER join (no prefix continues); B-LOC B-LOC split; I-LOC joins; E-ORG is named ORG after its first '-'.
    assert [(e.type, e.text) for e in entities] == [("PER", "b c"), ("LOC", "d"), ("LOC", "e f"), ("ORG", "g")]
    # The pipeline's own grouping, fed the same words, agrees (its 'O' group is dropped by ignore_labels).
    words = [{"entity": labels[int(row.argmax())], "score": np.float32(0.9), "word": text[start:end], "start": start,
              "end": end} for row, (start, end) in zip(logits, offsets, strict=True)]
    theirs = [(g["entity_group"], text[g["start"]:g["end"]]) for g in classify.group_entities(words)]
    assert [(e.type, e.text) for e in entities] == [group for group in theirs if group[0] != "O"]
    ignored = entities_from_logits(logits, offsets, word_ids, text, labels, ignore=("O", "LOC"))
    assert [e.type for e in ignored] == ["PER", "ORG"]
    assert entities_from_logits(logits, offsets, word_ids, text, dict(enumerate(labels))) == entities


def test_special_and_padding_tokens_are_skipped():
    labels = ["O", "B-PER"]
    logits = np.array([[0, 9], [0, 9], [9, 0], [0, 9], [0, 9]], dtype=np.float32)
    entities = entities_from_logits(logits, [(0, 0), (0, 3), (4, 6), (0, 0), (0, 0)], [None, 0, 1, None, None],
                                    "Ann is", labels)
    assert [(e.type, e.start, e.end, e.text) for e in entities] == [("PER", 0, 3, "Ann")]


def test_mismatched_inputs_are_refused_with_what_to_do():
    logits = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"4 rows of logits for 3 tokens.*logits\[:len\(word_ids\)\]"):
        entities_from_logits(logits, [(0, 0)] * 3, [None, 0, None], "a", ["O", "B-X", "I-X"])
    with pytest.raises(ValueError, match="3 offsets for 4 tokens"):
        entities_from_logits(logits, [(0, 0)] * 3, [None, 0, 1, None], "a b", ["O", "B-X", "I-X"])
    with pytest.raises(ValueError, match="2 labels given, but the logits have 3 columns"):
        word_labels(logits, [None, 0, 1, None], ["O", "B-X"])
    with pytest.raises(ValueError, match=r"missing indices \[2\]"):
        word_labels(logits, [None, 0, 1, None], {0: "O", 1: "B-X"})
    with pytest.raises(ValueError, match="expected \\[tokens, labels\\]"):
        word_labels(logits[None], [None, 0, 1, None], ["O", "B-X", "I-X"])
    with pytest.raises(ValueError, match="word_ids name word 1, but 1 words were given"):
        entities_from_words(logits, [None, 0, 1, None], ["a"], ["O", "B-X", "I-X"])


def test_importing_entities_never_imports_torch_or_transformers(tmp_path):
    code = ("import sys, edgetl.runtime.entities; heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

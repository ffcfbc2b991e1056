"""Vocabulary pruning: in-corpus text keeps its encoding (remapped ids) and its logits; the files agree."""

from __future__ import annotations

import copy
import json
import shutil
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer, BertTokenizerFast

from edgetl.errors import StageError
from edgetl.modeling import MeanPoolBertForSequenceClassification, load_classifier
from edgetl.runtime.text import load_tokenizer
from edgetl.vocab import prune_vocabulary, used_token_ids

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
CORPUS_ROWS = 100


@pytest.fixture(scope="module")
def bert_layout(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with a vocab of the same size laid out like BERT's.

    [unusedN] rows come before the specials ([PAD] is 3), so pruning moves every special id and a missed
    remap shows; letters and ##pieces make words outside the vocab split, so greedy matching is exercised.
    tokenizer.json carries padding, so its pad_id must be remapped too.
    """
    folder = tmp_path_factory.mktemp("bert-layout")
    rows = BertConfig.from_pretrained(tiny_model).vocab_size
    head = ["[unused0]", "[unused1]", "[unused2]", "[PAD]", *(f"[unused{i}]" for i in range(3, 10)), *SPECIALS[1:]]
    pieces = [*string.ascii_lowercase, *(f"##{c}" for c in string.ascii_lowercase), "##s", "##ed", "##ing", "##ly"]
    words = (tiny_model / "vocab.txt").read_text().splitlines()
    vocab = list(dict.fromkeys(head + pieces + [w for w in words if w not in SPECIALS]))[:rows]
    assert len(vocab) == rows
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    assert tokenizer.pad_token_id == 3
    tokenizer.backend_tokenizer.enable_padding(pad_id=3, pad_token="[PAD]")
    tokenizer.save_pretrained(str(folder))
    BertConfig.from_pretrained(tiny_model, pad_token_id=3).save_pretrained(str(folder))
    shutil.copy(tiny_model / "model.safetensors", folder)
    return folder


@pytest.fixture(scope="module")
def corpus(sst2_slice) -> list[str]:
    rows = (sst2_slice / "train.tsv").read_text().splitlines()[1 : CORPUS_ROWS + 1]
    return [row.rsplit("\t", 1)[0] for row in rows]


def classifier(folder: Path):
    torch.manual_seed(0)
    return MeanPoolBertForSequenceClassification.from_pretrained(str(folder), num_labels=2).eval()


@pytest.fixture(scope="module")
def pruned(bert_layout, corpus, tmp_path_factory) -> SimpleNamespace:
    """The layout model and tokenizer pruned to the corpus; ``original`` is an untouched copy."""
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    model = classifier(bert_layout)
    original = copy.deepcopy(model)
    keep = used_token_ids(tokenizer, corpus)
    out = tmp_path_factory.mktemp("pruned")
    stats = prune_vocabulary(model, tokenizer, keep, out)
    return SimpleNamespace(tokenizer=tokenizer, model=model, original=original, keep=keep, out=out, stats=stats,
                           remap={old: new for new, old in enumerate(keep)})


def test_in_corpus_text_encodes_to_remapped_ids(pruned, corpus):
    old_ids = pruned.tokenizer(corpus)["input_ids"]
    expected = [[pruned.remap[i] for i in ids] for ids in old_ids]
    new = AutoTokenizer.from_pretrained(str(pruned.out))
    runtime = load_tokenizer(pruned.out, max_length=512)

    assert new(corpus)["input_ids"] == expected
    assert [e.ids for e in runtime.encode_batch(corpus)] == expected
    old_text = pruned.tokenizer.batch_decode(old_ids)
    assert new.batch_decode(expected) == old_text
    # transformers and tokenizers clean up spaces differently; compare each library with itself.
    old_backend_text = pruned.tokenizer.backend_tokenizer.decode_batch(old_ids, skip_special_tokens=False)
    assert runtime.decode_batch(expected, skip_special_tokens=False) == old_backend_text
    # The check means something: ids moved, and words were split into ##pieces by greedy matching.
    assert expected != old_ids
    assert any(t.startswith("##") for ids in expected for t in new.convert_ids_to_tokens(ids))


def test_pruned_model_gives_the_same_logits(pruned, corpus):
    old_batch = pruned.tokenizer(corpus[:32], padding=True, return_tensors="pt")
    new_batch = AutoTokenizer.from_pretrained(str(pruned.out))(corpus[:32], padding=True, return_tensors="pt")
    with torch.no_grad():
        old_logits = pruned.original(**old_batch).logits
        new_logits = pruned.model(**new_batch).logits
    assert torch.equal(new_logits, old_logits)

    stats, hidden = pruned.stats, pruned.model.config.hidden_size
    assert stats["vocab_after"] == len(pruned.keep) < stats["vocab_before"] == pruned.original.config.vocab_size
    assert stats["embedding_params_after"] == stats["vocab_after"] * hidden
    dropped_params = pruned.original.num_parameters() - pruned.model.num_parameters()
    assert dropped_params == stats["embedding_params_before"] - stats["embedding_params_after"] > 0


def test_special_tokens_are_kept_and_agree(pruned):
    new = AutoTokenizer.from_pretrained(str(pruned.out))
    spec = json.loads((pruned.out / "tokenizer.json").read_text())
    assert new.all_special_tokens == pruned.tokenizer.all_special_tokens
    assert new.all_special_ids == [pruned.remap[i] for i in pruned.tokenizer.all_special_ids]
    assert new.convert_ids_to_tokens([0, 1, 2, 3, 4]) == SPECIALS  # the layout's [unusedN] rows are gone

    processor = spec["post_processor"]["special_tokens"]
    assert processor["[CLS]"]["ids"] == [new.cls_token_id] and processor["[SEP]"]["ids"] == [new.sep_token_id]
    assert {a["content"]: a["id"] for a in spec["added_tokens"]} == dict(zip(SPECIALS, range(5), strict=True))
    embedding = pruned.model.get_input_embeddings()
    assert spec["padding"]["pad_id"] == new.pad_token_id == pruned.model.config.pad_token_id == embedding.padding_idx
    assert not (pruned.out / "vocab.txt").exists()  # it cannot map many strings to [UNK]'s id
    config = json.loads((pruned.out / "tokenizer_config.json").read_text())
    assert {int(i): a["content"] for i, a in config["added_tokens_decoder"].items()} == dict(enumerate(SPECIALS))
    runtime_ids = load_tokenizer(pruned.out, max_length=16).encode("a film").ids
    assert (runtime_ids[0], runtime_ids[-1]) == (new.cls_token_id, new.sep_token_id)


def test_pruned_model_saves_and_reloads(pruned, corpus, tmp_path):
    pruned.model.save_pretrained(str(tmp_path))
    reloaded = load_classifier(tmp_path)
    assert reloaded.config.vocab_size == pruned.stats["vocab_after"] == reloaded.get_input_embeddings().num_embeddings
    batch = AutoTokenizer.from_pretrained(str(pruned.out))(corpus[:8], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, pruned.model(**batch).logits)


def test_words_outside_the_corpus_become_unk(bert_layout, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    assert tokenizer.tokenize("the film movie") == ["the", "film", "movie"]
    keep = used_token_ids(tokenizer, ["the film"])
    assert len(keep) == len(SPECIALS) + 2
    prune_vocabulary(classifier(bert_layout), tokenizer, keep, tmp_path)

    new = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = new("the film movie")["input_ids"]
    assert new.convert_ids_to_tokens(ids) == ["[CLS]", "the", "film", "[UNK]", "[SEP]"]
    runtime = load_tokenizer(tmp_path, max_length=16)
    assert runtime.encode("the film movie").ids == ids


def test_any_text_keeps_its_original_split(pruned):
    """Out-of-corpus words split as before; only their dropped pieces become [UNK]."""
    text = ["an unforeseen zzyzx of reviews", "qwertyuiop filmmakers"]
    unk = pruned.remap[pruned.tokenizer.unk_token_id]
    expected = [[pruned.remap.get(i, unk) for i in ids] for ids in pruned.tokenizer(text)["input_ids"]]
    assert AutoTokenizer.from_pretrained(str(pruned.out))(text)["input_ids"] == expected
    assert [e.ids for e in load_tokenizer(pruned.out, max_length=64).encode_batch(text)] == expected


def test_read_as_pruned_answers_as_the_pruned_model_until_removed(pruned):
    """Recovery trains with the cut in place: the whole model, reading dropped ids as [UNK], is the pruned one."""
    from edgetl.vocab import read_as_pruned

    text = ["an unforeseen zzyzx of reviews", "qwertyuiop filmmakers", "the film"]
    old_batch = pruned.tokenizer(text, padding=True, return_tensors="pt")
    assert any(i not in pruned.remap for i in old_batch["input_ids"].flatten().tolist())  # some ids are dropped
    new_batch = AutoTokenizer.from_pretrained(str(pruned.out))(text, padding=True, return_tensors="pt")
    whole = copy.deepcopy(pruned.original)
    with torch.no_grad():
        before = whole(**old_batch).logits
        handle = read_as_pruned(whole, pruned.tokenizer, pruned.keep)
        assert torch.equal(whole(**old_batch).logits, pruned.model(**new_batch).logits)
        assert not torch.equal(whole(**old_batch).logits, before)
        handle.remove()
        assert torch.equal(whole(**old_batch).logits, before)
    with pytest.raises(StageError, match=r"\[UNK\].*must be among keep_ids"):
        read_as_pruned(whole, pruned.tokenizer, [i for i in pruned.keep if i != pruned.tokenizer.unk_token_id])


def test_bert_processing_ids_are_remapped(bert_layout, tmp_path):
    """Older BERT tokenizer.json files add [CLS]/[SEP] with BertProcessing instead of a template."""
    from tokenizers.processors import BertProcessing

    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    tokenizer.backend_tokenizer.post_processor = BertProcessing(("[SEP]", tokenizer.sep_token_id),
                                                                ("[CLS]", tokenizer.cls_token_id))
    prune_vocabulary(classifier(bert_layout), tokenizer, used_token_ids(tokenizer, ["the film"]), tmp_path)
    assert json.loads((tmp_path / "tokenizer.json").read_text())["post_processor"]["type"] == "BertProcessing"
    new = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = load_tokenizer(tmp_path, max_length=16).encode("the film").ids
    assert ids == new("the film")["input_ids"] == [new.cls_token_id, *new.convert_tokens_to_ids(["the", "film"]),
                                                  new.sep_token_id]


def test_min_count_drops_rare_tokens(bert_layout):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    keep = used_token_ids(tokenizer, iter(["the film", "the movie"]), min_count=2)
    assert keep == sorted(keep)
    assert set(tokenizer.convert_ids_to_tokens(keep)) == {*SPECIALS, "the"}


def test_added_tokens_outside_the_vocabulary_are_refused(bert_layout, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    tokenizer.add_tokens(["zorblax"])
    model = classifier(bert_layout)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    keep = used_token_ids(tokenizer, ["the film"])
    with pytest.raises(StageError, match=r"added tokens outside the WordPiece vocabulary \['zorblax'\]"):
        prune_vocabulary(model, tokenizer, keep, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_pruning_keeps_dtype_and_rows(bert_layout, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    model = classifier(bert_layout).to(torch.bfloat16)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    keep = used_token_ids(tokenizer, ["the film"])
    prune_vocabulary(model, tokenizer, keep, tmp_path)
    new_weight = model.get_input_embeddings().weight
    assert new_weight.dtype == torch.bfloat16 and new_weight.requires_grad
    assert torch.equal(new_weight, old_rows[keep])


def wordlevel_tokenizer():
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, "the"])}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")), unk_token="[UNK]")


@pytest.mark.parametrize("case, match", [
    ("drops [MASK]", r"misses special or added tokens \[MASK\] \(id 14\)"),
    ("unknown id", r"keep_ids \[9999\] are not tokens"),
    ("masked LM", r"BertForMaskedLM has an output embedding over the vocabulary \(tied to the input one\)"),
    ("word level", r"needs a WordPiece tokenizer; this one is WordLevel"),
    ("slow tokenizer", r"needs a fast tokenizer \(tokenizer.json\); got BertTokenizer"),
    ("byte-level post_processor", r"post_processor type ByteLevel in tokenizer.json is not supported"),
])
def test_prune_errors(bert_layout, tmp_path, case, match):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    model = classifier(bert_layout)
    keep = used_token_ids(tokenizer, ["the film"])
    if case == "drops [MASK]":
        keep.remove(tokenizer.mask_token_id)
    elif case == "unknown id":
        keep.append(9999)
    elif case == "masked LM":
        model = BertForMaskedLM(BertConfig.from_pretrained(str(bert_layout)))
    elif case == "word level":
        tokenizer = wordlevel_tokenizer()
    elif case == "slow tokenizer":
        tokenizer = BertTokenizer.from_pretrained(str(bert_layout))
    elif case == "byte-level post_processor":
        from tokenizers.processors import ByteLevel

        tokenizer.backend_tokenizer.post_processor = ByteLevel()
    embedding = model.get_input_embeddings()
    with pytest.raises(StageError, match=match):
        prune_vocabulary(model, tokenizer, keep, tmp_path / "out")
    assert model.get_input_embeddings() is embedding and not (tmp_path / "out").exists()


def test_used_token_ids_errors(bert_layout):
    tokenizer = AutoTokenizer.from_pretrained(str(bert_layout))
    with pytest.raises(StageError, match="min_count must be at least 1, got 0"):
        used_token_ids(tokenizer, ["the film"], min_count=0)

"""Prompt learning as a cloze question (``edgetl.cloze``, ``edgetl.runtime.cloze``) on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import RECIPES
from edgetl.errors import RecipeError
from edgetl.recipe import load_recipe

PATTERN = "{text} All in all, it was {mask}."


def _tiny_lm(kind: str):
    import torch
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "mask":
        return BertForMaskedLM(BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=True)).eval()


@pytest.mark.parametrize("answer", ["mask", "last"])
def test_cloze_logits_are_the_lm_logits_at_the_answer_position(answer):
    import torch

    from edgetl.cloze import ClozeClassifier

    lm = _tiny_lm(answer)
    words = {"negative": [7, 8], "positive": [9]}  # a label scores the mean of its words' logits
    model = ClozeClassifier(lm, {"answer": answer, "mask_id": 4 if answer == "mask" else None,
                                 "verbalizer_ids": words}).eval()
    ids = torch.tensor([[1, 10, 11, 4, 12, 2], [1, 13, 4, 2, 0, 0]])  # the second row padded
    mask = (ids != 0).long()
    with torch.no_grad():
        vocab = lm(input_ids=ids, attention_mask=mask).logits
        logits = model(ids, mask).logits
    positions = [3, 2] if answer == "mask" else [5, 3]  # the mask token; the last token that is not padding
    expected = torch.stack([torch.stack([vocab[row, at, words["negative"]].mean(), vocab[row, at, 9]])
                            for row, at in enumerate(positions)])
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    assert model.head(torch.zeros(1, 16)).shape == (1, 3)  # the output layer keeps the verbaliser rows alone


def _cloze_tokenizer(folder, pattern=PATTERN, answer="mask", max_length=24, truncation="right", head_tokens=0):
    from tokenizers import Tokenizer

    from edgetl.runtime.cloze import ClozeTokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    mask_id = tokenizer.token_to_id("[MASK]") if answer == "mask" else None
    return ClozeTokenizer(tokenizer, {"pattern": pattern, "answer": answer, "mask_id": mask_id, "prompt_ids": [90, 91]},
                          max_length, truncation, head_tokens)


@pytest.mark.parametrize("truncation", ["right", "left", "head+tail"])
def test_the_text_is_cut_and_the_question_kept(tiny_model, truncation):
    tokenizer = _cloze_tokenizer(tiny_model, truncation=truncation, head_tokens=3)
    long = " ".join(["good"] * 5 + ["film"] * 30 + ["bad"] * 5)
    encoded = tokenizer.encode(long + " [MASK]")  # a text's own mask token is not an answer slot
    tokens = [tokenizer.id_to_token(i) for i in encoded.ids]
    assert len(tokens) == 24 and tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens[-9:] == ["all", "in", "all", ",", "it", "was", "[MASK]", ".", "[SEP]"]
    assert tokens.count("[MASK]") == 1
    text = tokens[1:-9]
    assert {"right": text == ["good"] * 5 + ["film"] * 9, "left": text == ["film"] * 9 + ["bad"] * 5,
            "head+tail": text == ["good"] * 3 + ["film"] * 6 + ["bad"] * 5}[truncation], text
    short = tokenizer.encode("good film")
    assert [tokenizer.id_to_token(i) for i in short.ids][1:4] == ["good", "film", "all"]


def test_prompt_vectors_take_their_ids_in_the_pattern(tiny_model):
    tokenizer = _cloze_tokenizer(tiny_model, pattern="{text} {prompt} it was {mask}.")
    ids = tokenizer.encode("good film").ids
    assert ids[3:5] == [90, 91] and ids[7] == tokenizer.mask_id


def test_a_causal_pattern_ends_with_the_answer(tiny_llama):
    with pytest.raises(ValueError, match="must end the pattern"):
        _cloze_tokenizer(tiny_llama, answer="last")
    tokenizer = _cloze_tokenizer(tiny_llama, pattern="{text} it was {mask}", answer="last")
    tail = tokenizer.encode("a review").ids[-2:]
    assert tail == tokenizer.tokenizer.encode(" it was", add_special_tokens=False).ids[-2:]


def test_a_verbaliser_word_is_one_token(tiny_llama):
    from tokenizers import Tokenizer

    from edgetl.runtime.cloze import verbalizer_ids

    tokenizer = Tokenizer.from_file(str(tiny_llama / "tokenizer.json"))
    assert verbalizer_ids(tokenizer, "{text} was {mask}", {"a": ["the"]}) == {
        "a": tokenizer.encode(" the", add_special_tokens=False).ids}  # read after the space before {mask}
    with pytest.raises(ValueError, match=r"cloze.verbalizer.b: 'terrible' is \d tokens"):
        verbalizer_ids(tokenizer, "{text} was {mask}", {"b": ["terrible"]})


@pytest.mark.parametrize(("overrides", "message"), [
    (["stages.finetune.cloze.pattern='{text} was'"], r"needs \{mask\} exactly once"),
    (["stages.finetune.cloze.train=prompt"], r"\{prompt\} marks where train: prompt"),
    (["stages.finetune.cloze.verbalizer={negative: [], positive: [good]}"], "labels \\['negative'\\] need at least"),
    (["stages.finetune.cloze.train=few"], "train"),
    (["stages.finetune.method=full"], "set it with method: cloze"),
    (["stages.finetune.cloze=null"], "set it with method: cloze"),
    (["stages.finetune.rdrop_alpha=1.0"], "trains through the verbaliser alone"),
    (["data.text_pair_field=title"], "a pattern places one text"),
])
def test_every_cloze_field_has_a_named_error(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("amazon-electronics-cloze", overrides)


def test_a_cloze_model_is_not_distilled_or_pruned(tmp_path):
    import yaml

    raw = yaml.safe_load((RECIPES / "amazon-electronics-cloze.yaml").read_text())
    raw["stages"].insert(2, {"stage": "prune", "heads_keep": 0.5})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="answers through its language-model head"):
        load_recipe(str(path))


def test_verbaliser_labels_are_the_data_labels_and_zero_shot_needs_an_lm_head(tiny_model):
    from transformers import AutoTokenizer

    from edgetl.cloze import new_cloze
    from edgetl.errors import ArchitectureError
    from edgetl.recipe.training import ClozeConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    cfg = ClozeConfig(pattern=PATTERN, verbalizer={"negative": ["bad"], "good": ["good"]}, train="none")
    with pytest.raises(ValueError, match=r"labels \['positive'\] have no words and \['good'\] are no label"):
        new_cloze(str(tiny_model), cfg, ["negative", "positive"], True, tokenizer, 0)
    cfg = cfg.model_copy(update={"verbalizer": {"negative": ["bad"], "positive": ["good"]}})
    with pytest.raises(ArchitectureError, match="ships no language-model head"):  # the tiny BERT has no MLM head
        new_cloze(str(tiny_model), cfg, ["negative", "positive"], True, tokenizer, 0)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def cloze_runs(tiny_runs):
    """The shipped encoder cloze recipe (adapt, PET, export, INT8, bundle), then zero-shot and P-tuning from it."""
    pet = tiny_runs("amazon-electronics-cloze")
    zero = tiny_runs("amazon-electronics-cloze", "stages.finetune.cloze.train=none")
    prompt = tiny_runs("amazon-electronics-cloze", "stages.finetune.cloze.train=prompt",
                       "stages.finetune.cloze.pattern='{text} {prompt} it was {mask}.'",
                       "stages.finetune.learning_rate=0.05")
    return {"pet": pet, "none": zero, "prompt": prompt}


def test_zero_shot_keeps_the_adapted_lm_and_p_tuning_trains_only_its_prompt(cloze_runs):
    import torch

    adapted = _weights(cloze_runs["none"] / "01-adapt")
    zero = _weights(cloze_runs["none"] / "02-finetune")
    assert zero.keys() == adapted.keys() and all(torch.equal(zero[k], adapted[k]) for k in zero)
    pet = _weights(cloze_runs["pet"] / "02-finetune")
    assert any(not torch.equal(pet[k], adapted[k]) for k in pet)
    prompt = _weights(cloze_runs["prompt"] / "02-finetune")
    config = json.loads((cloze_runs["prompt"] / "02-finetune" / "config.json").read_text())
    vocab = next(v.shape[0] for k, v in adapted.items() if k.endswith("word_embeddings.weight"))
    assert config["cloze"]["prompt_ids"] == list(range(vocab, vocab + 4)) and config["vocab_size"] == vocab + 4
    for key, value in prompt.items():
        if key.endswith("word_embeddings.weight"):  # the known rows as adapted, the 4 prompt rows trained
            assert torch.equal(value[:vocab], adapted[key]) and not torch.equal(value[vocab:], value[:4])
        elif key in adapted and value.shape == adapted[key].shape:
            assert torch.equal(value, adapted[key]), key


@pytest.mark.parametrize("run", ["pet", "prompt"])
def test_a_cloze_bundle_predicts_what_the_pytorch_model_does(cloze_runs, run):
    import torch

    from edgetl.modeling import load_classifier
    from edgetl.runtime import load
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import load_tokenizer, pad

    folder = cloze_runs[run]
    texts = ["a gorgeous , witty film", "dull and lifeless " * 40]
    model = load_classifier(folder / "02-finetune")
    tokenizer = load_tokenizer(folder / "02-finetune", 64, "head+tail", 16)
    feeds = {k: torch.tensor(v) for k, v in pad(tokenizer.encode_batch(texts)).items()}
    with torch.no_grad():
        expected = model(**feeds).logits.numpy()
    bundle = load(folder / "06-bundle", backend="onnx")
    manifest = json.loads((folder / "06-bundle" / "edgetl.json").read_text())
    assert manifest["cloze"]["pattern"].endswith("it was {mask}.") and bundle.tokenizer.budget < 64
    # dynamic INT8 keeps activations in float: 0.003 here; the static OpenVINO INT8 of this tiny model is off by
    # 0.03 to 0.06 depending on the machine it was trained on, too close to the logits' own scale to test the pattern
    np.testing.assert_allclose(bundle.logits(texts), expected, atol=0.02)
    onnx = open_engine("onnx", folder / "03-export" / "onnx" / "model.onnx")  # FP32, as exported
    fp32 = onnx.run(pad(load_tokenizer(folder / "03-export" / "onnx", 64, "head+tail", 16).encode_batch(texts)))
    np.testing.assert_allclose(fp32, expected, atol=1e-4)


def _planted_task(tmp_path, n=32):
    """A tiny masked LM taught that in "<text> <word> it was [MASK]." the answer is "sweet" when the text holds "apple"
    and "sour" when it holds "pear" (among random filler words) if the word is "fruit", and "day" after any other
    word; the label is which fruit."""
    import random

    import torch
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from edgetl.runtime.cloze import ClozeTokenizer
    from edgetl.runtime.text import pad

    filler = ["film", "book", "song", "day", "car", "tree", "house", "river", "stone", "cloud", "table", "green",
              "quick", "slow", "bright", "dark", "small", "large", "water", "light"]
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "all", "was",
                                                   "it", ".", "apple", "pear", "sweet", "sour", "fruit", *filler]))
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(str(tmp_path))
    tokenizer = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ids = {w: tokenizer.token_to_id(w) for w in ("the", "sweet", "sour", "fruit", "day", *filler)}
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(n):
        words = rng.sample(filler, 6)
        words.insert(rng.randrange(7), ("apple", "pear")[i % 2])
        texts.append(" ".join(words))
        labels.append(i % 2)
    torch.manual_seed(0)
    lm = BertForMaskedLM(BertConfig(vocab_size=35, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=64))
    encoded, answers = [], []
    for word in ("fruit", "fruit", "the", "film"):  # half the rows with the trigger
        template = ClozeTokenizer(Tokenizer.from_file(str(tmp_path / "tokenizer.json")),
                                  {"pattern": "{text} {prompt} it was {mask}.", "answer": "mask", "mask_id": 4,
                                   "prompt_ids": [ids[word]]}, 32)
        encoded += template.encode_batch(texts)
        answers += [ids[("sweet", "sour")[y]] if word == "fruit" else ids["day"] for y in labels]
    feeds = {k: torch.from_numpy(v) for k, v in pad(encoded).items()}
    targets = torch.where(feeds["input_ids"] == 4, torch.tensor(answers)[:, None], -100)
    optimizer = torch.optim.Adam(lm.parameters(), lr=3e-3)
    for _ in range(400):
        optimizer.zero_grad()
        lm(**feeds, labels=targets).loss.backward()
        optimizer.step()
    return lm.eval(), tokenizer, texts, labels


def _train_accuracy(model, tokenizer, texts, labels, data) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of a cloze model on the rows, as its template reads them."""
    import torch

    from edgetl.runtime.cloze import ClozeTokenizer
    from edgetl.runtime.text import pad

    template = ClozeTokenizer(tokenizer, model.cloze, data.max_length, data.truncation, data.head_tokens)
    feeds = {k: torch.from_numpy(v) for k, v in pad(template.encode_batch(texts)).items()}
    with torch.no_grad():
        out = model(**feeds, labels=torch.tensor(labels))
    return float((out.logits.argmax(-1) == torch.tensor(labels)).float().mean()), float(out.loss)


def test_verbaliser_and_trigger_search_improve_the_training_split(tmp_path):
    from edgetl.cloze import ClozeClassifier
    from edgetl.prompt_search import search
    from edgetl.recipe import DataConfig
    from edgetl.recipe.training import ClozeConfig
    from edgetl.runtime.cloze import verbalizer_ids

    lm, tokenizer, texts, labels = _planted_task(tmp_path)
    data = DataConfig(path=str(tmp_path), max_length=32)
    names = ["a", "b"]
    pattern = "{text} {prompt} it was {mask}."
    the = tokenizer.token_to_id("the")

    def cloze_model(verbalizer, prompt_ids, pattern=pattern):
        cloze = {"pattern": pattern, "answer": "mask", "mask_id": 4, "verbalizer": verbalizer, "prompt_ids": prompt_ids,
                 "verbalizer_ids": verbalizer_ids(tokenizer, pattern, verbalizer)}
        lm.config.cloze = cloze
        return ClozeClassifier(lm, cloze).eval()

    def accuracy(model):
        return _train_accuracy(model, tokenizer, texts, labels, data)[0]

    # The planted answers are found from a poor verbaliser (with the planted trigger in place).
    cfg = ClozeConfig(pattern="{text} fruit it was {mask}.", verbalizer={"a": ["film"], "b": ["book"]}, train="none",
                      verbalizer_search=1)
    before = accuracy(cloze_model(cfg.verbalizer, [], cfg.pattern))
    found = search(cloze_model(cfg.verbalizer, [], cfg.pattern), cfg, tokenizer, texts, labels, names, data, seed=0)
    assert found.cloze["verbalizer"] == {"a": ["sweet"], "b": ["sour"]}
    assert accuracy(found) == 1.0 and before <= 0.75, before
    # A trigger that recovers the planted answers is found from "the", the verbaliser given.
    cfg = ClozeConfig(pattern=pattern, verbalizer={"a": ["sweet"], "b": ["sour"]}, train="none", trigger_tokens=1,
                      search_steps=2, search_candidates=5, search_batch_size=32)
    before = accuracy(cloze_model(cfg.verbalizer, [the]))
    found = search(cloze_model(cfg.verbalizer, [the]), cfg, tokenizer, texts, labels, names, data, seed=0)
    assert found.cloze["prompt_ids"] != [the]  # "fruit", or a token the tiny LM learnt to read like it
    assert accuracy(found) == 1.0 and before <= 0.75, before


def test_weight_only_int8_is_for_a_decoder_classifier(tiny_model, tiny_llama):
    def recipe(model):
        return load_recipe("smollm2-electronics-cloze", [f"model={model}", "stages.quantize.method=weights",
                                                          "stages.quantize.bits=8"])

    assert recipe(tiny_llama).stages[2].method == "weights"
    with pytest.raises(RecipeError, match=r"stages\[2\] \(quantize\).method: bert is no decoder: weight-only"):
        recipe(tiny_model)

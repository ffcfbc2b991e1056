"""Domain adaptation and parameter-efficient tuning on the tiny model: adapt (MLM), augment, DANN, LoRA,
prompt tuning, head+tail truncation, and the recipe checks that guard them."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from edgetl.errors import RecipeError
from edgetl.recipe import AugmentStage, FinetuneStage, load_recipe


def test_gradient_reversal_flips_the_sign_of_the_domain_gradient():
    from edgetl.dann import reverse_gradient

    x = torch.randn(4, 8, requires_grad=True)
    head = torch.nn.Linear(8, 2)
    head(x).sum().backward()
    plain = x.grad.clone()
    x.grad = None
    head(reverse_gradient(x, 0.3)).sum().backward()
    assert torch.allclose(x.grad, -0.3 * plain)
    assert torch.equal(reverse_gradient(x, 0.3), x), "forward is the identity"


def test_dann_schedule_ramps_from_zero_to_the_weight():
    from edgetl.dann import ramp

    assert ramp(0.0, 1.0) == 0.0
    assert 0.99 < ramp(1.0, 1.0) <= 1.0
    assert ramp(0.1, 0.5) < ramp(0.5, 0.5) < 0.5


def test_adapt_lowers_the_held_out_mlm_loss(tiny_model, shrink, tmp_path, quiet_cwd):
    from edgetl.artifact import Artifact
    from edgetl.pipeline import run_recipe

    recipe = load_recipe("amazon-electronics", shrink("amazon-electronics", stages__adapt__max_steps=40,
                                                      stages__adapt__learning_rate=1e-3, stages__adapt__eval_steps=20))
    recipe = recipe.model_copy(update={"stages": recipe.stages[:1]})
    run_recipe(recipe, tmp_path / "run")
    adapted = Artifact.load(tmp_path / "run" / "01-adapt")
    metrics = adapted.manifest["metrics"]
    assert adapted.kind == "encoder" and metrics["new_mlm_head"] is True
    assert metrics["mlm_loss_after"] < metrics["mlm_loss_before"] - 0.25, metrics
    assert adapted.manifest["data"]["truncation"] == "head+tail" and adapted.manifest["data"]["max_length"] == 64


def test_a_new_mlm_head_is_tied_to_the_word_embeddings(tiny_model):
    from edgetl.stages.adapt import masked_lm

    model, new_head = masked_lm(str(tiny_model))
    assert new_head
    assert model.cls.predictions.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()


def test_whole_word_masking_masks_every_piece_of_a_word(tmp_path):
    from transformers import BertTokenizerFast

    from edgetl.stages.adapt import MaskingCollator, windows

    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "film", "##zz"]))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))  # "filmzz" -> film ##zz
    rows = windows(["filmzz " * 30], tokenizer, 64)
    assert all(len(r["input_ids"]) <= 64 for r in rows) and len(rows) == 1
    batch = MaskingCollator(tokenizer, 0.5, whole_word_mask=True, seed=0)(rows)
    masked = (batch["labels"][0] != -100).tolist()[1:-1]
    pairs = list(zip(masked[0::2], masked[1::2], strict=True))
    assert any(a for a, _ in pairs), "something is masked"
    assert all(a == b for a, b in pairs), "both pieces of a word are masked together"


def test_long_texts_are_cut_into_windows_not_truncated(tiny_model):
    from transformers import AutoTokenizer

    from edgetl.stages.adapt import windows

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rows = windows(["the film " * 100], tokenizer, 32)
    assert [len(r["input_ids"]) for r in rows] == [32] * 6 + [200 - 6 * 30 + 2]
    assert all(r["input_ids"][0] == tokenizer.cls_token_id and r["input_ids"][-1] == tokenizer.sep_token_id for r in rows)


@pytest.mark.parametrize("balance", [True, False])
def test_augmented_set_size_and_label_balance_are_as_configured(balance):
    from edgetl.stages.augment import augment

    texts = [f"review {i} was quite good and then bad" for i in range(10)]
    labels = [0] * 7 + [1] * 3
    cfg = AugmentStage(stage="augment", copies=2, balance=balance)
    rows = augment(texts, labels, cfg)
    counts = Counter(r["label"] for r in rows)
    if balance:
        assert counts == {0: 7 * 3, 1: 7 * 3}
    else:
        assert counts == {0: 7 * 3, 1: 3 * 3}
    assert [r["operation"] for r in rows[:10]] == ["original"] * 10
    assert {r["operation"] for r in rows[10:]} == {"swap", "delete", "insert"}
    assert all(r["label"] == labels[r["source"]] for r in rows), "each row keeps its original's label"
    assert rows == augment(texts, labels, cfg), "seeded: the same rows again"


def test_token_operations_change_what_they_say():
    from edgetl.stages.augment import delete, insert, swap

    words = "one two three four five six seven eight nine ten".split()
    rng = random.Random(0)
    swapped = swap(words, 0.2, rng)
    assert sorted(swapped) == sorted(words) and swapped != words
    assert len(delete(words, 0.2, rng)) == 8
    inserted = insert(words, 0.2, rng)
    assert len(inserted) == 12 and set(inserted) == set(words)
    assert delete(["alone"], 0.5, rng) == ["alone"], "never deletes a text's last word"


def test_contextual_substitution_uses_the_mlm(tiny_model):
    from edgetl.stages.augment import ContextualSubstitution

    sub = ContextualSubstitution(str(tiny_model), 64, seed=0)
    words = "the film was a good one".split()
    out = sub(words, 0.5, random.Random(0))
    assert len(out) == len(words) and out != words
    vocab = sub.tokenizer.get_vocab()
    assert all(w in vocab for w, old in zip(out, words, strict=True) if w != old), "replacements are MLM tokens"


def test_augment_stage_writes_a_dataset_with_provenance(tiny_runs):
    run_dir = tiny_runs("amazon-electronics-fewshot")
    manifest = json.loads((run_dir / "01-augment" / "manifest.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "01-augment" / "train.jsonl").read_text().splitlines()]
    assert manifest["kind"] == "dataset" and manifest["metrics"]["rows"] == len(rows)
    assert manifest["provenance"]["data"]["dataset"] == "target"
    originals = [r for r in rows if r["operation"] == "original"]
    assert len(originals) == 64
    per_label = Counter(r["label"] for r in rows)
    assert per_label[0] == per_label[1] == max(Counter(r["label"] for r in originals).values()) * 5
    finetune = json.loads((run_dir / "02-finetune" / "manifest.json").read_text())
    assert finetune["metrics"]["train_samples"] == len(rows), "finetune trained on the augmented rows"
    assert finetune["metrics"]["kept"] == "last" and finetune["metrics"]["selection_accuracy"] is None


def _tiny_classifier(tiny_model, pooling="mean"):
    from edgetl.modeling import new_classifier

    torch.manual_seed(0)
    model, tokenizer = new_classifier(str(tiny_model), ["negative", "positive"], pooling)
    return model.eval(), tokenizer


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_lora_merge_equals_the_unmerged_forward(tiny_model, pooling):
    from edgetl import peft_methods

    model, tokenizer = _tiny_classifier(tiny_model, pooling)
    cfg = FinetuneStage(stage="finetune", method="lora", lora_r=4, lora_modules=["query", "value", "dense"])
    wrapped = peft_methods.wrap(model, cfg)
    with torch.no_grad():  # trained-looking adapters (peft starts B at zero, which would make the check trivial)
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    wrapped.eval()
    batch = tokenizer(["a good film", "the plot was dull and too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        unmerged = wrapped(**batch).logits
        merged_model = peft_methods.unwrap(wrapped, cfg)
        merged = merged_model(**batch).logits
    assert not any("lora" in n for n, _ in merged_model.named_parameters())
    assert (unmerged - model.__class__(model.config).eval()(**batch).logits).abs().max() > 1e-3, "adapters matter"
    assert torch.allclose(unmerged, merged, atol=1e-5)


def test_lora_trains_few_weights_and_refuses_unknown_layers(tiny_model):
    from edgetl import peft_methods

    model, _ = _tiny_classifier(tiny_model)
    wrapped = peft_methods.wrap(model, FinetuneStage(stage="finetune", method="lora"))
    assert 0 < peft_methods.trainable_parameters(wrapped) < 0.2 * sum(p.numel() for p in wrapped.parameters())
    model, _ = _tiny_classifier(tiny_model)
    with pytest.raises(ValueError, match="qkv"):
        peft_methods.wrap(model, FinetuneStage(stage="finetune", method="lora", lora_modules=["qkv"]))


def test_prompt_tuning_saves_and_loads_as_it_trained(tiny_model, tmp_path):
    from edgetl import peft_methods
    from edgetl.modeling import load_classifier

    model, tokenizer = _tiny_classifier(tiny_model)
    cfg = FinetuneStage(stage="finetune", method="prompt-tuning", prompt_tokens=5)
    wrapped = peft_methods.wrap(model, cfg)
    trainable = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    assert trainable and all("prompt" in n or "classifier" in n for n in trainable), "the encoder is frozen"
    with torch.no_grad():
        for p in wrapped.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    wrapped.eval()
    batch = tokenizer(["a good film", "the plot was dull and too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = wrapped(**batch).logits
        peft_methods.save(peft_methods.unwrap(wrapped, cfg), tmp_path)
        loaded = load_classifier(tmp_path)(**batch).logits
        without_prompt = load_classifier(tmp_path).model(**batch).logits
    assert torch.allclose(trained, loaded, atol=1e-5)
    assert not torch.allclose(trained, without_prompt, atol=1e-3), "the soft prompt changes the answer"


DANN = "stages.finetune.domain_adversarial={weight: 0.1}"


@pytest.mark.slow
def test_domain_adversarial_finetune_trains_the_domain_classifier_and_ships_without_it(tiny_runs):
    run_dir = tiny_runs("amazon-electronics", DANN)
    finetune = run_dir / "02-finetune"
    log = json.loads((finetune / "domain_log.json").read_text())
    assert log and all(0 <= e["domain_accuracy"] <= 1 and e["coefficient"] >= 0 for e in log)
    assert log[-1]["coefficient"] > log[0]["coefficient"], "the reversal coefficient ramps up"
    from safetensors import safe_open

    with safe_open(str(finetune / "model.safetensors"), "pt") as f:
        assert not any("domain_head" in k for k in f.keys())
    inputs = json.loads((finetune / "manifest.json").read_text())["inputs"]
    assert [i["path"].rsplit("/", 1)[-1] for i in inputs] == ["01-adapt"], "finetune starts from the adapted encoder"


@pytest.mark.slow
def test_target_evaluation_and_truncation_reach_the_bundle(tiny_runs, electronics_slice):
    run_dir = tiny_runs("amazon-electronics")
    rows = json.loads(next(run_dir.glob("*-evaluate/evaluation.json")).read_text())
    assert {r["samples"] for r in rows} == {40} and {r["split"] for r in rows} == {str(electronics_slice)}
    bundle = json.loads(next(run_dir.glob("*-bundle/edgetl.json")).read_text())
    assert (bundle["truncation"], bundle["head_tokens"], bundle["max_length"]) == ("head+tail", 16, 64)
    from edgetl.runtime import TextClassifier

    classifier = TextClassifier.load(next(run_dir.glob("*-bundle")))
    long_review = "good " * 10 + "the " * 300 + "bad"
    bad = classifier.tokenizer.token_to_id("bad")
    assert bad is not None and classifier.tokenizer.encode(long_review).ids[-2] == bad, "the end of the review is kept"


def test_head_tail_cuts_the_same_in_training_and_at_runtime(tiny_model):
    import datasets
    from transformers import AutoTokenizer

    from edgetl.data import tokenize
    from edgetl.recipe import DataConfig
    from edgetl.runtime.text import load_tokenizer

    texts = ["the film " * 60, "short one", "good " * 5 + "bad " * 200]
    for truncation in ("right", "left", "head+tail"):
        cfg = DataConfig(max_length=32, truncation=truncation, head_tokens=8)
        hf = tokenize(datasets.Dataset.from_dict({"text": texts}), AutoTokenizer.from_pretrained(str(tiny_model)), cfg)
        runtime = load_tokenizer(tiny_model, 32, truncation, 8)
        assert [e.ids for e in runtime.encode_batch(texts)] == hf["input_ids"], truncation
        assert all(len(ids) <= 32 for ids in hf["input_ids"])
    cut = load_tokenizer(tiny_model, 32, "head+tail", 8).encode(texts[2]).ids
    vocab = AutoTokenizer.from_pretrained(str(tiny_model)).get_vocab()
    assert cut[1:9] == [vocab["good"]] * 5 + [vocab["bad"]] * 3 and cut[9:-1] == [vocab["bad"]] * 22


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.target=null"], "stages[0] (adapt).text: 'target' needs data.target"),
    (["data.target=null", "stages.adapt.text=train", DANN], "stages[1] (finetune).domain_adversarial: needs data.target"),
    (["data.target=atlantis"], "data.target: 'atlantis' is neither an amazon-reviews domain"),
    (["stages.finetune.method=prompt-tuning"], "stages[2] (self_train): the model of stages[1] (finetune) (method prompt-tuning)"),
    (["stages.finetune.method=adapter"], "stages[1] (finetune).method"),
    (["stages.finetune.domain_adversarial={wieght: 1}"], "stages[1] (finetune).domain_adversarial.wieght: unknown field"),
    (["data.head_tokens=300"], "head_tokens 300 leaves no room for the tail"),
    (["data.target=null", "stages.adapt.text=train"], "stages[2] (self_train): needs data.target"),
])
def test_bad_adaptation_recipes_fail_early_naming_the_field(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("amazon-electronics", overrides)
    assert message in str(info.value)


def test_contextual_augment_needs_an_mlm(tmp_path):
    raw = {"name": "x", "model": "minilm-l6", "data": {"dataset": "target", "target": "electronics"},
           "stages": [{"stage": "augment", "operations": ["contextual"]}, {"stage": "finetune"}]}
    import yaml

    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match=r"stages\[0\] \(augment\).operations: 'contextual' needs a masked language model"):
        load_recipe(str(tmp_path / "x.yaml"))
    raw["stages"].insert(0, {"stage": "adapt"})
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    assert load_recipe(str(tmp_path / "x.yaml")).stages[1].operations == ["contextual"]
    raw["stages"].append({"stage": "adapt"})
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError, match="adapt feeds fine-tuning; move it before the finetune stage"):
        load_recipe(str(tmp_path / "x.yaml"))


def test_the_domain_classifier_learns_at_its_own_rate_and_both_domains_weigh_half(tiny_model, tmp_path):
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, TrainingArguments

    from edgetl.dann import DomainAdversarialTrainer, domain_head
    from edgetl.recipe import DomainAdversarialConfig

    model, tokenizer = _tiny_classifier(tiny_model)
    model.domain_head = domain_head(model.config.hidden_size, 16)
    collator = DataCollatorWithPadding(tokenizer)
    target = [tokenizer(t) for t in ("a long review of a film", "the plot", "good")]
    trainer = DomainAdversarialTrainer(
        model=model, args=TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], learning_rate=5e-5),
        target_loader=DataLoader(target, batch_size=2, collate_fn=collator),
        dann=DomainAdversarialConfig(learning_rate=2e-3, weight=1.0))
    optimizer = trainer.create_optimizer()
    head = {id(p) for p in model.domain_head.parameters()}
    groups = [g for g in optimizer.param_groups if any(id(p) in head for p in g["params"])]
    assert len(groups) == 1 and groups[0]["lr"] == 2e-3 and {id(p) for p in groups[0]["params"]} == head
    assert all(g["lr"] == 5e-5 for g in optimizer.param_groups if g is not groups[0])
    model.train()
    source = collator([{**tokenizer(t), "labels": 1} for t in ("good film", "bad plot", "a film", "the end")])
    loss = trainer.compute_loss(model, source)
    loss.backward()
    assert model.domain_head[0].weight.grad.abs().sum() > 0, "the domain classifier learns from both domains"
    assert trainer.domain_log and 0 <= trainer.domain_log[0]["domain_accuracy"] <= 1


def test_self_training_keeps_the_surest_texts_and_balances_labels():
    import numpy as np

    from edgetl.stages.self_train import select_confident

    p_pos = np.array([0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.2, 0.1])  # a model leaning positive
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    picked, labels = select_confident(probs, 0.4, balance=True)
    assert sorted(zip(picked.tolist(), labels.tolist(), strict=True)) == [(0, 1), (1, 1), (8, 0), (9, 0)]
    picked, labels = select_confident(probs, 0.8, balance=True)
    assert Counter(labels.tolist()) == {0: 4, 1: 4} and len(set(picked.tolist())) == 8
    assert set(picked[labels == 0].tolist()) == {6, 7, 8, 9}, "the threshold moved: 0.55 positive becomes negative"
    picked, labels = select_confident(probs, 0.5, balance=False)  # 7 predicted positive, 3 negative
    assert Counter(labels.tolist()) == {1: 3, 0: 1}
    assert set(picked[labels == 1].tolist()) == {0, 1, 2} and picked[labels == 0].tolist() == [9]


@pytest.mark.slow
def test_self_train_pseudo_labels_the_target_and_resumes_after_a_killed_round(tiny_runs, shrink, tmp_path, monkeypatch):
    import shutil

    from transformers import Trainer

    from edgetl.pipeline import run_recipe

    run_dir = tiny_runs("amazon-electronics")
    stage = run_dir / "03-self_train"
    history = json.loads((stage / "self_training.json").read_text())
    assert [h["round"] for h in history] == [1, 2]
    assert all(h["per_label"][0] == h["per_label"][1] == h["pseudo_labelled"] // 2 for h in history), "balanced"
    assert history[1]["pseudo_labelled"] == 2 * history[0]["pseudo_labelled"], "round 2 keeps twice as many"
    inputs = json.loads((stage / "manifest.json").read_text())["inputs"]
    assert [i["path"].rsplit("/", 1)[-1] for i in inputs] == ["02-finetune"]

    # Kill the second round: the rerun takes round 1's weights and trains round 2 only.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("03-*", "04-*", "05-*", "06-*", "07-*", "08-*"))
    train, calls = Trainer.train, []

    def dies_in_round_2(self, *args, **kwargs):
        calls.append(self.args.output_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", dies_in_round_2)
    recipe = load_recipe("amazon-electronics", shrink("amazon-electronics"))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, copy)
    assert not (copy / "03-self_train").exists(), "a killed stage must not look finished"
    calls.clear()
    monkeypatch.setattr(Trainer, "train", lambda self, *a, **k: calls.append(self.args.output_dir) or train(self, *a, **k))
    run_recipe(recipe, copy)
    assert len(calls) == 1 and calls[0].endswith("train-2"), "only round 2 trains again"
    resumed = json.loads((copy / "03-self_train" / "self_training.json").read_text())
    assert [(h["round"], h["per_label"]) for h in resumed] == [(h["round"], h["per_label"]) for h in history]

"""Meta-learning (the meta stage, Reptile) on the tiny BERT."""

from __future__ import annotations

import pytest

from conftest import RECIPES
from edgetl.errors import RecipeError
from edgetl.recipe import load_recipe


def _classifier_and_batches(tiny_model, texts):
    import torch
    from transformers import DataCollatorWithPadding

    from edgetl.modeling import new_classifier

    torch.manual_seed(0)
    model, tokenizer = new_classifier(str(tiny_model), ["negative", "positive"], "mean")
    collate = DataCollatorWithPadding(tokenizer)
    rows = [dict(tokenizer(t, truncation=True, max_length=32), labels=i % 2) for i, t in enumerate(texts)]
    return model, tokenizer, [collate(rows[i : i + 8]) for i in range(0, len(rows), 8)]


def test_the_inner_loop_leaves_the_meta_weights_untouched(tiny_model, dev_texts):
    import torch

    from edgetl.stages.meta import inner_adapt, outer_step

    model, _, batches = _classifier_and_batches(tiny_model, list(dev_texts[:24]))
    meta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in meta.items()}
    adapted, losses = inner_adapt(model, meta, batches, learning_rate=1e-2)
    assert len(losses) == 3
    assert all(torch.equal(meta[k], before[k]) for k in meta)  # the inner steps trained the classifier alone
    moved = [k for k in meta if meta[k].is_floating_point() and not torch.equal(adapted[k], before[k])]
    assert "classifier.weight" in moved and len(moved) > 10
    expected = {k: before[k] + 0.25 * (adapted[k] - before[k]) for k in moved}
    outer_step(meta, adapted, 0.25)  # the outer step alone moves them: a quarter of the way
    for k in moved:
        torch.testing.assert_close(meta[k], expected[k])


def _with_stages(tmp_path, stages):
    import yaml

    raw = yaml.safe_load((RECIPES / "amazon-electronics-meta.yaml").read_text())
    raw["stages"] = stages(raw["stages"])
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda s: [s[0] | {"sources": ["sst2", "electronics"]}, *s[1:]], "'electronics' is data.target"),
    (lambda s: [s[0] | {"sources": ["nowhere"]}, *s[1:]], r"sources: 'nowhere' is neither an amazon-reviews domain"),
    (lambda s: [s[1], s[0], s[2]], "meta feeds fine-tuning; move it before the finetune stage"),
    (lambda s: [s[0], s[1] | {"method": "cloze", "cloze": {"pattern": "{text} {mask}", "verbalizer": {}}}, s[2]],
     "leaves a classifier without one"),
    (lambda s: [s[0] | {"steps": 0}, *s[1:]], "steps"),
])
def test_every_meta_field_has_a_named_error(tmp_path, change, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(_with_stages(tmp_path, change))


def test_finetune_adapts_the_meta_learned_classifier(tiny_runs):
    import json

    from safetensors.torch import load_file

    run = tiny_runs("amazon-electronics-meta")
    meta = json.loads((run / "01-meta" / "manifest.json").read_text())
    assert meta["kind"] == "encoder" and meta["metrics"]["episodes"] == 4
    assert set(meta["metrics"]["rows_per_source"]) == {"sst2", "books", "dvd", "kitchen"}
    config = json.loads((run / "01-meta" / "config.json").read_text())
    assert config["architectures"] == ["MeanPoolBertForSequenceClassification"]
    # The finetune stage starts from the meta-learned head (a new one would differ by its whole size): 6 small steps
    # at 5e-5 keep it close.
    start, end = (load_file(str(run / stage / "model.safetensors"))["classifier.weight"]
                  for stage in ("01-meta", "02-finetune"))
    assert (end - start).abs().max() < 0.1 * start.abs().max()


def test_a_rerun_resumes_from_the_saved_meta_weights(tiny_model, dev_texts, tmp_path):
    import torch
    from transformers import DataCollatorWithPadding

    from edgetl.recipe import MetaStage
    from edgetl.stages.meta import CHECKPOINT, reptile

    model, tokenizer, _ = _classifier_and_batches(tiny_model, [])
    rows = {"a": [dict(tokenizer(t, truncation=True, max_length=32), labels=i % 2) for i, t in enumerate(dev_texts[:16])],
            "b": [dict(tokenizer(t, truncation=True, max_length=32), labels=1 - i % 2) for i, t in enumerate(dev_texts[16:32])]}
    cfg = MetaStage(stage="meta", sources=["sst2"], steps=4, inner_steps=1, batch_size=4, learning_rate=1e-2,
                    checkpoint_steps=2)
    first = reptile(model, rows, DataCollatorWithPadding(tokenizer), cfg, tmp_path)
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["step"] == 4
    learnt = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _classifier_and_batches(tiny_model, [])[0]
    again = reptile(fresh, rows, DataCollatorWithPadding(tokenizer), cfg, tmp_path)  # nothing left to do
    assert again == first
    assert all(torch.equal(v, learnt[k]) for k, v in fresh.state_dict().items())


def test_the_joint_control_trains_the_same_batches_with_one_optimizer(tiny_model, dev_texts, tmp_path):
    """algorithm: joint is plain multi-source fine-tuning: one AdamW over the sources' batches in turn, no outer
    step; Reptile on the same batches lands elsewhere."""
    import torch
    from transformers import DataCollatorWithPadding

    from edgetl.recipe import MetaStage
    from edgetl.stages.meta import CHECKPOINT, reptile

    def fresh():
        model, tokenizer, _ = _classifier_and_batches(tiny_model, [])
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model, tokenizer

    model, tokenizer = fresh()
    collate = DataCollatorWithPadding(tokenizer)
    rows = {name: [dict(tokenizer(t, truncation=True, max_length=32), labels=(i + shift) % 2)
                   for i, t in enumerate(dev_texts[16 * shift:16 * shift + 8])] for shift, name in enumerate("ab")}
    # A batch is a whole source.
    settings = dict(stage="meta", sources=["sst2"], steps=4, inner_steps=1, batch_size=8, learning_rate=1e-2,
                    checkpoint_steps=2)
    reptile(model, rows, collate, MetaStage(**settings, algorithm="joint"), tmp_path / "joint")
    assert "optimizer" in torch.load(tmp_path / "joint" / CHECKPOINT, weights_only=False)

    by_hand, _ = fresh()
    optimizer = torch.optim.AdamW(by_hand.parameters(), lr=1e-2)
    by_hand.train()
    shuffle = torch.Generator().manual_seed(42)  # the stage's seed: the same rows in the same order
    for name in "abab":
        by_hand(**collate([rows[name][i] for i in torch.randperm(8, generator=shuffle).tolist()])).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for key, value in by_hand.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=1e-4, atol=1e-5)

    meta_learnt, _ = fresh()
    reptile(meta_learnt, rows, collate, MetaStage(**settings), tmp_path / "reptile")
    weight = "classifier.weight"
    assert not torch.allclose(meta_learnt.state_dict()[weight], model.state_dict()[weight], atol=1e-4)

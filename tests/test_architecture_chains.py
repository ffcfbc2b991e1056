"""Every architecture adapter x every task through the whole chain on a tiny model built from its config.

Each pair runs a recipe: fine-tune a few steps (text classification also distils and prunes), export, INT8 on
every backend the architecture allows, evaluate, benchmark, bundle; the FP32 exports must answer as PyTorch
does, and the bundle must load with the task's runtime and predict. Sentence embedding takes the tiny encoder as
it is (pretrained) on a dozen STS-B-like pairs and skips the benchmark, which the other tasks already time. What an architecture cannot do is refused
when the recipe loads (tests/test_architectures.py names each refusal).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModel, BertTokenizerFast

from conftest import SPECIAL_TOKENS, manifests
from test_architectures import tiny_config
from edgetl.architectures import ENCODERS, adapter_for
from edgetl.tasks import TASKS

TYPES = ENCODERS  # decoders: tests/test_generation.py
TASK_DATA = {"text-classification": "sst2", "token-classification": "conll2003", "text-regression": "stsb",
             "sentence-embedding": "stsb"}
TASK_SLICE = {"text-classification": "sst2_slice", "token-classification": "conll_slice",
              "text-regression": "stsb_slice", "sentence-embedding": "stsb_pairs"}
EMBEDDING_PAIRS = {"train.jsonl": 24, "dev.jsonl": 12}


@pytest.fixture(scope="module")
def words(sst2_slice, conll_slice, stsb_slice) -> list[str]:
    texts = [line.rsplit("\t", 1)[0] for line in (sst2_slice / "train.tsv").read_text().splitlines()[1:]]
    for line in (conll_slice / "train.jsonl").read_text().splitlines():
        texts.append(" ".join(json.loads(line)["tokens"]))
    for row in map(json.loads, (stsb_slice / "train.jsonl").read_text().splitlines()):
        texts += [row["sentence1"], row["sentence2"]]
    return [word for word, _ in collections.Counter(" ".join(texts).lower().split()).most_common(300)]


@pytest.fixture(scope="module")
def stsb_pairs(tmp_path_factory, stsb_slice) -> Path:
    """A dozen STS-B-like scored pairs to evaluate on, two dozen to calibrate and check INT8 fidelity on: the first
    rows of the STS-B slice, whose words the tiny encoders know."""
    folder = tmp_path_factory.mktemp("stsb-pairs")
    for name, count in EMBEDDING_PAIRS.items():
        (folder / name).write_text("\n".join((stsb_slice / name).read_text().splitlines()[:count]) + "\n")
    return folder


def tiny_encoder(model_type: str, folder: Path, words: list[str]) -> Path:
    """A 2-layer, 32-wide encoder of ``model_type`` with a WordPiece tokenizer of the slices' words ([PAD] = 0)
    giving the inputs the architecture's own tokenizers give (no token_type_ids where the model takes none)."""
    vocab = SPECIAL_TOKENS + [w for w in words if w not in SPECIAL_TOKENS]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt"),
                      model_input_names=list(adapter_for(model_type).input_names)).save_pretrained(folder)
    config = tiny_config(model_type, layers=2, vocab_size=len(vocab), max_position_embeddings=160, pad_token_id=0)
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


def chain(model_type: str, task: str, model: Path, data: Path) -> dict:
    adapter = adapter_for(model_type)
    backends = ["onnx", "openvino"] if adapter.supports("openvino") else ["onnx"]
    train = {"max_steps": 4, "eval_steps": 2, "batch_size": 16}
    trains = TASKS[task].refusal("finetune") is None
    stages = [{"stage": "finetune", **train} if trains else {"stage": "pretrained"}]
    if TASKS[task].refusal("distill") is None and TASKS[task].refusal("prune") is None:
        stages += [{"stage": "distill", "layers": [0], **train},
                   {"stage": "prune", "heads_keep": 0.5 if adapter.supports("head_pruning") else 1.0, "ffn_keep": 0.5,
                    "importance_samples": 32, **train}]
    quantize = {"stage": "quantize", "backends": backends, "onnx_method": "dynamic", "calibration_samples": 8}
    if TASKS[task].fidelity is not None:
        quantize["fidelity_samples"] = 16
    stages += [{"stage": "export", "formats": backends}, quantize, {"stage": "evaluate"},
               *([{"stage": "benchmark"}] if trains else []), {"stage": "bundle", "backends": backends}]
    return {"name": f"{model_type}-{task}", "task": task, "model": str(model),
            "data": {"dataset": TASK_DATA[task], "path": str(data), "max_length": 48},
            "stages": stages,
            # PyTorch is timed in every other recipe test; leaving it out here saves a torch import per process.
            "bench": {"rounds": 1, "warmup": 1, "max_sentences": 5, "include_pytorch": False}}


def fp32_agreement(run_dir: Path, task: str) -> float:
    """Largest |output difference| of the FP32 exports against the PyTorch model they came from, on dev inputs."""
    from edgetl.artifact import Artifact
    from edgetl.backends import targets_of
    from edgetl.data import load_evaluation
    from edgetl.recipe import load_recipe
    from edgetl.runtime.text import encode, load_tokenizer

    recipe, spec = load_recipe(str(run_dir / "recipe.resolved.yaml")), TASKS[task]
    inputs = spec.examples(load_evaluation(recipe.data, spec)[:6])
    exported = Artifact.load(next(run_dir.glob("[0-9][0-9]-export")))
    source = Artifact.load(run_dir / Path(exported.manifest["inputs"][0]["path"]).name)
    reference = targets_of([source])[0].open(1, spec)
    tokenizer = load_tokenizer(exported.path / "onnx", 48)
    worst = 0.0
    for target in targets_of([exported]):
        engine = target.open(1, spec)
        for item in inputs:
            feed = encode(tokenizer, [item], spec.pretokenized)
            worst = max(worst, float(np.abs(engine.run(feed) - reference.run(feed)).max()))
    return worst


@pytest.mark.parametrize("task", sorted(TASK_DATA))
@pytest.mark.parametrize("model_type", [t if t == "bert" else pytest.param(t, marks=pytest.mark.slow) for t in TYPES])
def test_the_whole_chain_runs_for_every_architecture_and_task(model_type, task, words, tmp_path, request, quiet_cwd):
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe
    from edgetl.runtime import load

    data = request.getfixturevalue(TASK_SLICE[task])
    model = tiny_encoder(model_type, tmp_path / "encoder", words)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(chain(model_type, task, model, data)))
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(str(path)), run_dir)

    ran = manifests(run_dir)
    quantized = next(m for name, m in ran.items() if name.endswith("-quantize"))
    assert all(m["precision"] == "int8" for m in quantized["models"].values()), quantized["models"]
    assert fp32_agreement(run_dir, task) < 1e-3
    bundle = next(p for p in run_dir.glob("[0-9][0-9]-bundle"))
    runtime = load(bundle)
    assert type(runtime).__name__ == TASKS[task].runtime
    example = {"text-classification": ("a gorgeous movie",), "token-classification": ("Angela Merkel met Macron",),
               "text-regression": ("A man plays a guitar.", "Someone plays the guitar."),
               "sentence-embedding": ("A man plays a guitar.",)}[task]
    assert runtime.predict_one(*example) is not None
    if task == "sentence-embedding":
        assert runtime.predict_one(*example).shape == (32,)
        scored = json.loads(next(run_dir.glob("[0-9][0-9]-evaluate")).joinpath("evaluation.json").read_text())
        assert {r["samples"] for r in scored} == {2 * EMBEDDING_PAIRS["dev.jsonl"]}
        assert all(r["cosine_mean"] >= 0.99 and r["fidelity_to"].startswith("pytorch-fp32") for r in scored)

"""Shared fixtures: small SST-2, CoNLL-2003 and STS-B slices, tiny BERTs (a few thousand parameters) and one tiny
run of sst-int8.

Everything heavy is session-scoped and built once: the tiny model, the tiny run, and the dynamic-INT8
rerun that both the pipeline tests and the stage tests read.
"""

from __future__ import annotations

import collections
import json
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

# Before anything imports huggingface_hub: no test may reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# NNCF compiles its PyTorch extension on first use and gives up after 60 s, leaving a lock behind that makes
# every later load wait; on a busy 2-core machine the build takes longer than that.
os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
SHARED_SST2 = REPO.parent / "shared" / "datasets" / "sst2"
SHARED_ELECTRONICS = REPO.parent / "shared" / "datasets" / "amazon-reviews" / "electronics"
SHARED_CONLL = REPO.parent / "shared" / "datasets" / "conll2003"
SHARED_STSB = REPO.parent / "shared" / "datasets" / "stsb"
DECODER_MODELS = {"smollm2-135m"}  # catalog decoders: a shipped recipe of one runs on the tiny Llama in tests
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# A cloze recipe's verbaliser on the tiny models: words that are one token of their vocabularies.
TINY_VERBALIZER = {"bert": "{negative: [bad], positive: [good]}", "llama": "{negative: [it], positive: [the]}"}
TRAIN_ROWS, DEV_ROWS, VOCAB_WORDS = 400, 120, 400


def shipped_recipes() -> list[Path]:
    return sorted(RECIPES.rglob("*.yaml"))


def _recipe_yaml(recipe: str | Path) -> dict:
    path = Path(recipe) if str(recipe).endswith((".yaml", ".yml")) else RECIPES / f"{recipe}.yaml"
    return yaml.safe_load(path.read_text())


def stage_names(recipe: str | Path) -> list[str]:
    return [s["stage"] for s in _recipe_yaml(recipe)["stages"]]


def tiny_overrides(tiny_model: Path, sst2_slice: Path, recipe: str | Path = "sst-int8", target: Path | None = None,
                   **changes) -> list[str]:
    """Overrides that shrink a recipe to the tiny model and the slices; only for stages the recipe has.

    ``target``: the electronics slice, replacing the target domain of recipes that name one.

    ``changes`` replace or add overrides, keyed by the path with dots written as ``__``
    (``stages__finetune__max_steps=60``).
    """
    stages = set(stage_names(recipe))
    wanted = {
        "model": str(tiny_model),
        "data.path": str(sst2_slice),
        "data.max_length": "64",
        "data.head_tokens": "16",
        "stages.adapt.max_steps": "4",
        "stages.adapt.eval_steps": "2",
        "stages.adapt.batch_size": "8",
        "stages.meta.steps": "4",
        "stages.meta.inner_steps": "2",
        "stages.meta.batch_size": "8",
        "stages.meta.max_rows_per_source": "32",
        "stages.finetune.max_steps": "6",
        "stages.finetune.eval_steps": "3",
        "stages.finetune.batch_size": "16",
        "stages.self_train.max_steps": "3",
        "stages.self_train.batch_size": "8",
        "stages.distill.layers": "[0]",  # the tiny teacher has 2 layers
        "stages.distill.max_steps": "6",
        "stages.distill.eval_steps": "3",
        "stages.distill.batch_size": "16",
        "stages.prune.max_steps": "4",
        "stages.prune.eval_steps": "2",
        "stages.prune.batch_size": "16",
        "stages.prune.importance_samples": "64",
        "stages.quantize.calibration_samples": "16",
        # The tiny run covers static QDQ (the stage default); ``dynamic_run`` reruns it with dynamic INT8,
        # which sst-int8 itself uses.
        "stages.quantize.onnx_method": "static",
        "stages.quantize.onnx_embedding_bits": "8",  # 4 bits is dynamic INT8's; a test asks for both
        "bench.rounds": "1",
        "bench.warmup": "2",
        "bench.max_sentences": "20",
    }
    if any(s.get("max_accuracy_drop") for s in _recipe_yaml(recipe)["stages"] if s["stage"] == "quantize"):
        # One text of the 120-row dev slice is 0.83 points: a recipe's half-point bar would ask a tiny random model's
        # INT8 to flip none, which depends on rounding that varies between runs. Three texts keep the control at work.
        wanted["stages.quantize.max_accuracy_drop"] = "2.5"
    if target is not None and "target" in (_recipe_yaml(recipe).get("data") or {}):
        wanted["data.target"] = str(target)
    for stage in (s["stage"] for s in _recipe_yaml(recipe)["stages"] if s.get("extra_text_file")):
        # The slice's own training file (STS-B's second texts, SST-2's sentences), not a whole corpus.
        train_file = next(sst2_slice.glob("train.*"))
        wanted[f"stages.{stage}.extra_text_file"] = str(train_file)
        wanted[f"stages.{stage}.extra_text_field"] = {".jsonl": "sentence2", ".tsv": "sentence"}[train_file.suffix]
    if any(s.get("depth") for s in _recipe_yaml(recipe)["stages"] if s["stage"] == "distill"):
        del wanted["stages.distill.layers"]  # the stage chooses them: 1 of the tiny teacher's 2
        wanted["stages.distill.depth"] = "1"
    wanted.update({key.replace("__", "."): str(value) for key, value in changes.items()})
    return [f"{key}={value}" for key, value in wanted.items()
            if not key.startswith("stages.") or key.split(".")[1] in stages]


def copy_run(source: Path, target: Path) -> Path:
    """A private copy of a finished run folder; artifacts hold no absolute paths that the pipeline reads."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns(".tmp", ".work"))
    return target


def manifests(run_dir: Path) -> dict[str, dict]:
    import json

    return {p.parent.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("[0-9][0-9]-*/manifest.json"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def edgetl_cli(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m edgetl ...`` in a subprocess, from ``cwd`` (never the checkout: nothing may land there)."""
    return subprocess.run([sys.executable, "-m", "edgetl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


PLAIN_NUMBER = re.compile(r"^\d+(\.\d+)?$")


def visible_tick_labels(axis) -> list[str]:
    """The tick labels a reader sees on a drawn axis: inside the view and not empty."""
    low, high = sorted(axis.get_view_interval())
    return [t.get_text() for t, v in zip(axis.get_ticklabels(), axis.get_ticklocs(), strict=True)
            if low <= v <= high and t.get_text()]


def assert_readable(ax) -> None:
    """Plain-number ticks on the log axis, and point labels inside the axes that overlap no other label."""
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    ticks = visible_tick_labels(ax.xaxis)
    assert len(ticks) >= 2 and all(PLAIN_NUMBER.match(t) for t in ticks), ticks
    frame = ax.get_window_extent(renderer)
    boxes = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
    for (a, box_a), (b, box_b) in itertools.combinations(boxes.items(), 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
    for label, box in boxes.items():
        assert frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1), f"{label!r} leaves the axes"


def write_tiny_bundle(folder: Path, model, task: str, labels: list[str], text_pair: bool, tokenizer_dir: Path,
                      max_length: int) -> Path:
    """``folder`` as the bundle stage writes it: an ONNX and an OpenVINO model, each with its tokenizer and config,
    ``tokenizer.json`` at the top and ``edgetl.json`` listing every file with its sha256 (and, for a sentence-embedding
    model, the ``embedding`` section read from its config, as the bundle stage reads it)."""
    from edgetl import __version__
    from edgetl.artifact import copy_tokenizer, file_table
    from edgetl.stages.bundle import BUNDLE_FORMAT, BUNDLE_VERSION
    from edgetl.stages.export import export_onnx, export_openvino
    from edgetl.tasks import task_for

    raw_dir = folder.with_name(folder.name + "-raw")
    raw_dir.mkdir()
    raw = export_onnx(model, raw_dir, opset=17, task=task_for(task).optimum_task)
    for backend in ("onnx", "openvino"):
        (folder / backend).mkdir(parents=True)
        copy_tokenizer(tokenizer_dir, folder / backend)
        model.config.save_pretrained(str(folder / backend))
    shutil.copy2(raw, folder / "onnx" / "model.onnx")
    export_openvino(raw, folder / "openvino" / "model.xml")
    shutil.copy2(tokenizer_dir / "tokenizer.json", folder / "tokenizer.json")
    manifest = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "edgetl_version": __version__, "task": task,
        "labels": labels, "text_pair": text_pair, "max_length": max_length, "truncation": "right", "head_tokens": 0,
        "input_names": ["input_ids", "attention_mask", "token_type_ids"],
        "models": {"onnx": {"path": "onnx/model.onnx", "precision": "fp32", "batch_invariant": True},
                   "openvino": {"path": "openvino/model.xml", "precision": "fp32", "batch_invariant": True}},
        "metrics": {}, "provenance": {}, "files": file_table(folder),
    }
    if hasattr(model.config, "sentence_pooling"):
        manifest["embedding"] = {"dimension": model.config.hidden_size, "pooling": model.config.sentence_pooling,
                                 "normalize": model.config.sentence_normalize}
    (folder / "edgetl.json").write_text(json.dumps(manifest, indent=1))
    return folder


def _read_tsv(path: Path) -> tuple[str, list[str]]:
    lines = path.read_text().splitlines()
    return lines[0], [line for line in lines[1:] if line.strip()]


def _spread(rows: list[str], count: int) -> list[str]:
    step = len(rows) / count
    return [rows[int(i * step)] for i in range(count)]


@pytest.fixture(scope="session")
def sst2_slice(tmp_path_factory) -> Path:
    """train.tsv (400 rows) and dev.tsv (120 rows) taken evenly over the shared SST-2 files, header kept."""
    if not SHARED_SST2.is_dir():
        pytest.fail(f"the shared SST-2 files are missing: {SHARED_SST2}")
    folder = tmp_path_factory.mktemp("sst2")
    for name, count in (("train.tsv", TRAIN_ROWS), ("dev.tsv", DEV_ROWS)):
        header, rows = _read_tsv(SHARED_SST2 / name)
        assert header.split("\t") == ["sentence", "label"]
        picked = _spread(rows, count)
        assert {r.rsplit("\t", 1)[1] for r in picked} == {"0", "1"}, f"{name}: the slice lacks a label"
        (folder / name).write_text("\n".join([header, *picked]) + "\n")
    return folder


def tiny_bert(folder: Path, texts: list[str]) -> Path:
    """A 2-layer, 32-wide BERT saved in ``folder``, with a WordPiece vocab of the texts' most frequent words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    counts = collections.Counter(word for text in texts for word in text.lower().split())
    words = [w for w, _ in counts.most_common() if w not in SPECIAL_TOKENS and not w.startswith("##")]
    vocab = SPECIAL_TOKENS + words[:VOCAB_WORDS]
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab_file))
    assert tokenizer.pad_token_id == 0
    tokenizer.save_pretrained(str(folder))
    assert (folder / "tokenizer.json").is_file()
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, sst2_slice) -> Path:
    """A 2-layer, 32-wide BERT with a WordPiece vocab of the SST-2 slice's most frequent words."""
    texts = [row.rsplit("\t", 1)[0] for name in ("train.tsv", "dev.tsv") for row in _read_tsv(sst2_slice / name)[1]]
    return tiny_bert(tmp_path_factory.mktemp("tiny-bert"), texts)


def _jsonl_slice(source: Path, folder: Path, counts: dict[str, int]) -> Path:
    for name, count in counts.items():
        rows = [line for line in (source / name).read_text().splitlines() if line.strip()]
        (folder / name).write_text("\n".join(_spread(rows, count)) + "\n")
    return folder


@pytest.fixture(scope="session")
def conll_slice(tmp_path_factory) -> Path:
    """train.jsonl (80 sentences) and dev.jsonl (30) taken evenly over the shared CoNLL-2003 files."""
    if not SHARED_CONLL.is_dir():
        pytest.fail(f"the shared CoNLL-2003 files are missing: {SHARED_CONLL}")
    return _jsonl_slice(SHARED_CONLL, tmp_path_factory.mktemp("conll2003"), {"train.jsonl": 80, "dev.jsonl": 30})


@pytest.fixture(scope="session")
def stsb_slice(tmp_path_factory) -> Path:
    """train.jsonl (80 pairs) and dev.jsonl (30) taken evenly over the shared STS-B files."""
    if not SHARED_STSB.is_dir():
        pytest.fail(f"the shared STS-B files are missing: {SHARED_STSB}")
    return _jsonl_slice(SHARED_STSB, tmp_path_factory.mktemp("stsb"), {"train.jsonl": 80, "dev.jsonl": 30})


@pytest.fixture(scope="session")
def tiny_task_model(tmp_path_factory, conll_slice, stsb_slice) -> Path:
    """The tiny BERT with a vocab of the CoNLL-2003 and STS-B slices' words."""
    import json

    texts = []
    for name in ("train.jsonl", "dev.jsonl"):
        texts += [" ".join(json.loads(line)["tokens"]) for line in (conll_slice / name).read_text().splitlines()]
        texts += [f"{row['sentence1']} {row['sentence2']}" for row in map(json.loads, (stsb_slice / name).read_text().splitlines())]
    return tiny_bert(tmp_path_factory.mktemp("tiny-task-bert"), texts)


@pytest.fixture(scope="session")
def tiny_embedding_bundle(tmp_path_factory, tiny_task_model) -> Path:
    """A sentence-embedding bundle of the tiny task BERT (random weights): mean-pooled, L2-normalised vectors of 32
    values, max_length 32, FP32 ONNX and OpenVINO models; built in seconds."""
    import torch
    from transformers import BertConfig

    from edgetl.modeling import embedding_class

    config = BertConfig.from_pretrained(str(tiny_task_model))
    config.sentence_pooling, config.sentence_normalize = "mean", True
    torch.manual_seed(0)
    model = embedding_class("bert")(config).eval()
    folder = tmp_path_factory.mktemp("embedding-bundle") / "bundle"
    return write_tiny_bundle(folder, model, "sentence-embedding", [], False, tiny_task_model, 32)


@pytest.fixture(scope="session")
def electronics_slice(tmp_path_factory) -> Path:
    """train.jsonl (80 reviews) and dev.jsonl (40), taken evenly over the shared electronics files."""
    if not SHARED_ELECTRONICS.is_dir():
        pytest.fail(f"the shared Amazon electronics files are missing: {SHARED_ELECTRONICS}")
    return _jsonl_slice(SHARED_ELECTRONICS, tmp_path_factory.mktemp("electronics"), {"train.jsonl": 80, "dev.jsonl": 40})


def tiny_decoder(folder: Path, model_type: str, texts: list[str], seed: int = 0) -> Path:
    """A 2-layer, 32-wide decoder of ``model_type`` (llama or gpt2) saved in ``folder``, with a byte-level BPE
    tokenizer (400 tokens) learnt on the texts; positions for 512 tokens (the benchmark's 256-token prompts + 128)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                        model_input_names=["input_ids", "attention_mask"])
    tokenizer.save_pretrained(str(folder))
    sizes = {"llama": {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64,
                       "num_hidden_layers": 2, "max_position_embeddings": 512, "tie_word_embeddings": True},
             "gpt2": {"n_embd": 32, "n_head": 4, "n_layer": 2, "n_positions": 512}}[model_type]
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2, **sizes)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    return folder


def electronics_texts(folder: Path) -> list[str]:
    return [json.loads(line)["text"] for name in ("train.jsonl", "dev.jsonl")
            for line in (folder / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, electronics_slice) -> Path:
    """A tiny Llama decoder with a BPE vocab of the electronics slice."""
    return tiny_decoder(tmp_path_factory.mktemp("tiny-llama"), "llama", electronics_texts(electronics_slice))


@pytest.fixture(scope="session")
def shrink(request, tiny_model, sst2_slice, electronics_slice):
    """``shrink(recipe="sst-int8", **changes)``: tiny_overrides bound to this session's model and slices (a recipe on
    CoNLL-2003 or STS-B gets that corpus's slice and the tiny model with their words; a text-generation recipe the
    electronics slice and a tiny decoder)."""
    task_slices = {"conll2003": "conll_slice", "stsb": "stsb_slice"}

    def make(recipe: str | Path = "sst-int8", **changes) -> list[str]:
        dataset = (_recipe_yaml(recipe).get("data") or {}).get("dataset")
        decoder = _recipe_yaml(recipe).get("model") in DECODER_MODELS
        if any("cloze" in s for s in _recipe_yaml(recipe)["stages"]):  # verbaliser words that are one tiny-vocab token
            changes.setdefault("stages__finetune__cloze__verbalizer", TINY_VERBALIZER["llama" if decoder else "bert"])
        if decoder:  # a decoder recipe runs on the tiny Llama
            data = electronics_slice if str(dataset).startswith("amazon-") else sst2_slice
            return tiny_overrides(request.getfixturevalue("tiny_llama"), data, recipe, **changes)
        if dataset in task_slices:
            model, data = request.getfixturevalue("tiny_task_model"), request.getfixturevalue(task_slices[dataset])
            return tiny_overrides(model, data, recipe, electronics_slice, **changes)
        return tiny_overrides(tiny_model, sst2_slice, recipe, electronics_slice, **changes)

    return make


@pytest.fixture(scope="session")
def quiet_cwd(tmp_path_factory):
    """An empty working folder for in-process runs: third-party tools that write into the cwd land here."""
    folder = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        yield folder


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory, shrink, quiet_cwd):
    """``tiny_runs(recipe, *overrides)``: a recipe run end to end on the tiny model, once per session per recipe
    and overrides.

    Runs sit side by side under one folder, as under ``runs/``, so ``bench.compare: [sst-int8:bundle]``
    finds the tiny sst-int8 run; a recipe's compared runs are run first.
    """
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def get(recipe: str | Path = "sst-int8", *overrides: str) -> Path:
        key = " ".join([str(recipe), *overrides])
        if key not in done:
            loaded = load_recipe(str(recipe), [*shrink(recipe), *overrides])
            for entry in loaded.bench.compare:
                get(entry.partition(":")[0])
            run_dir = root / (loaded.name if key == loaded.name else f"{loaded.name}-{len(done)}")
            run_recipe(loaded, run_dir)
            done[key] = run_dir
        return done[key]

    return get


@pytest.fixture(scope="session")
def tiny_run(tiny_runs) -> Path:
    """The sst-int8 recipe run once on the tiny model; tests read it and never write into it."""
    return tiny_runs("sst-int8")


@pytest.fixture(scope="session")
def dev_texts(sst2_slice) -> list[str]:
    """The dev sentences of the SST-2 slice, in file order."""
    from edgetl.data import load_labelled
    from edgetl.recipe import DataConfig

    return load_labelled(DataConfig(path=str(sst2_slice)))[1]["text"]


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run) -> dict:
    """stage name -> Artifact of the tiny sst-int8 run."""
    from edgetl.artifact import Artifact

    return {p.name.split("-", 1)[1]: Artifact.load(p) for p in sorted(tiny_run.glob("[0-9][0-9]-*"))}


@pytest.fixture(scope="session")
def dynamic_run(tmp_path_factory, tiny_run, shrink, quiet_cwd) -> dict:
    """A copy of the tiny run, rerun with ``stages.quantize.onnx_method=dynamic``.

    Returns the run folder and the manifests before and after, so tests can see which stages reran.
    """
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    run_dir = copy_run(tiny_run, tmp_path_factory.mktemp("dynamic") / "run")
    before = manifests(run_dir)
    recipe = load_recipe("sst-int8", shrink(stages__quantize__onnx_method="dynamic"))
    assert recipe.stages[2].onnx_method == "dynamic"
    run_recipe(recipe, run_dir)
    return {"run_dir": run_dir, "before": before, "after": manifests(run_dir)}

"""Recipe schema, loading, overrides and whole-chain checks.

A recipe is data: ``name``, ``model``, ``data``, ``stages`` and ``bench``. Every default lives in the
schema below; validation never imports torch, so a bad recipe fails in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgetl.errors import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

Backend = Literal["onnx", "openvino"]


class _Strict(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently used default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the labelled text comes from and how it is tokenized."""

    dataset: str = Field("sst2", description="'sst2' (local GLUE SST-2), 'files', or a hub dataset id.")
    path: str | None = Field(None, description="Folder holding sst2's train.tsv/dev.tsv (default: $EDGETL_DATA_DIR/sst2).")
    train_file: str | None = Field(None, description="dataset=files: csv, tsv or jsonl with the training rows.")
    eval_file: str | None = Field(None, description="dataset=files: csv, tsv or jsonl with the evaluation rows.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name (e.g. 'sst2' for 'nyu-mll/glue').")
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = "sentence"
    label_field: str = "label"
    labels: list[str] = Field(default_factory=lambda: ["negative", "positive"], min_length=2)
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text; longer texts are truncated.")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _files_need_paths(self) -> DataConfig:
        if self.dataset == "files" and not (self.train_file and self.eval_file):
            raise ValueError("dataset 'files' needs both train_file and eval_file")
        return self


class FinetuneStage(_Strict):
    """Full fine-tuning with a classification head (HF Trainer; best dev checkpoint kept)."""

    stage: Literal["finetune"]
    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    pooling: Literal["cls", "mean"] = Field("mean", description="Sentence vector fed to the classifier.")
    eval_steps: int = Field(200, ge=1, description="Evaluate and checkpoint every this many steps.")
    group_by_length: bool = Field(True, description="Batch texts of similar length (about 3x faster on SST-2).")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Mixed precision for training; auto = bf16 where the CPU or GPU computes it natively.")
    seed: int = 42


class ExportStage(_Strict):
    """PyTorch FP32 model -> ONNX (optimum exporter + ORT fusions) and/or OpenVINO IR."""

    stage: Literal["export"]
    formats: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)
    opset: int = Field(17, ge=14, le=21)
    optimize: bool = Field(True, description="Apply ONNX Runtime's transformer fusions to the ONNX model.")


class QuantizeStage(_Strict):
    """Post-training INT8 quantization of exported models."""

    stage: Literal["quantize"]
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)
    onnx_method: Literal["static", "dynamic"] = Field("static", description="ONNX Runtime QDQ with calibration, or dynamic INT8.")
    calibration_samples: int = Field(300, ge=1, description="Training sentences used to calibrate activations.")
    per_channel: bool = True
    onnx_calibration: Literal["minmax", "percentile"] = Field("minmax", description="Static activation ranges: min/max or 99.999th percentile.")
    onnx_dynamic_ffn_down: bool = Field(
        True, description="Static INT8 everywhere except the FFN down-projections, which get dynamic INT8 "
        "(cuts the logit error about 3x; see benchmarks/ort_static_configs.py).")


class EvaluateStage(_Strict):
    """Accuracy of every model artifact so far, each through its own runtime."""

    stage: Literal["evaluate"]
    batch_size: int = Field(64, ge=1)


class BenchmarkStage(_Strict):
    """Latency, throughput, size, memory and accuracy of every artifact x backend (settings under ``bench``)."""

    stage: Literal["benchmark"]


class BundleStage(_Strict):
    """An app-ready folder: the quantized model(s), tokenizer, labels, metrics and checksums."""

    stage: Literal["bundle"]
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)


StageConfig = Annotated[
    FinetuneStage | ExportStage | QuantizeStage | EvaluateStage | BenchmarkStage | BundleStage,
    Field(discriminator="stage"),
]
STAGE_NAMES = ("finetune", "export", "quantize", "evaluate", "benchmark", "bundle")


class BenchConfig(_Strict):
    """How the benchmark measures."""

    warmup: int = Field(20, ge=0, description="Untimed calls before each timed block.")
    rounds: int = Field(2, ge=1, description="Timed blocks per backend; block order alternates between rounds.")
    max_sentences: int | None = Field(None, ge=1, description="Eval sentences timed at batch 1 (default: all).")
    throughput_batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1, description="Intra-op threads for every backend (default: all cores).")
    include_pytorch: bool = True


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str = Field(description="Catalog name (minilm-l6), local folder, or hub id.")
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageConfig] = Field(min_length=1)
    bench: BenchConfig = Field(default_factory=BenchConfig)


def find_recipe(name_or_path: str) -> Path:
    """A recipe file path, or a shipped recipe's name (``sst-int8`` -> ``recipes/sst-int8.yaml``)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(str(path), ["file not found"])
        return path
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(name_or_path, [f"no such recipe file or shipped recipe (shipped: {known})"])


def apply_override(raw: dict, override: str) -> None:
    """Set ``a.b.c=value`` in the raw recipe dict. A stage is addressed by name or index."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise RecipeError("overrides", [f"'{override}': expected key.path=value"])
    value = yaml.safe_load(text) if text else ""
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _step(node, part, ".".join(parts[: depth + 1]))
    if isinstance(node, list):
        raise RecipeError("overrides", [f"'{key}': cannot replace a whole stage; set one of its fields"])
    if not isinstance(node, dict):
        raise RecipeError("overrides", [f"'{key}': '{'.'.join(parts[:-1])}' is not a section"])
    node[parts[-1]] = value


def _step(node: Any, part: str, where: str) -> Any:
    if isinstance(node, list):
        if part.isdigit() and int(part) < len(node):
            return node[int(part)]
        for item in node:
            if isinstance(item, dict) and item.get("stage") == part:
                return item
        raise RecipeError("overrides", [f"'{where}': no stage named or numbered '{part}'"])
    if isinstance(node, dict):
        return node.setdefault(part, {})
    raise RecipeError("overrides", [f"'{where}' is not a section"])


def load_recipe(name_or_path: str, overrides: list[str] = ()) -> Recipe:
    """Read, override, validate and chain-check a recipe. Raises RecipeError listing every problem."""
    path = find_recipe(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(str(path), [f"not valid YAML: {exc}"]) from None
    if not isinstance(raw, dict):
        raise RecipeError(str(path), ["top level must be a mapping with name, model, data, stages"])
    problems = []
    for override in overrides:
        try:
            apply_override(raw, override)
        except RecipeError as exc:
            problems += [f"overrides: {p}" for p in exc.problems]
    if problems:
        raise RecipeError(str(path), problems)
    if isinstance(raw.get("model"), str):
        problems += check_model(raw["model"])
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), [_describe(err, raw) for err in exc.errors()] + problems) from None
    problems = check_chain(recipe.stages) + problems
    if problems:
        raise RecipeError(str(path), problems)
    return recipe


def _describe(err: dict, raw: dict) -> str:
    loc = list(err["loc"])
    # Name stages by index and kind: "stages[2] (quantize).onnx_method" beats "stages.2.quantize.onnx_method".
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        if len(loc) >= 3 and loc[2] in STAGE_NAMES:
            del loc[2]
        head = f"stages[{loc[1]}] ({_stage_name(raw, loc[1])})"
        loc = [head] + loc[2:]
    field = ".".join(str(p) for p in loc) or "(top level)"
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        message = "unknown field (misspelt?)"
    elif err["type"] == "union_tag_invalid":
        message = f"unknown stage '{err['input'].get('stage')}'; known stages: {', '.join(STAGE_NAMES)}"
    elif err["type"] == "union_tag_not_found":
        message = f"missing 'stage:' key; known stages: {', '.join(STAGE_NAMES)}"
    return f"{field}: {message}"


def _stage_name(raw: dict, index: int) -> str:
    try:
        return str(raw["stages"][index].get("stage", "?"))
    except (KeyError, IndexError, AttributeError, TypeError):
        return "?"


def check_chain(stages: list) -> list[str]:
    """Simulate what each stage has available and refuse impossible orders before any work starts."""
    problems: list[str] = []
    pytorch_model = False
    exported: set[str] = set()
    quantized: set[str] = set()
    models_seen = False
    seen: set[str] = set()
    for index, stage in enumerate(stages):
        where = f"stages[{index}] ({stage.stage})"
        if isinstance(stage, FinetuneStage):
            if exported:
                problems.append(f"{where}: fine-tuning after export would leave the exported models stale; move it before export")
            pytorch_model = models_seen = True
        elif isinstance(stage, ExportStage):
            if not pytorch_model:
                problems.append(f"{where}: export needs a PyTorch model; add a finetune stage before it")
            if quantized:
                problems.append(f"{where}: export after quantize would feed an INT8 model to the exporter; export the FP32 model and quantize after export")
            exported |= set(stage.formats)
        elif isinstance(stage, QuantizeStage):
            missing = [b for b in stage.backends if b not in exported]
            if missing:
                problems.append(f"{where}.backends: {missing} not exported yet; quantize works on exported models, so add an export stage with those formats before it")
            quantized |= set(stage.backends)
        elif isinstance(stage, (EvaluateStage, BenchmarkStage)):
            if not models_seen:
                problems.append(f"{where}: nothing to measure; it needs a model stage before it")
        elif isinstance(stage, BundleStage):
            missing = [b for b in stage.backends if b not in exported]
            if missing:
                problems.append(f"{where}.backends: {missing} not exported by an earlier stage")
        if stage.stage in seen and stage.stage in ("finetune", "evaluate", "benchmark", "bundle"):
            problems.append(f"{where}: stage '{stage.stage}' appears twice")
        seen.add(stage.stage)
    return problems


def check_model(model: str) -> list[str]:
    from edgetl.models import resolve_model_source  # light: no torch

    try:
        resolve_model_source(model)
    except Exception as exc:  # ModelNotFoundError carries the user-facing text
        return [f"model: {exc}"]
    return []


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe with every default filled in, as written into the run folder."""
    return recipe.model_dump(mode="json")

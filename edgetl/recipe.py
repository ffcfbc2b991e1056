"""Recipe schema, loading, overrides and whole-chain checks.

A recipe is data: ``name``, ``model``, ``data``, ``stages`` and ``bench``. Every default lives in the
schema below; validation never imports torch, so a bad recipe fails in well under a second.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from edgetl.architectures.adapter import OPERATIONS
from edgetl.corpora import KNOWN_DATASETS, target_files
from edgetl.errors import RecipeError
from edgetl.inputs import BATCH_SIZE
from edgetl.tasks import DEFAULT_TASK, OPTIONS, TASKS, task_for

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"

Backend = Literal["onnx", "openvino"]
TaskName = Literal[tuple(TASKS)]


class _Strict(BaseModel):
    # extra="forbid" turns a misspelt key into an error instead of a silently used default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    """Where the labelled data come from, which columns hold what, and how texts are tokenized."""

    dataset: str = Field("sst2", description="A known dataset (local files under $EDGETL_DATA_DIR: 'sst2' (GLUE "
                         "SST-2), 'conll2003' (named entities), 'stsb' (similarity scores of sentence pairs); "
                         "'target': the target domain's own labelled reviews, for few-shot learning), 'files', or "
                         "a hub dataset id. A known dataset sets the column fields and labels a recipe leaves out.")
    path: str | None = Field(None, description="Folder holding a known dataset's two files (default: "
                             "$EDGETL_DATA_DIR/<dataset>; 'target' reads data.target's folder).")
    train_file: str | None = Field(None, description="dataset=files: csv, tsv, jsonl or parquet with the training rows.")
    eval_file: str | None = Field(None, description="dataset=files: csv, tsv, jsonl or parquet with the evaluation rows.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name (e.g. 'sst2' for 'nyu-mll/glue').")
    train_split: str = "train"
    eval_split: str = "validation"
    text_field: str = Field("sentence", description="Column of the text (text-classification, text-regression).")
    text_pair_field: str | None = Field(None, description="Column of a second text: each row is a pair of texts, "
                                        "cut longest_first (text-classification, text-regression).")
    label_field: str = Field("label", description="text-classification: column of the label, a name or an index "
                             "into labels.")
    tokens_field: str = Field("tokens", description="token-classification: column of the pre-split words (a list).")
    tags_field: str = Field("tags", description="token-classification: column of the tags, one per word (a list).")
    score_field: str = Field("score", description="text-regression: column of the score (a number).")
    labels: list[str] | None = Field(None, min_length=2, description="Label names (token-classification: the "
                                     "tags), in class order. Default: the known dataset's, else the distinct labels "
                                     "of the training rows, sorted. Every row's label must be one of them, or an "
                                     "integer index into them.")
    max_length: int = Field(128, ge=8, le=4096, description="Tokens per text (or pair); longer ones are truncated.")
    truncation: Literal["right", "left", "head+tail"] = Field(
        "right", description="Which part of a longer text is kept: its start, its end, or head_tokens from the "
        "start plus the end (long reviews often end with their verdict). One text per row only.")
    head_tokens: int = Field(64, ge=0, description="truncation head+tail: tokens kept from the start.")
    target: str | None = Field(None, description="Target domain: an amazon-reviews domain (books, dvd, electronics, "
                               "kitchen) or a folder with train.jsonl and dev.jsonl ({text, label}). Evaluation, "
                               "benchmark and bundle report on its dev split; adapt and domain_adversarial read its "
                               "train texts without labels; training still selects checkpoints on the labelled "
                               "data's own dev split.")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _known_dataset_defaults(cls, data: Any) -> Any:
        # A known dataset names its own columns and labels; whatever the recipe sets wins.
        known = KNOWN_DATASETS.get(data.get("dataset", "sst2")) if isinstance(data, dict) else None
        if known is None:
            return data
        return known.columns | ({"labels": list(known.labels)} if known.labels else {}) | data

    @model_validator(mode="after")
    def _files_need_paths(self) -> DataConfig:
        if self.dataset == "files" and not (self.train_file and self.eval_file):
            raise ValueError("dataset 'files' needs both train_file and eval_file")
        if self.dataset == "target" and not self.target:
            raise ValueError("dataset 'target' reads the target domain's labelled reviews; set data.target")
        if self.truncation == "head+tail" and self.head_tokens > self.max_length - 2:
            raise ValueError(f"head_tokens {self.head_tokens} leaves no room for the tail within max_length {self.max_length}")
        return self


class TrainingConfig(_Strict):
    """Optimizer, schedule and checkpointing of a stage that trains (HF Trainer; best dev checkpoint kept)."""

    epochs: float = Field(2.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    learning_rate: float = Field(5e-5, gt=0, lt=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(128, ge=1)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    eval_steps: int = Field(200, ge=1, description="Evaluate and checkpoint every this many steps.")
    group_by_length: bool = Field(True, description="Batch texts of similar length (about 3x faster on SST-2), "
                                  "the batches in random order.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Mixed precision for training; auto = bf16 where the CPU or GPU computes it natively.")
    keep: Literal["best", "last"] = Field(
        "best", description="best: the checkpoint with the best accuracy on the labelled data's dev split; last: "
        "the final weights, never evaluated during training (few-shot: the only dev split is the test split).")
    seed: int = 42


class AdaptStage(TrainingConfig):
    """Continued masked-language-model pretraining on unlabelled in-domain text (DAPT, or TAPT on the task's text)."""

    stage: Literal["adapt"]
    text: str = Field("target", description="'target' (data.target's training texts, labels dropped), 'train' "
                      "(the labelled training texts: task-adaptive), or a file: .txt (one text per line), or "
                      ".jsonl/.csv/.tsv with a text_field column.")
    text_field: str = Field("text", description="Column holding the text when `text` is a jsonl/csv/tsv file.")
    max_texts: int | None = Field(None, ge=2, description="Use at most this many texts (shuffled first).")
    whole_word_mask: bool = Field(True, description="Mask every piece of a word together (BERT's wwm).")
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    eval_fraction: float = Field(0.05, gt=0, lt=0.5, description="Texts held out to measure the MLM loss; "
                                 "the checkpoint with the lowest held-out loss is kept.")
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(16, ge=1)
    eval_steps: int = Field(50, ge=1)


class AugmentStage(_Strict):
    """More labelled examples from few: token-level edits and contextual substitution by a masked language model."""

    stage: Literal["augment"]
    copies: int = Field(4, ge=1, description="New texts made from each original (before balancing).")
    operations: list[Literal["swap", "delete", "insert", "contextual"]] = Field(
        default_factory=lambda: ["swap", "delete", "insert"], min_length=1,
        description="Each new text gets one of these, in turn: swap two words, delete words, insert a word of the "
        "same text (synonym-free), or replace words with a masked language model's prediction.")
    rate: float = Field(0.1, gt=0, le=0.5, description="Fraction of a text's words each operation touches (at least one).")
    balance: bool = Field(True, description="Every label ends with as many examples as the largest one: "
                          "smaller labels get more augmented copies.")
    mlm_model: str | None = Field(None, description="Masked language model for 'contextual' (default: the "
                                  "run's adapt stage).")
    seed: int = 42


class DomainAdversarialConfig(_Strict):
    """DANN: a domain classifier on the pooled representation behind a gradient-reversal layer."""

    weight: float = Field(0.1, gt=0, description="Largest gradient-reversal coefficient (lambda); it ramps up "
                          "from 0 as 2 / (1 + exp(-10 p)) - 1 over training progress p.")
    hidden_size: int = Field(256, ge=1, description="Width of the domain classifier's hidden layer.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Learning rate of the domain classifier (a new "
                                 "head at the encoder's rate falls behind the reversed gradient).")
    target_batch_size: int = Field(8, ge=1, description="Unlabelled target texts per training step.")
    target_max_length: int | None = Field(128, ge=8, description="Tokens per target text in the domain loss "
                                          "(null: data.max_length).")


class FinetuneStage(TrainingConfig):
    """Fine-tuning with the task's head: full, LoRA or prompt tuning, optionally domain-adversarial."""

    stage: Literal["finetune"]
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="The vector per text fed to the head: the attention-masked mean of the last hidden states, "
        "or the [CLS] one through the pooler. Default: the task's (mean; none for token-classification, whose head "
        "reads every token).")
    method: Literal["full", "lora", "prompt-tuning"] = Field(
        "full", description="full: every weight trains; lora: low-rank adapters (peft), merged into the weights "
        "afterwards; prompt-tuning: a trained soft prompt and head, the encoder frozen (PyTorch only).")
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.1, ge=0, lt=1)
    lora_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1,
                                    description="Linear layers (by name) that get LoRA adapters.")
    prompt_tokens: int = Field(20, ge=1, description="prompt-tuning: virtual tokens in the soft prompt.")
    domain_adversarial: DomainAdversarialConfig | None = Field(
        None, description="Train against a domain classifier on labelled source plus unlabelled data.target text.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the weights (decay per step; 0.999 "
        "averages over about the last 1,000 steps): the average is evaluated, checkpointed and kept, and the "
        "training weights' dev accuracy is logged beside it.")
    rdrop_alpha: float | None = Field(
        None, gt=0, description="R-Drop (Liang et al. 2021): each batch goes through the model twice under "
        "different dropout, and the loss adds alpha times the symmetric KL divergence of the two predictions "
        "(about 1.5x the fine-tuning time on SST-2 on a CPU).")

    @model_validator(mode="after")
    def _one_extra_loss(self) -> FinetuneStage:
        if self.rdrop_alpha is not None and self.domain_adversarial is not None:
            raise ValueError("rdrop_alpha and domain_adversarial both change the training loss; use one of them")
        return self


class SelfTrainStage(TrainingConfig):
    """Self-training on the unlabelled target domain: pseudo-label its texts, keep the surest, train on them
    with labelled rows mixed in; repeat."""

    stage: Literal["self_train"]
    rounds: int = Field(2, ge=1, description="Pseudo-label / train rounds; round k of n keeps fraction x k/n.")
    fraction: float = Field(0.8, gt=0, le=1, description="Share of the target texts pseudo-labelled in the last "
                            "round (surest first).")
    balance: bool = Field(True, description="Same number of pseudo-labels for every label (assumes the target's "
                          "labels are roughly balanced); false: each predicted label keeps its own share.")
    source_ratio: float = Field(1.0, ge=0, description="Labelled rows mixed in per pseudo-labelled text, so the "
                                "model keeps what the labels taught it.")
    epochs: float = Field(1.0, gt=0, description="Epochs over each round's mixed data.")
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)
    keep: Literal["best", "last"] = Field("last", description="last: no target labels are read to choose weights "
                                          "(best would choose on the labelled data's dev split, not the target).")


class DistillationConfig(TrainingConfig):
    """Training against a teacher: soft targets, optionally hidden states and attention maps (TinyBERT)."""

    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the soft targets.")
    kd_weight: float = Field(0.5, ge=0, le=1, description="Weight of the soft-target loss; the task loss gets 1 - kd_weight.")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of the MSE between matched hidden states "
                                 "(through a learned projection when the widths differ).")
    attention_weight: float = Field(0.0, ge=0, description="Weight of the KL between matched layers' head-averaged "
                                    "attention distributions.")


class DistillStage(DistillationConfig):
    """Knowledge distillation into a smaller student: a shallower copy of the teacher, or a named pretrained model."""

    stage: Literal["distill"]
    teacher: str | None = Field(None, description="Folder of a fine-tuned classifier (default: the run's last PyTorch model).")
    student: str | None = Field(None, description="Pretrained model for the student (catalog name, folder or hub id); "
                                "default: a copy of the teacher keeping `layers`.")
    layers: list[int] | None = Field(None, min_length=1, description="Teacher layers the student keeps "
                                     "(default: every other layer from the first, as DistilBERT).")
    epochs: float = Field(3.0, gt=0)
    learning_rate: float = Field(1e-4, gt=0, lt=1)
    extra_text_file: str | None = Field(None, description="Unlabelled text (jsonl/csv/tsv with data.text_field, or "
                                        ".txt, one text per line) added for the soft-target loss.")

    @model_validator(mode="after")
    def _student_or_layers(self) -> DistillStage:
        if self.student is not None and self.layers is not None:
            raise ValueError("give either student (a pretrained model) or layers (a copy of the teacher), not both")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeats a layer")
        return self


class PruneStage(DistillationConfig):
    """Structured pruning (heads, FFN neurons, whole layers) rebuilt as smaller Linear layers, then vocabulary."""

    stage: Literal["prune"]
    importance: Literal["fisher", "taylor", "magnitude"] = Field(
        "taylor", description="How heads, neurons and layers are ranked on training data: fisher sums each text's "
        "squared gradient of a gate on the unit (Kwon et al. 2022), taylor the |gradient| of a gate on each "
        "batch's mean loss (Michel et al. 2019), magnitude uses weight norms.")
    importance_samples: int = Field(2048, ge=1, description="Training sentences used to score heads, neurons and layers.")
    heads_keep: float = Field(1.0, gt=0, le=1, description="Fraction of attention heads kept (ranked over all layers).")
    ffn_keep: float = Field(1.0, gt=0, le=1, description="Fraction of FFN intermediate neurons kept (ranked over all layers).")
    layers_drop: int = Field(0, ge=0, description="Whole layers removed (the least important ones).")
    latency_budget_ms: float | None = Field(
        None, gt=0, description="Instead of heads_keep/ffn_keep: the largest common keep ratio (1.0, 0.9, ... 0.1) "
        "whose ONNX Runtime FP32 batch-1 p50 on evaluation texts, measured on this machine, is within this budget.")
    vocabulary: bool = Field(False, description="Drop embedding rows of tokens the training text never uses and "
                             "rewrite the tokenizer to match.")
    vocab_min_count: int = Field(1, ge=1, description="Keep tokens seen at least this often in the training text.")
    recovery: bool = Field(True, description="Distil from the unpruned model after structured pruning.")
    epochs: float = Field(1.0, gt=0)
    kd_weight: float = Field(0.8, ge=0, le=1)

    @model_validator(mode="after")
    def _layer_scores(self) -> PruneStage:
        if self.layers_drop and self.importance == "magnitude":
            raise ValueError("layers_drop ranks layers by gradient scores; set importance: fisher or taylor")
        if self.latency_budget_ms is not None and (self.heads_keep < 1 or self.ffn_keep < 1):
            raise ValueError("latency_budget_ms chooses the keep ratio itself; leave heads_keep and ffn_keep at 1")
        return self

    @property
    def structured(self) -> bool:
        return self.heads_keep < 1 or self.ffn_keep < 1 or self.layers_drop > 0 or self.latency_budget_ms is not None


class ExportStage(_Strict):
    """PyTorch FP32 model -> ONNX (optimum exporter + ORT fusions) and/or OpenVINO IR."""

    stage: Literal["export"]
    formats: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)
    opset: int = Field(17, ge=14, le=21)
    optimize: bool = Field(True, description="Apply ONNX Runtime's transformer fusions to the ONNX model.")


class QATConfig(DistillationConfig):
    """Quantization-aware training: the fake-quantized model learns from its FP32 self."""

    epochs: float = Field(1.0, gt=0)
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    kd_weight: float = Field(0.8, ge=0, le=1)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "fp32", description="fp32: bf16 autocast would compute the fake-quantizers' scales and rounding in bf16.")


class QuantizeStage(_Strict):
    """INT8: post-training on exported models (optionally accuracy-controlled), or quantization-aware training."""

    stage: Literal["quantize"]
    method: Literal["ptq", "qat"] = Field("ptq", description="ptq: quantize exported models; qat: NNCF fake-quantizers "
                                          "on the PyTorch model, trained with distillation, then exported to INT8.")
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)
    max_accuracy_drop: float | None = Field(
        None, gt=0, le=100, description="PTQ only: accuracy points a static INT8 model may lose on the evaluation "
        "split; the most sensitive layers stay in FP32 until it holds (nncf.quantize_with_accuracy_control). "
        "Applies to OpenVINO, and to ONNX when onnx_method is static (dynamic INT8 has no calibrated layers to revert).")
    qat: QATConfig = Field(default_factory=QATConfig, description="Training settings for method: qat.")
    onnx_method: Literal["static", "dynamic"] = Field("static", description="ONNX Runtime QDQ with calibration, or dynamic INT8.")
    calibration_samples: int = Field(300, ge=1, description="Texts that calibrate activations: training sentences, "
                                     "or data.target's unlabelled training texts when it is set (what the model will serve).")
    per_channel: bool = True
    onnx_calibration: Literal["minmax", "percentile"] = Field("minmax", description="Static activation ranges: min/max or 99.999th percentile.")
    onnx_dynamic_ffn_down: bool = Field(
        True, description="Static INT8 everywhere except the FFN down-projections, which get dynamic INT8 "
        "(cuts the logit error about 3x; see benchmarks/ort_int8_configs.py).")
    smooth_alpha: float | None = Field(
        None, ge=0, le=1, description="ONNX Runtime PTQ: SmoothQuant before INT8, moving activation outliers into the "
        "weights (strength alpha, measured on the calibration texts); none: off. OpenVINO's nncf.quantize already "
        "smooths MatMuls (alpha 0.95) under its transformer preset.")


class EvaluateStage(_Strict):
    """The task's metric for every model artifact so far, each through its own runtime."""

    stage: Literal["evaluate"]
    batch_size: int = Field(BATCH_SIZE, ge=1)


class BenchmarkStage(_Strict):
    """Latency, throughput, size, memory and accuracy of every artifact x backend (settings under ``bench``)."""

    stage: Literal["benchmark"]


class BundleStage(_Strict):
    """An app-ready folder: the quantized model(s), tokenizer, labels, metrics and checksums."""

    stage: Literal["bundle"]
    backends: list[Backend] = Field(default_factory=lambda: ["onnx", "openvino"], min_length=1)


StageConfig = Annotated[
    AdaptStage | AugmentStage | FinetuneStage | SelfTrainStage | DistillStage | PruneStage | ExportStage | QuantizeStage
    | EvaluateStage | BenchmarkStage | BundleStage,
    Field(discriminator="stage"),
]
STAGE_NAMES = ("adapt", "augment", "finetune", "self_train", "distill", "prune", "export", "quantize", "evaluate", "benchmark", "bundle")


class BenchConfig(_Strict):
    """How the benchmark measures."""

    warmup: int = Field(20, ge=0, description="Untimed calls before each timed block.")
    rounds: int = Field(2, ge=1, description="Timed blocks per backend; block order alternates between rounds.")
    max_sentences: int | None = Field(None, ge=1, description="Eval sentences timed at batch 1 (default: all).")
    throughput_batch_size: int = Field(32, ge=1)
    threads: int | None = Field(None, ge=1, description="Intra-op threads for every backend (default: all cores).")
    include_pytorch: bool = True
    compare: list[str] = Field(default_factory=list, description="Artifacts of other runs evaluated and timed "
                               "beside this run's: 'RECIPE:STAGE' (that recipe's run next to this one, e.g. "
                               "'sst-int8:bundle') or an artifact folder.")


class Recipe(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    task: TaskName = Field(DEFAULT_TASK, description="What the model learns: text-classification (a label per text "
                           "or pair of texts), token-classification (a tag per word), text-regression (a score per "
                           "text or pair). Sentence embeddings and text generation are to come.")
    description: str = ""
    model: str = Field(description="Catalog name (minilm-l6), local folder, or hub id.")
    data: DataConfig = Field(default_factory=DataConfig)
    stages: list[StageConfig] = Field(min_length=1)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, raw: Any) -> Any:
        # finetune.pooling defaults to the task's: mean where the head reads one vector per text, else none.
        if not isinstance(raw, dict) or raw.get("task", DEFAULT_TASK) not in TASKS or not isinstance(raw.get("stages"), list):
            return raw
        pooling = TASKS[raw.get("task", DEFAULT_TASK)].pooling
        stages = [{"pooling": pooling, **s} if isinstance(s, dict) and s.get("stage") == "finetune" else s
                  for s in raw["stages"]]
        return {**raw, "stages": stages}


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
    model_problems = check_model(raw["model"]) if isinstance(raw.get("model"), str) else []
    problems += model_problems
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(str(path), [_describe(err, raw) for err in exc.errors()] + problems) from None
    problems = check_chain(recipe.stages) + check_target(recipe) + check_task(recipe) + problems
    if not model_problems:
        problems += check_architecture(recipe)
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
    elif err["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{field}: {message}"


def _stage_name(raw: dict, index: int) -> str:
    try:
        return str(raw["stages"][index].get("stage", "?"))
    except (KeyError, IndexError, AttributeError, TypeError):
        return "?"


def check_target(recipe: Recipe) -> list[str]:
    """``data.target`` names files that exist, and stages that read target-domain text have one."""
    if recipe.data.target:
        try:
            missing = [str(f) for f in target_files(recipe.data.target) if not f.is_file()]
        except Exception as exc:  # DataError naming the field
            return [str(exc)]
        return [f"data.target: {', '.join(missing)} not found"] if missing else []
    problems = []
    for index, stage in enumerate(recipe.stages):
        if isinstance(stage, AdaptStage) and stage.text == "target":
            problems.append(f"stages[{index}] (adapt).text: 'target' needs data.target (a domain or folder)")
        if isinstance(stage, FinetuneStage) and stage.domain_adversarial is not None:
            problems.append(f"stages[{index}] (finetune).domain_adversarial: needs data.target, whose texts are "
                            "the unlabelled target domain")
        if isinstance(stage, SelfTrainStage):
            problems.append(f"stages[{index}] (self_train): needs data.target, whose texts it pseudo-labels")
    return problems


def check_task(recipe: Recipe) -> list[str]:
    """The task supports every stage and stage setting (``edgetl.tasks.OPTIONS``) of the recipe, and its data section."""
    task = task_for(recipe.task)
    problems = []
    known = KNOWN_DATASETS.get(recipe.data.dataset)
    if known is not None and known.task != task.name:
        problems.append(f"data.dataset: '{recipe.data.dataset}' holds {known.task} data, but the task is {task.name}: "
                        f"set task: {known.task}, or choose data of task {task.name}")
    problems += task.check_data(recipe.data)
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.stage})"
        reason = task.refusal(stage.stage)
        if reason is not None:
            problems.append(f"{where}: task {task.name} does not support the {stage.stage} stage: {reason}")
            continue
        if isinstance(stage, FinetuneStage) and task.pooling is not None and stage.pooling is None:
            problems.append(f"{where}.pooling: the {task.name} head reads one vector per text: choose mean or cls")
        for option in _options(stage):
            if (reason := task.refusal(option)) is not None:
                problems.append(f"{where}.{OPTIONS[option][1]}: task {task.name} does not support {option}: {reason}")
    return problems


def _options(stage) -> list[str]:
    """The stage settings (``edgetl.tasks.OPTIONS``) a stage uses."""
    if isinstance(stage, QuantizeStage):
        used = ["qat"] if stage.method == "qat" else []
        return used + (["max_accuracy_drop"] if stage.max_accuracy_drop is not None else [])
    if not isinstance(stage, FinetuneStage):
        return []
    used = ["pooling"] if stage.pooling is not None else []
    used += [stage.method] if stage.method != "full" else []
    used += ["domain_adversarial"] if stage.domain_adversarial is not None else []
    return used + (["rdrop_alpha"] if stage.rdrop_alpha is not None else [])


def check_chain(stages: list) -> list[str]:
    """Simulate what each stage has available and refuse impossible orders before any work starts."""
    problems: list[str] = []
    pytorch_model = False
    adapted = False
    prompt_tuned = None
    exported: set[str] = set()
    quantized: set[str] = set()
    seen: set[str] = set()
    for index, stage in enumerate(stages):
        where = f"stages[{index}] ({stage.stage})"
        if isinstance(stage, (AdaptStage, AugmentStage)) and pytorch_model:
            problems.append(f"{where}: {stage.stage} feeds fine-tuning; move it before the finetune stage")
        if isinstance(stage, AdaptStage):
            adapted = True
        if isinstance(stage, AugmentStage) and "contextual" in stage.operations and not (adapted or stage.mlm_model):
            problems.append(f"{where}.operations: 'contextual' needs a masked language model: add an adapt stage "
                            "before it or set mlm_model")
        if prompt_tuned is not None and isinstance(stage, (SelfTrainStage, DistillStage, PruneStage, ExportStage,
                                                             QuantizeStage)):
            problems.append(f"{where}: the model of {prompt_tuned} (method prompt-tuning) keeps its soft prompt "
                            f"outside the encoder weights, which {stage.stage} cannot take; use method lora "
                            "(merged into the weights) or full, or end the chain with evaluate")
        if isinstance(stage, FinetuneStage) and stage.method == "prompt-tuning":
            prompt_tuned = where
        if isinstance(stage, (FinetuneStage, SelfTrainStage, DistillStage, PruneStage)):
            if exported:
                problems.append(f"{where}: {stage.stage} after export would leave the exported models stale; move it before export")
            if isinstance(stage, (PruneStage, SelfTrainStage)) and not pytorch_model:
                problems.append(f"{where}: {stage.stage} needs a PyTorch model; add a finetune stage before it")
            if isinstance(stage, DistillStage) and not pytorch_model and stage.teacher is None:
                problems.append(f"{where}.teacher: no teacher; name a folder or add a finetune stage before distill")
            if isinstance(stage, PruneStage) and not (stage.structured or stage.vocabulary):
                problems.append(f"{where}: prunes nothing; set heads_keep, ffn_keep or layers_drop, or vocabulary: true")
            pytorch_model = True
        elif isinstance(stage, ExportStage):
            if not pytorch_model:
                problems.append(f"{where}: export needs a PyTorch model; add a finetune stage before it")
            if quantized:
                problems.append(f"{where}: export after quantize would feed an INT8 model to the exporter; export the FP32 model and quantize after export")
            exported |= set(stage.formats)
        elif isinstance(stage, QuantizeStage):
            problems += _check_quantize(stage, where, pytorch_model, exported)
            exported |= set(stage.backends)
            quantized |= set(stage.backends)
        elif isinstance(stage, (EvaluateStage, BenchmarkStage)):
            if not pytorch_model:
                problems.append(f"{where}: nothing to measure; it needs a model stage before it")
        elif isinstance(stage, BundleStage):
            missing = [b for b in stage.backends if b not in exported]
            if missing:
                problems.append(f"{where}.backends: {missing} not exported by an earlier stage")
        if stage.stage in seen and stage.stage in ("adapt", "augment", "finetune", "self_train", "evaluate", "benchmark", "bundle"):
            problems.append(f"{where}: stage '{stage.stage}' appears twice")
        seen.add(stage.stage)
    return problems


def _check_quantize(stage: QuantizeStage, where: str, pytorch_model: bool, exported: set[str]) -> list[str]:
    if stage.method == "qat":
        problems = [] if pytorch_model else [f"{where}: method qat trains the PyTorch model; add a finetune stage before it"]
        if stage.max_accuracy_drop is not None:
            problems.append(f"{where}.max_accuracy_drop: applies to method ptq; QAT recovers accuracy by training")
        return problems
    problems = []
    missing = [b for b in stage.backends if b not in exported]
    if missing:
        problems.append(f"{where}.backends: {missing} not exported yet; quantize works on exported models, so add an export stage with those formats before it")
    return problems


def _operations(stage) -> list[str]:
    """The architecture operations (``edgetl.architectures.adapter.OPERATIONS``) a stage performs."""
    if isinstance(stage, DistillStage) and stage.student is None:
        return ["layer_selection"]  # the student copies some of the teacher's layers
    if not isinstance(stage, PruneStage):
        return []
    budget = stage.latency_budget_ms is not None
    return ([op for op, used in (("head_pruning", stage.heads_keep < 1 or budget),
                                 ("ffn_pruning", stage.ffn_keep < 1 or budget),
                                 ("layer_selection", stage.layers_drop > 0)) if used])


def check_architecture(recipe: Recipe) -> list[str]:
    """The architecture of a local model (``model_type`` of its ``config.json``, read without torch) supports every
    operation the recipe's stages perform on it. A hub id is checked when the model is loaded."""
    from edgetl.architectures import ADAPTERS, adapter_for, model_type_of
    from edgetl.models import resolve_model_source

    folder = Path(resolve_model_source(recipe.model))
    if not (folder / "config.json").is_file():
        return []
    model_type, problems = model_type_of(folder), []
    for index, stage in enumerate(recipe.stages):
        where = f"stages[{index}] ({stage.stage})"
        for operation in _operations(stage):
            if model_type not in ADAPTERS:
                problems.append(f"{where}: model type '{model_type}' has no edgetl adapter, so its layers, heads and "
                                f"FFN neurons cannot be found; known types: {', '.join(sorted(ADAPTERS))}")
                break
            if not (adapter := adapter_for(model_type)).supports(operation):
                problems.append(f"{where}: {model_type} does not support {OPERATIONS[operation]}: "
                                f"{adapter.reasons[operation]}")
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

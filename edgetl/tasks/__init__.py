"""One module per task: what varies between text classification, token classification and text regression.

A task is declared as a frozen :class:`Task`: the head it trains, how a row of data is checked, labelled and
tokenized, the collator that pads a batch, the dev metric that selects checkpoints, optimum's export task, and
which stages and stage settings it supports (with the reason for each one it does not). Code elsewhere asks
the task object and never branches on a task's name; optimum's ``TasksManager`` is the pattern.

Importing this package never imports torch, transformers or datasets (the recipe loader reads the
declarations): the library classes are named as strings (``auto_model``, ``collator``) and resolved by the
code that builds models and batches, and the metrics import numpy, seqeval and scipy only when they are made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgetl.errors import RecipeError

# Stage settings a task may not support -> (the stage, its field that makes them).
OPTIONS = {
    "pooling": ("finetune", "pooling"),
    "lora": ("finetune", "method"),
    "prompt-tuning": ("finetune", "method"),
    "cloze": ("finetune", "method"),
    "domain_adversarial": ("finetune", "domain_adversarial"),
    "rdrop_alpha": ("finetune", "rdrop_alpha"),
    "ptq": ("quantize", "method"),
    "qat": ("quantize", "method"),
    "weights": ("quantize", "method"),
    "max_accuracy_drop": ("quantize", "max_accuracy_drop"),
    "student": ("distill", "student"),
}
WEIGHTS_ONLY_FOR_DECODERS = ("weight-only INT8/INT4 is wired and measured for decoders (generation or a decoder's classifier), whose "
                             "batch-1 decoding is bound by reading weights; an encoder gets static or dynamic INT8")
# Task.distillation values -> what the student learns from the teacher (edgetl.distillation reads them).
DISTILLATION = {
    "soft_targets": "the teacher's softened class distribution and the labels (KL + cross-entropy), on the labelled "
                    "training rows; checkpoints kept by the dev metric",
    "vectors": "the teacher's output vector (MSE), on unlabelled texts (the training split's texts, deduplicated); "
               "checkpoints kept by that MSE on held-out training texts",
}
# DataConfig fields that name a column; each task reads some of them, under a fixed name of its own.
COLUMN_FIELDS = ("text_field", "text_pair_field", "label_field", "tokens_field", "tags_field", "score_field")


@dataclass(frozen=True)
class Task:
    """What one task supplies; every callable works on plain Python and numpy values.

    Attributes:
        name: the recipe's ``task:`` value.
        optimum_task: optimum's exporter task name.
        auto_model: the transformers ``AutoModelFor...`` class of the head (mean pooling replaces it where the
            task pools and ``finetune.pooling`` is mean).
        collator: the transformers collator class that pads a batch, labels included.
        metric: the dev metric (greater is better) Trainer keeps checkpoints by; ``compute_metrics`` returns it.
        metric_scale: the metric times this reads on a 0-100 scale (100 for a fraction, 1 for a score already
            x100), as reports print it.
        columns: DataConfig column field -> the name the column gets once read (``text``, ``label``, ...).
            A field set to None (``text_pair_field`` for single texts) names no column and is skipped.
        pooling: ``finetune.pooling`` when a recipe leaves it out; None where the task does not pool.
        stages, options: the stages and stage settings (``OPTIONS``) it supports.
        reasons: why, for each stage or option it does not support.
        head_config: label names (None for a score) -> the head's config keys (num_labels, id2label, ...).
        labels_of: the training rows' columns (read names) -> label names read from the data (None: a score).
        row_problem: one row (read names -> values) and the label names -> (read name, problem) or None.
        to_ids: the checked columns and the label names -> the columns the model trains on.
        encode: a batch of rows, a transformers tokenizer, the DataConfig and max_length -> model features.
        compute_metrics: label names -> a function from Trainer's (predictions, label_ids) to named metrics; None
            where the metric needs whole evaluation rows that are not one model input each (a pair's two vectors):
            a trained model is then scored as the evaluate stage scores it, by ``score`` on its outputs.
        check_data: a DataConfig -> problems with the recipe's data section for this task.
        pretokenized: whether ``examples`` gives pre-split words (``tokenizers``' ``is_pretokenized``).
        examples: the columns of loaded rows -> one tokenizer input per row (a text, a (text, text_pair) pair, or
            a list of words): what a runtime tokenizer encodes for evaluation and calibration.
        runtime: the name of the class in ``edgetl.runtime`` that serves a bundle of this task.
        score: per-row runtime outputs (``[labels]`` per text, ``[tokens, labels]`` per word list, padding
            dropped), their ``tokenizers`` encodings, the rows' columns and the label names -> the metrics,
            ``metric`` among them.
        fidelity: (a task whose compressed models are judged against the FP32 one's outputs) a model's per-input
            outputs, the reference model's and the inputs -> closeness metrics; None where the task metric says it.
        reads_pairs: whether the model reads a (text, text_pair) pair as one input when the data names a
            ``text_pair_field``; False where the pairs only score the model and each text is an input of its own
            (a bundle's ``text_pair`` is then false).
        distillation: what a student (distill, prune's recovery) learns from its teacher: a key of ``DISTILLATION``.
        greater_is_better: whether a higher ``metric`` is a better model (False for perplexity).
        predict: (a task whose model is not one forward per input: a decoder's generation) replaces
            ``edgetl.runtime.text.predict_outputs`` (same arguments and return) where models are evaluated.
        export_atol: the largest output difference between the PyTorch model and its ONNX export that passes.
        collator_options: keywords of ``collator`` beyond the tokenizer (a causal LM's: no masking).
        peft_task_type: peft's ``TaskType`` name of the head LoRA and prompt tuning wrap.
        bench: ``module:function`` of a benchmark of the task's own (a decoder's time to first token and tokens/s),
            called as ``edgetl.bench.run.benchmark`` is; None: that one.
    """

    name: str
    optimum_task: str
    auto_model: str
    collator: str
    metric: str
    metric_scale: float
    columns: Mapping[str, str]
    pooling: str | None
    stages: frozenset[str]
    options: frozenset[str]
    reasons: Mapping[str, str]
    head_config: Callable[[list[str] | None], dict]
    labels_of: Callable[[dict], list[str] | None]
    row_problem: Callable[[dict, list[str] | None], tuple[str, str] | None]
    to_ids: Callable[[dict, list[str] | None], dict]
    encode: Callable[[dict, Any, Any, int], dict]
    compute_metrics: Callable[[list[str] | None], Callable] | None
    check_data: Callable[[Any], list[str]]
    pretokenized: bool
    examples: Callable[[dict], list]
    score: Callable[[list, list, dict, list[str] | None], dict]
    runtime: str
    fidelity: Callable[[list, list, list], dict] | None = None
    reads_pairs: bool = True
    distillation: str = "soft_targets"
    greater_is_better: bool = True
    predict: Callable | None = None
    export_atol: float = 1e-4
    bench: str | None = None
    collator_options: Mapping[str, Any] = field(default_factory=dict)
    peft_task_type: str = "SEQ_CLS"

    def __post_init__(self):
        unknown = set(self.options) - set(OPTIONS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown options {sorted(unknown)}; known: {', '.join(OPTIONS)}")
        stray = set(self.reasons) & (set(self.stages) | set(self.options))
        if stray:
            raise ValueError(f"task {self.name}: reasons given for supported {sorted(stray)}")
        if self.distillation not in DISTILLATION:
            raise ValueError(f"task {self.name}: unknown distillation '{self.distillation}'; known: {', '.join(DISTILLATION)}")
        if set(self.columns) - set(COLUMN_FIELDS):
            raise ValueError(f"task {self.name}: columns {sorted(set(self.columns) - set(COLUMN_FIELDS))} are no DataConfig field")

    def refusal(self, stage_or_option: str) -> str | None:
        """Why the task does not support a stage or option, or None if it does."""
        if stage_or_option in self.stages or stage_or_option in self.options:
            return None
        return self.reasons.get(stage_or_option, f"{self.name} does not declare it")

    def read_columns(self, data_cfg) -> dict[str, str]:
        """DataConfig field -> the column it names in the data files, for the fields this task reads."""
        return {f: getattr(data_cfg, f) for f in self.columns if getattr(data_cfg, f) is not None}


def _registry() -> dict[str, Task]:
    from edgetl.tasks import (sentence_embedding, text_classification, text_generation, text_regression,
                              token_classification)

    modules = (text_classification, token_classification, text_regression, sentence_embedding, text_generation)
    return {t.TASK.name: t.TASK for t in modules}


TASKS: dict[str, Task] = _registry()
DEFAULT_TASK = "text-classification"


def task_for(name: str) -> Task:
    """The task of a recipe's ``task:`` value; ``RecipeError`` naming the known tasks if there is none."""
    try:
        return TASKS[name]
    except KeyError:
        raise RecipeError("task", [f"unknown task '{name}'; known tasks: {', '.join(TASKS)}"]) from None

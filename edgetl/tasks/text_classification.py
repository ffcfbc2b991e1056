"""text-classification: one label per text, or per pair of texts (``data.text_pair_field``).

The head is edgetl's mean-pooled classifier (``finetune.pooling: mean``, the default) or transformers'
``AutoModelForSequenceClassification`` (``cls``); dev accuracy selects checkpoints. Every stage supports it.
"""

from __future__ import annotations

from edgetl.inputs import head_tail
from edgetl.tasks import OPTIONS, Task

STAGES = frozenset({"adapt", "augment", "meta", "finetune", "self_train", "distill", "prune", "export", "quantize", "evaluate",
                    "benchmark", "bundle", "shard"})


def head_config(labels: list[str]) -> dict:
    id2label = dict(enumerate(labels))
    return {"num_labels": len(labels), "id2label": id2label, "label2id": {label: i for i, label in id2label.items()}}


def _sort_key(value):
    return (isinstance(value, str), value)


def distinct_labels(values: list) -> list[str]:
    """The distinct labels among ``values``, sorted (numbers by value), as strings. Values that are no label
    (null, a float) are left to ``row_problem``, which names their row."""
    return [str(v) for v in sorted({v for v in values if is_label_value(v)}, key=_sort_key)]


def labels_of(columns: dict) -> list[str]:
    return distinct_labels(columns["label"])


def is_label_value(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def label_id(value, labels: list[str]) -> int | None:
    """The class index of a label: a string by name; an integer by name if ``labels`` has it (labels read from
    the data), else as an index into ``labels``. None if it is neither."""
    if isinstance(value, str) or str(value) in labels:
        return labels.index(str(value)) if str(value) in labels else None
    return value if 0 <= value < len(labels) else None


def text_problem(row: dict) -> tuple[str, str] | None:
    """The first text column of a row that holds no text (null, a number, a list)."""
    for column in ("text", "text_pair"):
        if column in row and not isinstance(row[column], str):
            return column, f"expected text, found {_kind(row[column])}"
    return None


def label_problem(value, labels: list[str]) -> str | None:
    if not is_label_value(value):
        return f"expected a label (a string or an integer), found {_kind(value)}"
    if label_id(value, labels) is None:
        return f"label {value!r} is not in data.labels {labels}"
    return None


def row_problem(row: dict, labels: list[str]) -> tuple[str, str] | None:
    problem = text_problem(row)
    if problem is None and (message := label_problem(row["label"], labels)) is not None:
        problem = "label", message
    return problem


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:60]


def to_ids(columns: dict, labels: list[str]) -> dict:
    return columns | {"label": [label_id(v, labels) for v in columns["label"]]}


def encode(batch: dict, tokenizer, cfg, max_length: int) -> dict:
    """Token ids without padding (the collator pads each batch): a text cut as ``cfg.truncation`` says, or a pair
    cut longest_first (the longer text loses tokens first)."""
    if "text_pair" in batch:
        return tokenizer(batch["text"], batch["text_pair"], truncation="longest_first", max_length=max_length)
    if cfg.truncation != "head+tail":
        tokenizer.truncation_side = cfg.truncation
        return tokenizer(batch["text"], truncation=True, max_length=max_length)
    out = tokenizer(batch["text"], truncation=False, verbose=False)
    return {k: [head_tail(v, max_length, cfg.head_tokens) for v in values] for k, values in out.items()}


def accuracy(eval_pred) -> dict:
    """Trainer's ``compute_metrics`` of classification: the share of rows whose top logit is their label."""
    import numpy as np

    logits, label_ids = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == label_ids).mean())}


def compute_metrics(labels: list[str] | None):
    return accuracy


def examples(columns: dict) -> list:
    """The texts, or (text, text_pair) pairs, as a ``tokenizers`` tokenizer encodes them."""
    if "text_pair" in columns:
        return list(zip(columns["text"], columns["text_pair"], strict=True))
    return list(columns["text"])


def score(outputs: list, encodings: list, columns: dict, labels: list[str]) -> dict:
    import numpy as np

    return accuracy((np.stack(outputs), np.asarray(columns["label"])))


def check_data(cfg) -> list[str]:
    if cfg.text_pair_field is not None and cfg.truncation != "right":
        return [f"data.truncation: '{cfg.truncation}' cuts one text; a pair (data.text_pair_field) is cut "
                "longest_first, the longer text losing tokens first: leave truncation out"]
    return []


TASK = Task(
    name="text-classification",
    optimum_task="text-classification",
    auto_model="AutoModelForSequenceClassification",
    collator="DataCollatorWithPadding",
    metric="accuracy",
    metric_scale=100,
    columns={"text_field": "text", "text_pair_field": "text_pair", "label_field": "label"},
    pooling="mean",
    stages=STAGES,
    options=frozenset(OPTIONS),  # quantize.method weights: a decoder's classifier only (checked by architecture)
    reasons={"pretrained": "a pretrained checkpoint has no trained head for this task: finetune it"},
    head_config=head_config,
    labels_of=labels_of,
    row_problem=row_problem,
    to_ids=to_ids,
    encode=encode,
    compute_metrics=compute_metrics,
    check_data=check_data,
    pretokenized=False,
    examples=examples,
    score=score,
    runtime="TextClassifier",
)

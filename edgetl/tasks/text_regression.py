"""text-regression: one score per text or pair of texts (semantic similarity such as STS-B, ratings).

The head is a sequence classifier with one output trained on the mean squared error (``problem_type``
regression): edgetl's mean-pooled one by default, as for text classification. Spearman's rank correlation x100
between prediction and score (STS-B's measure) selects checkpoints; Pearson's is reported beside it.
"""

from __future__ import annotations

import math

from edgetl.tasks import WEIGHTS_ONLY_FOR_DECODERS, Task
from edgetl.tasks.text_classification import check_data as check_text_data
from edgetl.tasks.text_classification import encode, examples, text_problem

_CLASSIFICATION_ONLY = "is written for one label per text (text-classification)"


def head_config(labels: None) -> dict:
    return {"num_labels": 1, "problem_type": "regression"}


def labels_of(columns: dict) -> None:
    return None


def score(value) -> float | None:
    """A score as a float: a number, or text that reads as one (a CSV column with one bad cell is all text);
    None if it is neither, or not finite."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def row_problem(row: dict, labels: None) -> tuple[str, str] | None:
    problem = text_problem(row)
    if problem is None and score(row["label"]) is None:
        found = "null" if row["label"] is None else repr(row["label"])[:60]
        problem = "label", f"expected a number (the score), found {found}"
    return problem


def to_ids(columns: dict, labels: None) -> dict:
    import numpy as np

    # float32: the head's outputs are float32, and the loss takes both in one dtype.
    return columns | {"label": np.asarray([score(v) for v in columns["label"]], dtype=np.float32)}


def compute_metrics(labels: None):
    def correlations(eval_pred) -> dict:
        import warnings

        import numpy as np
        from scipy.stats import ConstantInputWarning, pearsonr, spearmanr

        predictions, scores = eval_pred
        predictions = np.asarray(predictions).reshape(-1)
        # Constant predictions rank nothing: scipy warns and gives nan, counted here as no correlation, so that
        # Trainer (which never prefers anything to a nan) still keeps the first checkpoint that ranks.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConstantInputWarning)
            spearman, pearson = (float(np.nan_to_num(f(predictions, scores)[0])) for f in (spearmanr, pearsonr))
        return {"spearman": 100 * spearman, "pearson": 100 * pearson}

    return correlations


def score_outputs(outputs: list, encodings: list, columns: dict, labels: None) -> dict:
    import numpy as np

    return compute_metrics(None)((np.stack(outputs), np.asarray(columns["label"], dtype=np.float32)))


def check_data(cfg) -> list[str]:
    problems = check_text_data(cfg)
    if cfg.labels is not None:
        problems.append("data.labels: text-regression predicts a score (data.score_field), not labels: remove labels")
    if cfg.target:
        problems.append("data.target: a target domain holds labelled texts (text-classification), which "
                        "text-regression cannot evaluate on: remove target")
    return problems


TASK = Task(
    name="text-regression",
    optimum_task="text-classification",  # one output per text: optimum exports a score as a one-class logit
    auto_model="AutoModelForSequenceClassification",
    collator="DataCollatorWithPadding",
    metric="spearman",
    metric_scale=1,
    columns={"text_field": "text", "text_pair_field": "text_pair", "score_field": "label"},
    pooling="mean",
    stages=frozenset({"finetune", "export", "quantize", "evaluate", "benchmark", "bundle", "shard"}),
    options=frozenset({"pooling", "ptq"}),
    reasons={
        "weights": WEIGHTS_ONLY_FOR_DECODERS,
        "pretrained": "a pretrained checkpoint has no trained head for this task: finetune it",
        "adapt": f"adapt {_CLASSIFICATION_ONLY}",
        "augment": f"augment {_CLASSIFICATION_ONLY}: it balances labels",
        "self_train": f"self_train {_CLASSIFICATION_ONLY}: it pseudo-labels the surest predicted class",
        "distill": f"distill {_CLASSIFICATION_ONLY}: its soft targets are a distribution over labels",
        "prune": f"prune {_CLASSIFICATION_ONLY}: its recovery distillation reads a distribution over labels",
        "lora": "LoRA is tested on text-classification only",
        "prompt-tuning": "prompt tuning is tested on text-classification only",
        "meta": "meta-learning's episodes are labelled texts of text-classification sources",
        "cloze": "a cloze question's verbaliser scores one label per text: text-classification only",
        "domain_adversarial": "domain-adversarial training is tested on text-classification only",
        "rdrop_alpha": "R-Drop's consistency loss compares label distributions; a score has none",
        "qat": "quantization-aware training distils one distribution over labels per text",
        "student": "belongs to the distill stage, which this task does not support",
        "max_accuracy_drop": "accuracy control measures the INT8 drop in accuracy, not in Spearman",
    },
    head_config=head_config,
    labels_of=labels_of,
    row_problem=row_problem,
    to_ids=to_ids,
    encode=encode,
    compute_metrics=compute_metrics,
    check_data=check_data,
    pretokenized=False,
    examples=examples,
    score=score_outputs,
    runtime="TextRegressor",
)

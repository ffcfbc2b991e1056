"""token-classification: one tag per word (named-entity recognition in IOB2, part-of-speech, ...).

Rows hold pre-split words (``data.tokens_field``) and as many tags (``data.tags_field``). A word's tag trains
its first sub-token; its other sub-tokens and the special tokens get -100, which the loss ignores. Entity-level
F1 (seqeval, as CoNLL's conlleval counts it: an entity counts only with its exact span and type) over the words
the model saw selects checkpoints.
"""

from __future__ import annotations

from edgetl.errors import MissingDependencyError
from edgetl.tasks import WEIGHTS_ONLY_FOR_DECODERS, Task
from edgetl.tasks.text_classification import distinct_labels, head_config, is_label_value, label_id

IGNORED = -100  # the label the loss and the metric skip: special tokens and a word's later sub-tokens
_CLASSIFICATION_ONLY = "is written for one label per text (text-classification)"


def tags_of(columns: dict) -> list[str]:
    """The tag set of the training rows, sorted (rows that are no list of tags are left to ``row_problem``)."""
    return distinct_labels([tag for tags in columns["tags"] if isinstance(tags, list) for tag in tags])


def row_problem(row: dict, labels: list[str]) -> tuple[str, str] | None:
    tokens, tags = row["tokens"], row["tags"]
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        return "tokens", f"expected a list of words (strings), found {str(tokens)[:60]}"
    if not isinstance(tags, list):
        return "tags", f"expected a list of tags, found {str(tags)[:60]}"
    if len(tags) != len(tokens):
        return "tags", f"{len(tags)} tags for {len(tokens)} tokens"
    for tag in tags:
        if not is_label_value(tag):
            return "tags", f"expected tags (strings or integers), found {tag!r}"
        if label_id(tag, labels) is None:
            return "tags", f"tag {tag!r} is not in data.labels {labels}"
    return None


def to_ids(columns: dict, labels: list[str]) -> dict:
    return columns | {"tags": [[label_id(t, labels) for t in tags] for tags in columns["tags"]]}


def first_sub_token_labels(word_ids: list[int | None], tags: list[int]) -> list[int]:
    """Each word's tag on its first sub-token; -100 on its other sub-tokens and on special tokens."""
    labels, previous = [], None
    for word in word_ids:
        labels.append(IGNORED if word is None or word == previous else tags[word])
        previous = word
    return labels


def encode(batch: dict, tokenizer, cfg, max_length: int) -> dict:
    """Sub-tokens of the pre-split words, cut at ``max_length`` (the last words of a longer sentence are not
    seen), with ``labels`` aligned to them."""
    out = tokenizer(batch["tokens"], is_split_into_words=True, truncation=True, max_length=max_length)
    out["labels"] = [first_sub_token_labels(out.word_ids(i), tags) for i, tags in enumerate(batch["tags"])]
    return out


def _seqeval() -> dict:
    try:
        from seqeval.metrics import f1_score, precision_score, recall_score
    except ImportError:
        raise MissingDependencyError("seqeval", "train", "entity-level F1 of token classification") from None
    return {"f1": f1_score, "precision": precision_score, "recall": recall_score}


def entity_scores(gold: list[list[str]], guessed: list[list[str]]) -> dict:
    """Entity-level precision, recall and F1 (seqeval's default, conlleval's counting) of tag sequences."""
    # A model that finds no entity (early in training) scores 0, without seqeval's warning.
    return {name: float(metric(gold, guessed, zero_division=0)) for name, metric in _seqeval().items()}


def compute_metrics(labels: list[str]):
    """``entity_scores`` over each sentence's labelled positions (the first sub-token of every word the model
    saw)."""
    _seqeval()  # a missing seqeval fails before training, not at the first evaluation

    def entity_f1(eval_pred) -> dict:
        import numpy as np

        logits, label_ids = eval_pred
        predicted = np.argmax(logits, axis=-1)
        gold, guessed = [], []
        for guess_row, gold_row in zip(predicted, label_ids, strict=True):
            keep = gold_row != IGNORED
            gold.append([labels[i] for i in gold_row[keep]])
            guessed.append([labels[i] for i in guess_row[keep]])
        return entity_scores(gold, guessed)

    return entity_f1


def examples(columns: dict) -> list:
    return list(columns["tokens"])


def score(outputs: list, encodings: list, columns: dict, labels: list[str]) -> dict:
    """``entity_scores`` of every word's tag (its first sub-token's argmax, as the runtime tags it); a word cut by
    truncation counts as O, as the runtime predicts it. Precision and recall are named ``entity_precision`` and
    ``entity_recall``: an evaluation row's ``precision`` is its model's (fp32, int8)."""
    from edgetl.runtime.entities import word_labels

    guessed = [word_labels(logits, encoding.word_ids, labels, num_words=len(words))
               for logits, encoding, words in zip(outputs, encodings, columns["tokens"], strict=True)]
    scores = entity_scores([[labels[t] for t in tags] for tags in columns["tags"]], guessed)
    return {"f1": scores["f1"], "entity_precision": scores["precision"], "entity_recall": scores["recall"]}


def check_data(cfg) -> list[str]:
    problems = []
    if cfg.truncation != "right":
        problems.append(f"data.truncation: '{cfg.truncation}' does not apply to token-classification, which keeps a "
                        "sentence's first words and their tags: leave truncation out")
    if cfg.target:
        problems.append("data.target: a target domain holds labelled texts (text-classification), which "
                        "token-classification cannot calibrate or evaluate on: remove target")
    return problems


TASK = Task(
    name="token-classification",
    optimum_task="token-classification",
    auto_model="AutoModelForTokenClassification",
    collator="DataCollatorForTokenClassification",
    metric="f1",
    metric_scale=100,
    columns={"tokens_field": "tokens", "tags_field": "tags"},
    pooling=None,
    stages=frozenset({"finetune", "export", "quantize", "evaluate", "benchmark", "bundle", "shard"}),
    options=frozenset({"ptq"}),
    reasons={
        "weights": WEIGHTS_ONLY_FOR_DECODERS,
        "pretrained": "a pretrained checkpoint has no trained head for this task: finetune it",
        "adapt": f"adapt {_CLASSIFICATION_ONLY}: it reads the labelled texts, not pre-split words",
        "augment": f"augment {_CLASSIFICATION_ONLY}: its word edits would move the words the tags belong to",
        "self_train": f"self_train {_CLASSIFICATION_ONLY}: it pseudo-labels whole texts",
        "distill": f"distill {_CLASSIFICATION_ONLY}: its soft targets are one distribution per text",
        "prune": f"prune {_CLASSIFICATION_ONLY}: its importance scores and recovery distillation read one "
                 "distribution per text",
        "pooling": "every token gets its own label, so no pooled vector feeds the head: leave pooling out",
        "lora": "edgetl's LoRA wraps sequence-classification heads (peft TaskType.SEQ_CLS)",
        "prompt-tuning": "a soft prompt is tuned for sequence-classification heads (peft TaskType.SEQ_CLS)",
        "meta": "meta-learning's episodes are labelled texts of text-classification sources",
        "cloze": "a cloze question's verbaliser scores one label per text: text-classification only",
        "domain_adversarial": "its domain classifier reads one pooled vector per text",
        "rdrop_alpha": "R-Drop's consistency loss compares one label distribution per text",
        "qat": "quantization-aware training distils one distribution over labels per text",
        "student": "belongs to the distill stage, which this task does not support",
        "max_accuracy_drop": "accuracy control measures the INT8 drop in accuracy per text, not in entity F1",
    },
    head_config=head_config,
    labels_of=tags_of,
    row_problem=row_problem,
    to_ids=to_ids,
    encode=encode,
    compute_metrics=compute_metrics,
    check_data=check_data,
    pretokenized=True,
    examples=examples,
    score=score,
    runtime="TokenClassifier",
)

"""sentence-embedding: one vector per text, pooled as the checkpoint was trained (all-MiniLM-L6-v2: the mean over the
attention mask, then L2-normalised), for semantic search and similarity.

The model's one output is the pooled vector (the pooling is in the exported graph: an app gets a vector from one
call). It is evaluated on pairs of texts with a similarity score (STS-B): Spearman's rank correlation x100 between
the cosine of the two texts' vectors and the gold score, Pearson's beside it. ``fidelity`` measures how close a
compressed model's vectors stay to the FP32 model's: mean and 1st-percentile cosine between the two models' vectors
of the same texts, and recall@10 agreement of nearest neighbours over the evaluation texts.

A smaller model learns the teacher's vectors (``distillation`` vectors: the MSE between student and teacher vectors
on unlabelled sentences, Reimers and Gurevych 2020), in the distill stage and in prune's recovery; the pair scores
are never trained on, and the dev pairs are only scored.
"""

from __future__ import annotations

from edgetl.tasks import WEIGHTS_ONLY_FOR_DECODERS, Task
from edgetl.tasks.text_classification import encode
from edgetl.tasks.text_regression import check_data as check_pair_data
from edgetl.tasks.text_regression import labels_of, row_problem, to_ids

_NEEDS_LABELS = "reads a distribution over labels, which an embedding model has not"
NEIGHBOURS = 10  # recall@k of the nearest-neighbour agreement


def head_config(labels: None) -> dict:
    return {}


def examples(columns: dict) -> list:
    """Every text of the evaluation pairs, first texts then second texts: a vector each."""
    return list(columns["text"]) + list(columns.get("text_pair", []))


def cosines(first, second):
    """Row-wise cosine similarity of two (n, d) arrays."""
    import numpy as np

    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    norms = np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1)
    return (first * second).sum(axis=1) / np.maximum(norms, 1e-12)


def score(outputs: list, encodings: list, columns: dict, labels: None) -> dict:
    """Spearman and Pearson x100 between the cosine of each pair's vectors and its gold score."""
    import numpy as np

    from edgetl.tasks.text_regression import compute_metrics

    vectors, n = np.stack(outputs), len(columns["label"])
    similarity = cosines(vectors[:n], vectors[n:2 * n])
    return compute_metrics(None)((similarity, np.asarray(columns["label"], dtype=np.float32)))


def fidelity(outputs: list, reference: list, texts: list) -> dict:
    """How close a compressed model's vectors are to the reference (FP32) model's, on the same inputs: mean and
    1st-percentile cosine, and recall@10 agreement (the share of the reference's 10 nearest neighbours of each
    distinct text, among the distinct texts, that the compressed model also ranks in its 10 nearest)."""
    import numpy as np

    vectors, expected = np.stack(outputs).astype(np.float64), np.stack(reference).astype(np.float64)
    cosine = cosines(vectors, expected)
    first = list({text: i for i, text in reversed(list(enumerate(texts)))}.values())  # one row per distinct text
    k = min(NEIGHBOURS, len(first) - 1)
    recall = float("nan")
    if k > 0:
        neighbours = [_nearest(m[first], k) for m in (vectors, expected)]
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(*neighbours, strict=True)]))
    return {"cosine_mean": float(cosine.mean()), "cosine_p1": float(np.percentile(cosine, 1)),
            f"recall_at_{NEIGHBOURS}": recall}


def _nearest(vectors, k: int):
    """Each row's k nearest other rows by cosine (itself excluded), as index lists."""
    import numpy as np

    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argpartition(-similarity, k, axis=1)[:, :k].tolist()


def check_data(cfg) -> list[str]:
    # Each text of a pair is embedded alone, so any truncation side applies (text-regression's rule cuts a pair).
    problems = [p.replace("text-regression predicts a score", "sentence-embedding is evaluated on scored pairs")
                for p in check_pair_data(cfg) if not p.startswith("data.truncation")]
    if cfg.text_pair_field is None:
        problems.append("data.text_pair_field: sentence-embedding is evaluated on pairs of texts with a similarity "
                        "score (Spearman of their vectors' cosine): name the second text's column")
    return problems


TASK = Task(
    name="sentence-embedding",
    optimum_task="text-classification",  # the graph's one output (named logits by this exporter config) is the vector
    auto_model="AutoModel",
    collator="DataCollatorWithPadding",
    metric="spearman",
    metric_scale=1,
    columns={"text_field": "text", "text_pair_field": "text_pair", "score_field": "label"},
    pooling="mean",
    stages=frozenset({"pretrained", "distill", "prune", "export", "quantize", "evaluate", "benchmark", "bundle", "shard"}),
    options=frozenset({"ptq"}),
    reasons={
        "weights": WEIGHTS_ONLY_FOR_DECODERS,
        "adapt": "adapt trains a masked-LM head; the pretrained stage takes an embedding checkpoint as it is",
        "augment": "augment balances labels; an embedding model has none",
        "finetune": "training embeddings from pairs is not written yet: the pretrained stage takes an embedding "
                    "checkpoint as it was trained",
        "self_train": "self_train pseudo-labels the surest predicted class; an embedding model predicts none",
        "pooling": "finetune's pooling belongs to the finetune stage; the pretrained stage's pooling says how the "
                   "checkpoint pools",
        "lora": "LoRA belongs to the finetune stage",
        "prompt-tuning": "prompt tuning belongs to the finetune stage",
        "meta": "meta-learning's episodes are labelled texts of text-classification sources",
        "cloze": "a cloze question's verbaliser scores one label per text: text-classification only",
        "domain_adversarial": "domain-adversarial training belongs to the finetune stage",
        "rdrop_alpha": "R-Drop belongs to the finetune stage",
        "qat": f"quantization-aware training {_NEEDS_LABELS}",
        "student": "the student learns the teacher's vectors, so it is a shallower copy of the teacher "
                   "(distill.layers or distill.depth), of its width and pooling; a student of another width would "
                   "need a learned projection of its vectors, which is not written",
        "max_accuracy_drop": "accuracy control measures a drop in accuracy; an embedding model's INT8 is kept only "
                             "if its vectors stay close to FP32 (quantize.min_cosine)",
    },
    head_config=head_config,
    labels_of=labels_of,
    row_problem=row_problem,
    to_ids=to_ids,
    encode=encode,
    compute_metrics=None,  # a pair's score needs both texts' vectors: scored by `score`, as evaluate does
    check_data=check_data,
    pretokenized=False,
    examples=examples,
    score=score,
    runtime="Embedder",
    fidelity=fidelity,
    distillation="vectors",
    reads_pairs=False,  # the STS-B pairs score the vectors; the model embeds one text at a time
)

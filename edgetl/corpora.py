"""Corpus catalog: where the shared datasets and the target domains live. Light: never imports datasets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from edgetl.errors import DataError

AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")


@dataclass(frozen=True)
class KnownDataset:
    """A dataset by name: two files read as ``dataset: files`` reads them, its columns, labels and task.

    ``columns`` and ``labels`` are the defaults of the DataConfig fields of those names; a recipe may still set
    them. ``folder`` is under ``datasets_dir()`` (``data.path`` replaces it); None: the ``data.target`` folder
    (``data.path`` is not read).
    """

    folder: str | None
    train_file: str
    eval_file: str
    tasks: tuple[str, ...]  # the tasks its columns serve
    columns: dict[str, str] = field(default_factory=dict)
    labels: tuple[str, ...] | None = None


KNOWN_DATASETS = {
    "sst2": KnownDataset("sst2", "train.tsv", "dev.tsv", ("text-classification",),
                         {"text_field": "sentence", "label_field": "label"}, ("negative", "positive")),
    # The target domain's own labelled reviews ({text, label}), for few-shot learning.
    "target": KnownDataset(None, "train.jsonl", "dev.jsonl", ("text-classification",),
                           {"text_field": "text", "label_field": "label"}, ("negative", "positive")),
    "conll2003": KnownDataset("conll2003", "train.jsonl", "dev.jsonl", ("token-classification",),
                              {"tokens_field": "tokens", "tags_field": "tags"}),
    # A domain's reviews as text a language model learns and is scored on (labels not read).
    **{f"amazon-{domain}": KnownDataset(f"amazon-reviews/{domain}", "train.jsonl", "dev.jsonl", ("text-generation",),
                                        {"text_field": "text"}) for domain in AMAZON_DOMAINS},
    # Scored pairs: a cross-encoder's score, or the cosine of two sentence embeddings.
    "stsb": KnownDataset("stsb", "train.jsonl", "dev.jsonl", ("text-regression", "sentence-embedding"),
                         {"text_field": "sentence1", "text_pair_field": "sentence2", "score_field": "score"}),
}


def datasets_dir() -> Path:
    """Where the shared corpora live: $EDGETL_DATA_DIR, else ``shared/datasets`` beside the checkout or cwd."""
    if os.environ.get("EDGETL_DATA_DIR"):
        return Path(os.environ["EDGETL_DATA_DIR"]).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    for base in (Path.cwd(), repo_root):
        candidate = base.parent / "shared" / "datasets"
        if candidate.is_dir():
            return candidate
    return repo_root.parent / "shared" / "datasets"


def target_dir(name: str) -> Path:
    """The target domain's folder: ``amazon-reviews/<domain>`` for a domain name, else the folder named."""
    if name in AMAZON_DOMAINS:
        return datasets_dir() / "amazon-reviews" / name
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.target: '{name}' is neither an amazon-reviews domain ({', '.join(AMAZON_DOMAINS)}) "
                        "nor a folder")
    return folder


def target_files(name: str) -> list[Path]:
    """The target domain's ``train.jsonl`` (its texts serve unlabelled) and ``dev.jsonl`` (evaluation)."""
    folder = target_dir(name)
    return [folder / "train.jsonl", folder / "dev.jsonl"]

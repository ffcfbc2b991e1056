"""Corpus catalog: where the shared datasets and the target domains live. Light: never imports datasets."""

from __future__ import annotations

import os
from pathlib import Path

from edgetl.errors import DataError

AMAZON_DOMAINS = ("books", "dvd", "electronics", "kitchen")


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

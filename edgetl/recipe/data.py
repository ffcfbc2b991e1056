"""The recipe's ``data:`` section: which corpus or files, which columns, how texts are cut."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from edgetl.corpora import KNOWN_DATASETS
from edgetl.recipe.base import _Strict


class DataConfig(_Strict):
    """Where the labelled data come from, which columns hold what, and how texts are tokenized."""

    dataset: str = Field("sst2", description="A known dataset (local files under $EDGETL_DATA_DIR: 'sst2' (GLUE "
                         "SST-2), 'conll2003' (named entities), 'stsb' (similarity scores of sentence pairs); "
                         "'target': the target domain's own labelled reviews, for few-shot learning; "
                         "'amazon-books|dvd|electronics|kitchen': a domain's review texts for a language model), 'files', or "
                         "a hub dataset id. A known dataset sets the column fields and labels a recipe leaves out.")
    path: str | None = Field(None, description="Folder holding a known dataset's two files (default: its folder "
                             "under $EDGETL_DATA_DIR; 'target' reads data.target's folder).")
    train_file: str | None = Field(None, description="dataset=files: csv, tsv, jsonl or parquet with the training rows.")
    eval_file: str | None = Field(None, description="dataset=files: csv, tsv, jsonl or parquet with the evaluation rows.")
    hub_config: str | None = Field(None, description="Hub dataset configuration name (e.g. 'sst2' for 'nyu-mll/glue').")
    train_split: str = Field("train", description="Split the model trains on.")
    eval_split: str = Field("validation", description="Split every metric is measured on (and the best checkpoint chosen on).")
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
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first N training texts (quick trials).")
    max_eval_samples: int | None = Field(None, ge=1, description="Use only the first N evaluation texts (quick trials).")

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

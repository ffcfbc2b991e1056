"""Labelled data of every task, read through ``datasets`` from local files first (offline-first).

A known dataset (``edgetl.corpora.KNOWN_DATASETS``) is two files read exactly as ``dataset: files`` reads the
user's own. Every row is checked before anything trains: a bad one fails with its file, row and column named
(rows count from 1, a header line not counted, so in a JSONL file the row is the line).
"""

from __future__ import annotations

import re
from pathlib import Path

from edgetl.corpora import KNOWN_DATASETS, KnownDataset, datasets_dir, target_dir, target_files
from edgetl.errors import DataError
from edgetl.recipe import DataConfig
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
CLASSIFICATION = TASKS[DEFAULT_TASK]


def _read_file(path: Path, field: str):
    import datasets

    if not path.is_file():
        raise DataError(f"data.{field}: file not found: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data.{field}: {path.name}: unsupported extension (use .csv, .tsv, .jsonl or .parquet)")
    kwargs = {}
    if path.suffix.lower() == ".tsv":
        # SST-2 text contains bare quote characters: read tab-separated fields literally.
        kwargs = {"delimiter": "\t", "quoting": 3}
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as exc:  # pyarrow and pandas parse errors, mixed types in a column, no rows at all
        if fmt != "parquet" and not _has_rows(path, header=fmt == "csv"):
            raise DataError(f"{path}: no rows") from None
        raise DataError(f"{path}: not readable as {fmt} ({type(exc).__name__}: {str(exc)[:200]})") from None


def _has_rows(path: Path, header: bool) -> bool:
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return len(lines) > int(header)


def _known_folder(cfg: DataConfig, known: KnownDataset) -> Path:
    if known.folder is None:
        return target_dir(cfg.target)
    return Path(cfg.path).expanduser() if cfg.path else datasets_dir() / known.folder


def local_files(cfg: DataConfig) -> list[Path]:
    """The local files a data config reads (none for a hub dataset): training, evaluation, then data.target's."""
    known = KNOWN_DATASETS.get(cfg.dataset)
    files = []
    if cfg.dataset == "files":
        files = [Path(cfg.train_file), Path(cfg.eval_file)]
    elif known is not None:
        folder = _known_folder(cfg, known)
        files = [folder / known.train_file, folder / known.eval_file]
    if cfg.target:
        files += [f for f in target_files(cfg.target) if f not in files]
    return files


def _file_fields(cfg: DataConfig, known: KnownDataset | None) -> tuple[str, str]:
    """The DataConfig fields that name the training and the evaluation file."""
    if known is None:
        return "train_file", "eval_file"
    field = "target" if known.folder is None else "path"
    return field, field


def _load_splits(cfg: DataConfig) -> list[tuple[object, str]]:
    """(dataset, where its rows come from) for the training and the evaluation split."""
    import datasets

    if cfg.dataset == "files" or cfg.dataset in KNOWN_DATASETS:
        fields = _file_fields(cfg, KNOWN_DATASETS.get(cfg.dataset))
        return [(_read_file(path, field), str(path)) for path, field in zip(local_files(cfg)[:2], fields, strict=True)]
    # A hub dataset id, for users who are online. 'glue/sst2' is the GLUE name of our local sst2.
    repo, config = ("nyu-mll/glue", "sst2") if cfg.dataset == "glue/sst2" else (cfg.dataset, cfg.hub_config)
    try:
        return [(datasets.load_dataset(repo, config, split=split), f"{cfg.dataset} ({split} split)")
                for split in (cfg.train_split, cfg.eval_split)]
    except Exception as exc:
        raise DataError(f"data.dataset: could not load '{cfg.dataset}' from the hub ({exc}); "
                        "offline, use a known dataset or dataset: files") from None


def _columns(ds, source: str, fields: dict[str, str], task: Task) -> dict[str, list]:
    """The columns ``fields`` (DataConfig field -> column) name, under the task's names; a missing column or no
    rows is a ``DataError`` naming the file."""
    for field, column in fields.items():
        if column not in ds.column_names:
            raise DataError(f"{source}: no column '{column}' (data.{field}); its columns: {ds.column_names}")
    if len(ds) == 0:
        raise DataError(f"{source}: no rows")
    values = ds.select_columns(list(fields.values())).to_dict()  # whole columns at once: datasets' Column is lazy
    return {task.columns[field]: values[column] for field, column in fields.items()}


def _check_rows(columns: dict[str, list], source: str, fields: dict[str, str], task: Task, labels) -> None:
    column_of = {task.columns[field]: column for field, column in fields.items()}
    for index, values in enumerate(zip(*columns.values(), strict=True)):
        problem = task.row_problem(dict(zip(columns, values, strict=True)), labels)
        if problem is not None:
            name, message = problem
            raise DataError(f"{source}, row {index + 1}, column '{column_of[name]}': {message}")


def _read(cfg: DataConfig, task: Task):
    """[(columns, source)] of the training and evaluation splits, and the label names."""
    fields = task.read_columns(cfg)
    splits = [(_columns(ds, source, fields, task), source) for ds, source in _load_splits(cfg)]
    labels = cfg.labels if cfg.labels is not None else task.labels_of(splits[0][0])
    return splits, fields, labels


def label_names(cfg: DataConfig, task: Task = CLASSIFICATION) -> list[str] | None:
    """``data.labels``, or the labels the training rows hold (sorted) when it is not set; None for a score, and for a
    task that reads no labels (a language model's texts)."""
    if not {"label_field", "tags_field"} & set(task.columns):
        return None
    if cfg.labels is not None:  # no need to read the data (a known dataset sets its labels)
        return cfg.labels
    return _read(cfg, task)[2]


def load_labelled(cfg: DataConfig, task: Task = CLASSIFICATION):
    """Return (train, eval) ``datasets.Dataset`` with the task's columns, every row checked first.

    text-classification: ``text`` (and ``text_pair``), ``label`` (class index); token-classification: ``tokens``,
    ``tags`` (class indices); text-regression: ``text`` (and ``text_pair``), ``label`` (float32 score).

    The eval split is the labelled data's own (model selection); ``load_evaluation`` gives the split that
    results are reported on, which is the target domain's when ``data.target`` is set.

    Raises:
        DataError: naming the file (and the row and column) of a missing column, an empty split, a label not in
            data.labels, tokens and tags of different lengths, a value that is no text or no score.
    """
    splits, fields, labels = _read(cfg, task)
    limits = (cfg.max_train_samples, cfg.max_eval_samples)
    return tuple(_rows(columns, source, fields, task, labels, limit)
                 for (columns, source), limit in zip(splits, limits, strict=True))


def _rows(columns: dict[str, list], source: str, fields: dict[str, str], task: Task, labels, limit: int | None):
    import datasets

    _check_rows(columns, source, fields, task, labels)
    ds = datasets.Dataset.from_dict(task.to_ids(columns, labels))
    if limit is not None and limit < len(ds):
        # Shuffle before slicing: SST-2 and many corpora are sorted by label or source.
        ds = ds.shuffle(seed=0).select(range(limit))
    return ds


def load_evaluation(cfg: DataConfig, task: Task = CLASSIFICATION):
    """The split every artifact is scored on: the target domain's dev split if there is one (text classification),
    else the eval split, with the task's columns."""
    if not cfg.target:
        return load_labelled(cfg, task)[1]
    dev = target_files(cfg.target)[1]
    fields = {"text_field": "text", "label_field": "label"}  # a target folder holds {text, label} rows
    columns = _columns(_read_file(dev, "target"), str(dev), fields, CLASSIFICATION)
    return _rows(columns, str(dev), fields, CLASSIFICATION, label_names(cfg), cfg.max_eval_samples)


def target_texts(cfg: DataConfig) -> list[str]:
    """The target domain's training texts, labels dropped (unlabelled in-domain text)."""
    if not cfg.target:
        raise DataError("data.target: not set; adapt, domain_adversarial and self_train need target-domain text")
    return read_texts(target_files(cfg.target)[0], "text", "data.target")


def target_tokens(cfg: DataConfig, tokenizer, max_length: int | None = None):
    """``target_texts`` tokenized as ``tokenize`` cuts them (a dataset without labels)."""
    import datasets

    return tokenize(datasets.Dataset.from_dict({"text": target_texts(cfg)}), tokenizer, cfg, max_length)


def tokenize(ds, tokenizer, cfg: DataConfig, max_length: int | None = None, task: Task = CLASSIFICATION,
             encode=None):
    """Tokenize as the task does (or as ``encode``, called as ``Task.encode`` is), without padding (the collator
    pads each batch to its own longest row); the task's input columns are replaced by the model's features,
    ``label`` is kept."""
    max_length = max_length or cfg.max_length
    encode = encode or task.encode
    inputs = [c for c in ds.column_names if c in task.columns.values() and c != "label"]
    return ds.map(lambda batch: encode(batch, tokenizer, cfg, max_length), batched=True, remove_columns=inputs,
                  desc="tokenize")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: cut after . ! or ? and whitespace, and at line breaks. Good enough for text a teacher
    labels (a wrong cut leaves a phrase, as many rows of SST-2 are); no sentence model to download."""
    return [s for s in (part.strip() for part in re.split(r"(?<=[.!?])\s+|\s*\n\s*", text)) if s]


def read_texts(path: Path, text_field: str, field: str) -> list[str]:
    """Unlabelled text: a .txt file (one text per line) or the ``text_field`` column of a csv/tsv/jsonl file."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{field}: file not found: {path}")
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ds = _read_file(path, field)
    if text_field not in ds.column_names:
        raise DataError(f"{field}: {path.name} has no column '{text_field}' (columns: {ds.column_names})")
    return ["" if t is None else str(t) for t in ds[text_field]]

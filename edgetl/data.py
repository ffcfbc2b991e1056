"""Labelled text sources, read through ``datasets`` from local files first (offline-first)."""

from __future__ import annotations

from pathlib import Path

from edgetl.corpora import datasets_dir, target_files
from edgetl.errors import DataError
from edgetl.inputs import head_tail
from edgetl.recipe import DataConfig

_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}


def _read_file(path: Path, field: str):
    import datasets

    if not path.is_file():
        raise DataError(f"data.{field}: file not found: {path}")
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"data.{field}: {path.name}: unsupported extension (use .csv, .tsv or .jsonl)")
    kwargs = {}
    if path.suffix.lower() == ".tsv":
        # SST-2 text contains bare quote characters: read tab-separated fields literally.
        kwargs = {"delimiter": "\t", "quoting": 3}
    return datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)


def local_files(cfg: DataConfig) -> list[Path]:
    """The local files a data config reads (none for a hub dataset)."""
    files = target_files(cfg.target) if cfg.target else []
    if cfg.dataset == "sst2":
        folder = Path(cfg.path).expanduser() if cfg.path else datasets_dir() / "sst2"
        files = [folder / "train.tsv", folder / "dev.tsv"] + files
    elif cfg.dataset == "files":
        files = [Path(cfg.train_file), Path(cfg.eval_file)] + files
    return files


def _load_splits(cfg: DataConfig):
    import datasets

    if cfg.dataset in ("sst2", "files", "target"):
        train, dev = local_files(cfg)[:2]
        fields = {"sst2": ("path", "path"), "files": ("train_file", "eval_file"), "target": ("target", "target")}[cfg.dataset]
        return _read_file(train, fields[0]), _read_file(dev, fields[1])
    # A hub dataset id, for users who are online. 'glue/sst2' is the GLUE name of our local sst2.
    repo, config = ("nyu-mll/glue", "sst2") if cfg.dataset == "glue/sst2" else (cfg.dataset, cfg.hub_config)
    try:
        train = datasets.load_dataset(repo, config, split=cfg.train_split)
        dev = datasets.load_dataset(repo, config, split=cfg.eval_split)
    except Exception as exc:
        raise DataError(f"data.dataset: could not load '{cfg.dataset}' from the hub ({exc}); "
                        "offline, use dataset: sst2 or dataset: files") from None
    return train, dev


def load_labelled(cfg: DataConfig):
    """Return (train, eval) ``datasets.Dataset`` with columns ``text`` and ``label`` (int).

    The eval split is the labelled data's own (model selection); ``load_evaluation`` gives the split that
    results are reported on, which is the target domain's when ``data.target`` is set.
    """
    train, dev = _load_splits(cfg)
    fields = ("text", "label") if cfg.dataset == "target" else (cfg.text_field, cfg.label_field)
    return (_labelled(train, cfg, fields, "train", cfg.max_train_samples),
            _labelled(dev, cfg, fields, "eval", cfg.max_eval_samples))


def load_evaluation(cfg: DataConfig):
    """The split every artifact is scored on: the target domain's dev split if there is one, else the eval split."""
    if not cfg.target:
        return load_labelled(cfg)[1]
    dev = target_files(cfg.target)[1]
    return _labelled(_read_file(dev, "target"), cfg, ("text", "label"), "target dev", cfg.max_eval_samples)


def target_texts(cfg: DataConfig) -> list[str]:
    """The target domain's training texts, labels dropped (unlabelled in-domain text)."""
    if not cfg.target:
        raise DataError("data.target: not set; adapt, domain_adversarial and self_train need target-domain text")
    return read_texts(target_files(cfg.target)[0], "text", "data.target")


def target_tokens(cfg: DataConfig, tokenizer, max_length: int | None = None):
    """``target_texts`` tokenized as ``tokenize`` cuts them (a dataset without labels)."""
    import datasets

    return tokenize(datasets.Dataset.from_dict({"text": target_texts(cfg)}), tokenizer, cfg, max_length)


def _labelled(ds, cfg: DataConfig, fields: tuple[str, str], split: str, limit: int | None):
    text_field, label_field = fields
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise DataError(f"data: the {split} split has no column {missing} (columns: {ds.column_names}); "
                        "set data.text_field / data.label_field")
    ds = ds.select_columns([text_field, label_field]).rename_columns({text_field: "text", label_field: "label"})
    bad = [v for v in set(ds["label"]) if not (isinstance(v, int) and 0 <= v < len(cfg.labels))]
    if bad:
        raise DataError(f"data.{label_field}: {split} labels {sorted(map(str, bad))[:5]} are not integers "
                        f"in [0, {len(cfg.labels)}) matching data.labels {cfg.labels}")
    if limit is not None and limit < len(ds):
        # Shuffle before slicing: SST-2 and many corpora are sorted by label or source.
        ds = ds.shuffle(seed=0).select(range(limit))
    return ds.map(lambda row: {"text": "" if row["text"] is None else str(row["text"])})


def tokenize(ds, tokenizer, cfg: DataConfig, max_length: int | None = None):
    """Tokenize without padding (the collator pads each batch to its own longest text), cut as ``cfg.truncation`` says."""
    max_length = max_length or cfg.max_length

    def encode(batch):
        if cfg.truncation != "head+tail":
            tokenizer.truncation_side = cfg.truncation
            return tokenizer(batch["text"], truncation=True, max_length=max_length)
        out = tokenizer(batch["text"], truncation=False, verbose=False)
        return {k: [head_tail(v, max_length, cfg.head_tokens) for v in values] for k, values in out.items()}

    return ds.map(encode, batched=True, remove_columns=[c for c in ds.column_names if c == "text"], desc="tokenize")


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

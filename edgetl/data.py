"""Labelled text sources, read through ``datasets`` from local files first (offline-first)."""

from __future__ import annotations

import os
from pathlib import Path

from edgetl.errors import DataError
from edgetl.recipe import DataConfig

_FORMATS = {".csv": "csv", ".tsv": "csv", ".jsonl": "json", ".json": "json"}


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
    if cfg.dataset == "sst2":
        folder = Path(cfg.path).expanduser() if cfg.path else datasets_dir() / "sst2"
        return [folder / "train.tsv", folder / "dev.tsv"]
    if cfg.dataset == "files":
        return [Path(cfg.train_file), Path(cfg.eval_file)]
    return []


def _load_splits(cfg: DataConfig):
    import datasets

    if cfg.dataset in ("sst2", "files"):
        train, dev = local_files(cfg)
        fields = ("path", "path") if cfg.dataset == "sst2" else ("train_file", "eval_file")
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
    """Return (train, eval) ``datasets.Dataset`` with columns ``text`` and ``label`` (int)."""
    train, dev = _load_splits(cfg)
    out = []
    for split, ds, limit in (("train", train, cfg.max_train_samples), ("eval", dev, cfg.max_eval_samples)):
        missing = [f for f in (cfg.text_field, cfg.label_field) if f not in ds.column_names]
        if missing:
            raise DataError(f"data: the {split} split has no column {missing} (columns: {ds.column_names}); "
                            "set data.text_field / data.label_field")
        ds = ds.select_columns([cfg.text_field, cfg.label_field])
        ds = ds.rename_columns({cfg.text_field: "text", cfg.label_field: "label"})
        bad = [v for v in set(ds["label"]) if not (isinstance(v, int) and 0 <= v < len(cfg.labels))]
        if bad:
            raise DataError(f"data.{cfg.label_field}: {split} labels {sorted(map(str, bad))[:5]} are not integers "
                            f"in [0, {len(cfg.labels)}) matching data.labels {cfg.labels}")
        if limit is not None and limit < len(ds):
            # Shuffle before slicing: SST-2 and many corpora are sorted by label or source.
            ds = ds.shuffle(seed=0).select(range(limit))
        out.append(ds.map(lambda row: {"text": "" if row["text"] is None else str(row["text"])}))
    return out[0], out[1]


def tokenize(ds, tokenizer, max_length: int):
    """Tokenize without padding (the collator pads each batch to its own longest text)."""
    return ds.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )


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

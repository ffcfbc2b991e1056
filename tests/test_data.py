"""Labelled data: where the corpora are found, and the errors a user gets for a bad file or field."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from edgetl.errors import DataError
from edgetl.recipe import DataConfig


def write_tsv(path: Path, rows: list[tuple[str, int]], header: str = "sentence\tlabel") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *(f"{text}\t{label}" for text, label in rows)]) + "\n")
    return path


def test_data_dir_is_shared_datasets_beside_the_checkout(monkeypatch, tmp_path):
    from edgetl.data import datasets_dir

    monkeypatch.delenv("EDGETL_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert datasets_dir() == REPO.parent / "shared" / "datasets"
    assert (datasets_dir() / "sst2" / "train.tsv").is_file()


def test_data_dir_env_override(monkeypatch, tmp_path):
    from edgetl.data import datasets_dir

    monkeypatch.setenv("EDGETL_DATA_DIR", str(tmp_path))
    assert datasets_dir() == tmp_path


def test_sst2_slice_loads_with_text_and_int_labels(sst2_slice):
    from edgetl.data import load_labelled

    train, dev = load_labelled(DataConfig(path=str(sst2_slice)))
    assert (len(train), len(dev)) == (400, 120)
    assert train.column_names == ["text", "label"] and set(dev["label"]) == {0, 1}
    # Quote characters in SST-2 text are data, not CSV quoting.
    raw = (sst2_slice / "dev.tsv").read_text().splitlines()[1:]
    assert dev["text"] == [line.rsplit("\t", 1)[0] for line in raw]


def test_sample_limits_shuffle_before_slicing(tmp_path):
    from edgetl.data import load_labelled

    # Sorted by label, as many corpora are: a plain head would hold one label only.
    rows = [(f"bad film {i}", 0) for i in range(100)] + [(f"good film {i}", 1) for i in range(100)]
    write_tsv(tmp_path / "train.tsv", rows)
    write_tsv(tmp_path / "dev.tsv", rows)
    train, dev = load_labelled(DataConfig(path=str(tmp_path), max_train_samples=20, max_eval_samples=30))
    assert (len(train), len(dev)) == (20, 30)
    assert set(train["label"]) == {0, 1} and set(dev["label"]) == {0, 1}


def test_missing_data_file(tmp_path):
    from edgetl.data import load_labelled

    with pytest.raises(DataError, match=r"data\.path: file not found: .*train\.tsv"):
        load_labelled(DataConfig(path=str(tmp_path / "nowhere")))


def test_missing_column(sst2_slice):
    from edgetl.data import load_labelled

    with pytest.raises(DataError, match=r"the train split has no column \['text'\].*set data\.text_field"):
        load_labelled(DataConfig(path=str(sst2_slice), text_field="text"))


def test_labels_outside_the_label_list(tmp_path):
    from edgetl.data import load_labelled

    write_tsv(tmp_path / "train.tsv", [("fine", 0), ("great", 2), ("meh", 1)])
    write_tsv(tmp_path / "dev.tsv", [("fine", 0), ("meh", 1)])
    with pytest.raises(DataError, match=r"data\.label: train labels \['2'\] are not integers in \[0, 2\)"):
        load_labelled(DataConfig(path=str(tmp_path)))


def test_unsupported_file_extension(tmp_path):
    from edgetl.data import load_labelled

    for name in ("train.txt", "dev.txt"):
        (tmp_path / name).write_text("sentence\tlabel\nok\t1\n")
    cfg = DataConfig(dataset="files", train_file=str(tmp_path / "train.txt"), eval_file=str(tmp_path / "dev.txt"))
    with pytest.raises(DataError, match=r"data\.train_file: train\.txt: unsupported extension"):
        load_labelled(cfg)


def test_files_dataset_reads_csv_and_jsonl(tmp_path):
    from edgetl.data import load_labelled

    (tmp_path / "train.csv").write_text('review,stars\n"good, really",1\nbad,0\n')
    (tmp_path / "dev.jsonl").write_text('{"review": "fine", "stars": 1}\n{"review": "awful", "stars": 0}\n')
    cfg = DataConfig(dataset="files", train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "dev.jsonl"),
                     text_field="review", label_field="stars")
    train, dev = load_labelled(cfg)
    assert train["text"] == ["good, really", "bad"] and dev["label"] == [1, 0]


def test_hub_dataset_offline_says_what_to_use_instead():
    from edgetl.data import load_labelled

    with pytest.raises(DataError, match=r"data\.dataset: could not load 'nobody-xyz/no-such-data'.*offline, use dataset: sst2"):
        load_labelled(DataConfig(dataset="nobody-xyz/no-such-data"))

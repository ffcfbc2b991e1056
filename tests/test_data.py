"""Labelled data: where the corpora are found, and the errors a user gets for a bad file or field."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from edgetl.errors import DataError
from edgetl.recipe import DataConfig
from edgetl.tasks import TASKS


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

    with pytest.raises(DataError, match=r"train\.tsv: no column 'text' \(data\.text_field\); its columns: "
                                        r"\['sentence', 'label'\]"):
        load_labelled(DataConfig(path=str(sst2_slice), text_field="text"))


def test_labels_outside_the_label_list(tmp_path):
    from edgetl.data import load_labelled

    write_tsv(tmp_path / "train.tsv", [("fine", 0), ("great", 2), ("meh", 1)])
    write_tsv(tmp_path / "dev.tsv", [("fine", 0), ("meh", 1)])
    with pytest.raises(DataError, match=r"train\.tsv, row 2, column 'label': label 2 is not in data\.labels "
                                        r"\['negative', 'positive'\]"):
        load_labelled(DataConfig(path=str(tmp_path)))


def test_unsupported_file_extension(tmp_path):
    from edgetl.data import load_labelled

    for name in ("train.txt", "dev.txt"):
        (tmp_path / name).write_text("sentence\tlabel\nok\t1\n")
    cfg = DataConfig(dataset="files", train_file=str(tmp_path / "train.txt"), eval_file=str(tmp_path / "dev.txt"))
    with pytest.raises(DataError, match=r"data\.train_file: train\.txt: unsupported extension \(use \.csv, \.tsv, "
                                        r"\.jsonl or \.parquet\)"):
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

    with pytest.raises(DataError, match=r"data\.dataset: could not load 'nobody-xyz/no-such-data'.*offline, use a "
                                        r"known dataset or dataset: files"):
        load_labelled(DataConfig(dataset="nobody-xyz/no-such-data"))


def test_labels_are_read_from_the_data_sorted_when_not_given(tmp_path):
    from edgetl.data import label_names, load_labelled

    (tmp_path / "train.csv").write_text("review,verdict\ngood,yes\nbad,no\nso-so,maybe\nfine,yes\n")
    (tmp_path / "dev.csv").write_text("review,verdict\nawful,no\ngreat,yes\n")
    cfg = DataConfig(dataset="files", train_file=str(tmp_path / "train.csv"), eval_file=str(tmp_path / "dev.csv"),
                     text_field="review", label_field="verdict")
    assert label_names(cfg) == ["maybe", "no", "yes"]
    train, dev = load_labelled(cfg)
    assert train["label"] == [2, 1, 0, 2] and dev["label"] == [1, 2]
    # Given labels set the class order, and every row's label is checked against them.
    assert load_labelled(cfg.model_copy(update={"labels": ["no", "maybe", "yes"]}))[1]["label"] == [0, 2]


def test_parquet_files_are_read_through_datasets(tmp_path):
    import datasets

    from edgetl.data import load_labelled

    rows = {"tokens": [["Paris", "is", "big"], ["Bob", "Smith"]], "tags": [["B-LOC", "O", "O"], ["B-PER", "I-PER"]]}
    for name in ("train.parquet", "dev.parquet"):
        datasets.Dataset.from_dict(rows).to_parquet(str(tmp_path / name))
    cfg = DataConfig(dataset="files", train_file=str(tmp_path / "train.parquet"), eval_file=str(tmp_path / "dev.parquet"))
    train, _ = load_labelled(cfg, TASKS["token-classification"])
    assert train["tokens"] == rows["tokens"] and train["tags"] == [[0, 3, 3], [1, 2]]  # B-LOC B-PER I-PER O


def test_known_datasets_are_files_with_their_columns_task_and_labels():
    from edgetl.corpora import KNOWN_DATASETS
    from edgetl.data import local_files

    for name, known in KNOWN_DATASETS.items():
        cfg = DataConfig(dataset=name, target="electronics" if known.folder is None else None)
        assert {field: getattr(cfg, field) for field in known.columns} == known.columns, name
        assert cfg.labels == (list(known.labels) if known.labels else None), name
        assert all(path.is_file() for path in local_files(cfg)), name
        assert known.tasks and set(known.tasks) <= set(TASKS), name


# --- bad data fails before training, naming file, row and column, and leaves no run folder ----------------------

BAD_DATA = {
    # case: (task, dev file name, dev rows, fields, expected error)
    "missing-column": ("text-classification", "dev.csv", "review,stars\nfine,good\n", {},
                       r"dev\.csv: no column 'verdict' \(data\.label_field\); its columns: \['review', 'stars'\]"),
    "empty-split": ("text-classification", "dev.csv", "review,verdict\n", {}, r"dev\.csv: no rows"),
    "label-not-in-labels": ("text-classification", "dev.csv", "review,verdict\nfine,good\nok,great\n", {},
                            r"dev\.csv, row 2, column 'verdict': label 'great' is not in data\.labels \['bad', 'good'\]"),
    "null-text": ("text-classification", "dev.jsonl", '{"review": "fine", "verdict": "good"}\n'
                  '{"review": null, "verdict": "bad"}\n', {}, r"dev\.jsonl, row 2, column 'review': expected text, found null"),
    "number-for-text": ("text-classification", "dev.jsonl", '{"review": 7, "verdict": "good"}\n', {},
                        r"dev\.jsonl, row 1, column 'review': expected text, found int 7"),
    "tags-and-tokens-differ": ("token-classification", "dev.jsonl", '{"words": ["Bob", "ran"], "ner": ["B-PER", "O"]}\n'
                               '{"words": ["in", "Paris"], "ner": ["O"]}\n', {"tokens_field": "words", "tags_field": "ner"},
                               r"dev\.jsonl, row 2, column 'ner': 1 tags for 2 tokens"),
    "tag-not-in-labels": ("token-classification", "dev.jsonl", '{"words": ["Bob"], "ner": ["B-ORG"]}\n',
                          {"tokens_field": "words", "tags_field": "ner"},
                          r"dev\.jsonl, row 1, column 'ner': tag 'B-ORG' is not in data\.labels \['B-PER', 'O'\]"),
    "non-numeric-score": ("text-regression", "dev.csv", "a,b,similar\nx,y,0.5\nx,z,high\n",
                          {"text_field": "a", "text_pair_field": "b", "score_field": "similar"},
                          r"dev\.csv, row 2, column 'similar': expected a number \(the score\), found 'high'"),
}
GOOD_TRAIN = {
    "text-classification": ("train.csv", "review,verdict\nfine,good\nawful,bad\n"),
    "token-classification": ("train.jsonl", '{"words": ["Bob", "ran"], "ner": ["B-PER", "O"]}\n'),
    "text-regression": ("train.csv", "a,b,similar\nx,y,0.5\nx,z,4\n"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_fails_before_any_run_folder_naming_file_row_and_column(case, tmp_path, tiny_model):
    from edgetl.pipeline import run_recipe
    from edgetl.recipe import Recipe

    task, dev_name, dev_rows, fields, message = BAD_DATA[case]
    train_name, train_rows = GOOD_TRAIN[task]
    (tmp_path / train_name).write_text(train_rows)
    (tmp_path / dev_name).write_text(dev_rows)
    data = {"dataset": "files", "train_file": str(tmp_path / train_name), "eval_file": str(tmp_path / dev_name),
            "text_field": "review", "label_field": "verdict"} | fields
    recipe = Recipe.model_validate({"name": "bad", "task": task, "model": str(tiny_model), "data": data,
                                    "stages": [{"stage": "finetune", "max_steps": 1}]})
    with pytest.raises(DataError, match=message):
        run_recipe(recipe, tmp_path / "runs" / "bad")
    assert not (tmp_path / "runs").exists()

"""Every results file under benchmarks/results/ records the commit of the code it ran on.

Each folder that directly holds result files has a `provenance.json`: the commit, the command that produced
the files, the machine, the files themselves and where the commit was found. A folder whose files came from
runs of different commits lists them as `runs: [{commit, command, files, ...}, ...]` instead of a top-level
commit, command and files. Only file and git reading here: no model, no runtime.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PROVENANCE = "provenance.json"
COMMIT = re.compile(r"[0-9a-f]{7,40}")
# A path README mentions: benchmarks/results/ followed by a path (a line break right after a slash is joined).
MENTION = re.compile(r"benchmarks/results/[\w./-]*")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _provenances() -> dict[Path, dict]:
    """Folder -> its parsed provenance.json, for every provenance.json under benchmarks/results/."""
    found = {}
    for path in sorted(RESULTS.rglob(PROVENANCE)):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(data, dict), f"{_rel(path)}: not a JSON object"
        found[path.parent] = data
    return found


def _runs(provenance: dict) -> list[dict]:
    """The runs a provenance describes: its `runs` list, or the file itself as one run."""
    return provenance["runs"] if "runs" in provenance else [provenance]


def _listed(provenance: dict) -> list[str]:
    return [name for run in _runs(provenance) for name in run.get("files", [])]


def _result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file() and p.name != PROVENANCE)


def _commits() -> dict[str, list[str]]:
    """Every commit recorded -> the provenance files that record it."""
    commits: dict[str, list[str]] = {}
    for folder, provenance in _provenances().items():
        for run in _runs(provenance):
            commits.setdefault(str(run.get("commit")), []).append(_rel(folder / PROVENANCE))
    return commits


def test_results_folder_has_provenance_files():
    assert RESULTS.is_dir(), f"{_rel(RESULTS)} is missing"
    assert _provenances(), f"no {PROVENANCE} under {_rel(RESULTS)}"


def test_every_results_file_is_listed_in_its_folders_provenance():
    provenances = _provenances()
    unlisted = []
    for path in _result_files():
        provenance = provenances.get(path.parent)
        if provenance is None:
            unlisted.append(f"{_rel(path)} (its folder has no {PROVENANCE})")
        elif path.name not in _listed(provenance):
            unlisted.append(f"{_rel(path)} (not in {_rel(path.parent / PROVENANCE)})")
    assert not unlisted, "results files without provenance:\n" + "\n".join(unlisted)


def test_every_file_a_provenance_lists_exists_once_in_its_folder():
    wrong = []
    for folder, provenance in _provenances().items():
        where = _rel(folder / PROVENANCE)
        names = _listed(provenance)
        for name in names:
            if "/" in name or name == PROVENANCE or not (folder / name).is_file():
                wrong.append(f"{where} lists {name!r}, which is not a results file in {_rel(folder)}/")
        for name in sorted({n for n in names if names.count(n) > 1}):
            wrong.append(f"{where} lists {name!r} more than once")
    assert not wrong, "\n".join(wrong)


def test_every_provenance_names_commit_command_machine_files_and_source():
    wrong = []
    for folder, provenance in _provenances().items():
        where = _rel(folder / PROVENANCE)
        if "runs" in provenance:
            if {"commit", "command", "files"} & provenance.keys():
                wrong.append(f"{where}: has runs, so commit, command and files belong in each run")
            if not isinstance(provenance["runs"], list) or not provenance["runs"]:
                wrong.append(f"{where}: runs must be a non-empty list")
                continue
        if not isinstance(provenance.get("machine"), str) or not provenance["machine"].strip():
            wrong.append(f"{where}: no machine")
        for i, run in enumerate(_runs(provenance)):
            label = f"{where} runs[{i}]" if "runs" in provenance else where
            if not isinstance(run, dict):
                wrong.append(f"{label}: not a JSON object")
                continue
            if not isinstance(run.get("command"), str) or not run["command"].strip():
                wrong.append(f"{label}: no command")
            files = run.get("files")
            if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
                wrong.append(f"{label}: files must be a non-empty list of file names")
            elif files != sorted(files):
                wrong.append(f"{label}: files are not sorted")
            source = run.get("source", provenance.get("source"))
            if not isinstance(source, str) or not source.strip():
                wrong.append(f"{label}: no source (where the commit was found)")
    assert not wrong, "\n".join(wrong)


def test_every_recorded_commit_is_7_to_40_hex_characters():
    wrong = [f"{', '.join(where)}: commit {commit!r}" for commit, where in _commits().items()
             if not COMMIT.fullmatch(commit)]
    assert not wrong, "commits must be 7-40 lowercase hex characters:\n" + "\n".join(wrong)


def test_every_recorded_commit_exists_in_the_repository():
    if not (ROOT / ".git").exists():
        pytest.skip("no .git in this checkout (an sdist?): commits cannot be looked up")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    missing = []
    for commit, where in sorted(_commits().items()):
        if not COMMIT.fullmatch(commit):
            continue  # the format test reports it
        found = subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                               capture_output=True).returncode == 0
        if not found:
            missing.append(f"{commit} (recorded in {', '.join(where)})")
    assert not missing, "commits not in this repository:\n" + "\n".join(missing)


def _readme_mentions(text: str) -> list[str]:
    joined = re.sub(r"(benchmarks/results/[\w./-]*/)\n[ \t]*", r"\1", text)
    # The bare folder is a pointer to the index of results, not a claim about any one of them.
    return sorted({m.rstrip(".") for m in MENTION.findall(joined)} - {"benchmarks/results/", "benchmarks/results"})


def _commits_behind(mention: str, provenances: dict[Path, dict]) -> dict[str, set[str]] | None:
    """The commits a README mention stands for (a file's own run, or every run in and below a folder), each
    with the provenance files that record it; None when the path does not exist."""
    path = ROOT / mention
    if path.is_file():
        folders = [path.parent] if path.parent in provenances else []
    elif path.is_dir():
        folders = [folder for folder in provenances if folder == path or path in folder.parents]
    else:
        return None
    commits: dict[str, set[str]] = {}
    for folder in folders:
        for run in _runs(provenances[folder]):
            if path.is_dir() or path.name in run.get("files", []):
                commits.setdefault(str(run.get("commit")), set()).add(_rel(folder / PROVENANCE))
    return commits


PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_every_results_path_a_page_mentions_has_its_commits_named_on_that_page(page):
    text = page.read_text(encoding="utf-8")
    named = set(re.findall(r"\b[0-9a-f]{7,40}\b", text))
    provenances = _provenances()
    problems = []
    for mention in _readme_mentions(text):
        commits = _commits_behind(mention, provenances)
        if commits is None:
            problems.append(f"{mention}: {_rel(page)} mentions it, but it does not exist")
            continue
        for commit, where in sorted(commits.items()):
            if not any(commit.startswith(word) or word.startswith(commit) for word in named):
                problems.append(f"{mention}: commit {commit} (recorded in {', '.join(sorted(where))}) "
                                f"is not named in {_rel(page)}")
    assert not problems, f"{_rel(page)}: results paths whose commits it does not name:\n" + "\n".join(problems)


def test_readme_points_at_results():
    assert _readme_mentions(README.read_text(encoding="utf-8")), "README.md mentions no benchmarks/results/ path"

"""Scoring files of inputs with a bundle: one JSONL file in this process (``edgetl predict --input``), or a corpus
of JSONL / Parquet shards on Ray Data (``--engine ray``), one bundle loaded per worker actor, one Parquet file per
shard. A shard's Parquet file is written whole and then renamed, so a restarted job skips the shards that exist and
never holds half of one; each records the bundle and the input it was scored from, so a restart against another
bundle or a changed input is refused instead of mixed in."""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import sys
from pathlib import Path

from edgetl.artifact import write_bytes_atomic
from edgetl.errors import UsageError

CHUNK = 256  # inputs per runtime call (the runtime batches them only where the model is batch-invariant)
SHARD_SUFFIXES = (".jsonl", ".parquet")


def _jsonl_input(row, text_pair: bool, takes_words: bool, field: str = "text") -> tuple[str, object]:
    """The runtime method and input of one JSONL row (the text under ``field``); ValueError says what the row
    should be."""
    from edgetl.runtime.payloads import pair_from_json

    if takes_words and isinstance(row, dict) and "words" in row:
        words = row["words"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise ValueError("'words' must be a list of strings")
        return "predict_words", words
    if text_pair:
        pair = pair_from_json(row)
        if pair is None:
            raise ValueError("expected an object with a string 'text' and a string 'text_pair' (this bundle's model "
                             "reads pairs), or [text, text_pair]")
        return "predict", pair
    if isinstance(row, dict) and "text_pair" in row:
        raise ValueError("'text_pair' given, but this bundle's model reads single texts")
    text = row.get(field) if isinstance(row, dict) else row
    if not isinstance(text, str):
        found = f" (its keys: {', '.join(sorted(row))})" if isinstance(row, dict) and field not in row else ""
        raise ValueError(f"expected a string or an object with a string {field!r}{found}"
                         + (", or an object with a list of strings 'words'" if takes_words else ""))
    return "predict", text


def _input_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 file, split on newlines only (a JSON string or a text may hold U+2028 and other
    characters that ``str.splitlines`` would split on); a final newline ends the last line, a CR before a newline
    is dropped."""
    if not path.is_file():
        raise UsageError(f"--input: file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UsageError(f"--input: {path}:{line}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    lines = text.removeprefix("\ufeff").split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


def read_jsonl_inputs(path: Path, text_pair: bool = False, takes_words: bool = False,
                      field: str = "text") -> list[tuple[str, object]]:
    """(runtime method, input) per line of a JSONL file: a JSON string or {"text": ...} (the text under ``field``);
    {"text": ..., "text_pair": ...} for a bundle whose model reads pairs; {"words": [...]} for a runtime that takes
    pre-split words. Blank lines are skipped."""
    inputs = []
    for number, line in enumerate(_input_lines(path), 1):
        if not line.strip():
            continue
        try:
            inputs.append(_jsonl_input(json.loads(line), text_pair, takes_words, field))
        except json.JSONDecodeError as exc:
            raise UsageError(f"--input: {path}:{number}: not valid JSON ({exc.msg})") from None
        except ValueError as exc:
            raise UsageError(f"--input: {path}:{number}: {exc}") from None
    return inputs


def read_texts(path: Path, field: str = "text") -> list[str]:
    """The texts of a file to embed: a .txt file's lines (every line a text, an empty one too, so that row i of the
    vectors is line i + 1), or a .jsonl file's rows as ``read_jsonl_inputs`` reads single texts."""
    if path.suffix == ".txt":
        return _input_lines(path)
    if path.suffix != ".jsonl":
        raise UsageError(f"--input: {path}: expected a .jsonl file (one JSON text or {{\"{field}\": ...}} per line) "
                         f"or a .txt file (one text per line)")
    return [text for _, text in read_jsonl_inputs(path, field=field)]


def _predict_inputs(runtime, inputs: list[tuple[str, object]]) -> list:
    """Results in the order of ``inputs``, one runtime call per method (texts and word lists apart)."""
    results = [None] * len(inputs)
    for method in dict.fromkeys(method for method, _ in inputs):
        indices = [i for i, (name, _) in enumerate(inputs) if name == method]
        for index, result in zip(indices, getattr(runtime, method)([inputs[i][1] for i in indices]), strict=True):
            results[index] = result
    return results


def _input_fields(item) -> dict:
    if isinstance(item, tuple):
        return {"text": item[0], "text_pair": item[1]}
    return {"words": item} if isinstance(item, list) else {"text": item}


def _json_line(row: dict) -> str:
    """``row`` as one line of JSON, non-ASCII as is unless it holds a lone surrogate (a text that is not valid
    Unicode, echoed back), which UTF-8 cannot encode: then escaped."""
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(row)
    return line


def scored_rows(runtime, inputs: list[tuple[str, object]], chunk: int = CHUNK, progress=None) -> list[dict]:
    """One row per input, in order: the input's fields, then its result's (what both engines write); ``chunk``
    inputs per runtime call, each call counted on ``progress`` (a tqdm bar) if given."""
    rows = []
    for start in range(0, len(inputs), chunk):
        batch = inputs[start:start + chunk]
        rows += [{**_input_fields(item), **runtime.to_json(result)}
                 for (_, item), result in zip(batch, _predict_inputs(runtime, batch), strict=True)]
        if progress is not None:
            progress.update(len(batch))
    return rows


def predict_file(runtime, source: Path, target: Path | None, chunk: int = CHUNK) -> int:
    """Predictions for every line of ``source``, written as JSONL (the input and its result) to ``target``
    (atomically) or stdout."""
    from tqdm import tqdm

    inputs = read_jsonl_inputs(source, runtime.text_pair, runtime.takes_words)
    with tqdm(total=len(inputs), desc="predict", unit="text", disable=target is None) as progress:
        rows = [_json_line(row) for row in scored_rows(runtime, inputs, chunk, progress)]
    if target is None:
        print("\n".join(rows))
        return 0
    write_bytes_atomic(target, "".join(f"{row}\n" for row in rows).encode("utf-8"))  # never half a file
    print(f"wrote {len(rows)} predictions to {target}", file=sys.stderr)
    return 0


def shard_files(source: str) -> list[Path]:
    """The shards of ``--input``: the .jsonl and .parquet files of a folder, or of a glob pattern, sorted by path."""
    if Path(source).is_dir():
        paths = [p for p in Path(source).iterdir() if p.suffix in SHARD_SUFFIXES and p.is_file()]
    else:
        paths = [Path(p) for p in glob.glob(source, recursive=True) if Path(p).suffix in SHARD_SUFFIXES]
    if not paths:
        raise UsageError(f"--input: no .jsonl or .parquet shard in {source}")
    paths.sort()
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems:
            raise UsageError(f"--input: {stems[path.stem]} and {path} would both be scored into {path.stem}.parquet; "
                             f"rename one")
        stems[path.stem] = path
    return paths


def read_shard(path: Path, text_pair: bool, takes_words: bool) -> list[tuple[str, object]]:
    """(runtime method, input) per row of a JSONL shard (as ``read_jsonl_inputs``) or a Parquet shard (a ``text``
    column, ``text`` and ``text_pair``, or ``words``)."""
    if path.suffix == ".jsonl":
        return read_jsonl_inputs(path, text_pair, takes_words)
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's errors have no common base below Exception
        raise UsageError(f"--input: {path}: not a readable Parquet file ({exc})") from None
    inputs = []
    for number, row in enumerate(rows):
        try:
            inputs.append(_jsonl_input(row, text_pair, takes_words))
        except ValueError as exc:
            raise UsageError(f"--input: {path}: row {number}: {exc}") from None
    return inputs


def _provenance(bundle: Path, source: Path) -> dict[bytes, bytes]:
    """What a shard's Parquet file was scored from: the bundle's manifest (its files' hashes) and the input file."""
    manifest = hashlib.sha256((bundle / "edgetl.json").read_bytes()).hexdigest()
    stat = source.stat()
    return {b"edgetl.bundle": manifest.encode(), b"edgetl.source": f"{source.name}:{stat.st_size}".encode()}


def score_shard(runtime, source: Path, target: Path, chunk: int = CHUNK) -> int:
    """Score one shard into one Parquet file (the inputs' fields and the results', in input order), written whole;
    the number of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = scored_rows(runtime, read_shard(source, runtime.text_pair, runtime.takes_words), chunk)
    table = pa.Table.from_pylist(rows).replace_schema_metadata(_provenance(runtime.folder, source))
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes_atomic(target, buffer.getvalue())
    return len(rows)


def _pending(bundle: Path, shards: list[Path], out: Path) -> list[tuple[Path, Path]]:
    """(shard, its Parquet file) for the shards not scored yet; a finished one made from another bundle or input
    is refused."""
    import pyarrow.parquet as pq

    pending = []
    for shard in shards:
        target = out / f"{shard.stem}.parquet"
        if not target.exists():
            for stale in out.glob(f".{target.name}.*.tmp"):  # left by a job killed while writing this shard
                stale.unlink()
            pending.append((shard, target))
            continue
        made_from = pq.read_schema(target).metadata or {}
        for key, value in _provenance(bundle, shard).items():
            if made_from.get(key) != value:
                what = f"bundle than {bundle}" if key == b"edgetl.bundle" else f"input than {shard} (its name or size)"
                raise UsageError(f"--output: {target} was scored from another {what}; delete it (or give another "
                                 f"--output) to score it again")
    return pending


class _ShardScorer:
    """A Ray Data actor: loads the bundle once, then scores whole shards."""

    def __init__(self, bundle: str, backend: str, threads: int, public_key):
        from edgetl.runtime import load

        self.runtime = load(bundle, backend=backend, threads=threads, public_key=public_key)

    def __call__(self, batch: dict) -> dict:
        """Scores the batch's shards; a shard's bad row comes back as its ``error`` (Ray would wrap the exception)."""
        rows, errors = [], []
        for source, target in zip(batch["source"], batch["target"], strict=True):
            try:
                rows.append(score_shard(self.runtime, Path(source), Path(target)))
                errors.append("")
            except UsageError as exc:
                rows.append(0)
                errors.append(str(exc))
        return {"source": batch["source"], "rows": rows, "error": errors}


def score_on_ray(bundle: str, source: str, out: str, workers: int | None = None, threads: int = 1,
                 backend: str = "auto", public_key=None) -> tuple[int, int, int]:
    """Score every shard of ``source`` into ``out`` on Ray Data: ``workers`` actors (default: this machine's cores
    over ``threads``), each with ``threads`` inference threads. Connects to the cluster at ``RAY_ADDRESS``, else
    starts a local one. Returns (shards scored now, shards already done, rows scored now)."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("predict --engine ray needs Ray Data: pip install 'edgetl[ray]'") from None
    from tqdm import tqdm

    from edgetl.cluster import connect_ray
    from edgetl.runtime import load

    bundle_path, out_path = Path(bundle), Path(out)
    runtime = load(bundle_path, backend=backend, threads=1, public_key=public_key)  # a bad bundle fails here, once
    shards = shard_files(source)
    out_path.mkdir(parents=True, exist_ok=True)
    pending = _pending(bundle_path, shards, out_path)
    del runtime
    if not pending:
        return 0, len(shards), 0
    workers = workers or max(1, (os.cpu_count() or 1) // threads)
    connect_ray(workers * threads, "predict --engine ray")
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run lines would bury the progress bar
    ray.data.DataContext.get_current().enable_progress_bars = False
    items = [{"source": str(s.resolve()), "target": str(t.resolve())} for s, t in pending]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        _ShardScorer, batch_size=1, compute=ray.data.ActorPoolStrategy(size=min(workers, len(items))),
        num_cpus=threads, fn_constructor_kwargs={"bundle": str(bundle_path.resolve()), "backend": backend,
                                                 "threads": threads, "public_key": public_key})
    rows = 0
    with tqdm(total=len(items), desc="shards", unit="shard", file=sys.stderr) as progress:
        for done in dataset.iter_rows():
            if done["error"]:
                raise UsageError(done["error"])
            rows += int(done["rows"])
            progress.update(1)
    return len(items), len(shards) - len(items), rows

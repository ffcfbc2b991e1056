"""Batch scoring on Ray Data against the single-process ``edgetl predict``, on this machine.

    python benchmarks/batch_scoring.py BUNDLE --out DIR [--texts 100000] [--timing-texts 20000] [--shards 20]
        [--rounds 2]

The corpus: the first ``--texts`` texts of the shared datasets in a fixed order (SST-2 train sentences, the Amazon
reviews of the four domains, CoNLL-2003 sentences with their tokens joined by spaces, STS-B sentences), as one JSONL
file and as ``--shards`` JSONL shards of the same rows. Each engine runs as a whole ``edgetl predict`` command in its
own process (start-up, bundle load and, for Ray, starting the local cluster included): one process over the one file
with 2 inference threads, or ``--engine ray`` with 1 or 2 worker actors of 1 thread each.

1. Parity: the whole corpus through one process and through Ray with 2 workers; labels compared row for row, byte
   for byte (and the largest score difference).
2. Resume: a Ray job with 2 workers killed (SIGKILL to its process group) once half the shards are written, then
   started again: the shards finished before the kill keep their files untouched and the rows again equal the
   single-process ones, none lost or repeated.
3. Throughput: the first ``--timing-texts`` texts (as many shards), the three engines in ``--rounds`` rounds in
   alternating order.

Writes DIR/batch_scoring.json and DIR/batch_scoring.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "datasets"


def corpus(count: int) -> list[str]:
    texts = [line.split("\t")[0] for line in (DATA / "sst2" / "train.tsv").read_text().splitlines()[1:]]
    for domain in ("books", "dvd", "electronics", "kitchen"):
        for split in ("train", "dev"):
            texts += [json.loads(line)["text"] for line in (DATA / "amazon-reviews" / domain / f"{split}.jsonl").open()]
    for split in ("train", "dev"):
        texts += [" ".join(json.loads(line)["tokens"]) for line in (DATA / "conll2003" / f"{split}.jsonl").open()]
    for split in ("train", "dev"):
        for line in (DATA / "stsb" / f"{split}.jsonl").open():
            row = json.loads(line)
            texts += [row["sentence1"], row["sentence2"]]
    if len(texts) < count:
        sys.exit(f"the shared datasets hold {len(texts)} texts, fewer than --texts {count}")
    return texts[:count]


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")


def command(bundle: Path, engine: str, source: Path, target: Path) -> list[str]:
    cli = [sys.executable, "-m", "edgetl", "predict", str(bundle), "--input", str(source), "--output", str(target),
           "--backend", "onnxruntime"]
    if engine == "local":
        return cli + ["--threads", "2"]
    return cli + ["--engine", "ray", "--workers", engine.removeprefix("ray-"), "--threads", "1"]


def labels_and_scores(target: Path) -> tuple[list[str], list[float]]:
    if target.suffix == ".jsonl":
        rows = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    else:
        import pyarrow.parquet as pq

        rows = [row for path in sorted(target.glob("*.parquet")) for row in pq.read_table(path, columns=["label", "score"]).to_pylist()]
    return [r["label"] for r in rows], [r["score"] for r in rows]


def compare(reference: tuple[list[str], list[float]], other: tuple[list[str], list[float]]) -> dict:
    (labels, scores), (their_labels, their_scores) = reference, other
    return {"rows": len(their_labels), "rows_expected": len(labels),
            "labels_byte_identical": [s.encode() for s in labels] == [s.encode() for s in their_labels],
            "labels_differing": sum(a != b for a, b in zip(labels, their_labels, strict=False)),
            "max_score_difference": max((abs(a - b) for a, b in zip(scores, their_scores, strict=False)), default=0.0)}


def timed(cmd: list[str], target: Path) -> float:
    if target.is_dir():
        for path in target.glob("*.parquet"):
            path.unlink()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds


def settled(out: Path, quiet: float = 6.0) -> dict[str, int]:
    """The finished shards (name: mtime) once none has appeared for ``quiet`` seconds."""
    seen, since = None, time.monotonic()
    while time.monotonic() - since < quiet:
        now = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
        if now != seen:
            seen, since = now, time.monotonic()
        time.sleep(0.2)
    return seen


def kill_and_resume(bundle: Path, shards: Path, out: Path, count: int, reference) -> dict:
    out.mkdir(exist_ok=True)
    for path in out.glob("*.parquet"):
        path.unlink()
    cmd = command(bundle, "ray-2", shards, out)
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    while len(list(out.glob("*.parquet"))) < count // 2 and job.poll() is None:
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    before = settled(out)
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if done.returncode:
        sys.exit(f"the restarted job failed:\n{done.stderr[-3000:]}")
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    return {"shards": count, "finished_when_killed": len(before),
            "finished_shards_untouched": all(after.get(name) == mtime for name, mtime in before.items()),
            "restart_message": done.stderr.strip().splitlines()[-1],
            **compare(reference, labels_and_scores(out))}


def write_corpus(folder: Path, texts: list[str], shards: int) -> None:
    """``texts`` as one JSONL file (``all.jsonl``) and as ``shards`` JSONL shards of the same rows in order."""
    (folder / "shards").mkdir(parents=True, exist_ok=True)
    write_jsonl(folder / "all.jsonl", texts)
    size = -(-len(texts) // shards)
    for shard in range(shards):
        write_jsonl(folder / "shards" / f"part-{shard:03d}.jsonl", texts[shard * size:(shard + 1) * size])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle")
    parser.add_argument("--out", required=True)
    parser.add_argument("--texts", type=int, default=100_000, help="the corpus compared with one process")
    parser.add_argument("--timing-texts", type=int, default=20_000, help="its first N texts, timed in rounds")
    parser.add_argument("--shards", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from edgetl.bench.machine import describe, machine_info

    bundle, out = Path(args.bundle).resolve(), Path(args.out)
    texts = corpus(args.texts)
    write_corpus(out / "work" / "all", texts, args.shards)
    write_corpus(out / "work" / "timing", texts[:args.timing_texts], args.shards)

    def run(engine: str, folder: Path) -> float:
        source = folder / "all.jsonl" if engine == "local" else folder / "shards"
        target = folder / ("local.jsonl" if engine == "local" else engine)
        seconds = timed(command(bundle, engine, source, target), target)
        print(f"{folder.name} {engine}: {seconds:.1f} s", file=sys.stderr)
        return seconds

    whole = out / "work" / "all"
    corpus_seconds = {engine: run(engine, whole) for engine in ("local", "ray-2")}
    reference = labels_and_scores(whole / "local.jsonl")
    parity = compare(reference, labels_and_scores(whole / "ray-2"))
    resume = kill_and_resume(bundle, whole / "shards", whole / "resume", args.shards, reference)
    engines = ["local", "ray-1", "ray-2"]
    seconds: dict[str, list[float]] = {engine: [] for engine in engines}
    for round_ in range(args.rounds):
        for engine in engines if round_ % 2 == 0 else engines[::-1]:
            seconds[engine].append(run(engine, out / "work" / "timing"))
    result = {"command": "python benchmarks/batch_scoring.py " + " ".join(sys.argv[1:]),
              "machine": describe(machine_info()), "bundle": str(args.bundle), "texts": len(texts),
              "shards": args.shards, "corpus_seconds": corpus_seconds, "parity_ray_2_with_one_process": parity,
              "kill_and_resume": resume, "timing_texts": min(args.timing_texts, len(texts)), "rounds": args.rounds,
              "seconds": seconds}
    (out / "batch_scoring.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "batch_scoring.md").write_text(table(result))
    print(table(result))
    return 0


def table(result: dict) -> str:
    parity, resume, count = result["parity_ray_2_with_one_process"], result["kill_and_resume"], result["texts"]
    best = {e: min(v) for e, v in result["seconds"].items()}
    lines = [f"Machine: {result['machine']}.", "",
             f"{count:,} texts in {result['shards']} shards, Ray Data with 2 workers against one process "
             f"({result['corpus_seconds']['ray-2']:.0f} s and {result['corpus_seconds']['local']:.0f} s): "
             f"{parity['rows']:,} rows of {parity['rows_expected']:,}, labels byte-identical: "
             f"{parity['labels_byte_identical']} ({parity['labels_differing']} differ), largest score difference "
             f"{parity['max_score_difference']:.1e}.", "",
             f"Killed with {resume['finished_when_killed']} of {resume['shards']} shards written, restarted: finished "
             f"shards untouched: {resume['finished_shards_untouched']}; {resume['rows']:,} rows of "
             f"{resume['rows_expected']:,}; labels byte-identical: {resume['labels_byte_identical']} "
             f"(\"{resume['restart_message']}\").", "",
             f"Throughput on the first {result['timing_texts']:,} texts, each engine a whole `edgetl predict` process, "
             f"{result['rounds']} rounds in alternating order (seconds per round: "
             + "; ".join(f"{e} {', '.join(f'{s:.1f}' for s in v)}" for e, v in result["seconds"].items()) + "):", "",
             "| engine | texts / s (best round) | over one process (2 threads) | spread between rounds |",
             "|---|---:|---:|---:|"]
    for engine, seconds in result["seconds"].items():
        spread = (max(seconds) - min(seconds)) / min(seconds)
        lines.append(f"| {engine} | {result['timing_texts'] / best[engine]:,.0f} | {best['local'] / best[engine]:.2f}x "
                     f"| {spread:.0%}{' (noisy)' if spread > 0.1 else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

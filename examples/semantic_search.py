"""Semantic search with a sentence-embedding bundle: numpy + tokenizers + ONNX Runtime or OpenVINO; no torch.

    python examples/semantic_search.py index runs/stsb-embed-int8/06-bundle sentences/ --out search-index
    python examples/semantic_search.py query runs/stsb-embed-int8/06-bundle search-index "a man plays the flute" -k 5

``index`` embeds every line of every ``*.txt`` file under a folder (one sentence per line, blank lines skipped) and
saves ``vectors.npy`` (float32, one unit-length row per sentence) and ``texts.json`` (the sentences, in row order).
``query`` embeds the query and prints the ``k`` nearest sentences, best first, with their cosine similarity: a dot
product of unit vectors, over every row (exact search, linear in the number of sentences).

For millions of vectors, use an approximate nearest-neighbour index instead of this matrix product: FAISS
(``IndexHNSWFlat``, or ``IndexIVFPQ`` whose product quantisation keeps a 384-value vector in a few dozen bytes) or
hnswlib. Their graph or inverted-list search visits a small part of the vectors, so a query takes milliseconds
however large the index, and compressed codes (INT8 scalar or PQ) keep it in memory, for a small loss of recall.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgetl.runtime import Embedder


def unit(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 (a bundle that does not normalise gives raw pooled vectors)."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def index(bundle: str, folder: Path, out: Path) -> None:
    texts = [line.strip() for path in sorted(folder.rglob("*.txt"))
             for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    vectors = unit(Embedder.load(bundle).embed(texts))
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "vectors.npy", vectors)
    (out / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
    print(f"indexed {len(texts)} sentences from {folder} into {out}")


def query(bundle: str, saved: Path, question: str, k: int) -> None:
    vectors = np.load(saved / "vectors.npy")
    texts = json.loads((saved / "texts.json").read_text(encoding="utf-8"))
    scores = vectors @ unit(Embedder.load(bundle).embed([question]))[0]
    top = np.argpartition(-scores, min(k, len(texts)) - 1)[:k] if len(texts) > k else np.arange(len(texts))
    for row in top[np.argsort(-scores[top], kind="stable")]:
        print(f"{scores[row]:.4f}\t{texts[row]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("index", help="embed every line of FOLDER/**/*.txt and save the index")
    make.add_argument("bundle")
    make.add_argument("folder", type=Path)
    make.add_argument("--out", type=Path, default=Path("search-index"))
    ask = sub.add_parser("query", help="the k sentences nearest to a query")
    ask.add_argument("bundle")
    ask.add_argument("index", type=Path)
    ask.add_argument("text")
    ask.add_argument("-k", type=int, default=5)
    args = parser.parse_args()
    if args.command == "index":
        index(args.bundle, args.folder, args.out)
    else:
        query(args.bundle, args.index, args.text, args.k)


if __name__ == "__main__":
    main()

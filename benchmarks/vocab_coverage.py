"""How many SST-2 dev sentences hold a token a pruned vocabulary drops, for vocabularies built from SST-2's
training text alone and with an extra corpus's tokens seen at least N times (tokenization only; no model runs).

    python benchmarks/vocab_coverage.py TOKENIZER_DIR [--extra ../shared/datasets/amazon-reviews/dvd/train.jsonl]
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

from transformers import AutoTokenizer

from edgetl.data import datasets_dir, read_texts, split_sentences


def sentences(path: Path) -> list[str]:
    return [line.rsplit("\t", 1)[0] for line in path.read_text().splitlines()[1:] if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tokenizer", type=Path, help="the unpruned model's folder (e.g. runs/sst-tiny/02-distill)")
    parser.add_argument("--extra", type=Path, default=datasets_dir() / "amazon-reviews" / "dvd" / "train.jsonl")
    parser.add_argument("--extra-field", default="text")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    def counts(texts: list[str]) -> collections.Counter:
        seen = collections.Counter()
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            seen.update(ids)
        return seen

    train = counts(sentences(datasets_dir() / "sst2" / "train.tsv"))
    extra = counts([s for t in read_texts(args.extra, args.extra_field, "--extra") for s in split_sentences(t)])
    dev = tokenizer(sentences(datasets_dir() / "sst2" / "dev.tsv"), add_special_tokens=False)["input_ids"]
    vocabularies = {"SST-2 train": set(train)}
    for times in (1, 2, 3, 5, 10):
        vocabularies[f"SST-2 train + extra seen >= {times}"] = set(train) | {i for i, c in extra.items() if c >= times}
    print("| vocabulary | tokens | dev sentences with a dropped token | dropped dev tokens |\n|---|---:|---:|---:|")
    for name, keep in vocabularies.items():
        hit = sum(any(i not in keep for i in ids) for ids in dev)
        dropped = sum(i not in keep for ids in dev for i in ids)
        print(f"| {name} | {len(keep)} | {hit} of {len(dev)} | {dropped} |")


if __name__ == "__main__":
    main()

"""How a vocabulary-pruned model should treat tokens whose embedding rows were dropped, measured on dev.

    python benchmarks/vocab_mapping.py runs/sst-tiny/03-prune runs/sst-tiny/02-distill

The pruned artifact's tokenizer keeps every token string and maps dropped ones to [UNK] (edgetl/vocab.py).
This script compares that with two alternatives on the same pruned model and dev sentences:
- re-split: remove the dropped strings, so greedy WordPiece splits unseen words into other kept pieces;
- nearest: map each dropped token to the kept token closest in the unpruned model's embedding space.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from edgetl.data import datasets_dir
from edgetl.modeling import load_classifier


def dev_set(path: Path) -> tuple[list[str], torch.Tensor]:
    rows = [line.rsplit("\t", 1) for line in path.read_text().splitlines()[1:] if line.strip()]
    return [r[0] for r in rows], torch.tensor([int(r[1]) for r in rows])


def accuracy(model, texts, labels, encode) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            correct += int((model(**encode(texts[i:i + 64])).logits.argmax(-1) == labels[i:i + 64]).sum())
    return correct / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", type=Path)
    parser.add_argument("unpruned", type=Path)
    args = parser.parse_args()
    texts, labels = dev_set(datasets_dir() / "sst2" / "dev.tsv")
    model = load_classifier(args.pruned)
    original = AutoTokenizer.from_pretrained(args.unpruned)
    spec = json.loads((args.pruned / "tokenizer.json").read_text())
    vocab, unk_token = spec["model"]["vocab"], spec["model"]["unk_token"]
    unk = vocab[unk_token]
    old = original.get_vocab()
    kept = {token: new for token, new in vocab.items() if new != unk or token == unk_token}
    new_of_old = torch.tensor([vocab[t] for t, _ in sorted(old.items(), key=lambda kv: kv[1])])

    def through(mapping):
        def encode(batch):
            enc = original(batch, return_tensors="pt", padding=True, truncation=True, max_length=128)
            enc["input_ids"] = mapping[enc["input_ids"]]
            return enc
        return encode

    resplit_spec = json.loads(json.dumps(spec))
    resplit_spec["model"]["vocab"] = kept
    resplit = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(resplit_spec)),
                                      pad_token=original.pad_token, unk_token=unk_token)
    embeddings = torch.nn.functional.normalize(load_classifier(args.unpruned).get_input_embeddings().weight.detach(), dim=-1)
    kept_old = torch.tensor(sorted(old[t] for t in kept))
    nearest_kept = (embeddings @ embeddings[kept_old].T).argmax(-1)
    nearest = torch.where(new_of_old != unk, new_of_old, torch.tensor([vocab[t] for t in sorted(kept, key=old.get)])[nearest_kept])
    nearest[old[unk_token]] = unk
    results = {
        "[UNK] (edgetl)": accuracy(model, texts, labels, through(new_of_old)),
        "re-split": accuracy(model, texts, labels,
                             lambda b: resplit(b, return_tensors="pt", padding=True, truncation=True, max_length=128)),
        "nearest kept token": accuracy(model, texts, labels, through(nearest)),
    }
    changed = sum(any(new_of_old[i] == unk and i != old[unk_token] for i in ids) for ids in original(texts)["input_ids"])
    print(f"dev sentences with a dropped token: {changed} of {len(texts)}")
    for name, value in results.items():
        print(f"{name:20s} {100 * value:.2f} %")


if __name__ == "__main__":
    main()

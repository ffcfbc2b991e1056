"""What each half of `sst-tiny`'s vocabulary change is worth, on one finished run's own models (issue 24).

    python benchmarks/vocab_int4.py runs/sst-tiny [--out benchmarks/results/sst-tiny/RUN/vocab_int4.json]

The recipe keeps the tokens of SST-2's training text *and* of the DVD sentences recovery learns on
(`prune.vocabulary_extra_text`), and stores the word-embedding table in 4 bits (`quantize.onnx_embedding_bits: 4`)
so the larger table fits the size bar. On SST-2 dev, one text per call:

- the kept FP32 model (`03-prune`) as shipped, and the same model reading every token SST-2's training text lacks as
  [UNK] (what the former cut to SST-2's tokens alone would feed it, without retraining for it);
- ONNX Runtime dynamic INT8 with the 4-bit table (`05-quantize`), and the same export quantized as the stage does but
  with the INT8 table (`quantize.onnx_embedding_bits: 8`), with both files' sizes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np


def onnx_accuracy(model: Path, tokenizer_dir: Path, texts: list[str], labels: list[int], max_length: int) -> float:
    from edgetl.runtime.engines import open_engine
    from edgetl.runtime.text import load_tokenizer, predict_outputs

    outputs = predict_outputs(open_engine("onnx", model), load_tokenizer(tokenizer_dir, max_length), texts, 1)[0]
    return float(np.mean([int(np.argmax(o)) == y for o, y in zip(outputs, labels, strict=True)]))


def pytorch_accuracy(folder: Path, texts: list[str], labels: list[int], max_length: int, keep: list[int] | None) -> float:
    import torch
    from transformers import AutoTokenizer

    from edgetl.modeling import load_classifier
    from edgetl.vocab import read_as_pruned

    model, tokenizer = load_classifier(folder).eval(), AutoTokenizer.from_pretrained(folder)
    handle = read_as_pruned(model, tokenizer, keep) if keep is not None else None
    correct = 0
    with torch.no_grad():
        for text, label in zip(texts, labels, strict=True):
            logits = model(**tokenizer([text], return_tensors="pt", truncation=True, max_length=max_length)).logits
            correct += int(logits.argmax(-1).item() == label)
    if handle is not None:
        handle.remove()
    return correct / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from edgetl.artifact import Artifact
    from edgetl.data import load_labelled
    from edgetl.quantization import quantize_onnx
    from edgetl.recipe import load_recipe
    from edgetl.stages.prune import training_texts
    from edgetl.vocab import used_token_ids

    recipe = load_recipe(str(args.run / "recipe.resolved.yaml"))
    dev = load_labelled(recipe.data)[1]
    texts, labels, max_length = list(dev["text"]), list(dev["label"]), recipe.data.max_length
    prune, export, quantize = (Artifact.load(next(args.run.glob(f"[0-9][0-9]-{name}")))
                               for name in ("prune", "export", "quantize"))
    cfg = quantize.manifest["config"]
    # SST-2's tokens, found with the unpruned tokenizer, then numbered as the pruned one numbers them.
    unpruned = AutoTokenizer.from_pretrained(next(args.run.glob("[0-9][0-9]-distill")))
    new_ids = json.loads((prune.path / "tokenizer.json").read_text())["model"]["vocab"]
    sst_only = sorted({new_ids[unpruned.convert_ids_to_tokens(i)] for i in used_token_ids(unpruned, training_texts(recipe))})
    four_bit = quantize.model_path("onnx")
    with tempfile.TemporaryDirectory() as scratch:
        eight_bit = Path(scratch) / "model.onnx"
        quantize_onnx(export.path / export.manifest["unfused_onnx"], eight_bit, cfg["onnx_method"], [],
                      cfg["per_channel"], smooth_alpha=cfg["smooth_alpha"], embedding_bits=8)
        report = {
            "run": str(args.run), "dev_sentences": len(texts),
            "fp32_kept_vocabulary": {"tokens": prune.manifest["metrics"]["vocabulary"]["vocab_after"],
                                     "accuracy": pytorch_accuracy(prune.path, texts, labels, max_length, None)},
            "dev_sentences_with_a_token_sst2_lacks": sum(
                not set(ids) <= set(sst_only) for ids in AutoTokenizer.from_pretrained(prune.path)(texts)["input_ids"]),
            "fp32_sst2_tokens_only": {"tokens": len(sst_only),
                                      "accuracy": pytorch_accuracy(prune.path, texts, labels, max_length, sst_only)},
            "onnx_int8_4bit_table": {"bytes": four_bit.stat().st_size,
                                     "accuracy": onnx_accuracy(four_bit, four_bit.parent, texts, labels, max_length)},
            "onnx_int8_8bit_table": {"bytes": eight_bit.stat().st_size,
                                     "accuracy": onnx_accuracy(eight_bit, four_bit.parent, texts, labels, max_length)},
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

"""FP32 STS-B dev Spearman of the packaged all-MiniLM-L6-v2, computed twice: by edgetl (a recipe of the pretrained
and evaluate stages, scored as ``stsb-embed-int8`` scores its PyTorch model) and by a reference that knows nothing of
edgetl (transformers' AutoModel on the packaged folder, mean pooling over the attention mask, L2 normalisation,
cosine of each pair, scipy's Spearman x100 over all 1,500 dev pairs).

    python benchmarks/embedding_reference.py [--out benchmarks/results/stsb-embed-int8/reference.json]

The two must agree within 0.05 (``tests/test_real_embedding.py`` asserts it). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

MODEL = "minilm-l6"
MAX_LENGTH = 128  # stsb-embed-int8's data.max_length; no STS-B dev sentence is longer
AGREEMENT = 0.05  # Spearman x100 points


def read_pairs(dev_file: Path) -> tuple[list[str], list[str], np.ndarray]:
    rows = [json.loads(line) for line in dev_file.read_text().splitlines() if line.strip()]
    return ([r["sentence1"] for r in rows], [r["sentence2"] for r in rows],
            np.array([r["score"] for r in rows], dtype=np.float64))


def reference_vectors(folder: str, texts: list[str], max_length: int = MAX_LENGTH, batch: int = 64) -> np.ndarray:
    """Mean of the last hidden states over the attention mask, L2-normalised: all-MiniLM-L6-v2's pooling."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    vectors = []
    for start in range(0, len(texts), batch):
        feeds = tokenizer(texts[start:start + batch], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**feeds).last_hidden_state.double().numpy()
        mask = feeds["attention_mask"].numpy()[..., None].astype(np.float64)
        mean = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        vectors.append(mean / np.linalg.norm(mean, axis=1, keepdims=True))
    return np.concatenate(vectors)


def reference_spearman(folder: str, dev_file: Path, max_length: int = MAX_LENGTH) -> float:
    """Spearman x100 between the cosine of each pair's reference vectors and the gold score."""
    from scipy.stats import spearmanr

    first, second, gold = read_pairs(dev_file)
    vectors = reference_vectors(folder, first + second, max_length)
    cosine = (vectors[:len(first)] * vectors[len(first):]).sum(axis=1)
    return float(100 * spearmanr(cosine, gold)[0])


def edgetl_run(run_dir: Path, data_dir: Path | None = None, max_length: int = MAX_LENGTH) -> Path:
    """The packaged model through edgetl's pretrained and evaluate stages, into ``run_dir``."""
    import yaml

    from edgetl.pipeline import run_recipe
    from edgetl.recipe import load_recipe

    data = {"dataset": "stsb", "max_length": max_length} | ({"path": str(data_dir)} if data_dir else {})
    recipe = {"name": "embedding-reference", "task": "sentence-embedding", "model": MODEL, "data": data,
              "stages": [{"stage": "pretrained"}, {"stage": "evaluate"}]}
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_recipe(load_recipe(str(path)), run_dir)
    return run_dir


def edgetl_spearman(run_dir: Path) -> dict:
    """The evaluate stage's row for the PyTorch FP32 model of ``edgetl_run``."""
    rows = json.loads((run_dir / "02-evaluate" / "evaluation.json").read_text())
    return next(r for r in rows if r["artifact"] == "01-pretrained")


def main() -> None:
    from edgetl.corpora import datasets_dir
    from edgetl.models import resolve_model_source

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="STS-B folder (default: the shared datasets')")
    parser.add_argument("--out", type=Path, default=None, help="write the figures to this JSON file")
    args = parser.parse_args()
    dev_file = (args.data or datasets_dir() / "stsb") / "dev.jsonl"
    folder = resolve_model_source(MODEL)
    reference = reference_spearman(folder, dev_file)
    with tempfile.TemporaryDirectory() as tmp:
        row = edgetl_spearman(edgetl_run(Path(tmp) / "run", args.data))
    figures = {"model": MODEL, "pairs": len(read_pairs(dev_file)[2]), "max_length": MAX_LENGTH,
               "reference_spearman": round(reference, 5), "edgetl_spearman": row["spearman"],
               "edgetl_target": row["target"], "difference": round(row["spearman"] - reference, 5) + 0.0,
               "agree_within": AGREEMENT, "agree": abs(row["spearman"] - reference) <= AGREEMENT}
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()

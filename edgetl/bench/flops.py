"""FLOPs of a BERT-family classifier from its ``config.json`` alone (no torch), pruned shapes included."""

from __future__ import annotations

import json
from pathlib import Path

PRUNED_LAYERS = "edgetl_layers"  # per-layer {heads, intermediate} of a structurally pruned model


def layer_shapes(config: dict) -> list[dict]:
    """Heads and FFN width of every layer: the pruned sizes if recorded, else the config's uniform ones."""
    if config.get(PRUNED_LAYERS):
        return list(config[PRUNED_LAYERS])
    return [{"heads": config["num_attention_heads"], "intermediate": config["intermediate_size"]}] * config["num_hidden_layers"]


def encoder_flops(config: dict, lengths: list[int], layers: list[dict] | None = None) -> float:
    """Multiply-adds x 2 of one forward pass, averaged over texts of the given token lengths (batch 1).

    Counts the encoder's matrix products (projections, attention scores and mixing, FFN) and the classifier;
    embeddings, layer norms and softmax are lookups or elementwise and left out.
    """
    hidden = config["hidden_size"]
    head_dim = hidden // config["num_attention_heads"]
    mean_len = sum(lengths) / len(lengths)
    mean_sq = sum(n * n for n in lengths) / len(lengths)
    per_token = per_token_sq = 0
    for layer in layers if layers is not None else layer_shapes(config):
        attn, ffn = layer["heads"] * head_dim, layer["intermediate"]
        per_token += 2 * (3 * hidden * attn + attn * hidden + 2 * hidden * ffn)
        per_token_sq += 2 * 2 * attn  # scores (Q K^T) and mixing (P V)
    classifier = 2 * hidden * len(config.get("id2label") or {0: 0, 1: 1})
    return per_token * mean_len + per_token_sq * mean_sq + classifier


def folder_flops(model_folder: Path, lengths: list[int]) -> float | None:
    """``encoder_flops`` for the model whose ``config.json`` sits in ``model_folder`` (None if it has none)."""
    path = Path(model_folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return encoder_flops(json.loads(path.read_text()), lengths)
    except KeyError:  # not a BERT-style config
        return None

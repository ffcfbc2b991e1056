"""FLOPs of an encoder classifier from its ``config.json`` alone (no torch), pruned shapes included.

The size keys come from the architecture's adapter (DistilBERT calls them ``dim``, ``n_heads``, ...).
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetl.architectures import adapter_for
from edgetl.errors import ArchitectureError

PRUNED_LAYERS = "edgetl_layers"  # per-layer {heads, intermediate} of a structurally pruned model


def layer_shapes(config: dict) -> list[dict]:
    """Heads and FFN width of every layer: the pruned sizes if recorded, else the config's uniform ones."""
    if config.get(PRUNED_LAYERS):
        return list(config[PRUNED_LAYERS])
    keys = adapter_for(config["model_type"]).config_keys
    return [{"heads": config[keys.heads], "intermediate": config[keys.intermediate]}] * config[keys.layers]


def encoder_flops(config: dict, lengths: list[int], layers: list[dict] | None = None) -> float:
    """Multiply-adds x 2 of one forward pass, averaged over texts of the given token lengths (batch 1).

    Counts the encoder's matrix products (projections, attention scores and mixing, FFN) and the classifier;
    embeddings, layer norms and softmax are lookups or elementwise and left out. Relative-position terms are
    left out too: MPNet's bias is an addition, but DeBERTa-v2's content-to-position products are not small,
    so its count is a lower bound.
    """
    keys = adapter_for(config["model_type"]).config_keys
    hidden = config[keys.hidden]
    head_dim = config.get(keys.head_size) if keys.head_size else None
    head_dim = head_dim or hidden // config[keys.heads]
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
    except (KeyError, ArchitectureError):  # no model_type, or one edgetl has no adapter for
        return None

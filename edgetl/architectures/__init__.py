"""One adapter per architecture: where its layers, projections, FFN and sizes live, and what it supports.

Pruning, distillation, model loading and FLOPs ask the adapter of ``config.model_type`` and never name a
BERT attribute. The table is plain data and importing it never imports torch (recipe validation reads it);
the functions that act on a torch model are in ``edgetl.architectures.torch_ops``.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgetl.architectures.adapter import OPERATIONS, Adapter, ConfigKeys
from edgetl.errors import ArchitectureError

__all__ = ["ADAPTERS", "DECODERS", "ENCODERS", "OPERATIONS", "Adapter", "ConfigKeys", "adapter_for", "model_type_of"]

_BERT_LAYOUT = dict(
    layers="encoder.layer", attention="attention.self", query="attention.self.query", key="attention.self.key",
    value="attention.self.value", output="attention.output.dense", ffn_in="intermediate.dense",
    ffn_out="output.dense", word_embeddings="embeddings.word_embeddings",
)

# The relative-attention bias is one Embedding(buckets, heads) in MPNetEncoder, computed once per forward and
# added to every layer's scores: a layer that keeps fewer heads than the bias has columns no longer adds up.
_MPNET_HEADS = ("its relative-attention bias (encoder.relative_attention_bias) has one column per head and is "
                "shared by all layers, so one layer cannot keep fewer heads than the others")

# tests/test_architectures.py (every architecture with every task head) shows it on a tiny model with relative
# attention, as DeBERTa-v3 has: openvino.compile_model refuses the converted graph.
_DEBERTA_OPENVINO = ("the ONNX export of its relative attention holds an If operation of dynamic rank, which "
                     "OpenVINO's CPU plugin does not compile (OpenVINO 2026.4): export and quantize for onnx only")

# Decoders are compressed by weight-only INT8/INT4 (edgetl.weights), which keeps every head, neuron and layer.
_DECODER_STRUCTURE = ("edgetl compresses decoders by weight-only INT8/INT4 and does not prune or cut their structure "
                      "(grouped-query attention shares K/V heads, and a gated FFN has two input projections)")
_DECODER_POOLING = ("a decoder's classifier reads its last token (finetune.pooling: cls, transformers' head); a "
                    "causal model's states are not trained to be averaged")
_DECODER = dict(family="decoder", takes_token_type_ids=False, ort_fusion=None, head_pruning=False, ffn_pruning=False,
                layer_selection=False, mean_pooling=False,
                reasons={**dict.fromkeys(("head_pruning", "ffn_pruning", "layer_selection"), _DECODER_STRUCTURE),
                         "mean_pooling": _DECODER_POOLING})

ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (
    Adapter("bert", base="bert", **_BERT_LAYOUT),
    # RoBERTa's forward accepts token_type_ids, but its tokenizers do not return them and optimum's graph
    # has no such input; positions start at pad_token_id + 1.
    Adapter("roberta", base="roberta", takes_token_type_ids=False, pad_token_id=1, **_BERT_LAYOUT),
    Adapter("xlm-roberta", base="roberta", takes_token_type_ids=False, pad_token_id=1, **_BERT_LAYOUT),
    Adapter(
        "distilbert", base="distilbert", layers="transformer.layer", attention="attention",
        query="attention.q_lin", key="attention.k_lin", value="attention.v_lin", output="attention.out_lin",
        ffn_in="ffn.lin1", ffn_out="ffn.lin2", word_embeddings="embeddings.word_embeddings",
        # Its forward derives the head size as dim // n_heads, so a pruned layer sets dim to kept heads x size.
        heads_attr="n_heads", all_head_size_attr="dim",
        layer_output_index=-1,  # a TransformerBlock returns (attention weights, hidden) when asked for weights
        config_keys=ConfigKeys(hidden="dim", heads="n_heads", intermediate="hidden_dim", layers="n_layers"),
        takes_token_type_ids=False,
    ),
    Adapter(
        "mpnet", base="mpnet", layers="encoder.layer", attention="attention.attn", query="attention.attn.q",
        key="attention.attn.k", value="attention.attn.v", output="attention.attn.o", ffn_in="intermediate.dense",
        ffn_out="output.dense", word_embeddings="embeddings.word_embeddings", takes_token_type_ids=False,
        pad_token_id=1, head_pruning=False, reasons={"head_pruning": _MPNET_HEADS},
    ),
    Adapter(
        "deberta-v2", base="deberta", layers="encoder.layer", attention="attention.self",
        query="attention.self.query_proj", key="attention.self.key_proj", value="attention.self.value_proj",
        output="attention.output.dense", ffn_in="intermediate.dense", ffn_out="output.dense",
        word_embeddings="embeddings.word_embeddings",
        # Disentangled attention projects the shared relative embeddings per layer, per head: with
        # share_att_key through Q and K themselves, otherwise through these two, pruned with Q, K, V.
        optional_head_projections=("attention.self.pos_key_proj", "attention.self.pos_query_proj"),
        config_keys=ConfigKeys(head_size="attention_head_size"),
        takes_token_type_ids=False,  # type_vocab_size is 0 in the released checkpoints
        openvino=False, reasons={"openvino": _DEBERTA_OPENVINO},
    ),
    # Llama family (SmolLM2, TinyLlama, Llama 2/3): grouped-query attention, gated SiLU FFN, no pad token of its own.
    Adapter(
        "llama", base="model", layers="layers", attention="self_attn", query="self_attn.q_proj",
        key="self_attn.k_proj", value="self_attn.v_proj", output="self_attn.o_proj", ffn_in="mlp.up_proj",
        ffn_out="mlp.down_proj", word_embeddings="embed_tokens", **_DECODER,
    ),
    # GPT-2: one fused Conv1D projects Q, K and V together.
    Adapter(
        "gpt2", base="transformer", layers="h", attention="attn", query="attn.c_attn", key="attn.c_attn",
        value="attn.c_attn", output="attn.c_proj", ffn_in="mlp.c_fc", ffn_out="mlp.c_proj", word_embeddings="wte",
        config_keys=ConfigKeys(hidden="n_embd", heads="n_head", intermediate="n_inner", layers="n_layer"), **_DECODER,
    ),
)}
ENCODERS = sorted(t for t, a in ADAPTERS.items() if a.family == "encoder")
DECODERS = sorted(t for t, a in ADAPTERS.items() if a.family == "decoder")


def adapter_for(model_type: str) -> Adapter:
    """The adapter of a HF ``model_type``; ``ArchitectureError`` naming the known types if there is none."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise ArchitectureError(f"model type '{model_type}' has no edgetl adapter; known types: "
                                f"{', '.join(sorted(ADAPTERS))}") from None


def model_type_of(folder) -> str:
    """The ``model_type`` in a saved model's ``config.json`` (read with json, no transformers)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ArchitectureError(f"{folder}: no config.json, so no model type to adapt")
    model_type = json.loads(path.read_text()).get("model_type")
    if not model_type:
        raise ArchitectureError(f"{path}: no 'model_type' key")
    return model_type

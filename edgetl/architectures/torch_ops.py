"""The adapter's paths applied to a torch model: find the blocks, read their sizes, cut or resize them.

Every function works for every adapter; an operation an adapter declares unsupported raises
``ArchitectureError`` naming the architecture and the reason, before anything is changed.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from edgetl.architectures import Adapter, adapter_for
from edgetl.architectures.flops import PRUNED_LAYERS
from edgetl.errors import ArchitectureError


def adapter_of(model) -> Adapter:
    """The adapter of a transformers model (or edgetl head) from its ``config.model_type``."""
    return adapter_for(model.config.model_type)


def get(root: nn.Module, path: str):
    """The attribute at a dotted path (``"attention.self.query"``)."""
    return functools.reduce(getattr, path.split("."), root)


def _set(root: nn.Module, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get(root, parent) if parent else root, name, value)


def _has(root: nn.Module, path: str) -> bool:
    try:
        get(root, path)
    except AttributeError:
        return False
    return True


def layers(model) -> nn.ModuleList:
    """The transformer blocks of a classifier, through its architecture's adapter."""
    adapter = adapter_of(model)
    base = getattr(model, adapter.base, None)
    if base is None or not _has(base, adapter.layers):
        raise ArchitectureError(f"{type(model).__name__}: not a {adapter.model_type} encoder "
                                f"(no {adapter.base}.{adapter.layers})")
    return get(base, adapter.layers)


def head_count(adapter: Adapter, layer: nn.Module) -> int:
    return getattr(get(layer, adapter.attention), adapter.heads_attr)


def head_size(adapter: Adapter, layer: nn.Module) -> int:
    return getattr(get(layer, adapter.attention), adapter.head_size_attr)


def layer_sizes(model) -> list[dict]:
    """Heads and FFN width of every layer, as pruning leaves them."""
    adapter = adapter_of(model)
    return [{"heads": head_count(adapter, layer), "intermediate": get(layer, adapter.ffn_in).out_features}
            for layer in layers(model)]


def head_projections(adapter: Adapter, layer: nn.Module) -> list[str]:
    """Paths of the Linears whose output rows come in one block per head: Q, K, V and any present extras."""
    extras = [path for path in adapter.optional_head_projections if _has(layer, path)]
    return [adapter.query, adapter.key, adapter.value, *extras]


def select_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping the given output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None).to(weight.dtype)
    new.weight.data = weight
    if linear.bias is not None:
        bias = linear.bias.detach()
        new.bias.data = bias.index_select(0, index).clone() if dim == 0 else bias.clone()
    return new


def _set_heads(adapter: Adapter, layer: nn.Module, heads: int) -> None:
    attention = get(layer, adapter.attention)
    setattr(attention, adapter.heads_attr, heads)
    setattr(attention, adapter.all_head_size_attr, heads * head_size(adapter, layer))


def prune_heads(adapter: Adapter, layer: nn.Module, kept_heads: list[int]) -> None:
    """Keep only these heads of one layer: rows of Q, K, V (and extras), columns of the output projection."""
    if len(kept_heads) < head_count(adapter, layer):
        adapter.require("head_pruning")
    elif not adapter.head_pruning:
        return  # every head kept: nothing to cut, and nothing this architecture cannot do
    size = head_size(adapter, layer)
    rows = torch.tensor([h * size + j for h in kept_heads for j in range(size)])
    for path in head_projections(adapter, layer):
        _set(layer, path, select_linear(get(layer, path), rows, 0))
    _set(layer, adapter.output, select_linear(get(layer, adapter.output), rows, 1))
    _set_heads(adapter, layer, len(kept_heads))


def prune_neurons(adapter: Adapter, layer: nn.Module, kept_neurons: list[int]) -> None:
    """Keep only these FFN neurons of one layer: rows of the FFN input Linear, columns of its output Linear."""
    if len(kept_neurons) < get(layer, adapter.ffn_in).out_features:
        adapter.require("ffn_pruning")
    elif not adapter.ffn_pruning:
        return
    index = torch.tensor(kept_neurons)
    _set(layer, adapter.ffn_in, select_linear(get(layer, adapter.ffn_in), index, 0))
    _set(layer, adapter.ffn_out, select_linear(get(layer, adapter.ffn_out), index, 1))


def resize(adapter: Adapter, layer: nn.Module, heads: int, intermediate: int) -> None:
    """Give one layer fresh Linears of the recorded head count and FFN width (weights to be loaded over)."""
    if heads != head_count(adapter, layer):
        adapter.require("head_pruning")
    if intermediate != get(layer, adapter.ffn_in).out_features:
        adapter.require("ffn_pruning")
    width = heads * head_size(adapter, layer)
    for path in head_projections(adapter, layer):
        old = get(layer, path)
        _set(layer, path, nn.Linear(old.in_features, width, bias=old.bias is not None))
    old = get(layer, adapter.output)
    _set(layer, adapter.output, nn.Linear(width, old.out_features, bias=old.bias is not None))
    old_in, old_out = get(layer, adapter.ffn_in), get(layer, adapter.ffn_out)
    _set(layer, adapter.ffn_in, nn.Linear(old_in.in_features, intermediate, bias=old_in.bias is not None))
    _set(layer, adapter.ffn_out, nn.Linear(intermediate, old_out.out_features, bias=old_out.bias is not None))
    _set_heads(adapter, layer, heads)


def keep_layers(model, indices: list[int]) -> None:
    """Keep only the given layers, in the given order, and record the new depth in the config.

    Per-layer sizes recorded by pruning follow the kept layers.
    """
    adapter = adapter_of(model)
    blocks = layers(model)
    bad = [i for i in indices if not 0 <= i < len(blocks)]
    if bad:
        raise ArchitectureError(f"layers {bad} out of range: the model has layers 0..{len(blocks) - 1}")
    if list(indices) != list(range(len(blocks))):
        adapter.require("layer_selection")
    _set(getattr(model, adapter.base), adapter.layers, nn.ModuleList(blocks[i] for i in indices))
    setattr(model.config, adapter.config_keys.layers, len(indices))
    if getattr(model.config, PRUNED_LAYERS, None) is not None:
        setattr(model.config, PRUNED_LAYERS, layer_sizes(model))

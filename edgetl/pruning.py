"""Structured pruning of BERT-family classifiers: score heads, FFN neurons and layers, rebuild smaller Linears.

Nothing is masked: pruned rows and columns leave the weight matrices, so the saved model is smaller and
faster in every runtime. Per-layer sizes go into ``config.json`` (``edgetl_layers``) for
``edgetl.modeling.load_classifier`` to rebuild the exact shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from edgetl.modeling import PRUNED_LAYERS, encoder_layers, layer_sizes


@dataclass
class Importance:
    """One score per head and per FFN neuron of every layer, and one per layer (Taylor only)."""

    heads: list[torch.Tensor]
    neurons: list[torch.Tensor]
    layers: torch.Tensor | None = None


@dataclass
class PrunePlan:
    """What survives: kept head and neuron indices of every layer, and the layers removed whole."""

    heads: list[list[int]]
    neurons: list[list[int]]
    drop_layers: list[int]


def _gate_hooks(model, gates: dict) -> list:
    """Multiply each head's context, each FFN neuron and each layer's residual update by a gate of ones."""
    handles = []
    for index, layer in enumerate(encoder_layers(model)):
        attn = layer.attention.self

        def gate_heads(module, args, output, index=index):
            context = output[0] if isinstance(output, tuple) else output
            b, s, _ = context.shape
            gated = (context.view(b, s, module.num_attention_heads, -1) * gates["heads"][index][:, None]).view(b, s, -1)
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        def gate_layer(module, args, kwargs, output, index=index):
            before = args[0] if args else kwargs["hidden_states"]
            after = output[0] if isinstance(output, tuple) else output
            gated = before + gates["layers"][index] * (after - before)  # gate 0 = the layer replaced by identity
            return (gated, *output[1:]) if isinstance(output, tuple) else gated

        handles.append(attn.register_forward_hook(gate_heads))
        handles.append(layer.intermediate.register_forward_hook(lambda m, a, out, i=index: out * gates["neurons"][i]))
        handles.append(layer.register_forward_hook(gate_layer, with_kwargs=True))
    return handles


def taylor_importance(model, batches) -> Importance:
    """First-order Taylor scores: the summed |dL/d gate| of a gate on each head, neuron and layer.

    |dL/dg| at g = 1 estimates how much the loss moves when the unit is removed (Michel et al., 2019;
    Molchanov et al., 2019). ``batches`` are dicts of tensors with ``labels``.
    """
    layers = encoder_layers(model)
    gates = {
        "heads": [torch.ones(layer.attention.self.num_attention_heads, requires_grad=True) for layer in layers],
        "neurons": [torch.ones(layer.intermediate.dense.out_features, requires_grad=True) for layer in layers],
        "layers": [torch.ones((), requires_grad=True) for _ in layers],
    }
    scores = {key: [torch.zeros_like(g) for g in values] for key, values in gates.items()}
    was_training = model.training
    model.eval()  # no dropout: score the model as it predicts
    handles = _gate_hooks(model, gates)
    try:
        for batch in batches:
            with torch.enable_grad():
                loss = model(**batch).loss
                grads = torch.autograd.grad(loss, [g for values in gates.values() for g in values])
            flat = [s for values in scores.values() for s in values]
            for score, grad in zip(flat, grads, strict=True):
                score += grad.abs()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Importance(scores["heads"], scores["neurons"], torch.stack(scores["layers"]))


def magnitude_importance(model) -> Importance:
    """Weight-norm scores: a head by its Q, K, V rows and output columns; a neuron by in-row x out-column norms."""
    heads, neurons = [], []
    with torch.no_grad():
        for layer in encoder_layers(model):
            attn = layer.attention.self
            n, d = attn.num_attention_heads, attn.attention_head_size
            rows = sum(m.weight.view(n, d, -1).pow(2).sum((1, 2)) for m in (attn.query, attn.key, attn.value))
            cols = layer.attention.output.dense.weight.view(-1, n, d).pow(2).sum((0, 2))
            heads.append((rows + cols).sqrt())
            neurons.append(layer.intermediate.dense.weight.norm(dim=1) * layer.output.dense.weight.norm(dim=0))
    return Importance(heads, neurons)


def _keep_global(scores: list[torch.Tensor], keep_ratio: float) -> list[list[int]]:
    """The top ``keep_ratio`` of units over all layers, each layer's scores scaled to unit L2 norm first.

    Scaling per layer (Michel et al.) makes layers comparable; every layer keeps at least its best unit, so
    no layer loses its attention or FFN entirely (drop whole layers with ``layers_drop`` instead).
    """
    normed = [s / s.norm().clamp(min=1e-12) for s in scores]
    total = sum(len(s) for s in normed)
    budget = max(len(normed), round(keep_ratio * total))
    kept = [{int(s.argmax())} for s in normed]
    ranked = sorted(((float(v), li, ui) for li, s in enumerate(normed) for ui, v in enumerate(s)), reverse=True)
    for _, li, ui in ranked:
        if sum(len(k) for k in kept) >= budget:
            break
        kept[li].add(ui)
    return [sorted(k) for k in kept]


def make_plan(importance: Importance, heads_keep: float, ffn_keep: float, layers_drop: int) -> PrunePlan:
    n_layers = len(importance.heads)
    if layers_drop >= n_layers:
        raise ValueError(f"layers_drop {layers_drop} would remove all {n_layers} layers")
    drop: list[int] = []
    if layers_drop:
        if importance.layers is None:
            raise ValueError("layers_drop needs layer scores: use importance 'taylor'")
        drop = sorted(int(i) for i in importance.layers.argsort()[:layers_drop])
    remaining = [i for i in range(n_layers) if i not in drop]
    heads = _keep_global([importance.heads[i] for i in remaining], heads_keep)
    neurons = _keep_global([importance.neurons[i] for i in remaining], ffn_keep)
    return PrunePlan(heads, neurons, drop)


def _select(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping the given output rows (dim 0) or input columns (dim 1)."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach()
    bias = bias.index_select(0, index).clone() if dim == 0 else bias.clone()
    new = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.dtype)
    new.weight.data, new.bias.data = weight, bias
    return new


def apply_plan(model, plan: PrunePlan) -> None:
    """Rebuild the model in place with only what the plan keeps, and record the sizes in its config."""
    encoder = getattr(model, model.base_model_prefix).encoder
    encoder.layer = nn.ModuleList(layer for i, layer in enumerate(encoder.layer) if i not in plan.drop_layers)
    for layer, heads, neurons in zip(encoder.layer, plan.heads, plan.neurons, strict=True):
        attn = layer.attention.self
        d = attn.attention_head_size
        rows = torch.tensor([h * d + j for h in heads for j in range(d)])
        attn.query, attn.key, attn.value = (_select(m, rows, 0) for m in (attn.query, attn.key, attn.value))
        attn.num_attention_heads, attn.all_head_size = len(heads), len(heads) * d
        layer.attention.output.dense = _select(layer.attention.output.dense, rows, 1)
        index = torch.tensor(neurons)
        layer.intermediate.dense = _select(layer.intermediate.dense, index, 0)
        layer.output.dense = _select(layer.output.dense, index, 1)
    model.config.num_hidden_layers = len(encoder.layer)
    setattr(model.config, PRUNED_LAYERS, layer_sizes(model))

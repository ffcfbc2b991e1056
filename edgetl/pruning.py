"""Structured pruning of encoder classifiers: score heads, FFN neurons and layers, rebuild smaller Linears.

Nothing is masked: pruned rows and columns leave the weight matrices, so the saved model is smaller and
faster in every runtime. Per-layer sizes go into ``config.json`` (``edgetl_layers``) for
``edgetl.modeling.load_classifier`` to rebuild the exact shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from edgetl.architectures.torch_ops import (adapter_of, get, head_count, head_size, keep_layers, layer_sizes,
                                            prune_heads, prune_neurons)
from edgetl.modeling import PRUNED_LAYERS, encoder_layers


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
    """Multiply each head's context, each FFN neuron and each layer's residual update by a gate of ones.

    Heads and neurons are gated on the inputs of the output projection and of the FFN's second Linear (the
    concatenated head contexts and the activated neurons), which every architecture has, whatever it calls
    them. Gates have a leading batch axis of 1 (one gate for the whole batch) or of the batch size (one per text).
    """
    adapter = adapter_of(model)
    handles = []
    for index, layer in enumerate(encoder_layers(model)):
        heads = head_count(adapter, layer)

        def gate_heads(module, args, index=index, heads=heads):
            context = args[0]
            b, s, _ = context.shape
            gate = gates["heads"][index][:, None, :, None]
            return ((context.view(b, s, heads, -1) * gate).view(b, s, -1), *args[1:])

        def gate_neurons(module, args, index=index):
            return (args[0] * gates["neurons"][index][:, None, :], *args[1:])

        def gate_layer(module, args, kwargs, output, index=index):
            before = args[0] if args else kwargs["hidden_states"]
            at = adapter.layer_output_index
            after = output[at] if isinstance(output, tuple) else output
            gate = gates["layers"][index][:, None, None]
            gated = before + gate * (after - before)  # gate 0 = the layer replaced by identity
            if not isinstance(output, tuple):
                return gated
            return tuple(gated if i == at % len(output) else value for i, value in enumerate(output))

        handles.append(get(layer, adapter.output).register_forward_pre_hook(gate_heads))
        handles.append(get(layer, adapter.ffn_out).register_forward_pre_hook(gate_neurons))
        handles.append(layer.register_forward_hook(gate_layer, with_kwargs=True))
    return handles


def _label_loss(logits: torch.Tensor, labels: torch.Tensor, per_text: bool, generator) -> torch.Tensor:
    """Cross-entropy on the labels (summed over texts when ``per_text``)."""
    return F.cross_entropy(logits, labels, reduction="sum" if per_text else "mean")


def _vector_loss(vectors: torch.Tensor, labels, per_text: bool, generator) -> torch.Tensor:
    """Each text's vector projected on a random unit direction of its own (summed over texts when ``per_text``).

    A model distilled to reproduce its unpruned vectors loses, to second order, ||J (1 - g)||^2 when gates g move off
    1 (J: the vector's Jacobian in the gates); the MSE itself has no gradient at g = 1. The squared gradient of
    r . f with r uniform on the unit sphere has expectation ||J_unit||^2 / d, the Gauss-Newton diagonal of that
    loss (Hutchinson's estimator): fisher sums it over texts; taylor's |batch-mean gradient| is its root mean over
    the batch, up to the random signs, and ranks the same way in expectation.
    """
    directions = torch.randn(vectors.shape, generator=generator).to(vectors.device)
    directions = directions / directions.norm(dim=-1, keepdim=True)
    projected = (vectors * directions).sum(-1)
    return projected.sum() if per_text else projected.mean()


# Task.distillation -> the loss whose gate gradients score the units: what the pruned model is recovered towards.
IMPORTANCE_LOSSES = {"soft_targets": _label_loss, "vectors": _vector_loss}


def _gate_scores(model, batches, per_text: bool, objective: str = "soft_targets") -> Importance:
    """Summed |dL/dg| of batch-wide gates (``per_text`` False), or summed (dL_i/dg_i)^2 of one gate per text."""
    sizes = layer_sizes(model)
    widths = {"heads": [size["heads"] for size in sizes],
              "neurons": [size["intermediate"] for size in sizes],
              "layers": [1 for _ in sizes]}
    scores = {key: [torch.zeros(w) for w in values] for key, values in widths.items()}
    was_training = model.training
    model.eval()  # no dropout: score the model as it predicts
    gates: dict = {}
    handles = _gate_hooks(model, gates)
    loss_of, generator = IMPORTANCE_LOSSES[objective], torch.Generator().manual_seed(0)
    try:
        for batch in batches:
            batch = dict(batch)
            labels = batch.pop("labels")
            rows = len(labels) if per_text else 1
            for key, values in widths.items():
                gates[key] = [torch.ones(rows, w, requires_grad=True) for w in values]
                if key == "layers":
                    gates[key] = [torch.ones(rows, requires_grad=True) for _ in values]
            flat = [g for key in widths for g in gates[key]]
            with torch.enable_grad():
                logits = model(**batch).logits.float()
                # Summed over texts: each text's loss reaches only its own gates, so per-text gates get
                # per-text gradients from one backward pass.
                loss = loss_of(logits, labels, per_text, generator)
                grads = torch.autograd.grad(loss, flat)
            targets = [s for key in widths for s in scores[key]]
            for score, grad in zip(targets, grads, strict=True):
                score += (grad.pow(2) if per_text else grad.abs()).sum(0).reshape(score.shape)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return Importance(scores["heads"], scores["neurons"], torch.stack([s.squeeze() for s in scores["layers"]]))


def taylor_importance(model, batches, objective: str = "soft_targets") -> Importance:
    """First-order Taylor scores: the summed |dL/d gate| of a gate on each head, neuron and layer.

    |dL/dg| at g = 1 estimates how much the loss moves when the unit is removed (Michel et al., 2019;
    Molchanov et al., 2019). ``batches`` are dicts of tensors with ``labels``. The gradient is taken on
    each batch's mean loss, so texts that pull a gate in opposite directions cancel. ``objective`` (the task's
    ``distillation``) chooses the loss: ``IMPORTANCE_LOSSES``.
    """
    return _gate_scores(model, batches, per_text=False, objective=objective)


def fisher_importance(model, batches, objective: str = "soft_targets") -> Importance:
    """Empirical Fisher scores: the sum over texts of (dL_i/d gate)^2, one gate per text (Kwon et al., 2022).

    Squared per-text gradients never cancel between texts, so a unit that matters for some texts in one
    direction and for others in the other still scores high; the diagonal Fisher also approximates the
    loss increase of removing the unit to second order.
    """
    return _gate_scores(model, batches, per_text=True, objective=objective)


def magnitude_importance(model) -> Importance:
    """Weight-norm scores: a head by its Q, K, V rows and output columns; a neuron by in-row x out-column norms."""
    adapter = adapter_of(model)
    heads, neurons = [], []
    with torch.no_grad():
        for layer in encoder_layers(model):
            n, d = head_count(adapter, layer), head_size(adapter, layer)
            projections = (get(layer, path) for path in (adapter.query, adapter.key, adapter.value))
            rows = sum(m.weight.view(n, d, -1).pow(2).sum((1, 2)) for m in projections)
            cols = get(layer, adapter.output).weight.view(-1, n, d).pow(2).sum((0, 2))
            heads.append((rows + cols).sqrt())
            ffn_in, ffn_out = get(layer, adapter.ffn_in), get(layer, adapter.ffn_out)
            neurons.append(ffn_in.weight.norm(dim=1) * ffn_out.weight.norm(dim=0))
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
            raise ValueError("layers_drop needs layer scores: use importance 'fisher' or 'taylor'")
        drop = sorted(int(i) for i in importance.layers.argsort()[:layers_drop])
    remaining = [i for i in range(n_layers) if i not in drop]
    heads = _keep_global([importance.heads[i] for i in remaining], heads_keep)
    neurons = _keep_global([importance.neurons[i] for i in remaining], ffn_keep)
    return PrunePlan(heads, neurons, drop)


def apply_plan(model, plan: PrunePlan) -> None:
    """Rebuild the model in place with only what the plan keeps, and record the sizes in its config.

    Raises ``ArchitectureError`` before changing anything if the plan cuts what the architecture cannot lose.
    """
    adapter = adapter_of(model)
    sizes = layer_sizes(model)
    kept = [i for i in range(len(sizes)) if i not in plan.drop_layers]
    sizes = [sizes[i] for i in kept]
    if plan.drop_layers:
        adapter.require("layer_selection")
    if any(len(h) < s["heads"] for h, s in zip(plan.heads, sizes, strict=True)):
        adapter.require("head_pruning")
    if any(len(n) < s["intermediate"] for n, s in zip(plan.neurons, sizes, strict=True)):
        adapter.require("ffn_pruning")
    keep_layers(model, kept)
    for layer, heads, neurons in zip(encoder_layers(model), plan.heads, plan.neurons, strict=True):
        prune_heads(adapter, layer, heads)
        prune_neurons(adapter, layer, neurons)
    setattr(model.config, PRUNED_LAYERS, layer_sizes(model))

"""Domain-adversarial training (DANN, Ganin et al. 2016): a domain classifier behind a gradient-reversal layer.

The domain classifier learns to tell labelled source texts from unlabelled target texts by their pooled
representation (the classification head's input); the reversed gradient pushes the encoder towards
representations in which the two domains look alike, while the task loss keeps them useful.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from edgetl.recipe import DomainAdversarialConfig
from edgetl.training import Trainer


class _ReverseGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, coefficient: float):
        ctx.coefficient = coefficient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -ctx.coefficient * grad, None


def reverse_gradient(x: torch.Tensor, coefficient: float = 1.0) -> torch.Tensor:
    """Identity forward; the gradient comes back multiplied by ``-coefficient``."""
    return _ReverseGradient.apply(x, coefficient)


def ramp(progress: float, weight: float) -> float:
    """DANN's schedule: 0 at the start, ``weight`` at the end (2 / (1 + exp(-10 p)) - 1)."""
    return weight * (2.0 / (1.0 + math.exp(-10.0 * progress)) - 1.0)


def domain_head(hidden: int, width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, width), nn.ReLU(), nn.Dropout(0.1), nn.Linear(width, 2))


def classifier_module(model) -> nn.Module:
    """The classification head (its input is the pooled representation), peft-wrapped or not."""
    heads = [(name, m) for name, m in model.named_modules() if name.split(".")[-1] in ("classifier", "score")]
    if not heads:
        raise ValueError(f"{type(model).__name__}: no 'classifier' module to read the pooled representation from")
    return min(heads, key=lambda item: item[0].count("."))[1]


class DomainAdversarialTrainer(Trainer):
    """HF Trainer whose training loss adds the domain loss on a source batch and a batch of target texts.

    The domain classifier is ``model.domain_head`` (so the optimizer, checkpoints and resuming include it);
    the caller removes it before saving the classifier.
    """

    def __init__(self, *args, target_loader, dann: DomainAdversarialConfig, **kwargs):
        super().__init__(*args, **kwargs)
        self.dann, self._target_loader, self._target_batches = dann, target_loader, None
        self._head = classifier_module(self.model)
        self.domain_log: list[dict] = []

    def create_optimizer(self):
        """Trainer's optimizer, with the domain classifier in a group of its own at ``dann.learning_rate``: a
        new head at the encoder's fine-tuning rate learns too slowly to keep up with the reversed gradient."""
        optimizer = super().create_optimizer()
        head = list(self.model.domain_head.parameters())
        ids = {id(p) for p in head}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": head, "lr": self.dann.learning_rate, "weight_decay": 0.0})
        return optimizer

    def _next_target(self) -> dict:
        if self._target_batches is None:
            self._target_batches = iter(self._target_loader)
        try:
            batch = next(self._target_batches)
        except StopIteration:
            self._target_batches = iter(self._target_loader)
            batch = next(self._target_batches)
        return {k: v.to(self.args.device) for k, v in batch.items()}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        pooled = []
        hook = self._head.register_forward_hook(lambda _m, args, _out: pooled.append(args[0]))
        try:
            outputs = model(**inputs)
            model(**self._next_target())
        finally:
            hook.remove()
        source, target = (p.float() for p in pooled[-2:])
        progress = self.state.global_step / max(1, self.state.max_steps)
        coefficient = ramp(progress, self.dann.weight)
        domain_logits = self.model.domain_head(reverse_gradient(torch.cat([source, target]), coefficient))
        domains = torch.cat([torch.zeros(len(source), dtype=torch.long),
                             torch.ones(len(target), dtype=torch.long)]).to(domain_logits.device)
        # Each domain weighs half, however many texts of each a step holds.
        per_text = nn.functional.cross_entropy(domain_logits, domains, reduction="none")
        domain_loss = 0.5 * (per_text[: len(source)].mean() + per_text[len(source) :].mean())
        loss = outputs.loss + domain_loss
        if self.state.global_step % max(1, self.args.logging_steps) == 0:
            right = (domain_logits.argmax(-1) == domains).float()
            accuracy = 0.5 * float(right[: len(source)].mean() + right[len(source) :].mean())  # balanced
            self.domain_log.append({"step": self.state.global_step, "domain_loss": round(float(domain_loss.detach()), 4),
                                    "domain_accuracy": round(accuracy, 4), "coefficient": round(coefficient, 4)})
        return (loss, outputs) if return_outputs else loss

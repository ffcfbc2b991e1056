"""The decoding loop of a decoder exported with its KV cache, in numpy, over any engine with ``run_all``.

The graph is optimum's ``text-generation-with-past`` layout: inputs ``input_ids``, ``attention_mask``,
(``position_ids``) and ``past_key_values.<layer>.key|value`` of shape (batch, kv heads, past length, head size);
outputs ``logits`` and ``present.<layer>.key|value``. ``KVCacheDecoder`` runs that graph one step at a time, feeding
each step's present back as the next one's past. The runtime's ``Generator`` and the evaluate stage (every backend,
PyTorch included) decode through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgetl.errors import ArtifactError, UsageError

_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")


@dataclass(frozen=True)
class GenerationSettings:
    """How the next token is chosen and when generation stops.

    Attributes:
        max_new_tokens: tokens generated at most.
        temperature: 0 for greedy decoding (the most likely token), else sampling from the softmax of logits / it.
        top_k: sample among the k most likely tokens only (0: all).
        top_p: sample among the fewest tokens whose probabilities add up to p (1.0: all).
        seed: the sampler's seed (the same seed, prompt and model give the same text).
        stop: strings that end generation; the text ends before the first one found.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        problems = {"max_new_tokens": self.max_new_tokens < 1, "temperature": self.temperature < 0,
                    "top_k": self.top_k < 0, "top_p": not 0 < self.top_p <= 1}
        for field, bad in problems.items():
            if bad:
                raise UsageError(f"{field}={getattr(self, field)!r} is out of range (max_new_tokens >= 1, "
                                 "temperature >= 0, top_k >= 0, 0 < top_p <= 1)")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise UsageError(f"stop must be a list of non-empty strings, got {self.stop!r}")


class KVCacheDecoder:
    """One decoder graph with its KV cache, batch 1, on an engine with ``run_all`` and ``input_shapes``."""

    def __init__(self, engine):
        self.engine = engine
        layers = {int(m.group(1)) for name in engine.input_names if (m := _PAST.match(name))}
        if not layers or "input_ids" not in engine.input_names:
            raise ArtifactError("the model has no KV-cache inputs (past_key_values.N.key/value): export it for "
                                "text-generation, which keeps the cache")
        self.layers = max(layers) + 1
        shape = engine.input_shapes["past_key_values.0.key"]
        self.kv_heads, self.head_size = shape[1], shape[3]
        self.takes_positions = "position_ids" in engine.input_names

    def empty_cache(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_size), dtype=np.float32)
        return {f"past_key_values.{i}.{kind}": empty for i in range(self.layers) for kind in ("key", "value")}

    def feeds(self, ids: list[int], cache: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """The graph's inputs for ``ids`` after the cached tokens (none: a prompt from the start)."""
        cache = self.empty_cache() if cache is None else cache
        past = cache["past_key_values.0.key"].shape[2]
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64), **cache}
        if self.takes_positions:
            feeds["position_ids"] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        return feeds

    def forward(self, ids: list[int], cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of ``ids`` (one row per token) after the cached tokens, and the cache with them appended."""
        out = self.engine.run_all(self.feeds(ids, cache))
        present = {name.replace("present.", "past_key_values.", 1): value for name, value in out.items()
                   if name.startswith("present.")}
        return out["logits"][0], present

    def tokens(self, prompt_ids: list[int], settings: GenerationSettings, eos_ids: frozenset[int] = frozenset()
               ) -> Iterator[int]:
        """New token ids one by one, up to ``max_new_tokens`` or the first end-of-sequence token (not yielded)."""
        if not prompt_ids:
            raise UsageError("the prompt is empty: a decoder needs at least one token to continue")
        rng = np.random.default_rng(settings.seed)
        logits, cache = self.forward(list(prompt_ids), self.empty_cache())
        for _ in range(settings.max_new_tokens):
            token = next_token(logits[-1], settings, rng)
            if token in eos_ids:
                return
            yield token
            logits, cache = self.forward([token], cache)

    def negative_log_likelihood(self, ids: list[int]) -> float:
        """The summed negative log-likelihood of ``ids[1:]`` given what precedes each (one forward, no cache)."""
        logits, _ = self.forward(list(ids), self.empty_cache())
        logits = logits[:-1].astype(np.float64)
        top = logits.max(axis=-1, keepdims=True)
        log_norm = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[:, 0]
        return float((log_norm - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


def next_token(logits: np.ndarray, settings: GenerationSettings, rng: np.random.Generator) -> int:
    """The most likely token (temperature 0), or one sampled after temperature, top-k and top-p."""
    if settings.temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / settings.temperature
    order = np.argsort(-scaled, kind="stable")
    if settings.top_k:
        order = order[: settings.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if settings.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), settings.top_p)) + 1
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])

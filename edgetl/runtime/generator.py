"""Text generation with a decoder exported with its KV cache: the decoding loop in numpy, over any engine.

The graph is optimum's ``text-generation-with-past`` layout: inputs ``input_ids``, ``attention_mask``,
(``position_ids``) and ``past_key_values.<layer>.key|value`` of shape (batch, kv heads, past length, head size);
outputs ``logits`` and ``present.<layer>.key|value``. ``KVCacheDecoder`` runs that graph one step at a time, feeding
each step's present back as the next one's past; ``Generator`` is the bundle runtime around it: tokenizer, stop
strings, streaming text.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgetl.errors import ArtifactError, UsageError
from edgetl.runtime.bundle import BundleRuntime

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

    def forward(self, ids: list[int], cache: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits of ``ids`` (one row per token) after the cached tokens, and the cache with them appended."""
        past = cache["past_key_values.0.key"].shape[2]
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": np.ones((1, past + len(ids)), dtype=np.int64), **cache}
        if self.takes_positions:
            feeds["position_ids"] = np.arange(past, past + len(ids), dtype=np.int64)[None]
        out = self.engine.run_all(feeds)
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


@dataclass(frozen=True)
class Generation:
    """A finished generation: the text after the prompt, its token ids and why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (an end token or a stop string) or "length" (max_new_tokens)


class Generator(BundleRuntime):
    """A text-generation bundle: a decoder with its KV cache, greedy or sampled, streaming or whole.

    ``manifest["max_length"]`` is the longest prompt in tokens it accepts and ``generation.max_new_tokens`` the
    most new tokens per call; ``generation.eos_token_ids`` end a generation.
    """

    def __init__(self, folder: str | Path, backend: str = "auto", threads: int | None = None, verify: bool = True,
                 public_key=None):
        super().__init__(folder, backend, threads, verify, public_key)
        self.tokenizer.no_truncation()  # a prompt over the limit is refused, never cut
        self.decoder = KVCacheDecoder(self.engine)
        generation = self.manifest.get("generation", {})
        self.eos_ids = frozenset(generation.get("eos_token_ids", []))
        self.max_prompt_tokens = int(self.manifest["max_length"])
        self.max_new_tokens = int(generation.get("max_new_tokens", 256))

    def _check_outputs(self, outputs: int, config_name: str) -> None:
        """A decoder's config may name labels of a head it does not have; its output is the vocabulary."""

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's token ids; UsageError if it is empty, no text, or over the bundle's prompt limit."""
        if not isinstance(prompt, str):
            raise UsageError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt).ids
        if not prompt or not ids:
            raise UsageError("prompt is empty")
        if len(ids) > self.max_prompt_tokens:
            raise UsageError(f"prompt is {len(ids)} tokens; this bundle takes at most {self.max_prompt_tokens}")
        return ids

    def _settings(self, settings: GenerationSettings | None, **options) -> GenerationSettings:
        settings = settings or GenerationSettings(**options)
        if settings.max_new_tokens > self.max_new_tokens:
            raise UsageError(f"max_new_tokens={settings.max_new_tokens}; this bundle generates at most "
                             f"{self.max_new_tokens}")
        return settings

    def stream(self, prompt: str, settings: GenerationSettings | None = None, **options) -> Iterator[str]:
        """The new text in pieces as the tokens come (``GenerationSettings`` fields as keywords, or ``settings``);
        the pieces joined are ``generate(...).text``."""
        for piece, _ in self._pieces(prompt, self._settings(settings, **options)):
            if piece:
                yield piece

    def generate(self, prompt: str, settings: GenerationSettings | None = None, **options) -> Generation:
        """The whole continuation of ``prompt``."""
        settings = self._settings(settings, **options)
        text, ids, reason = [], [], "length"
        for piece, state in self._pieces(prompt, settings):
            text.append(piece)
            ids, reason = state
        return Generation("".join(text), ids, reason)

    def _pieces(self, prompt: str, settings: GenerationSettings) -> Iterator[tuple[str, tuple[list[int], str]]]:
        """(new text, (the ids so far, finish reason)) per token. Text is held back while it could be the start of
        a stop string or ends in half a character, so no stop string is ever streamed."""
        ids, sent, reason = [], 0, "stop"
        for token in self.decoder.tokens(self.prompt_ids(prompt), settings, self.eos_ids):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            cut = min((i for i in (text.find(s) for s in settings.stop) if i >= 0), default=None)
            if cut is not None:
                yield text[sent:cut], (ids, "stop")
                return
            safe = len(text) - _held_back(text, settings.stop)
            if safe > sent:
                yield text[sent:safe], (ids, reason)
                sent = safe
        else:
            reason = "length" if len(ids) == settings.max_new_tokens else "stop"
        text = self.tokenizer.decode(ids)
        yield text[sent:], (ids, reason)

    def predict(self, items: list) -> list[Generation]:
        """Greedy continuations of each prompt (at most the bundle's max_new_tokens)."""
        return [self.generate(prompt) for prompt in items]

    @staticmethod
    def to_json(result: Generation) -> dict:
        return {"text": result.text, "tokens": len(result.token_ids), "finish_reason": result.finish_reason}

    @staticmethod
    def to_text(result: Generation) -> str:
        return result.text.replace("\n", "\\n")


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` not to stream yet: half a character, or the start of a stop string."""
    if text.endswith("\ufffd"):  # a byte-level token that completes its character only with the next one
        return 1
    return max((n for s in stops for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)

"""``Generator``: the runtime of a text-generation bundle, around ``edgetl.runtime.decoding``'s loop: the tokenizer,
prompt and token limits, stop strings, streaming text."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgetl.errors import UsageError
from edgetl.runtime.bundle import BundleRuntime
from edgetl.runtime.decoding import GenerationSettings, KVCacheDecoder


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

    def settings_for(self, settings: GenerationSettings | None, **options) -> GenerationSettings:
        """The settings given, or made of ``options`` (max_new_tokens defaults to the bundle's limit if lower)."""
        options.setdefault("max_new_tokens", min(GenerationSettings.max_new_tokens, self.max_new_tokens))
        settings = settings or GenerationSettings(**options)
        if settings.max_new_tokens > self.max_new_tokens:
            raise UsageError(f"max_new_tokens={settings.max_new_tokens}; this bundle generates at most "
                             f"{self.max_new_tokens}")
        return settings

    def stream(self, prompt: str, settings: GenerationSettings | None = None, **options) -> Iterator[str]:
        """The new text in pieces as the tokens come (``GenerationSettings`` fields as keywords, or ``settings``);
        the pieces joined are ``generate(...).text``."""
        for piece, _ in self.pieces(prompt, self.settings_for(settings, **options)):
            if piece:
                yield piece

    def generate(self, prompt: str, settings: GenerationSettings | None = None, **options) -> Generation:
        """The whole continuation of ``prompt``."""
        settings = self.settings_for(settings, **options)
        text, ids, reason = [], [], "length"
        for piece, state in self.pieces(prompt, settings):
            text.append(piece)
            ids, reason = state
        return Generation("".join(text), ids, reason)

    def pieces(self, prompt: str, settings: GenerationSettings) -> Iterator[tuple[str, tuple[list[int], str | None]]]:
        """(new text, (the ids so far, finish reason)) per token: ``stream`` yields the text, the server reads both;
        the reason is None until the last piece. Text is held back while it could be the start of a stop string or
        ends in half a character, so no stop string is ever streamed."""
        ids, sent = [], 0
        for token in self.decoder.tokens(self.prompt_ids(prompt), settings, self.eos_ids):
            ids.append(token)
            text = self.tokenizer.decode(ids)
            cut = min((i for i in (text.find(s) for s in settings.stop) if i >= 0), default=None)
            if cut is not None:
                yield text[sent:cut], (ids, "stop")
                return
            safe = len(text) - _held_back(text, settings.stop)
            if safe > sent:
                yield text[sent:safe], (ids, None)
                sent = safe
        text = self.tokenizer.decode(ids)
        yield text[sent:], (ids, "length" if len(ids) == settings.max_new_tokens else "stop")

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

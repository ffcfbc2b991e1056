"""How a text becomes model input, the same in training, evaluation and the runtime (no dependencies)."""

from __future__ import annotations

# Texts per call: the runtime's default and the evaluate stage's, so predictions repeat evaluated logits.
BATCH_SIZE = 64


def head_tail(ids: list, max_length: int, head_tokens: int) -> list:
    """The first token and ``head_tokens`` after it, then the end of the sequence: ``max_length`` items in all.

    Special tokens survive: the first one ([CLS]) is in the head and the last one ([SEP]) in the tail.
    """
    if len(ids) <= max_length:
        return ids
    head = min(head_tokens, max_length - 2) + 1
    return ids[:head] + ids[len(ids) - (max_length - head):]

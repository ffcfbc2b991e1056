"""Discrete prompt search on the training split, as AutoPrompt (Shin et al. 2020) does it for a cloze classifier.

- Verbaliser search (``cloze.verbalizer_search: n``): for each label, the ``n`` whole-word tokens whose log-probability
  at the answer slot is highest on that label's training examples relative to the others' (the mean difference of
  log-probabilities; no word serves two labels). The LM's own head ranks the whole vocabulary.
- Trigger search (``cloze.trigger_tokens: n``): ``n`` real vocabulary tokens at the pattern's ``{prompt}``, started as
  the word "the" and improved one position at a time: the gradient of the loss with respect to that position's
  input embedding ranks every whole-word token by the first-order change of the loss if it took the place
  (``-e_token . grad``); the best ``search_candidates`` are tried on the batch and the one with the lowest loss is
  kept if it is lower than the current one.

Both read only training rows; the result is recorded in the model's ``cloze`` section (``verbalizer``, ``prompt_ids``),
so export, INT8 and the runtime take it as a fixed pattern.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from edgetl.architectures import adapter_for
from edgetl.cloze import ClozeClassifier
from edgetl.runtime.cloze import ClozeTokenizer, Encoded, answer_space, verbalizer_ids
from edgetl.runtime.text import pad

log = logging.getLogger("edgetl")


def word_ids(tokenizer, pattern: str) -> tuple[list[int], list[str]]:
    """The vocabulary's whole words of 3+ letters that are one token where the answer slot reads them, and the words."""
    space = answer_space(pattern)
    words = sorted({w.strip() for w in (tokenizer.decode([i]) for i in range(tokenizer.get_vocab_size()))
                    if w.strip().isalpha() and len(w.strip()) >= 3})
    encoded = tokenizer.encode_batch([space + w for w in words], add_special_tokens=False)
    pairs = [(e.ids[0], w) for e, w in zip(encoded, words, strict=True) if len(e.ids) == 1]
    return [i for i, _ in pairs], [w for _, w in pairs]


class _Rows:
    """Training texts as cloze questions whose ``{prompt}`` slots can take any token ids."""

    def __init__(self, model: ClozeClassifier, tokenizer, texts: list[str], data, slots: int):
        cloze = model.cloze | {"prompt_ids": [-1 - j for j in range(slots)]}  # placeholders: never a vocabulary id
        self.encoded = ClozeTokenizer(tokenizer, cloze, data.max_length, data.truncation,
                                      data.head_tokens).encode_batch(texts)
        self.inputs = set(adapter_for(model.config.model_type).input_names)

    def feeds(self, rows, triggers: list[int]) -> dict[str, torch.Tensor]:
        """Padded model inputs of ``rows``, the prompt slots holding ``triggers``."""
        feeds = pad([Encoded([triggers[-1 - i] if i < 0 else i for i in self.encoded[r].ids]) for r in rows])
        return {k: torch.from_numpy(v) for k, v in feeds.items() if k in self.inputs}


def _batches(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def search_verbalizer(model: ClozeClassifier, rows: _Rows, labels: np.ndarray, label_names: list[str], per_label: int,
                      candidates: list[int], words: list[str], triggers: list[int], batch_size: int = 16) -> dict:
    """label -> the ``per_label`` words that best tell its training rows from the others' (see the module)."""
    model.eval()
    columns = torch.tensor(candidates)
    log_probs = []
    for batch in _batches(len(labels), batch_size):
        logits = model.vocabulary_logits(model.answer_states(**rows.feeds(batch, triggers)))
        log_probs.append(torch.log_softmax(logits.float(), dim=-1)[:, columns])
    log_probs = torch.cat(log_probs)
    y = torch.from_numpy(labels)
    taken, out = set(), {}
    for index, name in enumerate(label_names):
        if not (y == index).any() or (y == index).all():
            raise ValueError(f"cloze.verbalizer_search: the training rows need examples of every label and of "
                             f"another one; label '{name}' has {(y == index).sum()} of {len(y)}")
        contrast = log_probs[y == index].mean(0) - log_probs[y != index].mean(0)
        ranked = [i for i in contrast.argsort(descending=True).tolist() if i not in taken][:per_label]
        taken.update(ranked)
        out[name] = [words[i] for i in ranked]
        log.info("cloze: verbaliser search: %s -> %s (log-probability contrast %s)", name, out[name],
                 [round(float(contrast[i]), 3) for i in ranked])
    return out


def _loss(model, rows, batch, triggers, labels) -> torch.Tensor:
    return model(**rows.feeds(batch, triggers), labels=torch.from_numpy(labels[list(batch)])).loss


def search_triggers(model: ClozeClassifier, rows: _Rows, labels: np.ndarray, start: int, n: int, steps: int,
                    candidates: list[int], tries: int, batch_size: int, seed: int) -> list[int]:
    """``n`` trigger token ids for the ``{prompt}`` slot (see the module), ``steps`` single-position updates."""
    model.eval()
    embeddings = model.model.get_input_embeddings()
    pool = torch.tensor(candidates)
    triggers = [start] * n
    generator = torch.Generator().manual_seed(seed)
    captured = {}  # the input embeddings of the last forward pass
    for step in range(steps):
        batch = torch.randperm(len(labels), generator=generator)[:batch_size].tolist()
        position = step % n
        hook = embeddings.register_forward_hook(lambda _m, _i, out: captured.__setitem__("out", out))
        try:
            feeds = rows.feeds(batch, triggers)
            loss = model(**feeds, labels=torch.from_numpy(labels[batch])).loss
        finally:
            hook.remove()
        (grad,) = torch.autograd.grad(loss, captured["out"])
        at = _slot_positions(rows, batch, n)[:, position]
        direction = grad[torch.arange(len(batch)), at].mean(0)  # [hidden]
        scores = -(embeddings.weight[pool] @ direction)
        best, best_loss = triggers[position], float(loss)
        with torch.no_grad():
            for token in pool[scores.topk(min(tries, len(pool))).indices].tolist():
                trial = triggers[:position] + [token] + triggers[position + 1:]
                value = float(_loss(model, rows, batch, trial, labels))
                if value < best_loss:
                    best, best_loss = token, value
        triggers[position] = best
        log.info("cloze: trigger search step %d/%d: batch loss %.4f -> %.4f", step + 1, steps, float(loss), best_loss)
    return triggers


def _slot_positions(rows: _Rows, batch: list[int], n: int) -> torch.Tensor:
    """[rows, n]: where each row's prompt slots are."""
    return torch.tensor([[row.ids.index(-1 - j) for j in range(n)] for row in (rows.encoded[r] for r in batch)])


def search(model: ClozeClassifier, cfg, tokenizer, texts: list[str], labels: list[int], label_names: list[str], data,
           seed: int) -> ClozeClassifier:
    """The model with its searched verbaliser and trigger tokens (``cfg``: the recipe's ``cloze``); ``tokenizer``: the
    ``tokenizers`` tokenizer."""
    candidates, words = word_ids(tokenizer, cfg.pattern)
    y = np.asarray(labels)
    rows = _Rows(model, tokenizer, texts, data, cfg.trigger_tokens)
    start = candidates[words.index("the")] if "the" in words else candidates[0]
    triggers = [start] * cfg.trigger_tokens
    cloze = dict(model.cloze)
    if cfg.verbalizer_search:
        found = search_verbalizer(model, rows, y, label_names, cfg.verbalizer_search, candidates, words, triggers)
        cloze["verbalizer"] = found
        cloze["verbalizer_ids"] = verbalizer_ids(tokenizer, cfg.pattern, found)
        model = ClozeClassifier(model.model, cloze)
        model.config.cloze = cloze
    if cfg.trigger_tokens:
        triggers = search_triggers(model, rows, y, start, cfg.trigger_tokens, cfg.search_steps, candidates,
                                   cfg.search_candidates, cfg.search_batch_size, seed)
        cloze["prompt_ids"] = triggers
        log.info("cloze: trigger tokens %s", [tokenizer.id_to_token(t) for t in triggers])
    model.cloze = model.config.cloze = cloze
    return model

"""Vocabulary pruning: drop the embedding rows of tokens the task corpus never uses.

The word-embedding matrix is half of MiniLM-L6 (30522 x 384 of 22.6M weights), yet one task's corpus uses
a small share of the vocabulary: the SST-2 training sentences use 11575 tokens. Pruning keeps only the rows of
used tokens; new id ``i`` is the ``i``-th kept old id.

The tokenizer keeps every token string, so it splits any text exactly as before; a token whose row was
dropped now maps to [UNK]'s id. (Removing the strings instead makes greedy WordPiece re-split unseen words
into other kept pieces, which cost more dev accuracy on SST-2: ``benchmarks/vocab_mapping.py``.) On
in-corpus text nothing changes but the ids, so the pruned model gives the same logits.

Only ``tokenizer.json`` can say this (many strings, one id), so no ``vocab.txt`` is written: the bundle and
transformers' fast tokenizer read ``tokenizer.json``; a slow tokenizer cannot be built from the folder.

``tokenizer.json`` is written from the live fast tokenizer, with the truncation and padding it holds now;
transformers overwrites both on each call, which is why ``used_token_ids`` encodes with a private copy.
"""

from __future__ import annotations

import collections
import itertools
import json
from collections.abc import Iterable
from pathlib import Path

from edgetl.errors import StageError

ENCODE_BATCH = 1024


def used_token_ids(tokenizer, texts: Iterable[str], min_count: int = 1) -> list[int]:
    """Old ids to keep: those seen on ``texts`` ``min_count`` times or more, and all special and added tokens.

    Args:
        tokenizer: a transformers fast tokenizer.
        texts: the task corpus (any iterable of strings; read once, in batches, never truncated).
        min_count: drop tokens seen fewer times than this; above 1 some in-corpus words change encoding.

    Returns:
        Sorted old token ids.
    """
    if min_count < 1:
        raise StageError(f"vocabulary pruning: min_count must be at least 1, got {min_count}")
    backend = _private_backend(tokenizer)
    backend.no_truncation()
    backend.no_padding()
    counts: collections.Counter[int] = collections.Counter()
    text_iter = iter(texts)
    while batch := list(itertools.islice(text_iter, ENCODE_BATCH)):
        for encoding in backend.encode_batch(batch, add_special_tokens=False):
            counts.update(encoding.ids)
    used = {token_id for token_id, count in counts.items() if count >= min_count}
    return sorted(used | set(_always_kept(tokenizer)))


def read_as_pruned(model, tokenizer, keep_ids: list[int]):
    """Until the returned handle is removed, ``model`` reads every id outside ``keep_ids`` as [UNK]'s.

    The model then answers as it will after ``prune_vocabulary(model, tokenizer, keep_ids, ...)``, while its ids,
    embedding and tokenizer stay whole: training with the handle in place (pruning recovery) learns the inputs
    the pruned model will get. A forward pre-hook on the input embedding; the handle's ``remove()`` ends it.
    """
    import torch

    embedding = model.get_input_embeddings()
    unk = tokenizer.unk_token_id
    if unk is None or unk not in set(keep_ids):
        raise StageError(f"vocabulary pruning: the tokenizer's [UNK] ({tokenizer.unk_token}) must be among keep_ids")
    lookup = torch.full((embedding.num_embeddings,), unk, dtype=torch.long)
    kept = torch.tensor(sorted(set(keep_ids)), dtype=torch.long)
    lookup[kept] = kept

    def unknown_outside(module, args):
        return (lookup.to(args[0].device)[args[0]], *args[1:])

    return embedding.register_forward_pre_hook(unknown_outside)


def prune_vocabulary(model, tokenizer, keep_ids: list[int], out_dir: Path) -> dict:
    """Cut ``model``'s input embedding to ``keep_ids`` in place; write the matching tokenizer in ``out_dir``.

    Everything is checked before the model or ``out_dir`` is touched.

    Args:
        model: a BERT-family encoder classifier (no output embedding over the vocabulary).
        tokenizer: the model's transformers fast tokenizer, with a WordPiece model.
        keep_ids: old ids to keep, as ``used_token_ids`` returns them; must hold all special and added tokens.
        out_dir: receives tokenizer.json, tokenizer_config.json and special_tokens_map.json.

    Returns:
        ``vocab_before``, ``vocab_after``, ``embedding_params_before``, ``embedding_params_after``.
    """
    keep = sorted(set(keep_ids))
    spec = json.loads(_backend(tokenizer).to_str())
    if (kind := spec["model"]["type"]) != "WordPiece":
        raise StageError(f"vocabulary pruning needs a WordPiece tokenizer; this one is {kind}, whose "
                         "segmentation may change when tokens are removed")
    old_embedding = model.get_input_embeddings()
    _check_prunable(model, tokenizer, spec, keep, old_embedding.num_embeddings)
    remap = {old: new for new, old in enumerate(keep)}
    new_spec = _remapped_spec(spec, remap)
    new_embedding = _kept_rows(old_embedding, keep, remap)
    config_ids = {name: _new_id(remap, old, f"config.{name}")
                  for name in ("pad_token_id", "bos_token_id", "eos_token_id")
                  if (old := getattr(model.config, name, None)) is not None}

    _write_tokenizer(tokenizer, new_spec, remap, Path(out_dir))
    model.set_input_embeddings(new_embedding)
    model.config.update({"vocab_size": len(keep), **config_ids})
    return {"vocab_before": old_embedding.num_embeddings, "vocab_after": new_embedding.num_embeddings,
            "embedding_params_before": old_embedding.weight.numel(),
            "embedding_params_after": new_embedding.weight.numel()}


def _new_id(remap: dict[int, int], old: int, user: str) -> int:
    """The new id of ``old``, or a StageError naming what needs it."""
    if old not in remap:
        raise StageError(f"vocabulary pruning: keep_ids drops id {old}, which {user} needs; keep it")
    return remap[old]


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` behind a transformers fast tokenizer."""
    if not getattr(tokenizer, "is_fast", False):
        raise StageError("vocabulary pruning needs a fast tokenizer (tokenizer.json); "
                         f"got {type(tokenizer).__name__}")
    return tokenizer.backend_tokenizer


def _private_backend(tokenizer):
    """A copy of the backend, so changing its truncation or padding leaves the caller's tokenizer alone."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_backend(tokenizer).to_str())


def _always_kept(tokenizer) -> dict[int, str]:
    """id -> token of every special and added token: the post-processor, padding and [UNK] need them."""
    kept = {token_id: added.content for token_id, added in tokenizer.added_tokens_decoder.items()}
    kept.update(zip(tokenizer.all_special_ids, tokenizer.all_special_tokens, strict=True))
    return kept


def _check_prunable(model, tokenizer, spec: dict, keep: list[int], rows: int) -> None:
    """Raise StageError for anything that would leave the model and tokenizer out of step."""
    if model.get_output_embeddings() is not None:
        tied = "tied to" if getattr(model.config, "tie_word_embeddings", False) else "beside"
        raise StageError(f"vocabulary pruning: {type(model).__name__} has an output embedding over the "
                         f"vocabulary ({tied} the input one); only encoder classifiers, which have none, "
                         "can be pruned")
    beyond = [a["content"] for a in spec["added_tokens"] if a["content"] not in spec["model"]["vocab"]]
    if beyond:
        # The pruned vocabulary keeps every string (dropped ones share [UNK]'s id), so tokenizers would number
        # tokens added after it from the string count, not from the kept ids.
        raise StageError(f"vocabulary pruning: added tokens outside the WordPiece vocabulary {beyond[:5]} are not "
                         "supported; prune before adding tokens")
    kept = set(keep)
    missing = {i: token for i, token in _always_kept(tokenizer).items() if i not in kept}
    if missing:
        names = ", ".join(f"{token} (id {i})" for i, token in sorted(missing.items()))
        raise StageError(f"vocabulary pruning: keep_ids misses special or added tokens {names}; "
                         "keep every id used_token_ids returns")
    known = set(spec["model"]["vocab"].values()) | {added["id"] for added in spec["added_tokens"]}
    strangers = [i for i in keep if i not in known or i >= rows]
    if strangers:
        raise StageError(f"vocabulary pruning: keep_ids {strangers[:10]} are not tokens of both the "
                         f"tokenizer ({len(known)} tokens) and the embedding ({rows} rows)")


def _kept_rows(embedding, keep: list[int], remap: dict[int, int]):
    """A new nn.Embedding holding the kept rows, with the old one's dtype, device and options."""
    import torch
    from torch import nn

    padding_idx = embedding.padding_idx
    if padding_idx is not None:
        padding_idx = _new_id(remap, padding_idx, "the embedding's padding_idx")
    index = torch.tensor(keep, dtype=torch.long, device=embedding.weight.device)
    return nn.Embedding.from_pretrained(
        embedding.weight.detach().index_select(0, index).clone(), freeze=not embedding.weight.requires_grad,
        padding_idx=padding_idx,
        max_norm=embedding.max_norm, norm_type=embedding.norm_type,
        scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse)


def _remapped_spec(spec: dict, remap: dict[int, int]) -> dict:
    """tokenizer.json content with remapped ids: WordPiece vocab, added tokens, padding, post_processor."""
    vocab = spec["model"]["vocab"]
    unk = _new_id(remap, vocab[spec["model"]["unk_token"]], "the WordPiece unk_token")
    spec["model"]["vocab"] = {token: remap.get(i, unk) for token, i in vocab.items()}
    for added in spec["added_tokens"]:
        added["id"] = _new_id(remap, added["id"], f"added token {added['content']}")
    if spec["padding"] is not None:
        spec["padding"]["pad_id"] = _new_id(remap, spec["padding"]["pad_id"], "tokenizer.json padding")
    spec["post_processor"] = _remap_post_processor(spec["post_processor"], remap)
    return spec


def _write_tokenizer(tokenizer, spec: dict, remap: dict[int, int], out_dir: Path) -> None:
    """Save the tokenizer as transformers does, then replace or rewrite every file that holds ids."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False, indent=2))
    (out_dir / "vocab.txt").unlink(missing_ok=True)  # one id per string: it would re-split unseen words

    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if "added_tokens_decoder" in config:
        decoder = config["added_tokens_decoder"]
        config["added_tokens_decoder"] = {str(remap[int(i)]): added for i, added in decoder.items()}
    config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n")
    # Written by transformers only for added tokens beyond the WordPiece vocab.
    added_file = out_dir / "added_tokens.json"
    if added_file.is_file():
        added_ids = json.loads(added_file.read_text())
        remapped = {token: remap[i] for token, i in added_ids.items()}
        added_file.write_text(json.dumps(remapped, ensure_ascii=False, indent=2, sort_keys=True) + "\n")


def _remap_post_processor(node: dict | None, remap: dict[int, int]) -> dict | None:
    """The post-processor with its special-token ids remapped (the two kinds BERT tokenizers use)."""
    if node is None:
        return None
    kind = node["type"]
    if kind == "TemplateProcessing":
        for special in node["special_tokens"].values():
            special["ids"] = [_new_id(remap, i, "the post_processor") for i in special["ids"]]
    elif kind == "BertProcessing":
        for key in ("sep", "cls"):
            node[key][1] = _new_id(remap, node[key][1], "the post_processor")
    else:
        raise StageError(f"vocabulary pruning: post_processor type {kind} in tokenizer.json is not supported")
    return node

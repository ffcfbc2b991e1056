"""Prompt learning as a cloze question (``finetune.method: cloze``): the language model's own head is the classifier.

The text goes into a pattern with an answer slot (``edgetl.runtime.cloze`` builds the ids); a label's logit is the
mean of its verbaliser words' logits at that slot: the mask token of a masked LM, the last token of a causal LM
(whose next token answers). ``ClozeClassifier`` computes exactly that, but runs the LM head on the answer position
alone and keeps only the verbaliser rows of its output layer, so the exported graph is an ordinary classifier
(``logits``: one row per text, one column per label) without the vocabulary-wide output matrix.

What trains (``cloze.train``): nothing (zero-shot), every weight (PET: cross-entropy over the verbaliser logits), or
only prompt vectors placed at ``{prompt}`` (P-tuning: new vocabulary rows, the LM frozen).

A saved cloze model is the LM's folder (``save_pretrained``; ``config.json`` holds the ``cloze`` section and the
labels) plus ``cloze_head.safetensors``, the answer head with its verbaliser rows, which PET trains apart from the
input embeddings they may be tied to.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from edgetl.errors import ArchitectureError

HEAD_FILE = "cloze_head.safetensors"


def _head_path(model) -> str:
    """The one top-level module besides the base model that holds weights: the LM head, which computes the
    vocabulary logits from the last hidden states (BERT's ``cls``, RoBERTa's and Llama's ``lm_head``)."""
    output, base = model.get_output_embeddings(), model.base_model
    rest = [(name, m) for name, m in model.named_children() if m is not base and next(m.parameters(), None) is not None]
    if len(rest) == 1 and any(m is output for m in rest[0][1].modules()):
        return rest[0][0]
    raise ArchitectureError(f"{model.config.model_type}: its language-model head is spread over {[n for n, _ in rest]}, "
                            "so edgetl cannot run it on the answer position alone; cloze takes BERT-, RoBERTa- and "
                            "MPNet-style masked LMs and Llama- and GPT-2-style causal LMs")


def _answer_head(model, ids: list[int]) -> nn.Module:
    """A copy of the LM head whose output layer keeps the rows ``ids`` alone (the vocabulary-wide layer is not copied)."""
    output = model.get_output_embeddings()
    sliced = nn.Linear(output.in_features, len(ids), bias=output.bias is not None)
    with torch.no_grad():
        sliced.weight.copy_(output.weight[ids])
        if output.bias is not None:
            sliced.bias.copy_(output.bias[ids])
    head = getattr(model, _head_path(model))
    if head is output:
        return sliced
    name = next(n for n, m in head.named_modules() if m is output)
    parent_name, _, attr = name.rpartition(".")
    parent = head.get_submodule(parent_name)
    parent._modules[attr] = None
    try:
        head = copy.deepcopy(head)
    finally:
        parent._modules[attr] = output
    parent = head.get_submodule(parent_name)
    parent._modules[attr] = sliced
    for name, value in list(parent._parameters.items()):  # BERT's head keeps the output bias beside it, tied
        if value is not None and value.shape == (output.out_features,):
            parent._parameters[name] = sliced.bias
    return head


class PromptEmbedding(nn.Module):
    """The input embeddings with ``n`` trainable vectors appended as ids ``vocab .. vocab + n - 1`` (P-tuning)."""

    def __init__(self, embeddings: nn.Embedding, n: int, seed: int):
        super().__init__()
        self.embeddings, self.vocab = embeddings, embeddings.num_embeddings
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, self.vocab, (n,), generator=generator)  # real words' vectors: on the LM's scale
        self.prompt = nn.Parameter(embeddings.weight[start].detach().clone())

    def forward(self, ids):
        known = ids < self.vocab
        vectors = self.embeddings(ids.masked_fill(~known, 0))
        return torch.where(known.unsqueeze(-1), vectors, self.prompt[(ids - self.vocab).clamp(min=0)].to(vectors.dtype))


class ClozeClassifier(nn.Module):
    """A language model answering a cloze question: per label, the mean of its verbaliser words' logits at the
    answer position.

    Args:
        model: a transformers masked or causal LM (its head is copied, its output layer cut to the verbaliser rows).
        cloze: the ``cloze`` section (``answer``, ``mask_id``, ``verbalizer_ids``: label -> word ids, in label order).
    """

    def __init__(self, model, cloze: dict):
        super().__init__()
        self.model, self.config, self.cloze = model, model.config, cloze
        words = list(cloze["verbalizer_ids"].values())
        ids = sorted({i for label_ids in words for i in label_ids})
        self.head = _answer_head(model, ids)
        widest = max(len(w) for w in words)
        # index[label, k]: the k-th word's column in the head's output; weight: 1/len(words) there, 0 for padding.
        self.register_buffer("index", torch.tensor([[ids.index(i) for i in w] + [0] * (widest - len(w)) for w in words]),
                             persistent=False)
        self.register_buffer("weight", torch.tensor([[1 / len(w)] * len(w) + [0.0] * (widest - len(w)) for w in words]),
                             persistent=False)

    def answer_states(self, input_ids, attention_mask=None, token_type_ids=None):
        """The last hidden state at each row's answer position: the (last) mask token, or the last attended token;
        position 0 where there is none."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **types).last_hidden_state
        slot = input_ids == self.cloze["mask_id"] if self.cloze["answer"] == "mask" else attention_mask.bool()
        order = torch.arange(1, input_ids.shape[1] + 1, device=input_ids.device, dtype=hidden.dtype)
        position = (slot.to(hidden.dtype) * order).argmax(dim=-1)
        return hidden.gather(1, position[:, None, None].expand(-1, 1, hidden.shape[-1])).squeeze(1)

    def vocabulary_logits(self, states):
        """The LM's own head over its whole vocabulary (what verbaliser search ranks words by)."""
        return getattr(self.model, _head_path(self.model))(states)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **_):
        scores = self.head(self.answer_states(input_ids, attention_mask, token_type_ids))
        logits = (scores[:, self.index] * self.weight.to(scores.dtype)).sum(dim=-1)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)

    def save_pretrained(self, folder) -> None:
        self.model.save_pretrained(str(folder))
        save_model(self.head, str(Path(folder) / HEAD_FILE))  # a head's tied bias is stored once


def new_cloze(source: str, cfg, labels: list[str], masked: bool, tokenizer, seed: int):
    """A pretrained LM as a ``ClozeClassifier`` of ``labels`` with the recipe's ``cloze`` settings, and its tokenizer
    (right padding, a pad token). ``masked``: load it as a masked LM (else causal)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from edgetl.runtime.cloze import verbalizer_ids
    from edgetl.tasks.text_classification import head_config

    missing = sorted(set(labels) - set(cfg.verbalizer))
    stray = sorted(set(cfg.verbalizer) - set(labels))
    if missing or stray:
        raise ValueError(f"cloze.verbalizer: labels {missing} have no words and {stray} are no label; "
                         f"the labels are {labels}")
    loader = AutoModelForMaskedLM if masked else AutoModelForCausalLM
    model, info = loader.from_pretrained(source, output_loading_info=True, dtype=torch.float32)
    new_head = [k for k in info["missing_keys"] if not k.endswith("decoder.weight")]
    if new_head and cfg.train != "pet":
        raise ArchitectureError(f"{source}: ships no language-model head ({len(new_head)} new tensors), so nothing "
                                f"scores the verbaliser words (cloze.train: {cfg.train}); add an adapt stage before "
                                "finetune (masked-LM pretraining trains one) or use a model that has one")
    if masked and tokenizer.mask_token_id is None:
        raise ArchitectureError(f"{source}: its tokenizer has no mask token; a masked LM answers at one")
    tokenizer.padding_side = "right"  # the answer position of a causal LM is its last attended token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    backend = tokenizer.backend_tokenizer
    words = verbalizer_ids(backend, cfg.pattern, cfg.verbalizer)
    cloze = {"pattern": cfg.pattern, "answer": "mask" if masked else "last",
             "mask_id": tokenizer.mask_token_id if masked else None, "verbalizer": cfg.verbalizer,
             "verbalizer_ids": {label: words[label] for label in labels}, "prompt_ids": []}
    if cfg.train == "prompt":
        model.set_input_embeddings(PromptEmbedding(model.get_input_embeddings(), cfg.prompt_tokens, seed))
        cloze["prompt_ids"] = list(range(model.get_input_embeddings().vocab, model.get_input_embeddings().vocab
                                         + cfg.prompt_tokens))
    for key, value in head_config(labels).items():
        setattr(model.config, key, value)
    model.config.cloze = cloze
    classifier = ClozeClassifier(model, cloze)
    if cfg.train == "prompt":  # P-tuning: the prompt vectors alone
        for name, parameter in classifier.named_parameters():
            parameter.requires_grad = name.endswith(".prompt")
    return classifier


def finalize(classifier: ClozeClassifier) -> ClozeClassifier:
    """Trained prompt vectors written into the vocabulary (new rows, ids ``cloze.prompt_ids``), so the saved LM, its
    export and the runtime read them as ordinary tokens."""
    embeddings = classifier.model.get_input_embeddings()
    if not isinstance(embeddings, PromptEmbedding):
        return classifier
    model = classifier.model
    model.set_input_embeddings(embeddings.embeddings)
    model.resize_token_embeddings(embeddings.vocab + len(embeddings.prompt), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[embeddings.vocab:] = embeddings.prompt.detach()
    return classifier


def load_cloze(folder) -> ClozeClassifier:
    """A saved cloze model: the LM with its ``cloze`` section, the trained answer head loaded over the copied one."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(folder)
    loader = AutoModelForMaskedLM if config.cloze["answer"] == "mask" else AutoModelForCausalLM
    classifier = ClozeClassifier(loader.from_pretrained(folder, dtype=torch.float32), config.cloze)
    head = Path(folder) / HEAD_FILE
    if head.is_file():
        load_model(classifier.head, str(head))
    return classifier

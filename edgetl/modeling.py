"""PyTorch side of models: the classification heads edgetl trains, and loading them back."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from edgetl.models import resolve_model_source

MEAN_POOL_ARCH = "MeanPoolBertForSequenceClassification"


class MeanPoolBertForSequenceClassification(BertPreTrainedModel):
    """BERT with a classifier on the attention-masked mean of the last hidden states.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained mean-pooled and ship no
    pooler; a head on the mean keeps that geometry (a [CLS] head peaked lower on SST-2 here).
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=False)
        self.dropout = nn.Dropout(config.classifier_dropout or config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **_):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def new_classifier(name: str, labels: list[str], pooling: str):
    """A pretrained encoder with a fresh classification head, plus its tokenizer."""
    source = resolve_model_source(name)
    id2label = dict(enumerate(labels))
    label2id = {label: i for i, label in id2label.items()}
    config = AutoConfig.from_pretrained(source, num_labels=len(labels), id2label=id2label, label2id=label2id)
    if pooling == "mean":
        if config.model_type != "bert":
            raise ValueError(f"pooling 'mean' supports BERT-family models; '{name}' is {config.model_type}: use pooling 'cls'")
        model = MeanPoolBertForSequenceClassification.from_pretrained(source, config=config)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config)
    return model, AutoTokenizer.from_pretrained(source)


def load_classifier(folder):
    """Load a classifier saved by edgetl (any head it trains) or a plain HF one."""
    config = AutoConfig.from_pretrained(folder)
    if MEAN_POOL_ARCH in (config.architectures or []):
        return MeanPoolBertForSequenceClassification.from_pretrained(folder).eval()
    return AutoModelForSequenceClassification.from_pretrained(folder).eval()

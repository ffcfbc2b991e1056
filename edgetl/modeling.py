"""PyTorch side of models: the classification heads edgetl trains, and loading them back."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, BertModel, BertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from edgetl.architectures.torch_ops import adapter_of, layer_sizes, resize
from edgetl.architectures.torch_ops import layers as layers_of
from edgetl.bench.flops import PRUNED_LAYERS, encoder_flops
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

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, output_attentions=None, inputs_embeds=None, **_):
        if attention_mask is None:
            given = input_ids if input_ids is not None else inputs_embeds
            attention_mask = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        out = self.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
                        output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = self.classifier(self.dropout(pooled))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


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


SOFT_PROMPT_FILE = "soft_prompt.safetensors"


class SoftPromptClassifier(nn.Module):
    """A frozen classifier behind a trained soft prompt: prompt vectors go before the text's token embeddings.

    The inference side of peft's prompt tuning (``PeftModelForSequenceClassification``), without peft:
    the prompt positions are attended to and carry token type 0, as in training.
    """

    def __init__(self, model, prompt: torch.Tensor):
        super().__init__()
        self.model, self.config = model, model.config
        self.prompt = nn.Parameter(prompt, requires_grad=False)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        batch, n = input_ids.shape[0], self.prompt.shape[0]
        embeds = self.model.get_input_embeddings()(input_ids)
        embeds = torch.cat([self.prompt.to(embeds.dtype).expand(batch, -1, -1), embeds], dim=1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = torch.cat([attention_mask.new_ones(batch, n), attention_mask], dim=1)
        if token_type_ids is not None:  # DistilBERT and MPNet have no such argument: pass it only when given
            kwargs["token_type_ids"] = torch.cat([token_type_ids.new_zeros(batch, n), token_type_ids], dim=1)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)


def load_classifier(folder):
    """Load a classifier saved by edgetl (any head it trains, pruned or prompt-tuned) or a plain HF one."""
    model = _load_encoder_classifier(folder)
    prompt_file = Path(folder) / SOFT_PROMPT_FILE
    if prompt_file.is_file():
        model = SoftPromptClassifier(model, load_file(str(prompt_file))["prompt"])
    return model.eval()


def _load_encoder_classifier(folder):
    config = AutoConfig.from_pretrained(folder)
    mean_pool = MEAN_POOL_ARCH in (config.architectures or [])
    sizes = getattr(config, PRUNED_LAYERS, None)
    if sizes is None:
        cls = MeanPoolBertForSequenceClassification if mean_pool else AutoModelForSequenceClassification
        return cls.from_pretrained(folder)
    # Pruned layers differ in width, which a config cannot say: build the recorded shapes, then load exactly.
    model = MeanPoolBertForSequenceClassification(config) if mean_pool else AutoModelForSequenceClassification.from_config(config)
    resize_layers(model, sizes)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    return model


def resize_layers(model, sizes: list[dict]) -> None:
    """Give every layer the recorded head count and FFN width (fresh weights, to be loaded over)."""
    adapter, layers = adapter_of(model), encoder_layers(model)
    if len(sizes) != len(layers):
        raise ValueError(f"config records {len(sizes)} layer sizes for {len(layers)} layers")
    for layer, size in zip(layers, sizes, strict=True):
        resize(adapter, layer, size["heads"], size["intermediate"])


def encoder_layers(model):
    """The transformer blocks of a classifier (edgetl's heads and HF's), found by its architecture's adapter."""
    return layers_of(model)


def flops_per_text(model, lengths: list[int]) -> int:
    """Multiply-adds x 2 of one forward pass at batch 1, averaged over texts of these lengths (see encoder_flops)."""
    return int(encoder_flops(model.config.to_dict(), lengths, layer_sizes(model)))


def model_stats(model, dev_tok) -> dict:
    """Parameters, FLOPs at the dev texts' own lengths and per-layer sizes, for a stage's manifest."""
    lengths = [len(ids) for ids in dev_tok["input_ids"]]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "gflops_per_text": round(flops_per_text(model, lengths) / 1e9, 4),
            "layers": layer_sizes(model)}

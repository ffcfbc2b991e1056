"""PyTorch side of models: the heads edgetl trains (the task's, or a mean-pooled one), and loading them back."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from edgetl.architectures import adapter_for
from edgetl.architectures.flops import PRUNED_LAYERS, encoder_flops
from edgetl.architectures.torch_ops import adapter_of, layer_sizes, resize
from edgetl.architectures.torch_ops import layers as layers_of
from edgetl.cloze import load_cloze
from edgetl.errors import ArchitectureError, ModelNotFoundError
from edgetl.models import CATALOG, catalog_file, resolve_model_source
from edgetl.tasks import DEFAULT_TASK, TASKS, Task

# The name BERT's mean-pool head has always been saved under; every type's head is MeanPool<Type>For...
MEAN_POOL_ARCH = "MeanPoolBertForSequenceClassification"


class _PooledEncoder:
    """What edgetl's heads share: the base model under the HF ``base_model_prefix`` (``bert``, ``distilbert``, ...,
    so pretrained weights load by name), without its pooler, and one vector per text pooled from its last hidden
    states."""

    def _add_encoder(self, config) -> None:
        base_cls = _base_model_class(config.model_type)
        # Poolers are unused here and would only hold untrained weights (DistilBERT, DeBERTa-v2 have none).
        no_pooler = {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(base_cls).parameters else {}
        setattr(self, self.base_model_prefix, base_cls(config, **no_pooler))

    def _pooled(self, pooling: str, input_ids, attention_mask, token_type_ids, inputs_embeds, output_hidden_states,
                output_attentions):
        """(one vector per text: the attention-masked mean, or the first position for ``cls``; the encoder output)."""
        if attention_mask is None:
            given = input_ids if input_ids is not None else inputs_embeds
            attention_mask = torch.ones(given.shape[:2], dtype=torch.long, device=given.device)
        # DistilBERT and MPNet have no token_type_ids argument: pass it only when given.
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = getattr(self, self.base_model_prefix)(
            input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **types,
            output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        hidden = out.last_hidden_state
        if pooling == "cls":
            return hidden[:, 0], out
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9), out


class _MeanPoolHead(_PooledEncoder):
    """A classifier (or, with ``problem_type`` regression, a scorer) on the attention-masked mean of the last
    hidden states, over any adapter's base model.

    Sentence-embedding checkpoints such as all-MiniLM-L6-v2 were trained mean-pooled and ship no
    pooler; a head on the mean keeps that geometry (a [CLS] head peaked lower on SST-2 here).
    Mixed into each architecture's ``PreTrainedModel`` by ``mean_pool_class``; the encoder sits under the
    HF ``base_model_prefix`` (``bert``, ``distilbert``, ...), so pretrained weights load by name.
    """

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self._add_encoder(config)
        self.dropout = nn.Dropout(_classifier_dropout(config))
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, output_attentions=None, inputs_embeds=None, **_):
        pooled, out = self._pooled("mean", input_ids, attention_mask, token_type_ids, inputs_embeds,
                                   output_hidden_states, output_attentions)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None and self.config.problem_type == "regression":  # one score per text, as HF's heads
            loss = nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        elif labels is not None:
            loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=out.hidden_states,
                                        attentions=out.attentions)


def _base_model_class(model_type: str) -> type:
    """transformers' ``AutoModel`` class of a model type (``BertModel``, ``DistilBertModel``, ...)."""
    from transformers import CONFIG_MAPPING, MODEL_MAPPING

    return MODEL_MAPPING[CONFIG_MAPPING[model_type]]


def _classifier_dropout(config) -> float:
    # The key differs by type: BERT-likes say classifier_dropout (often None) else hidden_dropout_prob,
    # DistilBERT says seq_classif_dropout.
    for key in ("classifier_dropout", "seq_classif_dropout", "hidden_dropout_prob"):
        if getattr(config, key, None) is not None:
            return getattr(config, key)
    return 0.1


class _EmbeddingHead(_PooledEncoder):
    """A sentence-embedding model: the base model's last hidden states pooled into one vector per text (the mean over
    the attention mask, or the [CLS] position), L2-normalised when ``config.sentence_normalize`` is true.

    The vector is returned as ``logits`` so that every engine, the exporter and the runtime read it like any head's
    output. ``config.sentence_pooling`` and ``config.sentence_normalize`` record how the checkpoint was trained.
    """

    def __init__(self, config):
        super().__init__(config)
        self._add_encoder(config)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, output_hidden_states=None,
                output_attentions=None, inputs_embeds=None, **_):
        pooled, out = self._pooled(self.config.sentence_pooling, input_ids, attention_mask, token_type_ids,
                                   inputs_embeds, output_hidden_states, output_attentions)
        if self.config.sentence_normalize:
            pooled = nn.functional.normalize(pooled, p=2, dim=-1)
        return SequenceClassifierOutput(logits=pooled, hidden_states=out.hidden_states, attentions=out.attentions)


# Head mixin -> the name suffix of its classes: <Base><suffix>, or MeanPool<Base>ForSequenceClassification.
_HEADS = {_MeanPoolHead: "ForSequenceClassification", _EmbeddingHead: "ForSentenceEmbedding"}


@functools.cache
def _head_class(head: type, model_type: str) -> type:
    adapter_for(model_type).require("mean_pooling")
    base_cls = _base_model_class(model_type)
    pretrained_cls = next(c for c in base_cls.__mro__[1:] if issubclass(c, PreTrainedModel))
    prefix = "MeanPool" if head is _MeanPoolHead else ""
    name = f"{prefix}{base_cls.__name__.removesuffix('Model')}{_HEADS[head]}"
    cls = type(name, (head, pretrained_cls), {"__module__": __name__, "__qualname__": name, "__doc__": head.__doc__})
    globals()[name] = cls  # so pickle and copy find the class by its module and name, like a written one
    return cls


def mean_pool_class(model_type: str) -> type:
    """The mean-pooled classifier of a model type that has an adapter; ``ArchitectureError`` otherwise.

    Named ``MeanPool<Type>ForSequenceClassification`` after the base class (``MeanPoolBertFor...`` for BERT,
    as saved before other types existed); ``save_pretrained`` records that name in ``config.architectures``.
    """
    return _head_class(_MeanPoolHead, model_type)


def embedding_class(model_type: str) -> type:
    """The sentence-embedding model of a model type that has an adapter (``<Type>ForSentenceEmbedding``)."""
    return _head_class(_EmbeddingHead, model_type)


def is_mean_pooled(model) -> bool:
    """Whether a classifier is one of edgetl's mean-pooled heads (of any architecture)."""
    return isinstance(model, _MeanPoolHead)


MeanPoolBertForSequenceClassification = mean_pool_class("bert")


def model_folder(name: str) -> str:
    """``resolve_model_source``, with a catalog GGUF checkpoint first dequantised into its cache folder (transformers
    with the ``gguf`` package; written to a temporary folder and renamed, so an interrupted conversion leaves no
    half-written folder)."""
    source = Path(resolve_model_source(name))
    if name not in CATALOG or (source / "config.json").is_file() or catalog_file(name).suffix != ".gguf":
        return str(source)
    import importlib.util
    import shutil
    import tempfile

    import transformers

    gguf_file = catalog_file(name)
    if importlib.util.find_spec("gguf") is None:
        raise ModelNotFoundError(f"catalog model '{name}' is a GGUF file ({gguf_file.name}); reading it needs the "
                                 "package 'gguf' (pip install gguf)")
    source.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=source.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = transformers.AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                                  dtype="float32")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
        tmp.rename(source)
    except OSError:
        if not (source / "config.json").is_file():  # not another process that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(source)


def new_classifier(name: str, labels: list[str] | None, pooling: str | None, task: Task = TASKS[DEFAULT_TASK]):
    """A pretrained encoder with a fresh head of the task (mean-pooled when ``pooling`` is mean), plus its tokenizer.

    ``labels``: the class names (None for a task that predicts a score).
    """
    import transformers

    source = model_folder(name)
    config = AutoConfig.from_pretrained(source, **task.head_config(labels))
    head = mean_pool_class(config.model_type) if pooling == "mean" else getattr(transformers, task.auto_model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    # A decoder's classifier reads the last token that is not config.pad_token_id: training batches must be padded
    # with that id. GPT-style checkpoints may name none; they are then padded (and masked) with EOS.
    if config.pad_token_id is not None and tokenizer.pad_token_id != config.pad_token_id:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    elif tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id
    return head.from_pretrained(source, config=config), tokenizer


EMBEDDING_POOLINGS = ("mean", "cls")  # what _EmbeddingHead computes


def new_embedder(name: str, pooling: str | None = None, normalize: bool | None = None):
    """A pretrained encoder as a sentence-embedding model, plus its tokenizer; pooling and normalisation as given,
    else as the checkpoint's sentence-transformers files say (``sentence_transformers_setup``), else mean and none."""
    from edgetl.models import sentence_transformers_setup

    source = model_folder(name)
    found = sentence_transformers_setup(source)
    pooling = pooling or found.get("pooling", "mean")
    if pooling not in EMBEDDING_POOLINGS:  # mean-pooling a max-pooled checkpoint would give vectors it never made
        raise ArchitectureError(f"{source}: its sentence-transformers Pooling module pools by '{pooling}', and edgetl "
                                f"pools by {' or '.join(EMBEDDING_POOLINGS)} only: set stages.pretrained.pooling to "
                                "one of them to take the checkpoint anyway (its vectors will not be the ones it "
                                "was trained to give)")
    config = AutoConfig.from_pretrained(source)
    config.sentence_pooling = pooling  # new keys: from_pretrained drops them as kwargs
    config.sentence_normalize = found.get("normalize", False) if normalize is None else normalize
    return embedding_class(config.model_type).from_pretrained(source, config=config), AutoTokenizer.from_pretrained(source)


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


def load_classifier(folder, task: Task = TASKS[DEFAULT_TASK]):
    """Load a model of the task saved by edgetl (any head it trains, pruned, prompt-tuned or cloze) or a plain HF one."""
    if "cloze" in AutoConfig.from_pretrained(folder).to_dict():
        return load_cloze(folder).eval()
    model = _load_encoder_classifier(folder, task)
    prompt_file = Path(folder) / SOFT_PROMPT_FILE
    if prompt_file.is_file():
        model = SoftPromptClassifier(model, load_file(str(prompt_file))["prompt"])
    return model.eval()


def _load_encoder_classifier(folder, task: Task):
    import transformers

    config = AutoConfig.from_pretrained(folder)
    saved = _saved_head_class(config)
    auto_head = getattr(transformers, task.auto_model)
    sizes = getattr(config, PRUNED_LAYERS, None)
    if sizes is None:
        return (saved or auto_head).from_pretrained(folder)
    # Pruned layers differ in width, which a config cannot say: build the recorded shapes, then load exactly.
    model = saved(config) if saved else auto_head.from_config(config)
    resize_layers(model, sizes)
    model.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=True)
    return model


def _saved_head_class(config) -> type | None:
    """The edgetl head class a saved config's ``architectures`` names (mean-pooled classifier, sentence embedding),
    or None for any other head."""
    saved = config.architectures or []
    for head, suffix in _HEADS.items():
        if not any(name.endswith(suffix) and (head is not _MeanPoolHead or name.startswith("MeanPool")) for name in saved):
            continue
        if head is _EmbeddingHead and not hasattr(config, "sentence_pooling"):
            continue  # a model of another library that happens to end in the same words
        cls = _head_class(head, config.model_type)
        if cls.__name__ not in saved:
            raise ArchitectureError(f"config.architectures {saved} names an edgetl head, but a "
                                    f"{config.model_type} one is {cls.__name__}")
        return cls
    return None


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
    parameters = sum(p.numel() for p in model.parameters())
    if adapter_for(model.config.model_type).family == "decoder":  # encoder_flops counts an encoder's blocks only
        return {"parameters": parameters}
    lengths = [len(ids) for ids in dev_tok["input_ids"]]
    return {"parameters": parameters,
            "gflops_per_text": round(flops_per_text(model, lengths) / 1e9, 4),
            "layers": layer_sizes(model)}

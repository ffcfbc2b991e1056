"""Stages that make the run's first PyTorch model or train one: pretrained, adapt, augment (its data), finetune,
self_train."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from edgetl.recipe.base import Declared, TrainingConfig, _Strict


class PretrainedStage(_Strict, Declared):
    """The recipe's model as it was trained, saved as the run's first PyTorch model: for a task whose pretrained
    checkpoint already does the job (sentence-embedding), so export, INT8 and benchmarks have a model to start from."""

    reads: ClassVar[frozenset[str]] = frozenset({"model"})

    stage: Literal["pretrained"]
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="One vector per text: the attention-masked mean of the last hidden states, or the [CLS] "
        "one. Default: as the checkpoint's sentence-transformers files say, else mean.")
    normalize: bool | None = Field(
        None, description="L2-normalise each vector (cosine similarity becomes a dot product). Default: as the "
        "checkpoint's sentence-transformers files say (a Normalize module), else no.")


class AdaptStage(TrainingConfig, Declared):
    """Continued masked-language-model pretraining on unlabelled in-domain text (DAPT, or TAPT on the task's text)."""

    takes: ClassVar[tuple[str, ...]] = ("encoder",)
    reads: ClassVar[frozenset[str]] = frozenset({"model", "data"})
    distributed: ClassVar[bool] = True

    stage: Literal["adapt"]
    text: str = Field("target", description="'target' (data.target's training texts, labels dropped), 'train' "
                      "(the labelled training texts: task-adaptive), or a file: .txt (one text per line), or "
                      ".jsonl/.csv/.tsv with a text_field column.")
    text_field: str = Field("text", description="Column holding the text when `text` is a jsonl/csv/tsv file.")
    max_texts: int | None = Field(None, ge=2, description="Use at most this many texts (shuffled first).")
    whole_word_mask: bool = Field(True, description="Mask every piece of a word together (BERT's wwm).")
    mlm_probability: float = Field(0.15, gt=0, lt=1, description="Fraction of tokens masked for the masked-LM loss.")
    eval_fraction: float = Field(0.05, gt=0, lt=0.5, description="Texts held out to measure the MLM loss; "
                                 "the checkpoint with the lowest held-out loss is kept.")
    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(16, ge=1)
    eval_steps: int = Field(50, ge=1)


class AugmentStage(_Strict, Declared):
    """More labelled examples from few: token-level edits and contextual substitution by a masked language model."""

    takes: ClassVar[tuple[str, ...]] = ("encoder",)
    reads: ClassVar[frozenset[str]] = frozenset({"data"})

    stage: Literal["augment"]
    copies: int = Field(4, ge=1, description="New texts made from each original (before balancing).")
    operations: list[Literal["swap", "delete", "insert", "contextual"]] = Field(
        default_factory=lambda: ["swap", "delete", "insert"], min_length=1,
        description="Each new text gets one of these, in turn: swap two words, delete words, insert a word of the "
        "same text (synonym-free), or replace words with a masked language model's prediction.")
    rate: float = Field(0.1, gt=0, le=0.5, description="Fraction of a text's words each operation touches (at least one).")
    balance: bool = Field(True, description="Every label ends with as many examples as the largest one: "
                          "smaller labels get more augmented copies.")
    mlm_model: str | None = Field(None, description="Masked language model for 'contextual' (default: the "
                                  "run's adapt stage).")
    seed: int = 42


class DomainAdversarialConfig(_Strict):
    """DANN: a domain classifier on the pooled representation behind a gradient-reversal layer."""

    weight: float = Field(0.1, gt=0, description="Largest gradient-reversal coefficient (lambda); it ramps up "
                          "from 0 as 2 / (1 + exp(-10 p)) - 1 over training progress p.")
    hidden_size: int = Field(256, ge=1, description="Width of the domain classifier's hidden layer.")
    learning_rate: float = Field(1e-3, gt=0, lt=1, description="Learning rate of the domain classifier (a new "
                                 "head at the encoder's rate falls behind the reversed gradient).")
    target_batch_size: int = Field(8, ge=1, description="Unlabelled target texts per training step.")
    target_max_length: int | None = Field(128, ge=8, description="Tokens per target text in the domain loss "
                                          "(null: data.max_length).")


CLOZE_TRAINING = {
    "none": "zero-shot: the pretrained LM head scores the verbaliser words, nothing trains",
    "pet": "PET: every weight trains, the LM head's verbaliser rows are the classifier (cross-entropy over them)",
    "prompt": "P-tuning: only prompt_tokens new vectors at the pattern's {prompt} train; the LM stays frozen",
}


class ClozeConfig(_Strict):
    """Prompt learning as a cloze question: the text goes into a pattern with an answer slot, and the language
    model's own head scores each label by its verbaliser words at that slot."""

    pattern: str = Field(description="The text with {text} (once) and {mask} (once, where the answer goes; last for a "
                         "causal LM, which predicts it as the next token); {prompt} places the trainable vectors "
                         "of train: prompt. Example: '{text} All in all, it was {mask}.'")
    verbalizer: dict[str, list[str]] = Field(
        description="Label -> one or more words, each one token of the model's vocabulary (with the space before "
        "{mask} when the pattern has one); a label scores the mean of its words' logits.")
    train: Literal["none", "pet", "prompt"] = Field(
        "pet", description="; ".join(f"{k}: {v}" for k, v in CLOZE_TRAINING.items()) + ".")
    prompt_tokens: int = Field(4, ge=1, description="train: prompt: vectors placed at {prompt}.")
    verbalizer_search: int = Field(
        0, ge=0, description="Replace the verbaliser by this many words per label, found on the training split: the "
        "whole words whose log-probability at the answer slot most separates that label's rows from the others' "
        "(AutoPrompt's label search; 0: the verbaliser as given).")
    trigger_tokens: int = Field(
        0, ge=0, description="AutoPrompt: this many real vocabulary tokens at {prompt}, searched on the training split "
        "by the loss gradient before any training (0: none).")
    search_steps: int = Field(30, ge=1, description="trigger_tokens: single-position updates, cycling over positions.")
    search_candidates: int = Field(10, ge=1, description="trigger_tokens: tokens tried per update (the best-ranked "
                                   "by the gradient); the lowest batch loss wins if it beats the current token.")
    search_batch_size: int = Field(16, ge=1, description="trigger_tokens: training rows per update.")

    @model_validator(mode="after")
    def _pattern_slots(self) -> ClozeConfig:
        for slot in ("{text}", "{mask}"):
            if self.pattern.count(slot) != 1:
                raise ValueError(f"pattern: needs {slot} exactly once, found {self.pattern.count(slot)} in {self.pattern!r}")
        if self.train == "prompt" and self.trigger_tokens:
            raise ValueError("trigger_tokens: searched tokens and train: prompt's vectors would share {prompt}; use one")
        if self.pattern.count("{prompt}") != (self.train == "prompt" or self.trigger_tokens > 0):
            raise ValueError("pattern: {prompt} marks where train: prompt puts its vectors or trigger_tokens its "
                             f"tokens: once with one of them, never otherwise (train is {self.train}, trigger_tokens "
                             f"{self.trigger_tokens})")
        empty = [label for label, words in self.verbalizer.items() if not words or not all(w.strip() for w in words)]
        if empty:
            raise ValueError(f"verbalizer: labels {empty} need at least one non-empty word")
        return self


class FinetuneStage(TrainingConfig, Declared):
    """Fine-tuning with the task's head: full, LoRA or prompt tuning, optionally domain-adversarial; or a cloze
    question answered by the model's own language-model head (method cloze)."""

    takes: ClassVar[tuple[str, ...]] = ("encoder", "dataset")
    reads: ClassVar[frozenset[str]] = frozenset({"model", "data"})
    distributed: ClassVar[bool] = True

    stage: Literal["finetune"]
    pooling: Literal["cls", "mean"] | None = Field(
        None, description="The vector per text fed to the head: the attention-masked mean of the last hidden states, "
        "or the [CLS] one through the pooler. Default: the task's (mean; none for token-classification, whose head "
        "reads every token).")
    method: Literal["full", "lora", "prompt-tuning", "cloze"] = Field(
        "full", description="full: every weight trains; lora: low-rank adapters (peft), merged into the weights "
        "afterwards; prompt-tuning: a trained soft prompt and head, the encoder frozen (PyTorch only); cloze: no new "
        "head, the language-model head answers a pattern (see cloze).")
    lora_r: int = Field(8, ge=1, description="method: lora: rank of the low-rank update matrices.")
    lora_alpha: int = Field(16, ge=1, description="method: lora: scaling of the update (alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="method: lora: dropout on the LoRA input.")
    lora_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1,
                                    description="Linear layers (by name) that get LoRA adapters.")
    prompt_tokens: int = Field(20, ge=1, description="prompt-tuning: virtual tokens in the soft prompt.")
    cloze: ClozeConfig | None = Field(None, description="method: cloze: the pattern, verbaliser and what trains.")
    domain_adversarial: DomainAdversarialConfig | None = Field(
        None, description="Train against a domain classifier on labelled source plus unlabelled data.target text.")
    ema_decay: float | None = Field(
        None, gt=0, lt=1, description="Keep an exponential moving average of the weights (decay per step; 0.999 "
        "averages over about the last 1,000 steps): the average is evaluated, checkpointed and kept, and the "
        "training weights' dev accuracy is logged beside it.")
    rdrop_alpha: float | None = Field(
        None, gt=0, description="R-Drop (Liang et al. 2021): each batch goes through the model twice under "
        "different dropout, and the loss adds alpha times the symmetric KL divergence of the two predictions "
        "(about 1.5x the fine-tuning time on SST-2 on a CPU).")

    @model_validator(mode="after")
    def _one_extra_loss(self) -> FinetuneStage:
        if self.rdrop_alpha is not None and self.domain_adversarial is not None:
            raise ValueError("rdrop_alpha and domain_adversarial both change the training loss; use one of them")
        if (self.method == "cloze") != (self.cloze is not None):
            raise ValueError("cloze: set it with method: cloze (the pattern and verbaliser), and only then")
        if self.method == "cloze" and (self.domain_adversarial is not None or self.rdrop_alpha is not None):
            raise ValueError("method: cloze trains through the verbaliser alone; domain_adversarial and rdrop_alpha "
                             "read a classification head it does not have")
        return self


class MetaStage(_Strict, Declared):
    """Meta-learning an initialisation that adapts fast to a new domain (Reptile, Nichol et al. 2018): episodes of a
    few training steps on one labelled source at a time; after each, the shared weights move part of the way
    towards the adapted ones. The finetune stage then adapts the result to the recipe's own labelled rows."""

    takes: ClassVar[tuple[str, ...]] = ("encoder",)
    reads: ClassVar[frozenset[str]] = frozenset({"model", "data"})

    stage: Literal["meta"]
    sources: list[str] = Field(min_length=1, description="Labelled source tasks, one episode at a time, in turn: "
                               "'sst2', an Amazon domain (books, dvd, electronics, kitchen) or a folder with "
                               "train.jsonl rows {text, label}; never data.target, whose labels the test split holds.")
    steps: int = Field(100, ge=1, description="Episodes (meta-updates).")
    inner_steps: int = Field(4, ge=1, description="Training steps per episode, on one source.")
    batch_size: int = Field(16, ge=1, description="Rows per inner step.")
    learning_rate: float = Field(5e-5, gt=0, lt=1, description="Inner AdamW learning rate (a fresh optimizer per episode).")
    meta_learning_rate: float = Field(0.5, gt=0, le=1, description="Outer step: the share of the way towards the "
                                      "adapted weights, decaying linearly to 0 over the episodes.")
    max_length: int = Field(128, ge=8, description="Tokens per source row (cut as data.truncation says).")
    max_rows_per_source: int = Field(2000, ge=1, description="Rows read from each source (a fixed shuffle).")
    pooling: Literal["cls", "mean"] = Field("mean", description="The classifier's pooling, as finetune's.")
    checkpoint_steps: int = Field(20, ge=1, description="Save the meta-weights every this many episodes; a rerun "
                                  "resumes from the last save.")
    algorithm: Literal["reptile", "joint"] = Field(
        "reptile", description="reptile: meta-learning as above. joint: the control, multi-source fine-tuning on "
        "the same batches in the same order with one AdamW throughout (no episodes, no outer step; "
        "meta_learning_rate unused).")
    seed: int = 42


class SelfTrainStage(TrainingConfig, Declared):
    """Self-training on the unlabelled target domain: pseudo-label its texts, keep the surest, train on them
    with labelled rows mixed in; repeat."""

    takes: ClassVar[tuple[str, ...]] = ("pytorch-model",)
    reads: ClassVar[frozenset[str]] = frozenset({"data"})
    distributed: ClassVar[bool] = True

    stage: Literal["self_train"]
    rounds: int = Field(2, ge=1, description="Pseudo-label / train rounds; round k of n keeps fraction x k/n.")
    fraction: float = Field(0.8, gt=0, le=1, description="Share of the target texts pseudo-labelled in the last "
                            "round (surest first).")
    balance: bool = Field(True, description="Same number of pseudo-labels for every label (assumes the target's "
                          "labels are roughly balanced); false: each predicted label keeps its own share.")
    source_ratio: float = Field(1.0, ge=0, description="Labelled rows mixed in per pseudo-labelled text, so the "
                                "model keeps what the labels taught it.")
    epochs: float = Field(1.0, gt=0, description="Epochs over each round's mixed data.")
    learning_rate: float = Field(2e-5, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)
    keep: Literal["best", "last"] = Field("last", description="last: no target labels are read to choose weights "
                                          "(best would choose on the labelled data's dev split, not the target).")

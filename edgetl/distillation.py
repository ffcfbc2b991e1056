"""Knowledge distillation with HF Trainer: soft targets or output vectors, hidden states and attention maps from a
frozen teacher.

Used by ``distill`` (a smaller student), ``prune`` (recovery from the unpruned model) and QAT (the
fake-quantized model learns from its FP32 self). What the student learns is the task's ``distillation``
(``edgetl.tasks.DISTILLATION``): a classifier the teacher's soft targets and the labels, an embedding model the
teacher's vectors on unlabelled text (Reimers and Gurevych 2020).
"""

from __future__ import annotations

import copy
import itertools
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgetl.architectures.torch_ops import keep_layers
from edgetl.modeling import encoder_layers
from edgetl.recipe import DistillationConfig, TransferText
from edgetl.training import Trainer


def shallow_copy(teacher, layers: list[int]):
    """A student keeping the given teacher layers, embeddings and head (DistilBERT's initialisation)."""
    student = copy.deepcopy(teacher)
    keep_layers(student, sorted(layers))
    return student


def every_other_layer(teacher) -> list[int]:
    return list(range(0, len(encoder_layers(teacher)), 2))


LAYER_CHOICE_TEXTS = 512  # training texts the candidate copies are scored on
EXHAUSTIVE_SUBSETS = 200  # more subsets than this: layers are dropped one at a time instead


def choose_layers(cfg: DistillationConfig, teacher, depth: int, rows, collator, objective: str) -> tuple[list[int], dict]:
    """The ``depth`` teacher layers whose untrained copy (``shallow_copy``) is closest to the teacher: the lowest
    teacher term of the objective (``OBJECTIVES``; soft targets alone for a classifier, the labels play no part)
    on a seeded draw of ``rows`` (tokenized training rows). Every subset is scored where there are at most
    ``EXHAUSTIVE_SUBSETS``; else, from all layers, the layer whose removal raises the loss least is dropped until
    ``depth`` remain. Returns the layers and every scored subset's loss, lowest first."""
    from tqdm import tqdm

    count, cfg = len(encoder_layers(teacher)), cfg.model_copy(update={"kd_weight": 1.0})
    if depth > count:
        raise ValueError(f"depth {depth}: the teacher has {count} layers")
    sample = rows.shuffle(seed=cfg.seed).select(range(min(LAYER_CHOICE_TEXTS, len(rows))))
    batches = [dict(collator([sample[j] for j in range(i, min(i + 64, len(sample)))])) for i in range(0, len(sample), 64)]
    labels = [b.pop("labels") for b in batches]
    teacher = teacher.eval()
    with torch.no_grad():
        targets = [teacher(**b).logits.float() for b in batches]
    scores: dict[tuple[int, ...], float] = {}

    def score(layers: tuple[int, ...]) -> float:
        student = shallow_copy(teacher, list(layers))
        with torch.no_grad():
            total = sum(OBJECTIVES[objective](cfg, student(**b).logits.float(), target, y).item() * len(y)
                        for b, target, y in zip(batches, targets, labels, strict=True))
        scores[layers] = total / len(sample)
        return scores[layers]

    if math.comb(count, depth) <= EXHAUSTIVE_SUBSETS:
        subsets = list(itertools.combinations(range(count), depth))
        best = min(tqdm(subsets, desc=f"distill: scoring {len(subsets)} sets of {depth} teacher layers"), key=score)
    else:
        best = tuple(range(count))
        with tqdm(total=count - depth, desc=f"distill: dropping teacher layers down to {depth}") as progress:
            while len(best) > depth:
                best = min((tuple(x for x in best if x != drop) for drop in best), key=score)
                progress.update()
    return list(best), {",".join(map(str, k)): v for k, v in sorted(scores.items(), key=lambda kv: kv[1])}


class StudentWithProjections(nn.Module):
    """The student plus the learned maps from its hidden width to the teacher's (trained, never exported)."""

    def __init__(self, student, teacher_width: int, use_hidden: bool):
        super().__init__()
        self.student = student
        width = student.config.hidden_size
        count = student.config.num_hidden_layers + 1 if use_hidden and width != teacher_width else 0
        self.projections = nn.ModuleList(nn.Linear(width, teacher_width) for _ in range(count))

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=False, output_attentions=False):
        # Only when given: DistilBERT's and MPNet's forward have no token_type_ids argument at all.
        types = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, **types,
                           output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        if not (output_hidden_states or output_attentions):
            return {"logits": out.logits}
        hidden = out.hidden_states
        if hidden is not None and len(self.projections):
            hidden = tuple(p(h) for p, h in zip(self.projections, hidden, strict=True))
        return {"logits": out.logits, "hidden_states": hidden, "attentions": out.attentions}


def layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """Teacher hidden-state index matched to each student one (0 = embeddings), spread evenly (TinyBERT)."""
    return [round(i * teacher_layers / student_layers) for i in range(student_layers + 1)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def soft_target_loss(cfg: DistillationConfig, s_logits: torch.Tensor, t_logits: torch.Tensor, labels) -> torch.Tensor:
    """(1 - kd_weight) * task CE + kd_weight * T^2 KL(soft targets)."""
    temperature = cfg.temperature
    soft = F.kl_div(F.log_softmax(s_logits / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature**2
    labelled = labels >= 0  # extra unlabelled text carries label -100: soft targets only
    task = F.cross_entropy(s_logits[labelled], labels[labelled]) if labelled.any() else s_logits.sum() * 0
    return (1 - cfg.kd_weight) * task + cfg.kd_weight * soft


def vector_loss(cfg: DistillationConfig, s_vectors: torch.Tensor, t_vectors: torch.Tensor, labels) -> torch.Tensor:
    """The mean squared error between the student's and the teacher's output vectors (sentence-transformers'
    MSELoss); labels, temperature and kd_weight play no part."""
    return F.mse_loss(s_vectors, t_vectors)


# Task.distillation -> the output term of the loss (edgetl.tasks.DISTILLATION says what each one trains on).
OBJECTIVES = {"soft_targets": soft_target_loss, "vectors": vector_loss}


def distillation_loss(cfg: DistillationConfig, student_out: dict, teacher_out, labels, attention_mask,
                      objective: str = "soft_targets") -> torch.Tensor:
    """The objective's output term (``OBJECTIVES``) + the optional hidden and attention terms."""
    loss = OBJECTIVES[objective](cfg, student_out["logits"].float(), teacher_out.logits.float(), labels)
    if cfg.hidden_weight:
        s_hidden, t_hidden = student_out["hidden_states"], teacher_out.hidden_states
        pairs = layer_map(len(s_hidden) - 1, len(t_hidden) - 1)
        mse = sum(_masked_mean((s_hidden[i].float() - t_hidden[j].float()).pow(2).mean(-1), attention_mask)
                  for i, j in enumerate(pairs))
        loss = loss + cfg.hidden_weight * mse / len(pairs)
    if cfg.attention_weight:
        s_att, t_att = student_out["attentions"], teacher_out.attentions
        pairs = layer_map(len(s_att), len(t_att))[1:]
        kl = 0
        for i, j in enumerate(pairs):
            # Heads averaged: pruning and narrower students change the head count, the token-to-token map stays.
            s_map, t_map = s_att[i].float().mean(1), t_att[j - 1].float().mean(1)
            row_kl = (t_map * (t_map.clamp(min=1e-9).log() - s_map.clamp(min=1e-9).log())).sum(-1)
            kl = kl + _masked_mean(row_kl, attention_mask)
        loss = loss + cfg.attention_weight * kl / len(pairs)
    return loss


class DistillationTrainer(Trainer):
    """Trainer whose training loss comes from a frozen teacher. Evaluation: soft targets, the student's
    cross-entropy on the labels (and its accuracy); vectors, the MSE to the teacher's vectors (the selection loss)."""

    def __init__(self, *args, teacher, kd: DistillationConfig, objective: str = "soft_targets", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval()
        for param in self.teacher.parameters():
            param.requires_grad_(False)
        self.kd, self.objective = kd, objective

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        if not model.training and self.objective == "soft_targets":
            out = model(**inputs)
            labelled = labels >= 0
            loss = F.cross_entropy(out["logits"][labelled].float(), labels[labelled])
            return (loss, out) if return_outputs else loss
        training = model.training
        wants = {"output_hidden_states": training and bool(self.kd.hidden_weight),
                 "output_attentions": training and bool(self.kd.attention_weight)}
        with torch.no_grad(), torch.autocast(self.args.device.type, dtype=torch.bfloat16, enabled=self.args.bf16 and training):
            teacher_out = self.teacher(**inputs, **wants)
        out = model(**inputs, **wants)
        if training:
            loss = distillation_loss(self.kd, out, teacher_out, labels, inputs["attention_mask"], self.objective)
        else:  # held-out texts: the output term alone, in FP32, is what selects the checkpoint
            loss = OBJECTIVES[self.objective](self.kd, out["logits"].float(), teacher_out.logits.float(), labels)
        return (loss, out) if return_outputs else loss


def distil(cfg: DistillationConfig, ctx, student, teacher, tokenizer, train_tok, dev_tok, collator, stage: str):
    """Train ``student`` against ``teacher`` with the task's objective (the best checkpoint on ``dev_tok`` kept:
    by accuracy for soft targets, by the MSE for vectors; resumed after a crash); returns the trainer."""
    from edgetl.tasks import task_for
    from edgetl.tasks.text_classification import accuracy
    from edgetl.training import train_and_resume, training_arguments

    objective = task_for(ctx.recipe.task).distillation
    by_accuracy = objective == "soft_targets"
    wrapped = StudentWithProjections(student, teacher.config.hidden_size, use_hidden=bool(cfg.hidden_weight))
    args = training_arguments(cfg, ctx, metric="accuracy" if by_accuracy else "loss")
    trainer = DistillationTrainer(model=wrapped, args=args, train_dataset=train_tok, eval_dataset=dev_tok,
                                  data_collator=collator, compute_metrics=accuracy if by_accuracy else None,
                                  processing_class=tokenizer, teacher=teacher, kd=cfg, objective=objective)
    train_and_resume(trainer, ctx.work_dir, stage)
    return trainer


def transfer_texts(cfg: TransferText, data) -> list[str]:
    """``cfg``'s ``extra_text_file`` texts (cut into sentences if it says so); none without one."""
    from edgetl.data import read_texts, split_sentences

    if not cfg.extra_text_file:
        return []
    texts = read_texts(Path(cfg.extra_text_file).expanduser(), cfg.extra_text_field or data.text_field,
                      f"{cfg.stage}.extra_text_file")
    return [sentence for text in texts for sentence in split_sentences(text)] if cfg.extra_text_sentences else texts


HELD_OUT_TEXTS = 1000  # at most, and at most a tenth of the training texts


def distillation_data(ctx, tokenizer, extra: TransferText | None = None):
    """Tokenized (train, selection) rows of the task's objective; ``extra``'s ``extra_text_file`` texts train only.

    soft_targets: the labelled training split (plus the extra text with label -100, soft targets only) and the dev
    split. vectors: unlabelled texts, every text of the training split's rows (both texts of a pair) once, of which a
    seeded draw of up to ``HELD_OUT_TEXTS`` is held out to select the checkpoint; the dev split is never read.
    """
    import datasets

    from edgetl.data import load_labelled, tokenize
    from edgetl.tasks import task_for
    from edgetl.training import labelled_data

    data, task = ctx.recipe.data, task_for(ctx.recipe.task)
    extra_texts = transfer_texts(extra, data) if extra is not None else []
    if task.distillation == "soft_targets":
        train_tok, dev_tok = labelled_data(ctx, tokenizer)
        if extra_texts:
            rows = datasets.Dataset.from_dict({"text": extra_texts, "label": [-100] * len(extra_texts)})
            train_tok = datasets.concatenate_datasets([train_tok, tokenize(rows, tokenizer, data).cast(train_tok.features)])
        return train_tok, dev_tok
    train = load_labelled(data, task)[0]
    texts = list(dict.fromkeys(t for column in ("text", "text_pair") if column in train.column_names for t in train[column]))
    order = np.random.default_rng(0).permutation(len(texts))
    held = min(HELD_OUT_TEXTS, max(1, len(texts) // 10))
    held_out = [texts[i] for i in order[:held]]
    unseen = set(held_out)
    training = [t for t in dict.fromkeys([texts[i] for i in order[held:]] + extra_texts) if t not in unseen]
    return tuple(tokenize(datasets.Dataset.from_dict({"text": split, "label": [-100] * len(split)}), tokenizer, data)
                 for split in (training, held_out))

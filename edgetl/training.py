"""What every training stage shares: HF Trainer arguments, data, resuming, and the FP32 dev metrics of the result."""

from __future__ import annotations

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from edgetl.data import load_labelled, tokenize
from edgetl.recipe import TrainingConfig
from edgetl.tasks import DEFAULT_TASK, TASKS, Task, task_for

log = logging.getLogger("edgetl")


def last_good_checkpoint(work_dir: Path) -> str | None:
    """Newest ``checkpoint-N`` that Trainer finished writing; half-written ones (killed mid-save) are removed.

    Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so its presence
    marks a complete checkpoint.
    """
    if not work_dir.is_dir():
        return None
    checkpoints = sorted(work_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    good = None
    for checkpoint in checkpoints:
        if (checkpoint / "trainer_state.json").is_file():
            good = checkpoint
        else:
            shutil.rmtree(checkpoint, ignore_errors=True)
    return str(good) if good else None


class ShuffledLengthGroupedSampler(LengthGroupedSampler):
    """HF's batches of similar length, in random order.

    HF's sampler sorts each mega-batch of 50 batches by length and yields it longest first, so the model trains
    from its longest texts down to its shortest every 50 steps, and an evaluation every multiple of 50 steps
    always follows the shortest ones (on SST-2: one- and two-word phrases). Here the longest batch still comes
    first (a memory error shows at once) and a last, smaller batch stays last, so every other batch keeps its
    size; the batches between are shuffled.
    """

    def __iter__(self):
        indices = get_length_grouped_indices(self.lengths, self.batch_size, generator=self.generator)
        size = self.batch_size
        full = len(indices) // size
        order = [0, *(torch.randperm(full - 1, generator=self.generator) + 1).tolist()] if full else []
        shuffled = [i for b in order for i in indices[b * size:(b + 1) * size]]
        return iter(shuffled + indices[full * size:])


class Trainer(transformers.Trainer):
    """HF Trainer whose length-grouped batches come in random order (:class:`ShuffledLengthGroupedSampler`) and
    whose evaluations run in FP32 even when it trains under bf16 autocast.

    The checkpoint is chosen by its evaluations, and the model ships in FP32: evaluated under bf16, the kept
    checkpoint need not be the best one in FP32, where tiny models differ by a few dev sentences.
    """

    def _get_train_sampler(self, train_dataset=None):
        sampler = super()._get_train_sampler(train_dataset)
        if type(sampler) is LengthGroupedSampler:
            return ShuffledLengthGroupedSampler(sampler.batch_size, lengths=sampler.lengths)
        return sampler

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with fp32_forward(model), _no_cpu_amp(self):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


@contextmanager
def _no_cpu_amp(trainer):
    """Trainer's own bf16 autocast around the loss (CPU AMP) off inside the block."""
    amp, trainer.use_cpu_amp = trainer.use_cpu_amp, False
    try:
        yield
    finally:
        trainer.use_cpu_amp = amp


@contextmanager
def fp32_forward(model):
    """The model's own forward inside the block, without the bf16 autocast wrapper that accelerate puts on it
    when Trainer trains in bf16; the wrapper is back after the block."""
    wrapped = model.__dict__.get("forward")
    if wrapped is None or "_original_forward" not in model.__dict__:
        yield
        return
    model.__dict__["forward"] = model.__dict__["_original_forward"]
    try:
        yield
    finally:
        model.__dict__["forward"] = wrapped


def regularized_dropout(trainer_cls, alpha: float):
    """``trainer_cls`` training with R-Drop: every batch twice through the model (dropout differs), loss = the
    mean cross-entropy of both + ``alpha`` x their symmetric KL divergence. Evaluation is unchanged."""
    class RDropTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            labels = inputs["labels"]
            outputs = model(**{k: torch.cat([v, v]) for k, v in inputs.items() if k != "labels"})
            first, second = outputs.logits.float().chunk(2)
            cross_entropy = (F.cross_entropy(first, labels) + F.cross_entropy(second, labels)) / 2
            p, q = F.log_softmax(first, -1), F.log_softmax(second, -1)
            kl = (F.kl_div(p, q, log_target=True, reduction="batchmean")
                  + F.kl_div(q, p, log_target=True, reduction="batchmean")) / 2
            loss = cross_entropy + alpha * kl
            return (loss, outputs) if return_outputs else loss

    return RDropTrainer


def native_bf16() -> bool:
    """Whether this machine computes bf16 matrix products natively (else autocast would only slow training)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from edgetl.cpu import isa_flags

    return bool({"avx512_bf16", "amx_bf16"} & set(isa_flags()))


def use_bf16(cfg: TrainingConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16())


def data_collator(task: Task, tokenizer):
    """The task's collator: pads each batch to its longest row, labels included."""
    return getattr(transformers, task.collator)(tokenizer, **task.collator_options)


def labelled_data(ctx, tokenizer, encode=None):
    """Tokenized (train, dev) of the recipe's data, as its task reads them (or ``encode``, as ``tokenize`` takes it);
    dev sorted by length, so its batches carry little padding.

    The training rows come from the run's augment stage when it has one.
    """
    data, task = ctx.recipe.data, task_for(ctx.recipe.task)
    train, dev = load_labelled(data, task)
    augmented = ctx.latest("dataset")
    if augmented is not None:
        import datasets

        train = datasets.load_dataset("json", data_files=str(augmented.path / "train.jsonl"), split="train")
        train = train.select_columns(["text", "label"])
    train_tok, dev_tok = (tokenize(split, tokenizer, data, task=task, encode=encode) for split in (train, dev))
    dev_tok = dev_tok.map(lambda row: {"n_tokens": len(row["input_ids"])}).sort("n_tokens").remove_columns("n_tokens")
    return train_tok, dev_tok


def training_arguments(cfg: TrainingConfig, ctx, metric: str = "accuracy"):
    """Trainer arguments of a training stage: evaluate and checkpoint every ``eval_steps``, keep the best
    (highest ``metric``, the task's; lowest if it is the loss), or keep the last weights and never evaluate."""
    return TrainingArguments(
        output_dir=str(ctx.work_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.learning_rate,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        weight_decay=cfg.weight_decay,
        warmup_ratio=cfg.warmup_ratio,
        lr_scheduler_type="linear",
        eval_strategy="steps" if cfg.keep == "best" else "no",
        eval_steps=cfg.eval_steps,
        save_strategy="steps",
        save_steps=cfg.eval_steps,
        save_total_limit=2,  # the best checkpoint is kept on top of this limit
        load_best_model_at_end=cfg.keep == "best",
        metric_for_best_model=metric,
        greater_is_better=metric != "loss",
        group_by_length=cfg.group_by_length,
        bf16=use_bf16(cfg),
        seed=cfg.seed,
        logging_steps=max(1, min(50, cfg.eval_steps)),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        ddp_backend="gloo" if ctx.world_size > 1 and not torch.cuda.is_available() else None,
    )


def train_and_resume(trainer, work_dir: Path, stage: str):
    """``trainer.train()``, resuming from the last complete checkpoint of an interrupted run."""
    resume = last_good_checkpoint(work_dir)
    if resume:
        log.info("%s: resuming from %s", stage, resume)
    trainer.train(resume_from_checkpoint=resume)


class WeightAverage:
    """Exponential moving average of a model's trainable weights, updated after every optimizer step.

    The first updates average over fewer steps (decay ``min(decay, (1 + n) / (10 + n))``, as TensorFlow's
    ExponentialMovingAverage with ``num_updates``), so the average does not cling to the pretrained weights.
    """

    FILE = "weight_average.safetensors"

    def __init__(self, model, decay: float):
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.average = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.updates = 0

    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for name, p in self.params.items():
                self.average[name].lerp_(p.detach().float(), 1 - decay)

    def copy_to_model(self, tensors: dict | None = None) -> None:
        """Write ``tensors`` (default: the average) into the model's trainable weights."""
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_((tensors or self.average)[name])

    @contextmanager
    def applied(self):
        """The model holds the average inside the block and its training weights again after it."""
        training = {name: p.detach().clone() for name, p in self.params.items()}
        self.copy_to_model()
        try:
            yield
        finally:
            self.copy_to_model(training)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.average, str(path), metadata={"updates": str(self.updates), "decay": str(self.decay)})

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            self.updates = int(f.metadata()["updates"])
            for name in self.average:
                self.average[name].copy_(f.get_tensor(name))


def averaging(trainer_cls, decay: float):
    """``trainer_cls`` keeping a :class:`WeightAverage`: the average is what is evaluated (the training
    weights' dev accuracy is logged beside it as ``eval_raw_accuracy``), checkpointed and kept at the end."""
    class Update(TrainerCallback):
        def __init__(self, average: WeightAverage):
            self.average = average

        def on_step_end(self, args, state, control, **kwargs):
            self.average.update()

    class AveragingTrainer(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.average = WeightAverage(self.model, decay)
            self.add_callback(Update(self.average))

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            super().evaluate(eval_dataset, ignore_keys, f"{metric_key_prefix}_raw")
            with self.average.applied():
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

        def _save_checkpoint(self, model, trial):
            # Before Trainer's own files: the trainer_state.json it writes last marks a complete checkpoint.
            if self.args.should_save:
                folder = Path(self._get_output_dir(trial)) / f"checkpoint-{self.state.global_step}"
                folder.mkdir(parents=True, exist_ok=True)
                self.average.save(folder / WeightAverage.FILE)
            super()._save_checkpoint(model, trial)

        def train(self, resume_from_checkpoint=None, **kwargs):
            if resume_from_checkpoint:
                self.average.load(Path(resume_from_checkpoint) / WeightAverage.FILE)
                log.info("weight average of %d steps restored from %s", self.average.updates, resume_from_checkpoint)
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
            best = self.state.best_model_checkpoint
            if best and self.args.load_best_model_at_end:
                self.average.load(Path(best) / WeightAverage.FILE)
            self.average.copy_to_model()
            return output

    return AveragingTrainer


def without_autocast(model):
    """Undo the bf16 autocast wrapper that accelerate puts around ``forward`` when Trainer trains in bf16
    (it stays on the module after training, so a later forward would still run in bf16)."""
    for module in model.modules():
        if "_original_forward" in module.__dict__:
            del module.__dict__["_original_forward"]
            module.__dict__.pop("forward", None)  # back to the class's own forward
    return model


def logits_of(model, dataset, collator, batch_size: int, bf16: bool = False) -> np.ndarray:
    """A PyTorch classifier's logits over a tokenized dataset (its labels, if any, unused), in FP32 unless ``bf16``."""
    without_autocast(model).eval()
    out = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch.pop("labels", None)
            out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out)


def fp32_metrics(model, dataset, collator, batch_size: int, compute_metrics) -> dict:
    """``compute_metrics`` (Trainer's kind) of the kept model in FP32, as it is exported (with no bf16 wrapper
    left on it). Batches of tokens of different lengths are padded with -100, as Trainer pads them."""
    from transformers.trainer_pt_utils import nested_concat

    without_autocast(model).eval()
    logits = labels = None
    with torch.inference_mode():
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator):
            batch_labels = batch.pop("labels").numpy()
            batch_logits = model(**batch).logits.float().numpy()
            logits = batch_logits if logits is None else nested_concat(logits, batch_logits, padding_index=-100)
            labels = batch_labels if labels is None else nested_concat(labels, batch_labels, padding_index=-100)
    return compute_metrics((logits, labels))


def task_metrics(model, tokenizer, dev_tok, collator, batch_size: int, ctx) -> dict:
    """The task's dev metrics of a PyTorch model in FP32: ``fp32_metrics`` on the tokenized dev split, or, for a task
    with no Trainer-style ``compute_metrics`` (a pair's score needs two vectors), as the evaluate stage scores it."""
    task = task_for(ctx.recipe.task)
    if task.compute_metrics is None:
        return output_metrics(model, tokenizer, ctx, batch_size)
    config = model.config
    labels = [config.id2label[i] for i in range(config.num_labels)]
    return fp32_metrics(model, dev_tok, collator, batch_size, task.compute_metrics(labels))


def output_metrics(model, tokenizer, ctx, batch_size: int) -> dict:
    """The task's ``score`` of a PyTorch model's outputs on the evaluation split, the inputs cut and batched by the
    runtime's tokenizer exactly as the evaluate stage cuts and batches them."""
    import tempfile

    from edgetl.backends import TorchEngine
    from edgetl.data import label_names, load_evaluation
    from edgetl.runtime.text import load_tokenizer, predict_outputs

    data, task = ctx.recipe.data, task_for(ctx.recipe.task)
    columns = load_evaluation(data, task)[:]
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        fast = load_tokenizer(folder, data.max_length, data.truncation, data.head_tokens)
    engine = TorchEngine(None, device=str(next(model.parameters()).device), model=without_autocast(model).eval())
    outputs, encodings = (task.predict or predict_outputs)(engine, fast, task.examples(columns), batch_size,
                                                           task.pretokenized)
    return task.score(outputs, encodings, columns, label_names(data, task))


def fp32_accuracy(model, dataset, collator, batch_size: int) -> float:
    """Accuracy of a kept classifier in FP32 (``fp32_metrics`` of text classification)."""
    return fp32_metrics(model, dataset, collator, batch_size, TASKS[DEFAULT_TASK].compute_metrics(None))["accuracy"]


def write_eval_history(trainer, out_dir: Path) -> None:
    """The dev metric that selects checkpoints at every evaluation, as ``eval_history.json`` (with a weight
    average: the average's, and the training weights' as ``eval_raw_<metric>``)."""
    import json

    metric = trainer.args.metric_for_best_model
    log_history = trainer.state.log_history
    raw = {h["step"]: h[f"eval_raw_{metric}"] for h in log_history if f"eval_raw_{metric}" in h}
    history = [h | ({f"eval_raw_{metric}": raw[h["step"]]} if h["step"] in raw else {})
               for h in log_history if f"eval_{metric}" in h]
    (out_dir / "eval_history.json").write_text(json.dumps(history, indent=1))


def finish_training(trainer, model, tokenizer, collator, train_tok, dev_tok, cfg: TrainingConfig, ctx, out_dir: Path,
                    **extra_metrics):
    """Save the kept model (rank 0) and return its artifact: the task's FP32 dev metrics, how it was chosen, its size."""
    from edgetl.artifact import StageOutput
    from edgetl.cloze import ClozeClassifier
    from edgetl.modeling import SoftPromptClassifier, model_stats
    from edgetl.peft_methods import save

    dev_metrics = task_metrics(model, tokenizer, dev_tok, collator, cfg.eval_batch_size, ctx)
    if ctx.rank == 0:
        save(model, out_dir)
        tokenizer.save_pretrained(str(out_dir))
        write_eval_history(trainer, out_dir)
    metrics = {**{name: round(value, 5) for name, value in dev_metrics.items()},
               **training_metrics(trainer, len(train_tok), len(dev_tok)),
               **model_stats(model.model if isinstance(model, (SoftPromptClassifier, ClozeClassifier)) else model, dev_tok),
               **extra_metrics}
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)


def training_metrics(trainer, train_samples: int, eval_samples: int) -> dict:
    """What chose the checkpoint: the best value of the dev metric (evaluated in FP32), its step, the run length."""
    state = trainer.state
    checkpoint = state.best_model_checkpoint
    return {
        "kept": "best" if checkpoint else "last",
        f"selection_{trainer.args.metric_for_best_model}": round(state.best_metric, 5) if state.best_metric is not None else None,
        "best_step": int(Path(checkpoint).name.split("-")[1]) if checkpoint else None,
        "steps": state.global_step,
        "train_samples": train_samples,
        "eval_samples": eval_samples,
        "train_precision": "bf16" if trainer.args.bf16 else "fp32",
    }

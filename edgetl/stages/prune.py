"""Structured pruning (heads, FFN neurons, layers) with recovery distillation, then vocabulary pruning."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from edgetl.artifact import StageOutput
from edgetl.recipe import PruneStage

log = logging.getLogger("edgetl")


def importance_batches(train_tok, collator, samples: int, batch_size: int = 32):
    from torch.utils.data import DataLoader

    subset = train_tok.shuffle(seed=0).select(range(min(samples, len(train_tok))))
    return DataLoader(subset, batch_size=batch_size, collate_fn=collator)


def onnx_p50_ms(model, feeds: list[dict], warmup: int = 10) -> float:
    """Batch-1 median latency of the model exported to ONNX (FP32, unfused) in ONNX Runtime on this machine."""
    import tempfile

    from edgetl.bench.measure import latency_summary, timed_calls
    from edgetl.runtime.engines import open_engine
    from edgetl.stages.export import export_onnx

    with tempfile.TemporaryDirectory() as folder:
        engine = open_engine("onnx", export_onnx(model, Path(folder), opset=17))
    return latency_summary(timed_calls(engine, feeds, warmup))["p50_ms"]


def keep_ratio_for_budget(cfg: PruneStage, model, importance, feeds: list[dict]) -> tuple[float, list[dict]]:
    """The largest common keep ratio for heads and FFN neurons whose pruned model meets the latency budget."""
    from edgetl.errors import StageError
    from edgetl.pruning import apply_plan, make_plan

    trials = []
    for ratio in (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1):
        trial = copy.deepcopy(model)
        apply_plan(trial, make_plan(importance, ratio, ratio, cfg.layers_drop))
        p50 = onnx_p50_ms(trial, feeds)
        trials.append({"keep": ratio, "onnx_fp32_p50_ms": round(p50, 4)})
        log.info("prune: keep %.1f -> ONNX Runtime FP32 p50 %.3f ms (budget %.3f)", ratio, p50, cfg.latency_budget_ms)
        if p50 <= cfg.latency_budget_ms:
            return ratio, trials
    raise StageError(f"prune.latency_budget_ms: even keeping 10 % of heads and FFN neurons the model takes "
                     f"{trials[-1]['onnx_fp32_p50_ms']} ms (budget {cfg.latency_budget_ms}); raise the budget or drop layers")


def structured_plan(cfg: PruneStage, ctx, model, train_tok, collator, objective: str = "soft_targets"):
    """Score and choose what to keep; the plan is saved first, so a resumed run rebuilds the same shapes."""
    from tqdm import tqdm

    from edgetl.pruning import PrunePlan, fisher_importance, magnitude_importance, make_plan, taylor_importance

    saved = ctx.work_dir / "plan.json"
    if saved.is_file():
        record = json.loads(saved.read_text())
        return PrunePlan(**record["plan"]), record["budget_trials"]
    if cfg.importance in ("fisher", "taylor"):
        batches = tqdm(importance_batches(train_tok, collator, cfg.importance_samples), desc="importance", leave=False)
        score = fisher_importance if cfg.importance == "fisher" else taylor_importance
        importance = score(model, batches, objective)
    else:
        importance = magnitude_importance(model)
    heads_keep, ffn_keep, trials = cfg.heads_keep, cfg.ffn_keep, None
    if cfg.latency_budget_ms is not None:
        from edgetl.data import load_labelled
        from edgetl.stages.quantize import encode_texts
        from edgetl.tasks import task_for

        _, dev = load_labelled(ctx.recipe.data, task_for(ctx.recipe.task))
        feeds = encode_texts(ctx.recipe.data, dev["text"][:200], ctx.latest("pytorch-model").path)
        heads_keep, trials = keep_ratio_for_budget(cfg, model, importance, feeds)
        ffn_keep = heads_keep
    plan = make_plan(importance, heads_keep, ffn_keep, cfg.layers_drop)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"plan": plan.__dict__, "budget_trials": trials}))
    return plan, trials


def run(cfg: PruneStage, ctx, out_dir: Path) -> StageOutput:
    from transformers import AutoTokenizer, DataCollatorWithPadding

    from edgetl.distillation import distil, distillation_data, transfer_texts
    from edgetl.modeling import load_classifier, model_stats
    from edgetl.pruning import apply_plan
    from edgetl.tasks import task_for
    from edgetl.training import task_metrics, training_metrics, write_eval_history
    from edgetl.vocab import prune_vocabulary, read_as_pruned, used_token_ids

    task = task_for(ctx.recipe.task)
    source = ctx.latest("pytorch-model")
    model = load_classifier(source.path)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    # Importance and recovery read the rows the task distils on (vectors: unlabelled texts, held-out ones select).
    train_tok, dev_tok = distillation_data(ctx, tokenizer)
    collator = DataCollatorWithPadding(tokenizer)
    metrics = {"before": {k: v for k, v in model_stats(model, dev_tok).items() if k != "layers"}}
    keep = None
    if cfg.vocabulary:
        texts = training_texts(ctx.recipe) + (transfer_texts(cfg, ctx.recipe.data) if cfg.vocabulary_extra_text else [])
        keep = used_token_ids(tokenizer, texts, cfg.vocab_min_count)
    as_pruned = None
    if cfg.structured:
        teacher = copy.deepcopy(model) if cfg.recovery_teacher == "unpruned" else load_classifier(ctx.earliest("pytorch-model").path)
        plan, trials = structured_plan(cfg, ctx, model, train_tok, collator, task.distillation)
        apply_plan(model, plan)
        if keep is not None and cfg.recovery and cfg.vocabulary_in_recovery:
            as_pruned = read_as_pruned(model, tokenizer, keep)  # the teacher, copied before, reads every token
        metrics["kept_heads"], metrics["dropped_layers"] = plan.heads, plan.drop_layers
        if trials:
            metrics["latency_budget_trials"] = trials
        before = task_metrics(model, tokenizer, dev_tok, collator, cfg.eval_batch_size, ctx)[task.metric]
        metrics[f"{task.metric}_before_recovery"] = round(before, 5)
        if cfg.recovery:
            # Recovery: the pruned model learns from the teacher (the model holds the best weights after).
            recovery_tok = distillation_data(ctx, tokenizer, cfg)[0] if cfg.extra_text_file else train_tok
            trainer = distil(cfg, ctx, model, teacher, tokenizer, recovery_tok, dev_tok, collator, "prune")
            metrics.update(training_metrics(trainer, len(recovery_tok), len(dev_tok)))
            write_eval_history(trainer, out_dir)
        del teacher
    if as_pruned is not None:
        as_pruned.remove()
    if keep is not None:
        metrics["vocabulary"] = prune_vocabulary(model, tokenizer, keep, out_dir)
        tokenizer = AutoTokenizer.from_pretrained(out_dir)
        dev_tok = distillation_data(ctx, tokenizer)[1]
        collator = DataCollatorWithPadding(tokenizer)
    else:
        tokenizer.save_pretrained(str(out_dir))
    dev_metrics = task_metrics(model, tokenizer, dev_tok, collator, cfg.eval_batch_size, ctx)
    if ctx.rank == 0:
        model.save_pretrained(str(out_dir))
    metrics = {**{name: round(value, 5) for name, value in dev_metrics.items()}, **model_stats(model, dev_tok), **metrics}
    log.info("prune: %d -> %d parameters", metrics["before"]["parameters"], metrics["parameters"])
    return StageOutput(kind="pytorch-model", precision="fp32", models={"pytorch": {"path": ".", "precision": "fp32"}},
                       metrics=metrics)


def training_texts(recipe) -> list[str]:
    """Every text of the training split's rows (both texts of a pair), which the pruned vocabulary must cover."""
    from edgetl.data import load_labelled
    from edgetl.tasks import task_for

    train = load_labelled(recipe.data, task_for(recipe.task))[0]
    return [text for column in ("text", "text_pair") if column in train.column_names for text in train[column]]

"""Meta-learning an initialisation for few-shot adaptation: Reptile (Nichol et al. 2018, first-order).

An episode copies the meta-weights into the classifier, trains it ``inner_steps`` steps on batches of one source
(a fresh AdamW), and moves the meta-weights ``epsilon`` of the way towards the adapted weights (``epsilon`` decays
linearly from ``meta_learning_rate`` to 0). Sources take turns. The inner loop trains the classifier, never the
meta-weights, which change only in the outer step. The result is a classifier (kind ``encoder``) that the finetune
stage adapts to the recipe's own k labelled rows. Saved every ``checkpoint_steps`` episodes; a rerun resumes.

``algorithm: joint`` is the control: the same batches in the same order, trained by one AdamW straight through
(multi-source fine-tuning, no episodes), so a comparison tells what the meta-update adds to the source data.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from edgetl.artifact import StageOutput
from edgetl.recipe import MetaStage

log = logging.getLogger("edgetl")
CHECKPOINT = "meta-checkpoint.pt"


def source_rows(source: str, cfg: MetaStage, tokenizer, data):
    """A source's labelled training rows, tokenized (at most ``max_rows_per_source``, after a fixed shuffle)."""
    from edgetl.data import load_labelled, tokenize
    from edgetl.recipe import DataConfig

    fields = {"truncation": data.truncation, "head_tokens": data.head_tokens, "max_length": cfg.max_length,
              "max_train_samples": cfg.max_rows_per_source, "max_eval_samples": 1}
    source_cfg = (DataConfig(dataset="sst2", **fields) if source == "sst2"
                  else DataConfig(dataset="target", target=source, **fields))
    train = load_labelled(source_cfg)[0]
    return tokenize(train, tokenizer, source_cfg)


def inner_adapt(model, meta: dict, batches: list[dict], learning_rate: float) -> tuple[dict, list[float]]:
    """The classifier trained on ``batches`` from the meta-weights (copied in; ``meta`` itself is left as it is):
    its weights after training and the losses."""
    model.load_state_dict(meta)
    losses = train_steps(model, torch.optim.AdamW(model.parameters(), lr=learning_rate), batches)
    return {k: v.detach() for k, v in model.state_dict().items()}, losses


def train_steps(model, optimizer, batches: list[dict]) -> list[float]:
    """One optimizer step per batch; the losses."""
    model.train()
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def outer_step(meta: dict, adapted: dict, epsilon: float) -> None:
    """Reptile's update, in place: each floating meta-weight moves ``epsilon`` of the way to the adapted one."""
    with torch.no_grad():
        for name, value in meta.items():
            if value.is_floating_point():
                value.add_(adapted[name] - value, alpha=epsilon)


def reptile(model, sources: dict, collator, cfg: MetaStage, work_dir: Path) -> dict:
    """The meta-weights after ``cfg.steps`` episodes (resuming from ``work_dir``'s checkpoint); the per-episode mean
    inner losses are logged every 10 episodes and returned in the metrics. With ``cfg.algorithm`` joint, the
    weights after training on the same batches with one AdamW throughout."""
    work_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = work_dir / CHECKPOINT
    generator = torch.Generator().manual_seed(cfg.seed)
    meta = {k: v.detach().clone() for k, v in model.state_dict().items()}
    joint = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate) if cfg.algorithm == "joint" else None
    start, history = 0, []
    if checkpoint.is_file():
        saved = torch.load(checkpoint, weights_only=False)
        meta, start, history = saved["meta"], saved["step"], saved["history"]
        generator.set_state(saved["generator"])
        if joint:
            model.load_state_dict(meta)
            joint.load_state_dict(saved["optimizer"])
        log.info("meta: resuming after episode %d of %d", start, cfg.steps)
    names = list(sources)
    for step in range(start, cfg.steps):
        rows = sources[names[step % len(names)]]
        picked = torch.randperm(len(rows), generator=generator)[: cfg.inner_steps * cfg.batch_size].tolist()
        batches = [collator([rows[i] for i in picked[j : j + cfg.batch_size]])
                   for j in range(0, len(picked), cfg.batch_size)]
        if joint:
            losses = train_steps(model, joint, batches)
            meta = {k: v.detach() for k, v in model.state_dict().items()}
        else:
            adapted, losses = inner_adapt(model, meta, batches, cfg.learning_rate)
            outer_step(meta, adapted, cfg.meta_learning_rate * (1 - step / cfg.steps))
        history.append(sum(losses) / len(losses))
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            log.info("meta: episode %d/%d, inner loss %.4f (mean of the last 10 episodes)", step + 1, cfg.steps,
                     sum(history[-10:]) / len(history[-10:]))
        if (step + 1) % cfg.checkpoint_steps == 0:
            tmp = checkpoint.with_suffix(".tmp")
            torch.save({"meta": meta, "step": step + 1, "history": history, "generator": generator.get_state(),
                        **({"optimizer": joint.state_dict()} if joint else {})}, tmp)
            tmp.replace(checkpoint)
    model.load_state_dict(meta)
    return {"episodes": cfg.steps, "inner_loss_first_10": round(sum(history[:10]) / len(history[:10]), 4),
            "inner_loss_last_10": round(sum(history[-10:]) / len(history[-10:]), 4)}


def run(cfg: MetaStage, ctx, out_dir: Path) -> StageOutput:
    from edgetl.data import label_names
    from edgetl.modeling import new_classifier
    from edgetl.tasks import task_for
    from edgetl.training import data_collator

    task = task_for(ctx.recipe.task)
    labels = label_names(ctx.recipe.data, task)
    adapted = ctx.latest("encoder")
    torch.manual_seed(cfg.seed)
    model, tokenizer = new_classifier(str(adapted.path) if adapted else ctx.recipe.model, labels, cfg.pooling, task)
    sources = {name: source_rows(name, cfg, tokenizer, ctx.recipe.data) for name in cfg.sources}
    collator = data_collator(task, tokenizer)
    metrics = reptile(model, {k: [dict(r) for r in v] for k, v in sources.items()}, collator, cfg, ctx.work_dir)
    model.eval()
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    metrics["rows_per_source"] = {k: len(v) for k, v in sources.items()}
    return StageOutput(kind="encoder", precision="fp32", metrics=metrics)

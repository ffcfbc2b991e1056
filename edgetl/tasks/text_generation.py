"""text-generation: a GPT-style decoder (causal language model) that continues a prompt, token by token.

The pretrained stage takes the checkpoint as it is, or finetune goes on training it as a causal language model on the
training texts (full or LoRA, the checkpoint of lowest dev loss kept); export keeps its KV cache (optimum's
``text-generation-with-past`` graph), quantize compresses its weights only (``method: weights``, INT8 or group-wise
INT4), and the runtime is ``edgetl.runtime.Generator``. Every artifact is scored on the evaluation split's texts
through the same numpy decoding loop (PyTorch included): perplexity (lower is better) over each text, and greedy
agreement with the first FP32 model: the first ``AGREEMENT_PROMPTS`` texts long enough are cut to their first
``PROMPT_TOKENS`` tokens and continued greedily for ``NEW_TOKENS`` tokens, and each model's continuation is compared
with the reference's token by token.
"""

from __future__ import annotations

from edgetl.tasks import Task
from edgetl.tasks.text_classification import text_problem

AGREEMENT_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 100, 32, 32
_NOT_A_CLASSIFIER = "it reads a distribution over labels; a language model predicts the next token"
_LM_ONLY = "classifier fine-tuning only; a language model is fine-tuned in full or with LoRA"
_STRUCTURE = "decoders are compressed by weight-only INT8/INT4; their distillation and pruning are not written"


def head_config(labels: None) -> dict:
    return {}


def labels_of(columns: dict) -> None:
    return None


def row_problem(row: dict, labels: None) -> tuple[str, str] | None:
    return text_problem(row)


def to_ids(columns: dict, labels: None) -> dict:
    return columns


def encode(batch: dict, tokenizer, cfg, max_length: int) -> dict:
    tokenizer.truncation_side = "right"
    return tokenizer(batch["text"], truncation=True, max_length=max_length)


def examples(columns: dict) -> list:
    return list(columns["text"])


def predict(engine, tokenizer, inputs: list, batch_size: int, is_pretokenized: bool = False,
            desc: str | None = None) -> tuple[list, list]:
    """Per text: [its summed negative log-likelihood, the tokens it predicts, then its greedy continuation's ids
    (-1 where there is none)], through the decoding loop of the runtime."""
    import numpy as np

    from edgetl.runtime.decoding import GenerationSettings, KVCacheDecoder

    decoder = KVCacheDecoder(engine)
    encodings = tokenizer.encode_batch(inputs)
    greedy = GenerationSettings(max_new_tokens=NEW_TOKENS)
    prompts = [i for i, e in enumerate(encodings) if len(e.ids) > PROMPT_TOKENS][:AGREEMENT_PROMPTS]
    rows = range(len(inputs))
    if desc is not None:
        from tqdm import tqdm

        rows = tqdm(rows, desc=desc, leave=False)
    outputs = []
    for i in rows:
        ids = encodings[i].ids
        row = np.full(2 + NEW_TOKENS, -1.0)
        row[:2] = (decoder.negative_log_likelihood(ids), len(ids) - 1) if len(ids) > 1 else (0.0, 0)
        if i in prompts:
            continuation = list(decoder.tokens(ids[:PROMPT_TOKENS], greedy))
            row[2:2 + len(continuation)] = continuation
        outputs.append(row)
    return outputs, encodings


def score(outputs: list, encodings: list, columns: dict, labels: None) -> dict:
    import math

    nll, tokens = sum(o[0] for o in outputs), sum(o[1] for o in outputs)
    return {"perplexity": math.exp(nll / tokens), "nll_per_token": nll / tokens, "tokens": int(tokens)}


def fidelity(outputs: list, reference: list, inputs: list) -> dict:
    """Greedy agreement with the reference model on the same prompts: the share of continuations equal to the
    reference's in every token, and the mean share of tokens equal before the first that differs."""
    import numpy as np

    pairs = [(o[2:], r[2:]) for o, r in zip(outputs, reference, strict=True) if r[2] >= 0]
    if not pairs:
        return {}
    prefix = [int(np.argmin(np.append(o == r, False))) / len(r) for o, r in pairs]
    return {"greedy_exact": float(np.mean([np.array_equal(o, r) for o, r in pairs])),
            "greedy_prefix": float(np.mean(prefix)), "greedy_prompts": len(pairs)}


def check_data(cfg) -> list[str]:
    if cfg.truncation != "right":
        return [f"data.truncation: '{cfg.truncation}'; a language model reads a text from its start: leave it out"]
    return []


TASK = Task(
    name="text-generation",
    optimum_task="text-generation-with-past",
    auto_model="AutoModelForCausalLM",
    collator="DataCollatorForLanguageModeling",
    metric="perplexity",
    metric_scale=1,
    greater_is_better=False,
    columns={"text_field": "text"},
    pooling=None,
    stages=frozenset({"pretrained", "finetune", "export", "quantize", "evaluate", "benchmark", "bundle", "shard"}),
    options=frozenset({"weights", "lora"}),
    reasons={
        "adapt": "adapt trains a masked-LM head; a decoder is a language model already",
        "augment": "augment balances labels; a language model has none",
        "self_train": _NOT_A_CLASSIFIER, "qat": _NOT_A_CLASSIFIER,
        "distill": _STRUCTURE, "prune": _STRUCTURE, "student": _STRUCTURE,
        "pooling": "a language model pools nothing",
        "prompt-tuning": _LM_ONLY, "cloze": _LM_ONLY, "meta": _LM_ONLY, "domain_adversarial": _LM_ONLY, "rdrop_alpha": _LM_ONLY,
        "ptq": "static and dynamic INT8 calibrate activations of a graph without a KV cache; a decoder gets "
               "weight-only INT8/INT4 (quantize.method: weights)",
        "max_accuracy_drop": "accuracy control measures a drop in accuracy; a decoder's weight-only INT8/INT4 is "
                             "judged by perplexity and greedy agreement",
    },
    head_config=head_config,
    labels_of=labels_of,
    row_problem=row_problem,
    to_ids=to_ids,
    encode=encode,
    compute_metrics=None,
    check_data=check_data,
    pretokenized=False,
    examples=examples,
    score=score,
    runtime="Generator",
    fidelity=fidelity,
    reads_pairs=False,
    predict=predict,
    # Logits over a 49k-token vocabulary reach |30|; 30 layers in another operation order move them by up to about
    # 2e-2 on optimum's random validation inputs (SmolLM2), about 1e-3 of their scale.
    export_atol=1e-1,
    bench="edgetl.bench.generation:benchmark",
    collator_options={"mlm": False},
    peft_task_type="CAUSAL_LM",
)

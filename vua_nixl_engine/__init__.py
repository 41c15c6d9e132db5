"""A small paged-KV inference engine on transformers that reuses KV through the vua-nixl store.

``Engine.from_model("tiny" | "qwen2-0.5b" | "/path/to/model_dir", store=KVStore(...))`` builds
or loads a real transformers causal LM (random weights for presets: no hub access is needed),
holds its KV in a paged cache, and on every prefill loads the longest stored prefix from the
store, computes only the rest, and saves new chunks write-behind. See docs/ENGINE.md.
"""

from importlib import import_module
from typing import Any

# Names resolve on first use (PEP 562), so importing a light submodule (the CLI registration in
# ``engine_cli``) never pulls transformers into a process that only wants ``vua-nixl ls``.
_EXPORTS = {
    "Engine": "engine", "Generation": "engine", "PrefillStats": "engine", "Sequence": "engine",
    "namespace_for": "engine", "open_partial_store": "engine",
    "EngineError": "errors", "ModelLoadError": "errors", "OutOfBlocksError": "errors",
    "PromptTooLongError": "errors", "StoreMismatchError": "errors",
    "LoadedModel": "modeldir", "build_preset": "modeldir", "load_model": "modeldir",
    "load_model_dir": "modeldir", "make_model_dir": "modeldir",
    "PagedKVCache": "paged",
    "PRESETS": "presets", "Preset": "presets", "get_preset": "presets",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vua_nixl_engine' has no attribute {name!r}")
    return getattr(import_module(f"vua_nixl_engine.{module}"), name)


__all__ = [
    "Engine",
    "open_partial_store",
    "Generation",
    "PrefillStats",
    "Sequence",
    "namespace_for",
    "EngineError",
    "ModelLoadError",
    "OutOfBlocksError",
    "PromptTooLongError",
    "StoreMismatchError",
    "LoadedModel",
    "build_preset",
    "load_model",
    "load_model_dir",
    "make_model_dir",
    "PagedKVCache",
    "PRESETS",
    "Preset",
    "get_preset",
]

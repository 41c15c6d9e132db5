"""A small paged-KV inference engine on transformers that reuses KV through the vua-nixl store.

``Engine.from_model("tiny" | "qwen2-0.5b" | "/path/to/model_dir", store=KVStore(...))`` builds
or loads a real transformers causal LM (random weights for presets: no hub access is needed),
holds its KV in a paged cache, and on every prefill loads the longest stored prefix from the
store, computes only the rest, and saves new chunks write-behind. See docs/ENGINE.md.
"""

from vua_nixl.engine.engine import Engine, Generation, PrefillStats, Sequence, namespace_for
from vua_nixl.engine.errors import EngineError, ModelLoadError, OutOfBlocksError, PromptTooLongError, StoreMismatchError
from vua_nixl.engine.modeldir import LoadedModel, build_preset, load_model, load_model_dir, make_model_dir
from vua_nixl.engine.paged import PagedKVCache
from vua_nixl.engine.presets import PRESETS, Preset, get_preset

__all__ = [
    "Engine",
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

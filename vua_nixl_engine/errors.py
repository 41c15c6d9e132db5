"""Engine error types.

All derive from :class:`vua_nixl.errors.VuaNixlError` so a serving loop (the Dynamo worker)
can turn them into a clean per-request error instead of crashing mid-serve.
"""

from __future__ import annotations

from vua_nixl.errors import InvalidInputError, VuaNixlError


class EngineError(VuaNixlError):
    """Base class for errors raised by the engine on purpose."""


class ModelLoadError(EngineError, ValueError):
    """A model directory or preset cannot be used: missing files, unknown or unsupported
    architecture, unreadable weights."""


class PromptTooLongError(EngineError, InvalidInputError):
    """The prompt (plus the tokens to generate) exceeds the model's context length."""


class OutOfBlocksError(EngineError, MemoryError):
    """The paged KV cache has no free block left for a sequence."""


class StoreMismatchError(EngineError, ValueError):
    """A KVStore was handed to an engine whose model produces KV of another namespace."""

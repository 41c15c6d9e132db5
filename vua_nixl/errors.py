"""Exception types. Every error the store raises on purpose derives from VuaNixlError, so a
serving loop can tell "bad request / bad store" apart from bugs."""

from __future__ import annotations


class VuaNixlError(Exception):
    """Base class for all vua-nixl errors."""


class InvalidInputError(VuaNixlError, ValueError):
    """Tokens or KV passed by the caller are malformed (shape, dtype, count, values)."""


class LayoutMismatchError(InvalidInputError):
    """KV whose layout or dtype disagrees with the store's namespace."""


class StoreRootError(VuaNixlError, OSError):
    """The store root is missing, not a directory, not writable, or holds an incompatible format."""


class CorruptBlockError(VuaNixlError):
    """A block file failed validation (header, size, namespace, key, tokens or checksum)."""


class BackendUnavailableError(VuaNixlError, RuntimeError):
    """An explicitly requested NIXL backend cannot start on this host."""


class TransferError(VuaNixlError, OSError):
    """A NIXL transfer did not complete. Data it touched must be treated as garbage."""


class CapacityError(VuaNixlError):
    """A single put is larger than the capacity it is allowed to use."""


class SplitFactorError(InvalidInputError):
    """VUA facade: a token count that is not a multiple of ``split_factor``."""

    def __init__(self, n: int, split_factor: int):
        super().__init__(f"{n} tokens is not a multiple of split_factor {split_factor}")


class NewerFormatError(StoreRootError):
    """A root or block written by a newer vua-nixl. Never treated as corrupt: left untouched."""

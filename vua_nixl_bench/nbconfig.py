"""Reading, checking and writing nixlbench ``--config_file`` TOML files.

The same file drives two things: nixlbench itself on a GPU host, and ``vua-nixl bench storage``,
which replays the file's matrix through the NIXL Python API and through the vua_nixl store. Both
must agree on what the file means, so the derived quantities (block/batch sweep, per-thread
iteration counts, buffer checks) follow nixlbench's own rules from ``utils.cpp`` / ``main.cpp``:

* block sizes double from ``start_block_size`` to ``max_block_size``; batch sizes likewise;
* ``num_iter`` and ``warmup_iter`` are rounded *up* to a multiple of
  ``num_threads * large_blk_iter_ftr``, then split evenly across threads, and divided by
  ``large_blk_iter_ftr`` for blocks above 1 MiB;
* ``max_block_size * max_batch_size`` must fit in ``total_buffer_size / num_threads``.
"""

from __future__ import annotations

import logging
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from vua_nixl.errors import InvalidInputError

from .flags import (
    CONFIG_FILE_KEYS,
    LARGE_BLOCK_SIZE,
    NIXLBENCH_FLAGS,
    STORAGE_BACKENDS,
    backend_of_key,
    check_value,
    flag_default,
)

log = logging.getLogger(__name__)


class ConfigError(InvalidInputError):
    """A nixlbench config that nixlbench would reject or silently misread."""


def format_bytes(n: int | float) -> str:
    """Human-readable binary size (``1048576`` -> ``1 MiB``) for comments and tables."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B" or n != int(n):
                return f"{n:.4g} {unit}" if unit != "B" else f"{int(n)} B"
            return f"{int(n)} {unit}"
        n /= 1024
    raise AssertionError("unreachable")



def doubling(start: int, stop: int) -> list[int]:
    """``start, 2*start, ...`` up to and including ``stop`` (nixlbench's sweep rule)."""
    if start <= 0:
        raise ConfigError(f"sweep start must be positive, got {start}")
    out = []
    v = start
    while v <= stop:
        out.append(v)
        v *= 2
    return out


@dataclass
class NixlbenchConfig:
    """A resolved nixlbench configuration: defaults overlaid with a TOML file's values.

    ``explicit`` keeps only the keys that were set (by the file or by code), which is what gets
    written back out, so generated files stay short and defaults stay nixlbench's to change.
    """

    explicit: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    comment: str = ""
    #: values nixlbench would not use as written (it falls back to its default for them)
    warnings: list[str] = field(default_factory=list)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> "NixlbenchConfig":
        """Load and validate a config file; raises ConfigError on keys/types nixlbench rejects."""
        path = Path(path)
        with path.open("rb") as f:
            data = tomllib.load(f)
        cfg = cls(source=path)
        cfg.update(data)
        return cfg

    @classmethod
    def from_dict(cls, values: dict[str, Any], comment: str = "") -> "NixlbenchConfig":
        cfg = cls(comment=comment)
        cfg.update(values)
        return cfg

    def update(self, values: dict[str, Any]) -> None:
        """Set flags after checking names and TOML types (nested tables are not flags)."""
        problems = []
        for key, value in values.items():
            if isinstance(value, dict):
                problems.append(f"[{key}] is a table; nixlbench only reads top-level keys")
                continue
            if key not in CONFIG_FILE_KEYS:
                why = "config_file cannot be set inside a config file" if key == "config_file" else (
                    f"unknown nixlbench flag {key!r}"
                )
                problems.append(why)
                continue
            used, bad, warn = check_value(key, value)
            if bad:
                problems.append(bad)
                continue
            if warn:  # nixlbench runs with its default: so do we, and say so
                self.warnings.append(warn)
                log.warning("nixlbench config%s: %s", f" {self.source}" if self.source else "", warn)
                self.explicit.pop(key, None)
                continue
            self.explicit[key] = used
        if problems:
            where = f" in {self.source}" if self.source else ""
            raise ConfigError(f"invalid nixlbench config{where}: " + "; ".join(problems))

    # -- access -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        if name not in NIXLBENCH_FLAGS:
            raise KeyError(name)
        return self.explicit.get(name, flag_default(name))

    @property
    def backend(self) -> str:
        return str(self["backend"])

    @property
    def op(self) -> str:
        return str(self["op_type"]).upper()

    @property
    def direct(self) -> bool:
        return bool(self["storage_enable_direct"])

    @property
    def num_threads(self) -> int:
        return int(self["num_threads"])

    @property
    def name(self) -> str:
        return self.source.stem if self.source else "config"

    def block_sizes(self) -> list[int]:
        return doubling(int(self["start_block_size"]), int(self["max_block_size"]))

    def batch_sizes(self) -> list[int]:
        return doubling(int(self["start_batch_size"]), int(self["max_batch_size"]))

    def matrix(self) -> Iterator[tuple[int, int]]:
        """(block, batch) pairs in nixlbench's order: blocks outer, batches inner."""
        for block in self.block_sizes():
            for batch in self.batch_sizes():
                yield block, batch

    def rounded_iters(self) -> tuple[int, int]:
        """(num_iter, warmup_iter) after nixlbench rounds them up to a multiple of
        ``num_threads * large_blk_iter_ftr`` so every thread gets the same share."""
        part = self.num_threads * int(self["large_blk_iter_ftr"])
        n, w = int(self["num_iter"]), int(self["warmup_iter"])
        if n % part:
            n += part - n % part
        if w % part:
            w += part - w % part
        return n, w

    def iters_for_block(self, block_size: int) -> tuple[int, int]:
        """(timed iterations per thread, warmup iterations per thread) for one block size."""
        n, w = self.rounded_iters()
        per_thread, skip = n // self.num_threads, w // self.num_threads
        if block_size > LARGE_BLOCK_SIZE:
            ftr = int(self["large_blk_iter_ftr"])
            per_thread //= ftr
            skip //= ftr
        return per_thread, skip

    def touched_bytes(self) -> int:
        """Bytes of file a run touches at its largest point: threads x max batch x max block.

        nixlbench's storage offsets advance one block per descriptor and restart at 0 for every
        (block, batch) point, so every iteration re-reads the same span; this, not
        total_buffer_size, decides whether a buffered run can outgrow the page cache.
        """
        return self.num_threads * int(self["max_batch_size"]) * int(self["max_block_size"])

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> list[str]:
        """Return nixlbench's own rejections for this config (empty list = it would run)."""
        errs = []
        for key in self.explicit:
            owners = backend_of_key(key)
            if owners and self.backend not in owners:
                errs.append(f"{key} applies to {'/'.join(owners)} only; nixlbench ignores it under backend "
                            f"{self.backend}")
        if self.op not in ("READ", "WRITE"):
            errs.append(f"op_type must be READ or WRITE, got {self['op_type']!r}")
        if self.backend == "POSIX" and self["posix_api_type"] not in ("AIO", "URING", "POSIXAIO"):
            errs.append(f"posix_api_type must be AIO, URING or POSIXAIO, got {self['posix_api_type']!r}")
        if int(self["num_iter"]) < 1:
            errs.append("num_iter must be >= 1")
        if int(self["pipeline_depth"]) < 1:
            errs.append("pipeline_depth must be >= 1")
        if self.num_threads < 1:
            errs.append("num_threads must be >= 1")
        if int(self["start_block_size"]) > int(self["max_block_size"]):
            errs.append("start_block_size > max_block_size: the sweep would be empty")
        if int(self["start_batch_size"]) > int(self["max_batch_size"]):
            errs.append("start_batch_size > max_batch_size: the sweep would be empty")
        total = int(self["total_buffer_size"])
        need = int(self["max_block_size"]) * int(self["max_batch_size"])
        if self.num_threads >= 1 and need > total // self.num_threads:
            errs.append(
                f"max_block_size*max_batch_size ({need}) > total_buffer_size/num_threads "
                f"({total // max(self.num_threads, 1)})"
            )
        if self.num_threads >= 1 and total % (self.num_threads * int(self["num_initiator_dev"])):
            errs.append("total_buffer_size must be divisible by num_threads*num_initiator_dev")
        if self.direct:
            for key in ("start_block_size", "max_block_size"):
                if int(self[key]) % 4096:
                    errs.append(f"{key}={self[key]} is not a multiple of 4096, required by O_DIRECT")
        return errs

    def is_storage(self) -> bool:
        return self.backend in STORAGE_BACKENDS

    # -- output -------------------------------------------------------------------------------
    def to_toml(self, header: str | None = None) -> str:
        """Serialize the explicit keys as a flat TOML file nixlbench reads (ints, bools, strings)."""
        lines = []
        text = header if header is not None else self.comment
        for line in text.strip("\n").splitlines() if text else []:
            lines.append(f"# {line}".rstrip())
        if lines:
            lines.append("")
        for key in NIXLBENCH_FLAGS:  # stable order: nixlbench's own
            if key not in self.explicit:
                continue
            lines.append(f"{key} = {_toml_value(self.explicit[key])}" + _size_comment(key, self.explicit[key]))
        return "\n".join(lines) + "\n"

    def command_line(self, binary: str = "nixlbench", config_file: str | None = None,
                     overrides: dict[str, Any] | None = None) -> str:
        """The equivalent nixlbench invocation (flags, or ``--config_file`` plus overrides)."""
        parts = [binary]
        if config_file:
            parts.append(f"--config_file={shlex.quote(config_file)}")
            items = dict(overrides or {})
        else:
            items = {**self.explicit, **(overrides or {})}
        for key in NIXLBENCH_FLAGS:
            if key not in items:
                continue
            v = items[key]
            if isinstance(v, bool):
                v = "true" if v else "false"
            parts.append(f"--{key}={shlex.quote(str(v))}")
        return " ".join(parts)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def _size_comment(key: str, v: Any) -> str:
    if key.endswith("_size") and isinstance(v, int) and not isinstance(v, bool) and v >= 1024 and key not in (
        "posix_ios_pool_size", "posix_kernel_queue_size", "gds_batch_pool_size"
    ):
        return f"  # {format_bytes(v)}"
    return ""

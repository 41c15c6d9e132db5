"""One typed configuration object for the store.

Every knob has a default that works on a laptop, and every knob can be overridden from the
environment with the ``VUA_NIXL_`` prefix (``VUA_NIXL_BACKEND=POSIX``, ``VUA_NIXL_FSYNC=1``), so
a Dynamo worker or a Kubernetes pod is configured without code changes. Explicit constructor
arguments win over the environment, which wins over defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, Optional, TypeVar, Union

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vua_nixl.errors import InvalidInputError

ENV_PREFIX = "VUA_NIXL_"

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30, "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
          # Kubernetes quantities (a PVC's "2Ti"), so a manifest's sizes read the same here
          "ki": 1 << 10, "mi": 1 << 20, "gi": 1 << 30, "ti": 1 << 40}


def parse_size(text: Any) -> int:
    """``4096``, ``"4KiB"``, ``"1.5TiB"``, ``"500G"``, ``"2Ti"``, ``"1e6"`` -> bytes (K/M/G/T alone,
    and Kubernetes' Ki/Mi/Gi/Ti, are binary).

    The one size parser of the project: the CLI, the config (``VUA_NIXL_MAX_BYTES=500G``) and
    the bench tools all accept the same spellings.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().replace("_", "")
        i = len(s)
        while i > 0 and s[i - 1].isalpha():
            i -= 1
        num, unit = s[:i].strip(), s[i:].strip().lower()
        try:
            value = int(float(num) * _UNITS[unit])
        except (KeyError, ValueError):
            raise InvalidInputError(f"not a size: {text!r} (examples: 500G, 1.5TiB, 1000000)") from None
    if value <= 0:
        raise InvalidInputError(f"size must be positive: {text!r}")
    return value


Backend = Literal["auto", "GDS", "GDS_MT", "POSIX"]
PosixIO = Literal["auto", "uring", "aio", "posix_aio", "sync"]
EvictionPolicy = Literal["lru", "lfu", "ttl"]
HashOverlap = Literal["auto", "thread", "inline"]


class TypedConfig(BaseSettings):
    """Base of every component config: a bad value (argument or environment) is an
    :class:`InvalidInputError` naming the field and its variable, never a pydantic traceback."""

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise InvalidInputError(describe_validation(type(self), exc)) from None


def describe_validation(model: type[BaseSettings], exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(x) for x in err.get("loc", ()))
        if not name:  # a rule across fields: its message names them
            parts.append(str(err.get("msg")).removeprefix("Value error, "))
            continue
        env = env_var(model, name) if name in model.model_fields else name
        parts.append(f"{name} (env {env}): {err.get('msg')}; got {err.get('input')!r}")
    return f"invalid {model.__name__}: " + "; ".join(parts)


class StoreConfig(TypedConfig):
    model_config = SettingsConfigDict(env_prefix="VUA_NIXL_", extra="forbid", validate_assignment=True)

    root: Path = Field(default=Path("~/.cache/vua-nixl/store"), description="store root directory")
    chunk_tokens: int = Field(default=256, gt=0, description="tokens per block file")
    backend: Backend = Field(default="auto", description="NIXL backend; auto probes GDS, GDS_MT, POSIX")
    posix_io: PosixIO = Field(default="auto", description="POSIX backend I/O engine; auto probes aio (libaio), uring, posix_aio, sync")
    direct_io: bool = Field(default=False, description="open block files with O_DIRECT (GDS always does)")
    fsync: bool = Field(default=False, description="fsync data and directory before publishing a block")
    verify_checksums: bool = Field(default=True, description="check each payload's XXH3 on every load")
    verify_cache_s: float = Field(
        default=0.0, ge=0, description="skip re-hashing a block file this process verified less than this many seconds "
        "ago and whose inode, size, mtime and ctime are unchanged (hot prefixes); 0: hash every load. Not on GDS; "
        "tenant MACs are always checked")
    hash_overlap: HashOverlap = Field(
        default="auto", description="with one I/O lane: where payload checksums run while NIXL moves the bytes: "
        "a helper thread, the calling thread (inline), or auto (a helper thread while a CPU is idle)")
    io_lanes: int = Field(
        default=0, ge=0, description="NIXL agents (each on its own thread) that one large POSIX batch of host memory "
        "is spread over (0: auto, one per usable CPU up to 4 while a CPU is idle; 1: a single agent)")
    pipeline_kib: Optional[int] = Field(
        default=None, ge=1, description="bytes (KiB) per pipelined sub-batch: each is verified right after it moved, "
        "while still in the CPU's cache, and an O_DIRECT put posts each as soon as its files are open (unset: 2048, "
        "measured best on a 2-CPU host; hosts with larger caches may gain from more)")
    stage_max_kib: int = Field(
        default=4608, ge=0, description="block files up to this size (KiB), page cache and host memory, move whole, one "
        "descriptor per file, through a registered slab of the lane that moves them: a put gathers each chunk there "
        "and digests it in one pass, a get verifies it there and copies only good chunks into place (0: every segment "
        "moves as its own descriptor, straight between the KV and the file). Small chunks of real models are dozens "
        "of small segments each; 4608 takes in a 4 MiB chunk with its header, while 16 MiB files read slower staged "
        "(docs/BENCHMARKS.md)")
    file_mode: int = Field(default=0o644, description="permission bits for block files (umask applies)")
    staging_mib: int = Field(default=256, ge=1, description="registered bounce buffer for unregistrable memory")
    output_pool_mib: int = Field(default=1024, ge=0, description="registered memory get() without out= returns results in (0: a fresh tensor per load)")
    presence_ttl_s: float = Field(default=2.0, ge=0, description="how long a positive lookup is trusted")
    presence_entries: int = Field(default=200_000, ge=0, description="bound on the presence cache")
    tmp_max_age_s: float = Field(default=3600.0, ge=0, description="age after which gc removes temp files")
    max_bytes: Optional[int] = Field(default=None, gt=0, description="capacity limit for the store root (e.g. 500G)")
    eviction: EvictionPolicy = Field(default="lru", description="policy used when over max_bytes")
    recycle_pool_mib: int = Field(
        default=0, ge=0, description="evicted block files kept (up to this many MiB, counted against max_bytes) for later "
        "puts to overwrite instead of creating new files: overwriting allocated blocks writes faster, above all with "
        "O_DIRECT (docs/BENCHMARKS.md). 0: eviction unlinks")
    recycle_after_s: float = Field(
        default=300.0, gt=0, description="a pooled block file is overwritten only this long after its eviction, so any "
        "reader that opened it before has finished; must exceed transfer_timeout_s, and be the same on every host of "
        "the root")
    max_age_s: Optional[float] = Field(default=None, gt=0, description="TTL since last access (ttl policy, gc)")
    access_log: bool = Field(default=True, description="record hits in the shared access log")
    transfer_timeout_s: float = Field(default=120.0, gt=0, description="a storage transfer not done by then is an error")
    agent_name: Optional[str] = Field(default=None, description="NIXL agent name; unique per process by default")
    gds_max_ios: int = Field(default=128, ge=1, description="I/Os per GDS/GDS_MT request (cuFile batch size); larger transfers are split")
    gds_split_mib: int = Field(default=16, ge=1, description="descriptor size at which the GDS plugin splits I/Os (MiB)")
    gds_mt_threads: Optional[int] = Field(default=None, ge=1, description="GDS_MT worker threads (NIXL default when unset)")
    gds_batch_pool: Optional[int] = Field(default=None, ge=1, description="GDS batches per agent (NIXL default 16 when unset)")
    gds_compat: bool = Field(default=False, description="let auto pick GDS/GDS_MT where cuFile has only compat mode (no nvidia-fs): slower than POSIX, for exercising the GDS path")
    low_water: float = Field(default=0.9, gt=0, le=1, description="over a limit, evict down to this fraction of it")
    prune_period_s: float = Field(default=60.0, gt=0, description="seconds between background pruning rounds")
    lease_s: float = Field(default=10.0, gt=0, description="root lease: holders renew every lease_s/3")
    lease_margin_s: float = Field(default=5.0, ge=0, description="root lease: broken after lease_s + this, unrenewed")
    lease_wait_s: float = Field(default=300.0, gt=0, description="root lease: give up acquiring after this long")
    ledger_rescan_s: float = Field(default=30.0, gt=0, description="a guard rescans the root at least this often")

    @model_validator(mode="after")
    def _recycle_after_reads(self) -> "StoreConfig":
        if self.recycle_after_s <= self.transfer_timeout_s:
            raise ValueError(f"recycle_after_s ({self.recycle_after_s:g} s, env VUA_NIXL_RECYCLE_AFTER_S) must exceed "
                             f"transfer_timeout_s ({self.transfer_timeout_s:g} s, env VUA_NIXL_TRANSFER_TIMEOUT_S): a reader "
                             "still inside its deadline could see a recycled file rewritten under it")
        return self

    @field_validator("root", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("max_bytes", mode="before")
    @classmethod
    def _size(cls, v: object) -> object:
        return None if v is None or v == "" else parse_size(v)

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal(cls, v: object) -> object:
        if isinstance(v, str):
            try:
                return int(v, 8)
            except ValueError:
                raise ValueError("must be an octal mode such as 644") from None
        return v

    @field_validator("file_mode", mode="after")
    @classmethod
    def _safe_mode(cls, v: int) -> int:
        # Block files are shared read-mostly data: no setuid/setgid/sticky bit, no world write.
        if v & ~0o775:
            raise ValueError(f"mode {v:o} adds bits outside 775 (setuid, setgid, sticky or world-write)")
        return v


# ---- command-line flags generated from config fields ---------------------------------------------

C = TypeVar("C", bound=BaseSettings)


def env_var(model: type[BaseSettings], name: str) -> str:
    """The environment variable that sets field ``name`` of ``model``."""
    return (str(model.model_config.get("env_prefix") or "") + name).upper()


def _flag_type(annotation: Any) -> tuple[Any, dict[str, Any]]:
    """argparse keyword arguments for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType) and len(args) == 1:
        return _flag_type(args[0])
    if origin is Literal:
        return str, {"choices": list(args)}
    if annotation is bool:
        return None, {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float):
        return annotation, {}
    return str, {}


def add_config_flags(parser: argparse.ArgumentParser | Any, model: type[BaseSettings],
                     fields: Optional[Iterable[str]] = None, *, flags: Optional[dict[str, str]] = None) -> None:
    """One ``--flag`` per field of ``model`` (all, or ``fields``), named after the field (or
    ``flags[field]``), with its env var and default in the help. Flags default to None so an
    absent flag lets the environment (then the field default) decide."""
    flags = flags or {}
    for name in fields or model.model_fields:
        info = model.model_fields[name]
        ftype, extra = _flag_type(info.annotation)
        if name == "max_bytes":
            ftype = _size_arg
        default = info.default if info.default is not None else "none"
        help_ = f"{info.description or name} (env {env_var(model, name)}; default {default})"
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": help_.replace("%", "%%"), **extra}
        if ftype is not None:
            kwargs["type"] = ftype
        parser.add_argument(flags.get(name, "--" + name.replace("_", "-")), **kwargs)


def _size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidInputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from_args(model: type[C], args: argparse.Namespace, **fixed: Any) -> C:
    """``model`` built from the flags that were given (``add_config_flags``), then the
    environment, then defaults; ``fixed`` values win over everything."""
    given = {n: getattr(args, n) for n in model.model_fields if getattr(args, n, None) is not None}
    return model(**{**given, **fixed})

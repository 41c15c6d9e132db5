"""One typed configuration object for the store.

Every knob has a default that works on a laptop, and every knob can be overridden from the
environment with the ``VUA_NIXL_`` prefix (``VUA_NIXL_BACKEND=POSIX``, ``VUA_NIXL_FSYNC=1``), so
a Dynamo worker or a Kubernetes pod is configured without code changes. Explicit constructor
arguments win over the environment, which wins over defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Backend = Literal["auto", "GDS", "GDS_MT", "POSIX"]
PosixIO = Literal["auto", "uring", "aio", "posix_aio", "sync"]
EvictionPolicy = Literal["lru", "lfu", "ttl"]


class StoreConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VUA_NIXL_", extra="forbid", validate_assignment=True)

    root: Path = Field(default=Path("~/.cache/vua-nixl/store"), description="store root directory")
    chunk_tokens: int = Field(default=256, gt=0, description="tokens per block file")
    backend: Backend = Field(default="auto", description="NIXL backend; auto probes GDS, GDS_MT, POSIX")
    posix_io: PosixIO = Field(default="auto", description="POSIX backend I/O engine; auto probes uring, aio")
    direct_io: bool = Field(default=False, description="open block files with O_DIRECT (GDS always does)")
    fsync: bool = Field(default=False, description="fsync data and directory before publishing a block")
    verify_checksums: bool = Field(default=True, description="check each payload's XXH3 on every load")
    file_mode: int = Field(default=0o644, description="permission bits for block files (umask applies)")
    staging_mib: int = Field(default=256, ge=1, description="registered bounce buffer for unregistrable memory")
    presence_ttl_s: float = Field(default=2.0, ge=0, description="how long a positive lookup is trusted")
    presence_entries: int = Field(default=200_000, ge=0, description="bound on the presence cache")
    tmp_max_age_s: float = Field(default=3600.0, ge=0, description="age after which gc removes temp files")
    max_bytes: Optional[int] = Field(default=None, gt=0, description="capacity limit for the store root")
    eviction: EvictionPolicy = Field(default="lru", description="policy used when over max_bytes")
    max_age_s: Optional[float] = Field(default=None, gt=0, description="TTL since last access (ttl policy, gc)")
    access_log: bool = Field(default=True, description="record hits in the shared access log")
    transfer_timeout_s: float = Field(default=120.0, gt=0, description="a storage transfer not done by then is an error")
    agent_name: Optional[str] = Field(default=None, description="NIXL agent name; unique per process by default")

    @field_validator("root", mode="after")
    @classmethod
    def _expand(cls, v: Path) -> Path:
        return v.expanduser()

    @field_validator("file_mode", mode="before")
    @classmethod
    def _octal(cls, v: object) -> object:
        if isinstance(v, str):
            return int(v, 8)
        return v

"""nixlbench's flags: names, value types and defaults.

nixlbench reads every setting from a gflags flag, and its ``--config_file`` TOML accepts the same
names as top-level keys (a flag given on the command line wins over the file). The table below was
written by reading ``benchmark/nixlbench/src/utils/utils.cpp`` of ai-dynamo/nixl at commit
8770b655a6b17b5cdf7d2b56b6e0be5392496df5; ``tests/data/nixlbench_flags.txt`` holds the same names
extracted mechanically from that file, and a test keeps the two in step.

Value types matter more than they look: nixlbench reads a TOML value with
``value<decltype(flag)>()`` and silently falls back to the default when the TOML type does not
match. A size written as ``"1MiB"`` (a string) or a boolean written as ``1`` (an integer) is
therefore ignored without an error, so configs here always use plain integers and TOML booleans.
gflags does not parse unit suffixes either, so command lines carry plain byte counts too.
"""

from __future__ import annotations

from typing import Any

#: Source of the table, for messages and generated files.
FLAGS_SOURCE = (
    "ai-dynamo/nixl benchmark/nixlbench/src/utils/utils.cpp @ 8770b655a6b17b5cdf7d2b56b6e0be5392496df5"
)

# name -> (python type, nixlbench default). Order follows utils.cpp.
NIXLBENCH_FLAGS: dict[str, tuple[type, Any]] = {
    "config_file": (str, ""),
    "benchmark_group": (str, "default"),
    "runtime_type": (str, "ETCD"),
    "worker_type": (str, "nixl"),
    "backend": (str, "UCX"),
    "initiator_seg_type": (str, "DRAM"),
    "target_seg_type": (str, "DRAM"),
    "scheme": (str, "pairwise"),
    "mode": (str, "SG"),
    "op_type": (str, "WRITE"),
    "check_consistency": (bool, False),
    "total_buffer_size": (int, 8 * 1024**3),
    "start_block_size": (int, 4 * 1024),
    "max_block_size": (int, 64 * 1024**2),
    "start_batch_size": (int, 1),
    "max_batch_size": (int, 1),
    "num_iter": (int, 1000),
    "recreate_xfer": (bool, False),
    "reregister_mem": (bool, False),
    "prepared_xfer": (bool, False),
    "pipeline_depth": (int, 1),
    "large_blk_iter_ftr": (int, 16),
    "warmup_iter": (int, 100),
    "num_threads": (int, 1),
    "num_initiator_dev": (int, 1),
    "num_target_dev": (int, 1),
    "enable_pt": (bool, False),
    "progress_threads": (int, 0),
    "enable_vmm": (bool, False),
    "use_hugepages": (bool, False),
    "filepath": (str, ""),
    "filenames": (str, ""),
    "num_files": (int, 1),
    "storage_enable_direct": (bool, False),
    "gds_batch_pool_size": (int, 32),
    "gds_batch_limit": (int, 128),
    "gds_mt_num_threads": (int, 1),
    "device_list": (str, "all"),
    "etcd_endpoints": (str, ""),
    "asio_address": (str, "127.0.0.1"),
    "asio_port": (int, 12345),
    "randomize_location_mode": (str, "none"),
    "randomize_location_mode_seed": (int, 0),
    "posix_api_type": (str, "AIO"),
    "posix_ios_pool_size": (int, 65536),
    "posix_kernel_queue_size": (int, 256),
    "gpunetio_device_list": (str, "0"),
    "gpunetio_oob_list": (str, ""),
    "obj_access_key": (str, ""),
    "obj_secret_key": (str, ""),
    "obj_session_token": (str, ""),
    "obj_bucket_name": (str, ""),
    "obj_scheme": (str, "http"),
    "obj_region": (str, "eu-central-1"),
    "obj_use_virtual_addressing": (bool, False),
    "obj_endpoint_override": (str, ""),
    "obj_req_checksum": (str, "supported"),
    "obj_ca_bundle": (str, ""),
    "obj_crt_min_limit": (int, 0),
    "obj_accelerated_enable": (bool, False),
    "obj_accelerated_type": (str, ""),
    "azure_blob_account_url": (str, ""),
    "azure_blob_container_name": (str, ""),
    "azure_blob_connection_string": (str, ""),
    "infinia_config_file": (str, ""),
    "hf3fs_iopool_size": (int, 64),
    "gusli_client_name": (str, "NIXLBench"),
    "gusli_max_simultaneous_requests": (int, 32),
    "gusli_config_file": (str, ""),
    "gusli_device_byte_offsets": (str, ""),
    "gusli_device_security": (str, ""),
    "gusli_try_use_uring": (bool, False),
    "use_device_api": (bool, False),
}

#: Keys a ``--config_file`` TOML may carry: every flag except ``config_file`` itself.
CONFIG_FILE_KEYS: frozenset[str] = frozenset(NIXLBENCH_FLAGS) - {"config_file"}

#: Backends nixlbench treats as storage (single process, no etcd needed, initiator only).
STORAGE_BACKENDS = ("GDS", "GDS_MT", "POSIX", "HF3FS", "OBJ", "GUSLI", "AZURE_BLOB", "INFINIA")

#: nixlbench divides iterations by ``large_blk_iter_ftr`` for blocks strictly above this size.
LARGE_BLOCK_SIZE = 1 << 20

#: Fill bytes nixlbench uses for check_consistency: the initiator's buffer holds 0xbb, the
#: target (file) 0xaa; a WRITE must leave 0xbb in the file, a READ must leave 0xaa in memory.
INITIATOR_BYTE = 0xBB
TARGET_BYTE = 0xAA


def flag_default(name: str) -> Any:
    """Return nixlbench's default for ``name`` (KeyError for an unknown flag)."""
    return NIXLBENCH_FLAGS[name][1]


#: Flag-name prefixes that belong to one storage backend: nixlbench silently ignores them under
#: another backend, so a config that sets them there does not do what it says.
BACKEND_KEY_PREFIXES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("gds_mt_", ("GDS_MT",)),
    ("gds_", ("GDS",)),
    ("posix_", ("POSIX",)),
    ("obj_", ("OBJ",)),
    ("azure_blob_", ("AZURE_BLOB",)),
    ("infinia_", ("INFINIA",)),
    ("hf3fs_", ("HF3FS",)),
    ("gusli_", ("GUSLI",)),
)


def backend_of_key(name: str) -> tuple[str, ...] | None:
    """The backends a backend-specific flag applies to (None: a general flag)."""
    for prefix, backends in BACKEND_KEY_PREFIXES:
        if name.startswith(prefix):
            return backends
    return None


def check_value(name: str, value: Any) -> tuple[Any, str | None, str | None]:
    """How nixlbench reads ``value`` for flag ``name``: (value it uses, error, warning).

    Measured rules of nixlbench's ``--config_file`` reader: a boolean flag accepts ``true`` /
    ``false`` and the integers ``1`` / ``0``; an integer flag accepts an integer and a float
    with no fractional part (``64.0``); a *string* where a number (or boolean) is expected,
    such as ``"64KiB"``, is silently replaced by the default: that is a warning here (the run
    works, with another value than written). Anything else cannot mean what was written and
    is an error.
    """
    if name not in NIXLBENCH_FLAGS:
        return value, f"unknown nixlbench flag {name!r}", None
    want, default = NIXLBENCH_FLAGS[name]
    if want is bool:
        if isinstance(value, bool):
            return value, None, None
        if isinstance(value, int) and value in (0, 1):
            return bool(value), None, None
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value, None, None
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value), None, None
    elif isinstance(value, str):
        return value, None, None
    if isinstance(value, str):
        return default, None, (f"{name} = {value!r}: nixlbench expects a {want.__name__} and falls back to "
                                f"its default {default!r} for a string")
    return value, f"{name} = {value!r}: nixlbench expects a TOML {want.__name__} and would not use this", None


def check_value_type(name: str, value: Any) -> str | None:
    """Return why ``value`` cannot mean what it says for flag ``name`` (error or fallback), or None."""
    _, err, warn = check_value(name, value)
    return err or warn

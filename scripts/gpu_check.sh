#!/usr/bin/env bash
# One command for a GPU host (under 8 minutes, no network): the GPU tests, store vs raw NIXL
# GDS / GDS_MT / POSIX at 4-64 MiB with the GPU digest, nixlbench's GDS configs if a nixlbench
# binary is on PATH, and the vLLM connector TTFT check if vLLM is importable. Writes
# results/gpu_check/{summary.md,log.txt,...}.
#
# The host is expected to have Python with CUDA PyTorch, numpy, msgpack, xxhash and pytest; NIXL
# and the core's small pure-Python dependencies come from wheels carried with the checkout in
# .whl/ (scripts/fetch-gpu-wheels.sh makes them), installed into .gpu-site/, never from an index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-results/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: > "$LOG"
PY=${PYTHON:-python3}
say() { echo "$*" | tee -a "$LOG"; }
run() { say "\$ $*"; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$LOG"; return "${PIPESTATUS[0]}"; }

if ! "$PY" -c "import nixl._api" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    run "$PY" -m pip install --no-index --no-deps --quiet --upgrade --target .gpu-site .whl/*.whl || say "wheel install failed"
  else
    say "NIXL is not importable and .whl/ is empty: run scripts/fetch-gpu-wheels.sh where an index is reachable"
  fi
fi
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# NIXL's GDS plugins need libcufile.so.0 and libcudart.so.13 at dlopen time; pip's CUDA wheels
# and the toolkit keep them outside the default search path, and the loader reads
# LD_LIBRARY_PATH only at process start, so it is set here, before any Python runs.
cuda_dirs=$("$PY" - <<'PYEOF' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + glob.glob("/usr/local/cuda*/lib64") + glob.glob("/usr/local/cuda*/targets/x86_64-linux/lib")
found = []
for r in roots:
    for pat in ("libcufile.so.0", "libcudart.so.1[0-9]"):
        for f in glob.glob(os.path.join(r, "**", pat), recursive=True):
            d = os.path.dirname(os.path.realpath(f))
            if d not in found:
                found.append(d)
print(":".join(found))
PYEOF
)
[ -n "$cuda_dirs" ] && export LD_LIBRARY_PATH="$cuda_dirs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# The I/O root must take O_DIRECT (tmpfs and some overlays refuse it): the first candidate that does.
if [ -z "${GPU_IO_ROOT:-}" ]; then
  for cand in "$PWD/.gpu-io" /var/tmp/vua-gpu-io /tmp/vua-gpu-io /root/vua-gpu-io; do
    mkdir -p "$cand" 2>/dev/null || continue
    if "$PY" -c "import os,sys; fd=os.open(os.path.join(sys.argv[1],'.odirect'), os.O_RDWR|os.O_CREAT|os.O_DIRECT, 0o600); os.close(fd); os.unlink(os.path.join(sys.argv[1],'.odirect'))" "$cand" 2>/dev/null; then
      GPU_IO_ROOT=$cand; break
    fi
  done
fi
export GPU_IO_ROOT=${GPU_IO_ROOT:-$PWD/.gpu-io}

# Without the nvidia-fs driver cuFile can only run in compat mode (POSIX I/O through its own
# bounce buffer), and only if its config allows it. Such a host gets a config that does (unless
# CUFILE_ENV_PATH_JSON names one), so the GDS code path (NIXL plugin, cuFile handles, batch I/O)
# is exercised even where the bytes cannot go GPU-direct; cuFile's log lands next to the results.
# A site /etc/cufile.json is written for the driver this host lacks, so it is set aside here.
[ -e /etc/cufile.json ] && say "site cuFile config: $(grep -E '"(allow_compat_mode|use_compat_mode)"' /etc/cufile.json | tr -s ' ' | tr '\n' ' ')"
if ! ls /dev/nvidia-fs* >/dev/null 2>&1 && [ -z "${CUFILE_ENV_PATH_JSON:-}" ]; then
  cat > "$GPU_IO_ROOT/cufile.json" <<JSON
{ "logging": { "dir": "$(cd "$OUT" && pwd)", "level": "INFO" },
  "properties": { "allow_compat_mode": true, "use_compat_mode": true } }
JSON
  # auto skips GDS in compat mode (POSIX is faster there); the GPU tests are here to run it
  export CUFILE_ENV_PATH_JSON="$GPU_IO_ROOT/cufile.json" CUFILE_FORCE_COMPAT_MODE=true VUA_NIXL_GDS_COMPAT=true
fi
# cuFile learns the file system's type from udev's entry for its block device; a VM or container
# without udev has none, and then every cuFileHandleRegister fails (err 5027). Run as root on
# such a host, the script writes the minimal entry for the I/O root's device (a container on a
# real GDS host mounts /run/udev from the host instead).
io_dev=$(stat -c '%d' "$GPU_IO_ROOT" 2>/dev/null || echo 0)
io_entry="/run/udev/data/b$((io_dev >> 8 & 0xfff)):$(( (io_dev & 0xff) | (io_dev >> 12 & 0xfff00) ))"
if [ "$((io_dev >> 8 & 0xfff))" != 0 ] && [ ! -e "$io_entry" ] && [ "$(id -u)" = 0 ]; then
  mkdir -p /run/udev/data && printf 'E:ID_FS_USAGE=filesystem\nE:ID_FS_TYPE=%s\n' "$(findmnt -n -o FSTYPE -T "$GPU_IO_ROOT")" > "$io_entry" \
    && say "wrote $io_entry (no udev data for the I/O root's device: cuFile could not register files)"
fi
export VUA_NIXL_ROOT=${VUA_NIXL_ROOT:-$GPU_IO_ROOT/store}

say "## host"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
run "$PY" -c "import torch, nixl; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true
say "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
say "I/O root $GPU_IO_ROOT: $(df -T "$GPU_IO_ROOT" | tail -1)"
say "nvidia-fs: $(ls /dev/nvidia-fs* 2>/dev/null | head -1 || true) (none means cuFile runs in compat mode); cuFile config ${CUFILE_ENV_PATH_JSON:-/etc/cufile.json}"
for g in /usr/local/cuda*/gds/tools/gdscheck; do [ -x "$g" ] && { STEP_TIMEOUT=30 run "$g" -p || true; break; }; done
run "$PY" -m vua_nixl info --json || true

status=0
say "## GPU tests"
run "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_gds_logic.py --basetemp "$GPU_IO_ROOT/pytest" --junitxml="$OUT/gpu_tests.xml" || status=1

say "## store vs raw NIXL (VRAM, O_DIRECT)"
run "$PY" benchmarks/gpu_io.py --sizes 4 16 64 --total-mib 256 --root "$GPU_IO_ROOT" --out "$OUT" || status=1

if command -v nixlbench >/dev/null; then
  say "## nixlbench GDS configs"
  for cfg in nixlbench_configs/gds_*.toml; do
    run "$PY" -m vua_nixl bench storage --config "$cfg" --out "$OUT/nixlbench" || status=1
  done
else
  say "## nixlbench: not on PATH (skipped)"
fi

if "$PY" -c "import vllm" 2>/dev/null && [ -n "${VLLM_MODEL:-}" ]; then
  say "## vLLM connector TTFT ($VLLM_MODEL)"
  run "$PY" benchmarks/vllm_gpu_ttft.py --model "$VLLM_MODEL" --store-root "$PWD/.gpu-vllm-store" || status=1
else
  say "## vLLM: not installed, or VLLM_MODEL (a local model directory) not set (skipped)"
fi

{
  echo "# gpu_check $(date -u +%FT%TZ)"
  echo
  grep -E "^(name|torch|device|backend|GDS|POSIX|digests)|passed|failed|skipped" "$LOG" || true
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit "$status"

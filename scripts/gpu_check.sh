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
    run "$PY" -m pip install --no-index --no-deps --quiet --target .gpu-site .whl/*.whl || say "wheel install failed"
  else
    say "NIXL is not importable and .whl/ is empty: run scripts/fetch-gpu-wheels.sh where an index is reachable"
  fi
fi
export PYTHONPATH="$PWD/.gpu-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VUA_NIXL_ROOT=${VUA_NIXL_ROOT:-$PWD/.gpu-check-store}

say "## host"
run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
run "$PY" -c "import torch, nixl; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" || true
run "$PY" -m vua_nixl info --json || true

status=0
say "## GPU tests"
run "$PY" -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu.py tests/test_gds_logic.py --junitxml="$OUT/gpu_tests.xml" || status=1

say "## store vs raw NIXL (VRAM, O_DIRECT)"
run "$PY" benchmarks/gpu_io.py --sizes 4 16 64 --chunks 16 --root "${GPU_IO_ROOT:-$PWD/.gpu-io}" --out "$OUT" || status=1

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

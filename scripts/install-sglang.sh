#!/usr/bin/env bash
# Create (or update) a venv with SGLang, for the HiCache storage backend (dynamo_components.sglang)
# and its tests (tests/sglang_backend). SGLang's pins conflict with the main venv (transformers, torch), so it
# lives apart.
#   scripts/install-sglang.sh                                              -> .venv-sglang, SGLang 0.5.21
#   SGLANG_VERSION=0.5.23 VENV=.venv-sglang0523 scripts/install-sglang.sh  -> a second venv, SGLang 0.5.23
# Order matters (see /work/shared/ENVIRONMENT.md, "Production engines on a CPU-only machine"):
#   1. torch first: the CPU wheel 2.13.0 unless a torch is already importable (GPU users install their
#      CUDA torch first and this script leaves it alone). SGLang's own requirements would pull a CUDA
#      torch (0.5.21 pins 2.13.0, 0.5.23 pins 2.14.1) and several GB of CUDA packages.
#   2. SGLang with --no-deps.
#   3. the lean set its HiCache controller, host pools and storage backends need on CPU
#      (requirements-sglang-lock.txt, [common] + one section per SGLang line), with torch held by a
#      constraint so pip can never swap it; no torchvision (see the lock file).
#   4. this project, editable, without re-resolving dependencies.
# Idempotent: a stamp of the inputs' hash skips all of it when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
SGLANG_VERSION=${SGLANG_VERSION:-0.5.21}
VENV=${VENV:-.venv-sglang}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${VUA_NIXL_TORCH_VERSION:-2.13.0}
LOCK=requirements-sglang-lock.txt
case "$SGLANG_VERSION" in
  0.5.21) section=sglang-0.5.21 ;;
  0.5.23) section=sglang-0.5.23 ;;
  *) echo "[install-sglang] no tested dependency set for SGLang $SGLANG_VERSION (0.5.21, 0.5.23)" >&2; exit 2 ;;
esac
stamp="$VENV/.vua-nixl-sglang-installed"
want=$( (cat pyproject.toml "$LOCK" scripts/install-sglang.sh; echo "$SGLANG_VERSION $TORCH_VERSION") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
t0=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -W ignore -c "import torch" 2>/dev/null; then
  echo "[install-sglang] torch==$TORCH_VERSION (CPU wheel unless you installed a CUDA torch first)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
torch_before=$("$VENV/bin/python" -W ignore -c "import torch; print(torch.__version__)")
reqs=$(mktemp)
cons=$(mktemp)
trap 'rm -f "$reqs" "$cons"' EXIT
awk -v want="[$section]" '
  /^\[.*\]$/ { cur = $0; next }
  /^[[:space:]]*(#|$)/ { next }
  cur == "[common]" || cur == want { print }
' "$LOCK" > "$reqs"
# Keep torch where it is: a constraint makes any attempt to replace it fail loudly.
echo "torch==$torch_before" > "$cons"
echo "[install-sglang] sglang==$SGLANG_VERSION (--no-deps)"
"${PIP[@]}" install --no-deps "sglang==$SGLANG_VERSION"
echo "[install-sglang] lean SGLang dependency set + vua-nixl core ($LOCK [common] + [$section])"
"${PIP[@]}" install --no-warn-conflicts -r "$reqs" -c "$cons"  # sglang --no-deps: its full list is unmet on purpose
echo "[install-sglang] vua-nixl (editable, --no-deps)"
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2>/dev/null || "${PIP[@]}" install --no-deps -e .
torch_after=$("$VENV/bin/python" -W ignore -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
  echo "[install-sglang] torch changed from $torch_before to $torch_after: refusing" >&2
  exit 1
fi
# The import check that matters: the classes the backend and its tests drive.
"$VENV/bin/python" - <<'PY'
from dynamo_components.sglang import cpu_compat
cpu_compat.enable()
import sglang, torch
import sglang.srt.managers.cache_controller  # noqa: F401
import sglang.srt.mem_cache.memory_pool_host  # noqa: F401
import sglang.srt.mem_cache.storage.nixl.hicache_nixl  # noqa: F401
import nixl, vua_nixl  # noqa: F401
print(f"[install-sglang] sglang {sglang.__version__} torch {torch.__version__}")
PY
echo "$want" > "$stamp"
echo "[install-sglang] done: $VENV ($(( $(date +%s) - t0 )) s, $(du -sh "$VENV" | cut -f1))"

#!/usr/bin/env bash
# Create (or update) a venv with vLLM, for the vLLM KV connector (dynamo_components.vllm) and its
# tests (tests/vllm_connector). vLLM's pins conflict with the main venv (transformers, torch), so it lives apart.
#   scripts/install-vllm.sh                                         -> .venv-vllm, vLLM 0.31.0
#   VLLM_VERSION=0.33.0 VENV=.venv-vllm033 scripts/install-vllm.sh  -> a second venv, vLLM 0.33.0
# Order matters (see /work/shared/ENVIRONMENT.md, "Production engines on a CPU-only machine"):
#   1. torch first: the CPU wheel 2.13.0 unless a torch is already importable (GPU users install their
#      CUDA torch first and this script leaves it alone). vLLM's own requirements would pull a CUDA
#      torch and ~9 GB of CUDA packages.
#   2. vLLM with --no-deps.
#   3. the lean set vLLM's scheduler, config and connector code needs (requirements-vllm-lock.txt,
#      one section per vLLM line), plus the vua-nixl core dependencies and ai-dynamo-runtime (KvRouter).
#   4. this project, editable, without re-resolving dependencies.
# The torch version is checked at the end: pip must never have swapped it.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=${VLLM_VERSION:-0.31.0}
VENV=${VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${VUA_NIXL_TORCH_VERSION:-2.13.0}
LOCK=requirements-vllm-lock.txt
case "$VLLM_VERSION" in
  0.31.*) section=vllm-0.31 ;;
  0.33.*) section=vllm-0.33 ;;
  *) echo "[install-vllm] no tested dependency set for vLLM $VLLM_VERSION (0.31.x, 0.33.x)" >&2; exit 2 ;;
esac
stamp="$VENV/.vua-nixl-vllm-installed"
want=$( (cat pyproject.toml "$LOCK" scripts/install-vllm.sh; echo "$VLLM_VERSION $TORCH_VERSION") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install-vllm] torch==$TORCH_VERSION (CPU wheel unless you installed a CUDA torch first)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
torch_before=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
# Select the lines of the lock file that apply: the common ones and this vLLM line's section.
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
awk -v want="[$section]" '
  /^\[.*\]$/ { cur = $0; next }
  /^[[:space:]]*(#|$)/ { next }
  cur == "[common]" || cur == want { print }
' "$LOCK" > "$reqs"
# Keep torch where it is: a constraint makes any attempt to replace it fail loudly.
echo "torch==$torch_before" >> "$reqs.constraint"
trap 'rm -f "$reqs" "$reqs.constraint"' EXIT
echo "[install-vllm] vllm==$VLLM_VERSION (--no-deps)"
"${PIP[@]}" install --no-deps "vllm==$VLLM_VERSION"
echo "[install-vllm] lean vLLM dependency set + vua-nixl core ($LOCK [common] + [$section])"
"${PIP[@]}" install -r "$reqs" -c "$reqs.constraint"
echo "[install-vllm] vua-nixl (editable, --no-deps)"
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2>/dev/null || "${PIP[@]}" install --no-deps -e .
torch_after=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
if [ "$torch_after" != "$torch_before" ]; then
  echo "[install-vllm] torch changed from $torch_before to $torch_after: refusing" >&2
  exit 1
fi
"$VENV/bin/python" -c "import vllm, nixl, vua_nixl; print('[install-vllm] vllm', vllm.__version__, 'torch', __import__('torch').__version__)"
echo "$want" > "$stamp"
echo "[install-vllm] done: $VENV"

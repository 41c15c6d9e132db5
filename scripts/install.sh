#!/usr/bin/env bash
# Create (or update) the project venv with everything the demo, the tests and the Dynamo graph need.
#   scripts/install.sh            -> .venv
#   VENV=/path scripts/install.sh -> another venv
# Order matters:
#   1. torch first. A CPU wheel (2.13.0) unless a torch is already importable: GPU users install
#      their CUDA build first and this script leaves it alone. Installing torch later would let a
#      dependency pull the newest torch with several GB of CUDA packages.
#   2. the pinned dependency set (requirements-lock.txt), which includes ai-dynamo-runtime 1.6.1
#      and the requirements of ai-dynamo's frontend.
#   3. ai-dynamo 1.6.1 with --no-deps: from 1.5 on it depends on `aisimulate`, a placeholder that
#      only resolves on NVIDIA's index. The frontend and router run without it.
#   4. this project, editable, without re-resolving dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${VUA_NIXL_TORCH_VERSION:-2.13.0}
stamp="$VENV/.vua-nixl-installed"
want=$(cat pyproject.toml requirements-lock.txt requirements-dynamo-nodeps.txt scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[install] torch==$TORCH_VERSION (CPU wheel unless you installed a CUDA torch first)"
  "${PIP[@]}" install "torch==$TORCH_VERSION"
fi
echo "[install] pinned dependencies (requirements-lock.txt)"
"${PIP[@]}" install -r requirements-lock.txt
echo "[install] ai-dynamo frontend (--no-deps, see README)"
"${PIP[@]}" install --no-deps -r requirements-dynamo-nodeps.txt
echo "[install] vua-nixl (editable)"
"${PIP[@]}" install --no-deps --no-build-isolation -e . 2>/dev/null || "${PIP[@]}" install --no-deps -e .
echo "$want" > "$stamp"
echo "[install] done: $VENV"

#!/usr/bin/env bash
# Download, on a machine with a package index, the wheels scripts/gpu_check.sh installs on a GPU
# host that has none (Python 3.12, CUDA PyTorch already installed): NIXL's cp312 cu13 build and
# the small pure-Python wheels the core needs that such an image lacks. About 62 MiB in .whl/,
# which travels with the checkout (the device tool's `carry`).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PY=${GPU_PYTHON_VERSION:-3.12}
mkdir -p "$DEST"
pip download --no-deps --only-binary=:all: --python-version "$PY" --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$DEST" \
  nixl==1.5.1 nixl-cu13==1.5.1 pydantic==2.13.5 pydantic-core==2.46.5 pydantic-settings==2.16.3 \
  python-dotenv==1.2.4 typing-inspection==0.4.5 annotated-types==0.8.0 prometheus-client==0.26.0
du -sh "$DEST"

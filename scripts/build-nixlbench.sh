#!/usr/bin/env bash
# Build nixlbench (and the NIXL core + POSIX plugin it needs) from source on Debian 12 / Ubuntu,
# CPU only, no containers: the recipe verified in /work/shared/ENVIRONMENT.md. Sources are
# downloaded at run time on the user's machine; nothing third-party is kept in this repository.
#   scripts/build-nixlbench.sh [PREFIX]      (default ~/.local/nixlbench; ~6 min on 2 cores)
# Offline: WORK=<dir> with abseil-cpp/, nixl/ and nixl/subprojects/taskflow-X.Y.Z/ already cloned
# (at the refs below) skips every download except apt's.
# Then: export PATH=$PREFIX/wrap:$PATH   (a wrapper that sets LD_LIBRARY_PATH and
#       NIXL_PLUGIN_DIR for nixlbench only)
set -euo pipefail
PREFIX=${1:-$HOME/.local/nixlbench}
NIXL_REF=${NIXL_REF:-main}
ABSL_REF=${ABSL_REF:-20250814.1}
TASKFLOW_REF=${TASKFLOW_REF:-v3.10.0}
WORK=${WORK:-$(mktemp -d /tmp/nixlbench-build.XXXXXX)}
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
$SUDO apt-get install -y build-essential cmake pkg-config git meson ninja-build libgflags-dev libasio-dev \
  libtomlplusplus-dev libaio-dev liburing-dev pybind11-dev python3-dev
mkdir -p "$PREFIX" "$WORK" && cd "$WORK"
# abseil: Debian's is too old (no absl_log)
[ -d abseil-cpp ] || git clone --depth 1 -b "$ABSL_REF" https://github.com/abseil/abseil-cpp.git
cmake -S abseil-cpp -B absl-build -DCMAKE_CXX_STANDARD=20 -DBUILD_SHARED_LIBS=ON -DABSL_PROPAGATE_CXX_STD=ON \
  -DCMAKE_INSTALL_PREFIX="$PREFIX/absl" -DCMAKE_INSTALL_LIBDIR=lib
cmake --build absl-build -j"$(nproc)" && cmake --install absl-build
export PKG_CONFIG_PATH="$PREFIX/absl/lib/pkgconfig:$PREFIX/shim/pkgconfig:${PKG_CONFIG_PATH:-}"
# shims: Debian ships no asio.pc, and NIXL includes toml++/toml.hpp
mkdir -p "$PREFIX/shim/pkgconfig" "$PREFIX/shim/include/toml++"
printf 'Name: asio\nDescription: standalone asio\nVersion: 1.28\nCflags: -DASIO_STANDALONE\n' > "$PREFIX/shim/pkgconfig/asio.pc"
echo '#include <toml++/toml.h>' > "$PREFIX/shim/include/toml++/toml.hpp"
export CPATH="$PREFIX/shim/include:${CPATH:-}" CUDA_HOME=/nonexistent
[ -d nixl ] || git clone --depth 1 -b "$NIXL_REF" https://github.com/ai-dynamo/nixl.git
cd nixl
if [ ! -d subprojects/taskflow-${TASKFLOW_REF#v} ]; then
  git clone --depth 1 -b "$TASKFLOW_REF" https://github.com/taskflow/taskflow.git "subprojects/taskflow-${TASKFLOW_REF#v}"
fi
# the wrap's patch directory (meson.build), also for a checkout placed there beforehand (offline)
[ -f "subprojects/taskflow-${TASKFLOW_REF#v}/meson.build" ] || \
  cp subprojects/packagefiles/taskflow/meson.build "subprojects/taskflow-${TASKFLOW_REF#v}/" 2>/dev/null || true
meson setup build --prefix="$PREFIX" -Denable_plugins=POSIX -Dbuild_tests=false -Dbuild_examples=false \
  -Dwith_trace=false --wrap-mode=nodownload -Dwerror=false --reconfigure 2>/dev/null || \
meson setup build --prefix="$PREFIX" -Denable_plugins=POSIX -Dbuild_tests=false -Dbuild_examples=false \
  -Dwith_trace=false --wrap-mode=nodownload -Dwerror=false
ninja -C build && ninja -C build install
cd benchmark/nixlbench
LDFLAGS="-Wl,-rpath-link,$PREFIX/lib/x86_64-linux-gnu -Wl,-rpath-link,$PREFIX/absl/lib" \
  meson setup build --prefix="$PREFIX" -Dnixl_path="$PREFIX" --wrap-mode=nodownload
ninja -C build && ninja -C build install
# A wrapper that sets the library paths for nixlbench alone (exported in a Python process they
# would also reach the nixl wheel's own bindings).
mkdir -p "$PREFIX/wrap"
cat > "$PREFIX/wrap/nixlbench" <<EOF
#!/bin/sh
export LD_LIBRARY_PATH="$PREFIX/lib/x86_64-linux-gnu:$PREFIX/absl/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export NIXL_PLUGIN_DIR="$PREFIX/lib/x86_64-linux-gnu/plugins"
exec "$PREFIX/bin/nixlbench" "\$@"
EOF
chmod +x "$PREFIX/wrap/nixlbench"
echo "nixlbench installed in $PREFIX/bin; put $PREFIX/wrap on PATH (a wrapper that sets its library paths)"
